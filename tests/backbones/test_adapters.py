"""The adapter contract on tiny random models of every family."""
from __future__ import annotations

import pytest
import torch

from PIL import Image

from fam.backbones import NATIVE_FAMILIES, load_backbone
from fam.config import LoraConfig
from fam.data.types import IMAGE_PLACEHOLDER, MMItem
from fam.errors import ConfigError
from fam.model import EmbeddingModel, apply_lora, merge_lora

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava", "llava_next", "idefics3", "smolvlm"]
# At 112 px: Qwen 8×8 patches merged 2×2; LLaVA 8×8 patches; LLaVA-NeXT 4×4 base tile + 8×8
# grid + 8 newlines; Idefics3 2×2 tiles + global, 16 tokens each; SmolVLM the same, 4 each.
EXPECTED_IMAGE_TOKENS = {"qwen2_vl": 16, "qwen2_5_vl": 16, "llava": 64, "llava_next": 88,
                         "idefics3": 80, "smolvlm": 20}
#: Where each family keeps its language model (LoRA must touch nothing else).
LM_NAME = {"idefics3": "text_model", "smolvlm": "text_model"}


def test_every_native_family_is_in_the_contract_suite():
    assert sorted(FAMILIES) == sorted(NATIVE_FAMILIES)


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
    # float32 model: padding changes attention sum lengths and matmul blocking; 1e-4 ≈ 1700 ulps
    torch.testing.assert_close(outs["left"], outs["right"], rtol=1e-4, atol=1e-5)
    # and equal to encoding each item alone (no cross-talk through padding)
    with torch.no_grad():
        single = torch.cat([m(a.encode([it])).embedding for it in items])
    # float32 model: batch size changes matmul blocking; 1e-4 ≈ 1700 ulps
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
    assert all(LM_NAME.get(family, "language_model") in n for n in trainable)
    lm_params = {id(p) for p in a.language_model().parameters()}
    assert all(id(p) in lm_params for p in m.parameters() if p.requires_grad)
    m.eval()
    items = _items(scene_images)
    with torch.no_grad():
        e_base = m(a.encode(items)).embedding  # lora_B starts at zero: the base model's output
    # make LoRA non-trivial, then compare adapter model vs merged model
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    with torch.no_grad():
        e_lora = m(a.encode(items)).embedding
    # Negative control: the adapter really changes the outputs, by far more than the merge
    # tolerance below, so "merged == adapter" cannot pass by both equalling the base model.
    assert (e_lora - e_base).abs().max() > 100 * 1e-5
    merge_lora(m)
    assert not any("lora_" in n for n, _ in m.named_parameters())
    with torch.no_grad():
        e_merged = m(a.encode(items)).embedding
    # float32: W + BA folded into one weight rounds differently from Wx + B(Ax)
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


# ----------------------------------------------------------------------------- family specifics

def test_llava_next_token_count_matches_the_model_on_every_aspect_ratio(tiny_dirs):
    """The anyres count (base tile + unpadded grid + newlines) equals the model's features."""
    a = load_backbone(tiny_dirs["llava_next"])
    sizes = [(112, 112), (150, 100), (90, 130), (300, 60), (40, 200), (57, 56), (1000, 333),
             (20, 20)]  # (W, H): square, landscape, portrait, extreme, tiny
    ims = [Image.new("RGB", s, (40 * i % 255, 120, 60)) for i, s in enumerate(sizes)]
    pix, counts = a.process_images(ims)
    with torch.no_grad():
        feats = a.hf_model.model.get_image_features(**pix).pooler_output
    assert [f.shape[0] for f in feats] == counts
    assert len(set(counts)) > 4  # the sizes really exercise different grids/unpadding
    # the model's own check (it raises on a token/feature mismatch) on a mixed batch
    items = [MMItem(f"{IMAGE_PLACEHOLDER} Represent the given image.", None) for _ in ims]
    b = a.encode(items + [MMItem("short", None)], images=ims + [None])
    assert b.image_mask.sum(1).tolist() == counts + [0]
    with torch.no_grad():
        a.forward(b)
        b.inputs["input_ids"][0, b.image_mask[0].nonzero()[0, 0]] = a.pad_token_id
        with pytest.raises(Exception, match="do not match"):
            a.forward(b)


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_idefics3_block_is_the_processors(family, tiny_dirs, scene_images):
    """Token for token what transformers' Idefics3Processor builds (SmolVLM's is the same)."""
    import copy
    from transformers import Idefics3Processor
    a = load_backbone(tiny_dirs[family])
    proc = Idefics3Processor(image_processor=a.image_processor,
                             tokenizer=copy.deepcopy(a.tokenizer), image_seq_len=a.image_seq_len)
    text = "Represent the given image."
    for p in scene_images:
        im = Image.open(p).convert("RGB")
        ref = proc(images=[[im]], text=[f"<image>\n{text}"], add_special_tokens=False)
        ours = a.encode([MMItem(f"{IMAGE_PLACEHOLDER}\n{text}", p)])
        ids = ours.inputs["input_ids"][0].tolist()
        assert ids[0] == a.tokenizer.bos_token_id and ids[-1] == a.eos_token_id
        assert ids[1:-1] == list(ref["input_ids"][0])
        assert ours.image_mask.sum() == (ours.inputs["input_ids"] == a.config.image_token_id).sum()
    # an unsplit image (fits one tile): <fake><global-img><image>×n<fake>, no row tags
    from fam.backbones.idefics3 import SplitCount
    ids, img = a.image_block(SplitCount(a.image_seq_len, 0, 0))
    n = a.image_seq_len
    assert ids == [a.fake_token_id, a.global_token_id] + [a.image_token_id] * n + [a.fake_token_id]
    assert sum(img) == n
    with pytest.raises(ValueError, match="do not fit"):
        a.image_block(SplitCount(n + 1, 0, 0))


