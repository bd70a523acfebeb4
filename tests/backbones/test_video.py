"""Videos and several images per item.

Golden test: fam's Qwen2-VL video input (frames chosen, token ids, ``video_grid_thw``,
``pixel_values_videos``) and embedding equal a direct transformers call built by hand from
VLM2Vec-V2's published rules (8 frames by ``linspace(0, n-1, 8)`` from a folder in natural
order; the processor's ``smart_resize``, bicubic resize, CLIP normalisation, last frame
repeated to a multiple of ``temporal_patch_size``; prompt ``"<|video_pad|> " + instruction``;
sequential positions, last token pooled, L2).
"""
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fam.backbones import load_backbone
from fam.data.types import MMItem
from fam.data.video import frame_paths, sample_indices
from fam.errors import ConfigError, DataError
from fam.model.embedding import EmbeddingModel

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def _write_video(folder, n, size=(150, 100)):
    """n frames of a circle moving left to right, named frame_1.png .. frame_n.png (natural
    order differs from lexicographic order from 10 frames on)."""
    folder.mkdir(parents=True)
    for i in range(n):
        im = Image.new("RGB", size, (90, 90, 90))
        x = 5 + i * (size[0] - 40) // max(1, n - 1)
        ImageDraw.Draw(im).ellipse([x, 30, x + 30, 60], fill=(250, 40 + 15 * i, 20))
        im.save(folder / f"frame_{i + 1}.png")
    return folder


def _ref_smart_resize(h, w, factor, lo, hi):
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if hb * wb > hi:
        beta = math.sqrt(h * w / hi)
        hb = max(factor, math.floor(h / beta / factor) * factor)
        wb = max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < lo:
        beta = math.sqrt(lo / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def _ref_video(paths, lo, hi, patch=14, merge=2, tp=2):
    """pixel_values_videos and grid_thw of one video, from the published rules alone."""
    frames = [Image.open(p).convert("RGB") for p in paths]
    w0, h0 = frames[0].size
    h, w = _ref_smart_resize(h0, w0, patch * merge, lo, hi)
    arr = np.stack([(np.asarray(f.resize((w, h), Image.BICUBIC), dtype=np.float64) / 255.0
                     - CLIP_MEAN) / CLIP_STD for f in frames])          # (T, H, W, C)
    arr = arr.transpose(0, 3, 1, 2)                                      # (T, C, H, W)
    while len(arr) % tp:
        arr = np.concatenate([arr, arr[-1:]])
    t, c = len(arr) // tp, arr.shape[1]
    gh, gw = h // patch, w // patch
    x = arr.reshape(t, tp, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)   # t, h-blocks, w-blocks, mh, mw, C, T, P, P
    return torch.tensor(x.reshape(t * gh * gw, c * tp * patch * patch)), [t, gh, gw]


@pytest.mark.parametrize("n_frames", [11, 5])
def test_qwen2_vl_video_equals_a_hand_built_transformers_call(tiny_dirs, tmp_path, n_frames):
    folder = _write_video(tmp_path / "vid", n_frames)
    # frames: natural order, then linspace(0, n-1, 8) (all when fewer)
    names = [f"frame_{i + 1}.png" for i in range(n_frames)]
    chosen = ([names[int(i)] for i in np.linspace(0, n_frames - 1, 8).astype(int)]
              if n_frames > 8 else names)
    assert [p.name for p in frame_paths(folder)] == names
    a = load_backbone(tiny_dirs["qwen2_vl"], prompt_format="vlm2vec")
    lo, hi = a.pixel_budget
    instr = "Understand the content of the provided video."
    item = MMItem("<|video_1|> " + instr, video=folder)
    assert [p.name for p in item.video] == names
    batch = a.encode([item])
    # hand-built input
    pix, grid = _ref_video([folder / n for n in chosen], lo, hi)
    n_tok = int(np.prod(grid)) // 4
    text = "<|video_pad|>" * n_tok + " " + instr
    ids = torch.tensor([a.tokenizer(text, add_special_tokens=True)["input_ids"]])
    assert batch.inputs["input_ids"].tolist() == ids.tolist()
    assert batch.inputs["video_grid_thw"].tolist() == [grid]
    assert grid[0] == math.ceil(len(chosen) / 2)
    # float32 normalisation in the processor vs float64 here: equal to float32 rounding.
    torch.testing.assert_close(batch.inputs["pixel_values_videos"], pix.float(),
                               rtol=0, atol=1e-5)  # float32 rounding of values ~1 (see above)
    assert int(batch.image_mask.sum()) == n_tok and batch.has_image.tolist() == [True]
    with torch.no_grad():
        got = EmbeddingModel(a).eval()(batch).embedding
        out = a.hf_model.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                               pixel_values_videos=pix.float(),
                               video_grid_thw=torch.tensor([grid]),
                               position_ids=torch.arange(ids.shape[1])[None],
                               use_cache=False, return_dict=True)
    want = torch.nn.functional.normalize(out.last_hidden_state[:, -1], dim=-1)
    # the same float32 forward; only the ~1e-7 pixel rounding differs.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_fam_format_video_block_and_rope_types(tiny_dirs, tmp_path, family):
    folder = _write_video(tmp_path / "vid", 8)
    a = load_backbone(tiny_dirs[family])
    im = Image.new("RGB", (112, 112), (10, 200, 30))
    items = [MMItem("what happens? <|video_1|> answer", video=folder),
             MMItem("a still <|image_1|> and text"), MMItem("text only")]
    b = a.encode(items, images=[None, im, None])
    ids = b.inputs["input_ids"]
    v = a.video_token_id
    n_v = int((ids[0] == v).sum())
    assert n_v == int(b.inputs["video_grid_thw"].prod()) // 4 and n_v > 0
    row = ids[0].tolist()
    first = row.index(v)
    assert row[first - 1] == a.vision_start_id and row[first + n_v] == a.vision_end_id
    types = b.inputs["mm_token_type_ids"]
    assert torch.equal(types[0] == 2, ids[0] == v) and int((types[1] == 1).sum()) > 0
    assert b.has_image.tolist() == [True, True, False]
    words = a.tokenizer.decode(ids[0][b.text_mask[0]].tolist()).split()
    assert words[-1] == "answer" and "what" in words[0]
    with torch.no_grad():
        emb = EmbeddingModel(a).eval()(b).embedding
    assert torch.isfinite(emb).all()
    # frame order matters: the reversed video embeds differently
    rev = tmp_path / "rev"
    rev.mkdir()
    for i, p in enumerate(reversed(frame_paths(folder))):
        (rev / f"frame_{i + 1}.png").write_bytes(p.read_bytes())
    with torch.no_grad():
        emb_rev = EmbeddingModel(a).eval()(a.encode([MMItem(items[0].text, video=rev)])).embedding
    # order must move it well past float32 noise
    assert not torch.allclose(emb[0], emb_rev[0], atol=1e-4)


