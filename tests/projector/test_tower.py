"""Vision-tower pretraining model: builds from a tiny LLaVA, trains, exports exactly."""
import pytest
import torch
from PIL import Image

from fam.backbones import build_tiny
from fam.projector.tower import TowerModel, export_vision_tower, llava_vision_tower

CORPUS = ["a red circle left of a blue square", "a green star above a white cross",
          "a small yellow diamond", "a large purple triangle below a cyan circle"]


@pytest.fixture(scope="module")
def llava():
    return build_tiny("llava", size="xs", image_size=56, corpus=CORPUS, seed=0)


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(56, 56, 3, generator=g) * 255).byte().numpy())
            for _ in range(n)]


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_tower_trains_and_exports_into_the_llava(llava, loss):
    torch.manual_seed(0)
    tower = TowerModel.from_llava(llava, loss=loss, text_hidden=32, projection_dim=16)
    # starts from the checkpoint's own vision weights
    src = llava_vision_tower(llava.hf_model).state_dict()
    before = {k: v.clone() for k, v in src.items()}
    for k, v in tower.clip.vision_model.state_dict().items():
        assert torch.equal(v, src[k]), k
    pix = llava.image_processor(_images(4), return_tensors="pt")["pixel_values"]
    txt = tower.encode_text(CORPUS, llava.tokenizer)
    # EOS appended at the end of each row (the pooling position)
    lengths = txt["attention_mask"].sum(1)
    assert (txt["input_ids"][torch.arange(4), lengths - 1] == llava.tokenizer.eos_token_id).all()
    opt = torch.optim.AdamW(tower.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = tower(pix, **txt)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < losses[0]              # 4 fixed pairs: the loss must fall
    export_vision_tower(tower, llava)
    dst = llava_vision_tower(llava.hf_model).state_dict()
    for k, v in tower.clip.vision_model.state_dict().items():
        assert torch.equal(v, dst[k]), k
    # training changed the tower (src holds the pre-training tensors)
    assert any(not torch.equal(v, before[k]) for k, v in dst.items())
    # the LLaVA forward uses the exported tower
    with torch.no_grad():
        feats = llava.hf_model.model.get_image_features(pixel_values=pix)
    assert torch.isfinite(getattr(feats, "pooler_output", feats)[0]).all()


def test_text_is_cut_with_the_eos_kept(llava):
    tower = TowerModel.from_llava(llava, text_hidden=32, max_text_tokens=4)
    txt = tower.encode_text(["a large purple triangle below a cyan circle"], llava.tokenizer)
    assert txt["input_ids"].shape == (1, 4)
    assert int(txt["input_ids"][0, -1]) == llava.tokenizer.eos_token_id


def test_unknown_loss_is_rejected(llava):
    with pytest.raises(ValueError, match="expected one of"):
        TowerModel.from_llava(llava, loss="mse")