@pytest.mark.parametrize("family", FAMILIES)
def test_several_images_per_item(family, tiny_dirs, scene_images):
    """``<|image_1|>``/``<|image_2|>`` in one text with a list of images; the model accepts it."""
    a = load_backbone(tiny_dirs[family])
    ims = [Image.open(p).convert("RGB") for p in scene_images[:2]]
    counts = a.process_images(ims)[1]
    items = [MMItem("<|image_2|> is left of <|image_1|>", None), MMItem("short", None),
             MMItem(f"{IMAGE_PLACEHOLDER} one image", None)]
    m = EmbeddingModel(a).eval()
    outs = {}
    for side in ("right", "left"):
        a.padding_side = side
        b = a.encode(items, images=[ims, None, ims[0]])
        assert b.image_mask.sum(1).tolist() == [sum(counts), 0, counts[0]]
        assert b.has_image.tolist() == [True, False, True]
        # image 2's block comes first (the text says so)
        first_text = b.text_mask[0].nonzero()[0, 0]
        assert int(b.image_mask[0, :first_text].sum()) == counts[1]
        assert a.tokenizer.decode(b.inputs["input_ids"][0][b.text_mask[0]].tolist()).split() == \
            ["is", "left", "of"]
        with torch.no_grad():
            outs[side] = m(b).embedding  # the model's own token/feature check runs here
    torch.testing.assert_close(outs["left"], outs["right"], rtol=1e-4, atol=1e-5)
    # features follow the tags, not the list order: "<|image_2|> x <|image_1|>" with [A, B]
    # is the sequence B x A, i.e. "<|image_1|> x <|image_2|>" with [B, A]
    in_order = MMItem("<|image_1|> is left of <|image_2|>", None)
    with torch.no_grad():
        b_x_a = m(a.encode([in_order], images=[ims[::-1]])).embedding
        a_x_b = m(a.encode([in_order], images=[ims])).embedding
        a_x_b2 = m(a.encode(items[:1], images=[ims[::-1]])).embedding
    # float32 model, different batch/padding: summation order only
    torch.testing.assert_close(b_x_a, outs["left"][:1], rtol=1e-4, atol=1e-5)
    # float32 model, different batch/padding: summation order only
    torch.testing.assert_close(a_x_b2, a_x_b, rtol=1e-4, atol=1e-5)
    # must differ by more than the float32 padding noise allowed above
    assert not torch.allclose(a_x_b, b_x_a, atol=1e-4)


def test_placeholders_without_images_are_dropped_and_unreferenced_images_go_first(tiny_dirs,
                                                                                  scene_images):
    a = load_backbone(tiny_dirs["qwen2_vl"])
    im = Image.open(scene_images[0]).convert("RGB")
    n = a.process_images([im])[1][0]
    # <|image_2|> has no image: dropped; the text has no <|image_1|>: the image goes first
    b = a.encode([MMItem("see <|image_2|> here", None)], images=[[im]])
    ids = b.inputs["input_ids"][0]
    assert int(b.image_mask.sum()) == n and bool(b.image_mask[0, 1])
    assert a.tokenizer.decode(ids[b.text_mask[0]].tolist()).split() == ["see", "here"]