@pytest.mark.parametrize("family", ["llava_next", "idefics3"])
def test_multi_image_families_take_frames_as_images(tiny_dirs, tmp_path, family):
    folder = _write_video(tmp_path / "vid", 12, size=(56, 56))
    a = load_backbone(tiny_dirs[family])
    frames = [Image.open(folder / f"frame_{i + 1}.png").convert("RGB")
              for i in sample_indices(12)]
    b = a.encode([MMItem("clip: <|video_1|> done", video=folder)])
    want = a.encode([MMItem("clip: " + "".join(f"<|image_{k}|>" for k in range(1, 9)) + " done")],
                    images=[frames])
    assert b.inputs["input_ids"].tolist() == want.inputs["input_ids"].tolist()
    torch.testing.assert_close(b.inputs["pixel_values"], want.inputs["pixel_values"])
    with torch.no_grad():
        assert torch.isfinite(EmbeddingModel(a).eval()(b).embedding).all()


def test_a_family_without_video_gets_one_clear_error(tiny_dirs, tmp_path):
    folder = _write_video(tmp_path / "vid", 3)
    a = load_backbone(tiny_dirs["qwen2_vl"])
    a.video_input = None
    with pytest.raises(ConfigError, match="takes neither a video"):
        a.encode([MMItem("x", video=folder)])


def test_frame_folders_and_sampling(tmp_path):
    for n in (1, 7, 8, 9, 64, 301):
        assert sample_indices(n) == (list(range(n)) if n <= 8 else
                                     np.linspace(0, n - 1, 8).astype(int).tolist())
    with pytest.raises(DataError, match="does not exist"):
        MMItem("x", video=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no frame"):
        MMItem("x", video=tmp_path / "empty", source="rows.jsonl", line=3, field="video")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (20, 20)).save(mixed / "1.png")
    Image.new("RGB", (30, 20)).save(mixed / "2.png")
    (mixed / "notes.txt").write_text("not a frame")
    item = MMItem("x", video=mixed)
    assert [p.name for p in item.video] == ["1.png", "2.png"]
    from fam.backbones.video import load_video_frames
    with pytest.raises(DataError, match="share one size"):
        load_video_frames(item)
    assert re.fullmatch(r".*2\.png", str(MMItem("x", video=[mixed / "2.png"]).video[0]))
