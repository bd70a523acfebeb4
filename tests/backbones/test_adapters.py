"""The adapter contract on tiny random models of every family."""
from __future__ import annotations

import pytest
import torch

from fam.backbones import load_backbone
from fam.data.types import IMAGE_PLACEHOLDER, MMItem
from fam.model import EmbeddingModel, apply_lora, merge_lora
from fam.config import LoraConfig

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava"]
EXPECTED_IMAGE_TOKENS = {"qwen2_vl": 16, "qwen2_5_vl": 16, "llava": 64}  # at 112 px


def _items(paths):
    cap = "a red circle left of a blue square"
    head = "Find me an everyday image that matches the given caption: "
    return [
        MMItem(f"{IMAGE_PLACEHOLDER}\nRepresent the given image.", paths[0]),
        MMItem(head + cap, None, content=(len(head), len(head) + len(cap))),
        MMItem("Represent the given image for classification.", paths[1]),  # no placeholder
        MMItem("short", None),
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_masks_point_at_the_right_tokens(family, tiny_dirs, scene_images):
    a = load_backbone(tiny_dirs[family])
    items = _items(scene_images)
    for side in ("right", "left"):
        a.padding_side = side
        b = a.encode(items)
        ids, attn = b.inputs["input_ids"], b.inputs["attention_mask"]
        img_id = a.config.image_token_id
        # image tokens: exactly where the config's image token sits, the expected count
        assert torch.equal(b.image_mask, ids == img_id)
        n_img = EXPECTED_IMAGE_TOKENS[family]
        # the non-square image gets what the family's processor says (aspect kept by Qwen)
        from PIL import Image
        n_img2 = a.process_images([Image.open(scene_images[1]).convert("RGB")])[1][0]
        assert b.image_mask.sum(1).tolist() == [n_img, 0, n_img2, 0]
        # eos: the last real token, and it is the eos id
        assert (ids[torch.arange(4), b.eos_index] == a.eos_token_id).all()
        lengths = attn.sum(1)
        if side == "right":
            assert torch.equal(b.eos_index, lengths - 1)
        else:
            assert (b.eos_index == ids.shape[1] - 1).all()
        # no mask touches padding; image and text masks are disjoint
        assert not (b.image_mask & (attn == 0)).any()
        assert not (b.text_mask & (attn == 0)).any()
        assert not (b.image_mask & b.text_mask).any()
        # the content tokens decode back to the content (only the caption for item 1)
        tok = a.tokenizer
        dec = tok.decode(ids[1][b.text_mask[1]].tolist()).strip()
        assert dec == "a red circle left of a blue square"
        dec0 = tok.decode(ids[0][b.text_mask[0]].tolist()).strip()
        assert dec0 == "Represent the given image."
        assert tok.decode(ids[3][b.text_mask[3]].tolist()).strip() == "short"
        # special tokens are never text-content tokens
        specials = torch.tensor(sorted(tok.all_special_ids))
        assert not torch.isin(ids[b.text_mask], specials).any()


@pytest.mark.parametrize("family", FAMILIES)
def test_left_and_right_padding_give_the_same_embeddings(family, tiny_dirs, scene_images):
    a = load_backbone(tiny_dirs[family])
    m = EmbeddingModel(a).eval()
    items = _items(scene_images)
    outs = {}
    for side in ("right", "left"):
        a.padding_side = side
        with torch.no_grad():
            outs[side] = m(a.encode(items)).embedding
    torch.testing.assert_close(outs["left"], outs["right"], rtol=1e-4, atol=1e-5)
    # and equal to encoding each item alone (no cross-talk through padding)
    with torch.no_grad():
        single = torch.cat([m(a.encode([it])).embedding for it in items])
    torch.testing.assert_close(single, outs["right"], rtol=1e-4, atol=1e-5)
    assert torch.allclose(outs["right"].norm(dim=-1), torch.ones(4))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_is_identical(family, tiny_dirs, scene_images, tmp_path):
    a = load_backbone(tiny_dirs[family])
    items = _items(scene_images)
    m = EmbeddingModel(a).eval()
    with torch.no_grad():
        e1 = m(a.encode(items)).embedding
    a.save_pretrained(tmp_path / "copy")
    b = load_backbone(tmp_path / "copy")
    with torch.no_grad():
        e2 = EmbeddingModel(b).eval()(b.encode(items)).embedding
    assert torch.equal(e1, e2)
    assert b.tokenizer.get_vocab() == a.tokenizer.get_vocab()


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_wraps_language_model_only_and_merge_is_exact(family, tiny_dirs, scene_images):
    a = load_backbone(tiny_dirs[family])
    m = EmbeddingModel(a)
    apply_lora(m, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all("language_model" in n for n in trainable)
    # make LoRA non-trivial, then compare adapter model vs merged model
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    m.eval()
    items = _items(scene_images)
    with torch.no_grad():
        e_lora = m(a.encode(items)).embedding
    merge_lora(m)
    assert not any("lora_" in n for n, _ in m.named_parameters())
    with torch.no_grad():
        e_merged = m(a.encode(items)).embedding
    torch.testing.assert_close(e_merged, e_lora, rtol=1e-5, atol=1e-5)


def test_hidden_states_layers_and_gradients(tiny_dirs, scene_images):
    a = load_backbone(tiny_dirs["qwen2_vl"])
    m = EmbeddingModel(a)
    out = m(a.encode(_items(scene_images)), layers=[-1, -2, 1])
    n = a.num_layers
    assert set(out.hidden_states) == {n, n - 1, 1}
    assert out.hidden_states[n].shape[-1] == a.hidden_size
    out.embedding.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in a.model.parameters())
    with pytest.raises(ValueError, match="out of range"):
        m.resolve_layer(n + 1)


def test_truncation_keeps_image_block_and_eos(tiny_dirs, scene_images):
    a = load_backbone(tiny_dirs["qwen2_vl"], max_text_tokens=5)
    long = " ".join(["red circle"] * 30)
    b = a.encode([MMItem(f"{IMAGE_PLACEHOLDER} {long}", scene_images[0])])
    assert int(b.image_mask.sum()) == 16
    assert int(b.text_mask.sum()) <= 5
    assert int(b.inputs["input_ids"][0, b.eos_index[0]]) == a.eos_token_id


def test_missing_image_error_names_the_row(tiny_dirs, tmp_path):
    from fam.errors import DataError
    a = load_backbone(tiny_dirs["qwen2_vl"])
    bad = tmp_path / "nope.png"
    with pytest.raises(DataError, match="nope.png") as ei:
        a.encode([MMItem("x", bad, source="train.jsonl", line=7, field="qry_image_path")])
    assert "train.jsonl" in str(ei.value) and "line 7" in str(ei.value)
    assert "qry_image_path" in str(ei.value)