# ----------------------------------------------------------------------------- Phi-3.5-V
# No remote code is available offline, so a fake processor and model stand in for
# Phi3VImageProcessor / Phi3VForCausalLM. They reproduce only the interface the adapter
# relies on: the processor returns pixel_values (n, 1 + max_crops, 3, h, w), image_sizes and
# num_img_tokens; the model fills positions with input_ids < 0 image after image, each
# image's tokens contiguous (as Phi3ImageEmbedding does), and runs a tiny Llama.

class _FakePhi3VImageProcessor:
    def __call__(self, images, return_tensors="pt"):
        n_crops = [(im.width // 50) * (im.height // 50) for im in images]
        pv = torch.zeros(len(images), 1 + max(n_crops), 3, 4, 4)
        for i, im in enumerate(images):
            t = torch.tensor(list(im.resize((4, 4)).getdata()), dtype=torch.float32)
            pv[i, :1 + n_crops[i]] = t.T.reshape(3, 4, 4) / 255.0
        sizes = torch.tensor([[im.height, im.width] for im in images])
        return {"pixel_values": pv, "image_sizes": sizes,
                "num_img_tokens": [3 * (1 + c) for c in n_crops]}  # global + crops, 3 each

    def save_pretrained(self, path):
        pass


class _FakePhi3VInner(torch.nn.Module):
    def __init__(self, llama):
        super().__init__()
        self.llama = llama
        self.img_proj = torch.nn.Linear(3 * 16, llama.config.hidden_size)

    def forward(self, input_ids, attention_mask, pixel_values=None, image_sizes=None, **kw):
        emb = self.llama.embed_tokens(input_ids.clamp(min=0))
        pos = (input_ids < 0).nonzero()
        if len(pos):
            n_crops = [(int(w) // 50) * (int(h) // 50) for h, w in image_sizes.tolist()]
            feats = [self.img_proj(pixel_values[i, :1 + c].flatten(1)).repeat(3, 1)
                     for i, c in enumerate(n_crops)]
            flat = torch.cat(feats)
            if flat.shape[0] != pos.shape[0]:
                raise ValueError(f"{pos.shape[0]} image tokens for {flat.shape[0]} features")
            emb = emb.clone()
            emb[pos[:, 0], pos[:, 1]] = flat
        return self.llama(inputs_embeds=emb, attention_mask=attention_mask, **kw)


class _FakePhi3V(torch.nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel
        torch.manual_seed(0)
        self.config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
        self.model = _FakePhi3VInner(LlamaModel(self.config))

    def get_input_embeddings(self):
        return self.model.llama.embed_tokens


@pytest.fixture(scope="module")
def phi3v():
    from transformers import PreTrainedTokenizerFast
    from fam.backbones import Phi3VAdapter
    from fam.backbones.tokenizer import train_bpe_tokenizer
    specials = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|image|>"]
    tok = PreTrainedTokenizerFast(tokenizer_object=train_bpe_tokenizer([], specials, 400),
                                  bos_token="<s>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", unk_token="<unk>")
    # Phi-3.5-V's Llama tokenizer adds <s> to every chunk it tokenises.
    from tokenizers import processors
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.convert_tokens_to_ids("<s>"))])
    return Phi3VAdapter(_FakePhi3V(len(tok)).eval(), tok, _FakePhi3VImageProcessor())


def test_phi3v_layout_negative_ids_and_masks(phi3v, scene_images):
    a = phi3v
    ims = [Image.open(p).convert("RGB") for p in scene_images]
    counts = a.process_images(ims)[1]
    bos = a.tokenizer.bos_token_id
    items = [MMItem(f"{IMAGE_PLACEHOLDER}\nRepresent the given image.", None),
             MMItem("<|image_1|> and <|image_2|>", None), MMItem("short", None)]
    for side in ("right", "left"):
        a.padding_side = side
        b = a.encode(items, images=[ims[0], ims[1:], None])
        ids = b.inputs["input_ids"]
        assert torch.equal(b.image_mask, ids < 0)
        assert b.image_mask.sum(1).tolist() == [counts[0], counts[1] + counts[2], 0]
        assert (ids[torch.arange(3), b.eos_index] == a.eos_token_id).all()
        # Phi3VProcessor's layout: <s> chunk [-1]×N <s> chunk ... ; image k is -k
        row = ids[0][b.inputs["attention_mask"][0].bool()].tolist()
        assert row[:1 + counts[0] + 1] == [bos] + [-1] * counts[0] + [bos]
        row1 = ids[1][b.inputs["attention_mask"][1].bool()].tolist()
        assert row1.count(-1) == counts[1] and row1.count(-2) == counts[2]
        assert row1.index(-2) > row1.index(-1)
        assert a.tokenizer.decode(ids[0][b.text_mask[0]].tolist()).strip() == \
            "Represent the given image."
        assert not (b.text_mask & b.image_mask).any()
    # EOS pooling is padding-invariant through a model that consumes negative ids
    m = EmbeddingModel(a).eval()
    with torch.no_grad():
        a.padding_side = "right"
        e_r = m(a.encode(items, images=[ims[0], ims[1:], None])).embedding
        a.padding_side = "left"
        e_l = m(a.encode(items, images=[ims[0], ims[1:], None])).embedding
        single = m(a.encode(items[:1], images=[ims[0]])).embedding
    # float32 model: padding side changes summation order only
    torch.testing.assert_close(e_l, e_r, rtol=1e-4, atol=1e-5)
    # float32 model: batch size changes summation order only
    torch.testing.assert_close(single[0], e_r[0], rtol=1e-4, atol=1e-5)


def test_phi3v_needs_an_explicit_opt_in(tmp_path):
    import json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3_v"}))
    with pytest.raises(ConfigError, match="trust_remote_code=True"):
        load_backbone(tmp_path)
    from fam.backbones import Phi3VAdapter, build_tiny
    with pytest.raises(ConfigError, match="trust_remote_code=True"):
        Phi3VAdapter.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="no native transformers class"):
        build_tiny("phi3_v")


def test_phi3v_lora_targets_only_the_decoder():
    """Against Phi-3.5-vision-instruct's module names (fused qkv/gate_up; CLIP tower inside)."""
    import re
    from fam.backbones import Phi3VAdapter
    pat = re.compile(Phi3VAdapter.lora_target_modules(None))
    lm = ["model.layers.0.self_attn.qkv_proj", "model.layers.31.self_attn.o_proj",
          "model.layers.3.mlp.gate_up_proj", "model.layers.3.mlp.down_proj"]
    other = ["model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.self_attn.q_proj",
             "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.mlp.fc1",
             "model.vision_embed_tokens.img_projection.0", "lm_head", "model.embed_tokens"]
    assert all(pat.fullmatch(n) for n in lm)
    assert not any(pat.fullmatch(n) for n in other)


def test_dora_wraps_and_merges_exactly(tiny_dirs, scene_images):
    a = load_backbone(tiny_dirs["qwen2_vl"])
    m = EmbeddingModel(a)
    apply_lora(m, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, use_dora=True))
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)
    m.eval()
    items = _items(scene_images)
    with torch.no_grad():
        e_base = m(a.encode(items)).embedding  # lora_B starts at zero: the base model's output
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        before = m(a.encode(items)).embedding
    # Negative control: the adapter changes the outputs by far more than the tolerance below.
    assert (before - e_base).abs().max() > 100 * 1e-5
    merge_lora(m)
    with torch.no_grad():
        after = m(a.encode(items)).embedding
    # float32: DoRA's merged weight (magnitude × normalised W + BA) rounds differently
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_phi3v_vlm2vec_format_is_the_processors_chunks_without_eos(phi3v, scene_images):
    """VLM2Vec's Phi3VProcessor (processing_phi3_v.py L149-201): split at <|image_k|>, each
    chunk tokenised with the tokenizer's specials, image k as -k × its token count, nothing
    appended; a text-only item is one tokenizer call."""
    import re

    from fam.backbones import Phi3VAdapter
    a = Phi3VAdapter(phi3v.model, phi3v.tokenizer, phi3v.image_processor, prompt_format="vlm2vec")
    assert a.max_text_tokens is None
    ims = [Image.open(p).convert("RGB") for p in scene_images[:2]]
    counts = a.process_images(ims)[1]
    texts = [f"{IMAGE_PLACEHOLDER}\nRepresent the given image.", "<|image_1|> and <|image_2|>",
             "Represent the given text: a red circle"]
    b = a.encode([MMItem(t) for t in texts], images=[ims[0], ims, None])
    tok = a.tokenizer
    for row, text in enumerate(texts):
        tags = [int(t) for t in re.findall(r"<\|image_(\d+)\|>", text)]
        chunks = [tok(c)["input_ids"] for c in re.split(r"<\|image_\d+\|>", text)]
        want = list(chunks[0])
        for k, chunk in zip(tags, chunks[1:]):
            want += [-k] * counts[k - 1] + list(chunk)
        real = b.inputs["attention_mask"][row].bool()
        assert b.inputs["input_ids"][row][real].tolist() == want
        assert int(b.eos_index[row]) == len(want) - 1
        assert b.inputs["position_ids"][row][real].tolist() == list(range(len(want)))
    pooled = b.inputs["input_ids"][torch.arange(3), b.eos_index]
    assert (pooled != a.eos_token_id).all()  # the last real token, never an appended EOS
