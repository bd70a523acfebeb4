"""Training on videos and page images: GradCache splits video pixel inputs by row (parity with
the full batch), and ``fam train adapt`` runs on MMEB rows with frame folders."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image, ImageDraw

from fam.backbones import load_backbone
from fam.cli import main
from fam.data.mmeb import load_train
from fam.data.types import MMItem
from fam.model.embedding import EmbeddingModel
from fam.train import gradcache as gc


def _video(folder, shift, n=5):
    folder.mkdir(parents=True)
    for i in range(n):
        im = Image.new("RGB", (56, 56), (70, 70, 70))
        x = 4 + ((i * shift) % 30)
        ImageDraw.Draw(im).rectangle([x, 16, x + 12, 28], fill=(240, 30 * shift % 255, 40))
        im.save(folder / f"f{i}.png")


def test_split_encoded_keeps_each_rows_video_and_images(tiny_dirs, tmp_path):
    for v in range(3):
        _video(tmp_path / f"v{v}", v + 1)
    im = Image.new("RGB", (80, 60), (10, 200, 30))
    items = [MMItem("a clip", video=tmp_path / "v0"), MMItem("text"),
             MMItem("two <|image_1|> <|image_2|>"), MMItem("clip", video=tmp_path / "v1"),
             MMItem("<|image_1|> one"), MMItem("last", video=tmp_path / "v2")]
    images = [None, None, [im, im.rotate(90)], None, im, None]
    a = load_backbone(tiny_dirs["qwen2_vl"])
    m = EmbeddingModel(a).eval()
    full = a.encode(items, images)
    assert full.visual_counts.tolist() == [[0, 1], [0, 0], [2, 0], [0, 1], [1, 0], [0, 1]]
    with torch.no_grad():
        want = m(full).embedding
        parts = [gc.split_encoded(full, s, e) for s, e in gc.chunk_bounds(6, 2)]
        got = torch.cat([m(p).embedding for p in parts])
    assert [int(p.inputs["video_grid_thw"].shape[0]) if "video_grid_thw" in p.inputs else 0
            for p in parts] == [1, 1, 1]
    assert "pixel_values" not in parts[0].inputs
    # the same rows, same padded length: only the batch composition of kernels differs.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_train_adapt_on_video_rows(tiny_dirs, tmp_path):
    data = tmp_path / "data"
    rows = []
    for v in range(6):
        _video(data / "frames" / f"v{v}", v + 1)
        rows.append({"qry": f"find the clip number {v}", "qry_image_path": "",
                     "pos_text": "Understand the content of the provided video.",
                     "pos_image_path": "", "pos_video": f"frames/v{v}"})
    (data / "train").mkdir()
    (data / "train" / "ClipRet.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_train(data / "train", data)
    assert len(pairs[0].pos.video) == 5 and pairs[0].pos.image is None
    assert sum(1 for _ in pairs[0].image_refs()) == 5
    out = tmp_path / "ad"
    assert main(["train", "adapt", f"model={tiny_dirs['qwen2_vl']}",
                 f"train_dir={data / 'train'}", f"image_root={data}", "optim.steps=2",
                 "optim.batch_size=4", "gradcache_chunk=2", "run.progress=false",
                 f"run.out_dir={out}"]) == 0
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["steps"] == 2
    # a bad frame folder is one clear error naming the row
    rows[1]["pos_video"] = "frames/missing"
    (data / "train" / "ClipRet.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["train", "adapt", f"model={tiny_dirs['qwen2_vl']}",
                 f"train_dir={data / 'train'}", f"image_root={data}", "optim.steps=1",
                 f"run.out_dir={tmp_path / 'bad'}"]) == 2


def test_train_align_on_video_captions(tiny_dirs, tmp_path):
    """MAC on (video, caption) pairs: the video's tokens are the fine-grained tokens."""
    from fam.data.captions import load_captions
    from fam.errors import DataError
    from fam.train.align import AlignCollator
    data = tmp_path / "data"
    recs = []
    for v in range(4):
        _video(data / "frames" / f"v{v}", v + 1)
        recs.append({"video": f"frames/v{v}", "caption": f"a clip number {v}"})
    recs.append({"image": "frames/v0/f0.png", "caption": "one still frame"})
    (data / "caps.json").write_text(json.dumps(recs))
    with pytest.raises(DataError, match="only fam train align"):
        load_captions(data / "caps.json", data)
    samples = load_captions(data / "caps.json", data, allow_video=True)
    assert len(samples[0].video) == 5 and samples[0].image is None and samples[4].image
    a = load_backbone(tiny_dirs["qwen2_vl"])
    batch = AlignCollator(a, "Represent the given image.", "")(samples)
    assert batch.images.visual_counts.tolist() == [[0, 1]] * 4 + [[1, 0]]
    assert int((batch.images.inputs["input_ids"] == a.video_token_id).sum()) == \
        int(batch.images.image_mask[:4].sum())
    assert main(["train", "align", f"model={tiny_dirs['qwen2_vl']}",
                 f"captions={data / 'caps.json'}", f"image_root={data}", "optim.steps=2",
                 "optim.batch_size=4", "gradcache_chunk=2", "run.progress=false",
                 f"run.out_dir={tmp_path / 'al'}"]) == 0
    assert json.loads((tmp_path / "al" / "train_metrics.json").read_text())["steps"] == 2
