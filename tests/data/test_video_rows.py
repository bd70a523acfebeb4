"""Rows with several images or a video: ``fam encode`` items and training rows."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fam.backbones import load_backbone
from fam.cli import main
from fam.data.mmeb import read_items
from fam.data.types import MMItem
from fam.errors import DataError
from fam.model.embedding import EmbeddingModel


@pytest.fixture
def media(tmp_path):
    (tmp_path / "clip").mkdir()
    for i in (10, 2, 1):  # natural order: 1, 2, 10
        Image.new("RGB", (56, 56), (20 * i, 100, 30)).save(tmp_path / "clip" / f"f{i}.png")
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (48, 64), (10, 10, 200)).save(tmp_path / "b.png")
    return tmp_path


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_items_with_images_and_video(media):
    f = _jsonl(media / "items.jsonl", [
        {"text": "<|image_2|> left of <|image_1|>", "images": ["a.png", "b.png"]},
        {"text": "a clip", "video": "clip"},
        {"video": ["clip/f2.png", "clip/f1.png"]}])
    items = read_items(f, media)
    assert [p.name for p in items[0].images] == ["a.png", "b.png"]
    assert [p.name for p in items[1].video] == ["f1.png", "f2.png", "f10.png"]
    assert [p.name for p in items[2].video] == ["f2.png", "f1.png"]
    for bad, key in [({"images": "a.png"}, "images"), ({"video": "nowhere"}, "video"),
                     ({"images": ["a.png"], "video": "clip"}, "video"),
                     ({"images": ["../x.png"]}, "images")]:
        with pytest.raises(DataError) as e:
            read_items(_jsonl(media / "bad.jsonl", [bad]), media)
        assert e.value.field == key and "line 1" in str(e.value)


def test_fam_encode_embeds_video_items_like_the_library(media, tiny_dirs):
    f = _jsonl(media / "items.jsonl", [{"text": "a clip", "video": "clip"},
                                       {"text": "two", "images": ["a.png", "b.png"]}])
    out = media / "emb.safetensors"
    assert main(["encode", "--model", str(tiny_dirs["qwen2_vl"]), "--input", str(f),
                 "--out", str(out)]) == 0
    got = load_file(str(out))["embeddings"]
    m = EmbeddingModel(load_backbone(tiny_dirs["qwen2_vl"])).eval()
    with torch.no_grad():
        want = m.encode([MMItem("a clip", video=media / "clip"),
                         MMItem("two", images=[media / "a.png", media / "b.png"])])
    # the same model and inputs; batching may pad differently: float32 rounding.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_training_rows_keep_their_videos_in_either_format(media, fmt, caplog):
    """qry_video / pos_video / neg_video are read from JSONL and from parquet (which reads
    only the columns fam asks for), without the 'not MMEB fields' warning."""
    from fam.data.mmeb import load_train
    rows = [{"qry": "<|video_1|> which event?", "qry_image_path": "", "qry_video": "clip",
             "pos_text": "moves right", "pos_image_path": ""},
            {"qry": "find the clip", "qry_image_path": "", "pos_text": "<|video_1|> a clip",
             "pos_image_path": "", "pos_video": ["clip/f1.png", "clip/f2.png"],
             "neg_text": "<|video_1|>", "neg_image_path": "", "neg_video": "clip"}]
    (media / "train").mkdir()
    if fmt == "jsonl":
        _jsonl(media / "train" / "Vid.jsonl", rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        keys = sorted({k for r in rows for k in r})  # from_pylist takes the first row's keys
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]),
                       media / "train" / "Vid.parquet")
    with caplog.at_level("WARNING"):
        pairs = load_train(media / "train", media)
    assert "not MMEB fields" not in caplog.text
    assert [p.name for p in pairs[0].query.video] == ["f1.png", "f2.png", "f10.png"]
    assert [p.name for p in pairs[1].pos.video] == ["f1.png", "f2.png"]
    assert len(pairs[1].neg.video) == 3 and not pairs[0].pos.video
