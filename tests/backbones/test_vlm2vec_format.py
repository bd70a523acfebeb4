"""Golden tests: ``prompt_format="vlm2vec"`` feeds the model what VLM2Vec's v1 code feeds it.

The expected values are built here from VLM2Vec's documented rules (docs/vlm2vec.md, with
file/line references into TIGER-AI-Lab/VLM2Vec@v1), independently of fam's adapter code:

- R1 ``src/dataset.py`` L80-85/L129-130: ``<|image_1|>`` is replaced by the family's token,
  ``<|image_pad|>`` for Qwen2-VL / Qwen2.5-VL (``src/model_utils.py`` L29-34).
- R2 ``src/dataset.py`` L16-29: optional pre-resize (``high`` 1344², ``mid`` 672², ``low``
  128²) of the opened image, in its own mode.
- R3 the processor converts to RGB: transformers 4.46 ``convert_to_rgb`` = ``convert("RGB")``.
- R4 ``processing_qwen2_vl.py`` L133-155: each ``<|image_pad|>`` is expanded to
  ``prod(image_grid_thw) / merge_size²`` copies, then the whole string is tokenised once
  (``max_len`` None: no truncation, ``src/arguments.py`` L84-87); nothing is appended.
- R5 ``src/model.py`` L40-52: the pooled token is the last real one (right padding:
  ``attention_mask.sum() - 1``); L55-56 L2 normalisation.
- R6 ``modeling_qwen2_vl.py`` L1458-1513 (get_rope_index): images are counted only after a
  ``<|vision_start|>``; with none, every real token gets position ``0..n-1`` on all three
  M-RoPE axes.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fam.backbones import load_backbone
from fam.data.types import MMItem
from fam.model import EmbeddingModel

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
# A pixel budget wide enough that a non-square image keeps a non-square grid (tiny presets
# fix min = max = 112², which would square every image).
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 16

LONG = " ".join(f"the {c} {s} number {i} is left of the next one" for i, (c, s) in enumerate(
    [("red", "circle"), ("blue", "square"), ("green", "star"), ("pink", "heart")] * 12))


def _image(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    ch = 4 if mode == "RGBA" else 3
    arr = rng.integers(0, 256, (h, w, ch), dtype=np.uint8)
    if mode == "RGBA":  # a real alpha gradient, fully transparent on the left edge
        arr[..., 3] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    return Image.fromarray(arr, mode)


def _cases() -> list[tuple[str, str, Image.Image | None]]:
    """(name, text, image): the acceptance list of item kinds."""
    return [
        ("image+instruction", "<|image_1|>\nRepresent the given image.", _image(112, 112, 0)),
        ("text only", "Find me an everyday image that matches the given caption: a red circle "
                      "left of a blue square", None),
        ("image+long text", "<|image_1|> Represent the given image with the following "
                            "question: " + LONG[:300], _image(100, 100, 1)),
        ("non-square image", "<|image_1|>\nRepresent the given image for classification.",
         _image(150, 100, 2)),
        ("placeholder mid-text", "Select the portion of the image <|image_1|> that isolates the "
                                 "object labeled as red circle", _image(90, 130, 3)),
        ("long text", LONG, None),
        ("rgba image", "<|image_1|>\nRepresent the given image.", _image(120, 80, 4, "RGBA")),
    ]


def _expected(adapter, text: str, image: Image.Image | None, resolution: int | None = None):
    """VLM2Vec's inputs for one item, by rules R1-R4 (not by fam's adapter code)."""
    tok, proc = adapter.tokenizer, adapter.image_processor
    text = text.replace("<|image_1|>", "<|image_pad|>")  # R1
    pixels = grid = None
    if image is not None:
        if resolution is not None:
            image = image.resize((resolution, resolution))  # R2
        image = image.convert("RGB")  # R3
        out = proc(images=[image], return_tensors="pt")
        pixels, grid = out["pixel_values"], out["image_grid_thw"]
        n = int(grid[0].prod()) // proc.merge_size ** 2  # R4
        text = text.replace("<|image_pad|>", "<|placeholder|>" * n, 1).replace(
            "<|placeholder|>", "<|image_pad|>")
    ids = tok(text)["input_ids"]  # R4: one call, no truncation, nothing appended
    return ids, pixels, grid


def _reference_embedding(adapter, ids, pixels, grid) -> torch.Tensor:
    """R5 + R6: a plain forward of the checkpoint with sequential positions, last token."""
    L = len(ids)
    kw = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, L, dtype=torch.long),
              position_ids=torch.arange(L).view(1, 1, L).expand(3, 1, L), use_cache=False)
    if pixels is not None:
        kw.update(pixel_values=pixels, image_grid_thw=grid)
    with torch.no_grad():
        h = adapter.hf_model.model(**kw).last_hidden_state
    return F.normalize(h[0, -1].float(), dim=-1)


@pytest.fixture(scope="module", params=FAMILIES)
def vlm2vec(request, tiny_dirs):
    return load_backbone(tiny_dirs[request.param], prompt_format="vlm2vec",
                         min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def test_options_are_kept_and_the_long_text_is_long(vlm2vec):
    a = vlm2vec
    assert a.prompt_format == "vlm2vec"
    assert a.max_text_tokens is None  # VLM2Vec does not truncate
    assert a.pixel_budget == (MIN_PIXELS, MAX_PIXELS)
    assert len(a.tokenizer(LONG)["input_ids"]) > 128


@pytest.mark.parametrize("side", ["right", "left"])
def test_ids_pooled_position_and_positions_are_vlm2vecs(vlm2vec, side):
    a = vlm2vec
    a.padding_side = side
    cases = _cases()
    items = [MMItem(text) for _, text, _ in cases]
    b = a.encode(items, [im for _, _, im in cases])
    ids, attn = b.inputs["input_ids"], b.inputs["attention_mask"]
    assert "mm_token_type_ids" not in b.inputs  # no M-RoPE: positions are given explicitly
    for row, (name, text, image) in enumerate(cases):
        want, _, _ = _expected(a, text, image)
        real = attn[row].bool()
        assert ids[row][real].tolist() == want, name
        # R5: the pooled token is the last real one, and no EOS was appended
        assert int(b.eos_index[row]) == int(real.nonzero().max()), name
        assert ids[row, b.eos_index[row]].item() == want[-1], name
        # R6: 0..n-1 over the real tokens, image tokens included
        pos = b.inputs["position_ids"][row][real]
        assert pos.tolist() == list(range(len(want))), name
        assert int(b.image_mask[row].sum()) == want.count(a.image_token_id), name
    # the > 128-token text is kept whole
    assert int(attn[5].sum()) == len(a.tokenizer(LONG)["input_ids"]) > 128


def test_pooled_embedding_equals_a_sequential_position_reference_forward(vlm2vec):
    a = vlm2vec
    a.padding_side = "right"
    cases = _cases()
    emb = EmbeddingModel(a).eval()
    with torch.no_grad():
        got = emb(a.encode([MMItem(t) for _, t, _ in cases], [im for _, _, im in cases])).embedding
    for row, (name, text, image) in enumerate(cases):
        ref = _reference_embedding(a, *_expected(a, text, image))
        # float32, 2-layer tiny model, batched (padded, mixed-image) vs a single-item forward:
        # differences are accumulation-order rounding, ~1e-6 here.
        assert torch.allclose(got[row], ref, atol=1e-4), (name, (got[row] - ref).abs().max())


def test_same_weights_other_embeddings_in_fams_format(vlm2vec, tiny_dirs):
    """The formats really differ on one checkpoint (what makes MMEB numbers move)."""
    a = vlm2vec
    fam = load_backbone(tiny_dirs[a.family], min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    cases = _cases()[:1]
    items, ims = [MMItem(t) for _, t, _ in cases], [im for _, _, im in cases]
    with torch.no_grad():
        e_v = EmbeddingModel(a)(a.encode(items, ims)).embedding
        e_f = EmbeddingModel(fam)(fam.encode(items, ims)).embedding
    assert (e_v - e_f).abs().max() > 1e-3


@pytest.mark.parametrize("resolution,size", [("low", 128), ("high", 1344), (336, 336)])
def test_image_resolution_pre_resizes_before_the_processor(tiny_dirs, resolution, size):
    a = load_backbone(tiny_dirs["qwen2_vl"], prompt_format="vlm2vec", image_resolution=resolution,
                      min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    text, image = "<|image_1|>\nRepresent the given image.", _image(150, 60, 5)
    b = a.encode([MMItem(text)], [image])
    want, pixels, grid = _expected(a, text, image, resolution=size)
    assert b.inputs["input_ids"][0].tolist() == want
    assert torch.equal(b.inputs["image_grid_thw"], grid)
    assert torch.equal(b.inputs["pixel_values"], pixels)


def test_rgba_follows_each_formats_processor(tiny_dirs):
    rgba = _image(120, 80, 6, "RGBA")
    item = [MMItem("<|image_1|>\nRepresent the given image.")]
    fam = load_backbone(tiny_dirs["qwen2_vl"], min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    v2v = load_backbone(tiny_dirs["qwen2_vl"], prompt_format="vlm2vec",
                        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    proc = fam.image_processor
    # fam: what the installed (transformers 5) processor does with the RGBA image itself
    composited = proc(images=[rgba], return_tensors="pt")["pixel_values"]
    dropped = proc(images=[rgba.convert("RGB")], return_tensors="pt")["pixel_values"]
    assert (composited - dropped).abs().max() > 0.5  # the two rules really differ here
    assert torch.equal(fam.encode(item, [rgba]).inputs["pixel_values"], composited)
    # vlm2vec: transformers 4.46's convert_to_rgb, i.e. Image.convert("RGB")
    assert torch.equal(v2v.encode(item, [rgba]).inputs["pixel_values"], dropped)


def test_truncation_is_explicit_and_logged(tiny_dirs, caplog):
    image = _image(112, 112, 7)
    item = MMItem("<|image_1|> " + LONG)
    n_long = len(load_backbone(tiny_dirs["qwen2_vl"]).tokenizer(LONG)["input_ids"])
    # fam's default keeps 128 text tokens (+ EOS) and says so
    fam = load_backbone(tiny_dirs["qwen2_vl"])
    with caplog.at_level(logging.WARNING, logger="fam.backbones.base"):
        b = fam.encode([MMItem(LONG)])
    assert b.inputs["input_ids"].shape[1] == 129
    assert fam.truncated_items == 1 and "max_text_tokens=128 cut" in caplog.text
    # none = no limit
    assert load_backbone(tiny_dirs["qwen2_vl"], max_text_tokens=None).encode(
        [MMItem(LONG)]).inputs["input_ids"].shape[1] == n_long + 1
    # vlm2vec with an explicit cap: the first text tokens stay, every image token stays
    caplog.clear()
    v = load_backbone(tiny_dirs["qwen2_vl"], prompt_format="vlm2vec", max_text_tokens=10)
    with caplog.at_level(logging.WARNING, logger="fam.backbones.base"):
        b = v.encode([item], [image])
    ids = b.inputs["input_ids"][0].tolist()
    full, _, _ = _expected(v, item.text, image)
    n_img = full.count(v.image_token_id)
    assert ids.count(v.image_token_id) == n_img and len(ids) == n_img + 10
    assert ids == full[:n_img + 10]  # the image comes first here, then the kept text
    assert v.truncated_items == 1 and "max_text_tokens=10 cut" in caplog.text


def test_settings_are_saved_with_the_model_and_reloaded(tiny_dirs, tmp_path):
    import json
    a = load_backbone(tiny_dirs["qwen2_vl"], prompt_format="vlm2vec", image_resolution="low",
                      min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    a.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "fam_backbone.json").read_text())
    assert saved == {"family": "qwen2_vl", "prompt_format": "vlm2vec", "image_resolution": "low",
                     "max_text_tokens": None, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
    b = load_backbone(tmp_path / "m")
    assert (b.prompt_format, b.image_resolution, b.max_text_tokens, b.pixel_budget) == \
        ("vlm2vec", "low", None, (MIN_PIXELS, MAX_PIXELS))
    # an explicit option wins over the saved one
    c = load_backbone(tmp_path / "m", prompt_format="fam")
    assert (c.prompt_format, c.max_text_tokens, c.image_resolution) == ("fam", 128, "low")


def test_options_are_validated(tiny_dirs):
    from fam.errors import ConfigError
    path = tiny_dirs["qwen2_vl"]
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['nonsense'\]"):
        load_backbone(path, nonsense=1)
    with pytest.raises(ConfigError, match="prompt_format must be one of"):
        load_backbone(path, prompt_format="anything")
    with pytest.raises(ConfigError, match="image_resolution must be"):
        load_backbone(path, image_resolution="huge")
    with pytest.raises(ConfigError, match="max_text_tokens must be"):
        load_backbone(path, max_text_tokens=0)
    with pytest.raises(ConfigError, match="larger than max_pixels"):
        load_backbone(path, min_pixels=10_000, max_pixels=100)
    with pytest.raises(ConfigError, match="pixel budget"):
        load_backbone(tiny_dirs["llava"], min_pixels=3136)
    with pytest.raises(ConfigError, match="VLM2Vec has no llava backbone"):
        load_backbone(tiny_dirs["llava"], prompt_format="vlm2vec")


# ----------------------------------------------------------------------------- LLaVA-NeXT
# VLM2Vec writes "<image>" (src/model_utils.py L29-34) and LlavaNextProcessor (its copy:
# processing_llava_next.py L150-178) expands it and tokenises with the tokenizer's specials
# (Llama: <s>); nothing is appended; the model gets no position_ids, so positions are 0..L-1,
# i.e. 0..n-1 for the real tokens of a right-padded row. transformers' LlavaNextProcessor is
# that same class, so it builds the expected inputs here.

def test_llava_next_inputs_are_the_processors(tiny_dirs):
    from transformers import LlavaNextProcessor
    a = load_backbone(tiny_dirs["llava_next"], prompt_format="vlm2vec")
    proc = LlavaNextProcessor(image_processor=a.image_processor, tokenizer=a.tokenizer,
                              patch_size=a.config.vision_config.patch_size,
                              vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)  # CLIP's CLS, as llava-hf configs say
    cases = [c for c in _cases() if c[0] != "rgba image"]
    b = a.encode([MMItem(t) for _, t, _ in cases], [im for _, _, im in cases])
    emb = EmbeddingModel(a).eval()
    with torch.no_grad():
        got = emb(b).embedding
    for row, (name, text, image) in enumerate(cases):
        text = text.replace("<|image_1|>", "<image>")
        out = proc(text=text, images=[image.convert("RGB")] if image is not None else None,
                   return_tensors="pt")
        want = out["input_ids"][0].tolist()
        real = b.inputs["attention_mask"][row].bool()
        assert want[0] == a.tokenizer.bos_token_id and want[-1] != a.eos_token_id, name
        assert b.inputs["input_ids"][row][real].tolist() == want, name
        assert int(b.eos_index[row]) == len(want) - 1, name
        assert b.inputs["position_ids"][row][real].tolist() == list(range(len(want))), name
        kw = {k: out[k] for k in ("pixel_values", "image_sizes") if k in out}
        with torch.no_grad():
            h = a.hf_model.model(input_ids=out["input_ids"], attention_mask=out["attention_mask"],
                                 use_cache=False, **kw).last_hidden_state
        ref = F.normalize(h[0, -1].float(), dim=-1)
        # float32 unit vectors, batched vs single forward: summation order only
        assert torch.allclose(got[row], ref, atol=1e-4), (name, (got[row] - ref).abs().max())
