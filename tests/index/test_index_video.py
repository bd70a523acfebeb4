"""An index of items with videos and several images (issue 18): what the index stores for the
search page, parity with ``fam encode``, and the resume fingerprint over frame lists."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil

import pytest
import torch
from test_index_build import _Killed

from fam.backbones import load_backbone
from fam.index import Index, build_index
from fam.index import build as build_mod
from fam.index.items import items_fingerprint, read_items
from fam.model import EmbeddingModel

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def emb_model(tiny_dirs):
    return EmbeddingModel(load_backbone(tiny_dirs["qwen2_vl"]))


def test_index_stores_images_video_and_sampled_frames(video_collection, tiny_dirs, emb_model,
                                                      tmp_path):
    items, root = video_collection
    out = build_index(tmp_path / "idx", items, model=tiny_dirs["qwen2_vl"], image_root=root,
                      progress=False, embedding_model=emb_model)
    rows = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in rows}
    # 8 of 11 frames by linspace(0, 10, 8) -> 0, 1, 2, 4, 5, 7, 8, 10 (fam.data.video.sample).
    assert by_id["clip-a"]["video"] == "vid/a"
    assert by_id["clip-a"]["video_frames"] == [f"vid/a/frame_{j}.png"
                                               for j in (0, 1, 2, 4, 5, 7, 8, 10)]
    assert by_id["clip-b"]["video_frames"] == by_id["clip-b"]["video"]  # 5 frames: all
    assert by_id["pair"]["images"] == ["img/0.png", "img/1.png"]
    assert "video" not in by_id["words"] and "images" not in by_id["words"]
    index = Index.load(out)
    hit = next(h for h in index.search(index.vectors.embeddings[:1], 4)[0] if h.id == "clip-a")
    assert hit.to_json()["video_frames"] == by_id["clip-a"]["video_frames"]
    assert "video_frames" not in hit.metadata and "video" not in hit.metadata
    assert index.image_file(hit.index, "video_frames", 7) == \
        (root / "vid/a/frame_10.png").resolve()
    assert index.image_file(hit.index, "video_frames", 8) is None
    assert index.image_file(hit.index, "video", 0) is None  # only files the index lists
    # The vectors are fam encode's (same model, same items, one process).
    ref = emb_model.encode([r.item for r in read_items(items, root)], batch_size=2)
    # float32 unit vectors: batch composition differs (summation order only)
    assert torch.allclose(index.vectors.embeddings, ref, atol=1e-6)


def _old_fingerprint(records) -> str:
    """The fingerprint before images/video were hashed (text and image path only)."""
    h = hashlib.sha256()
    for r in records:
        h.update(r.item.text.encode() + b"\0" + str(r.item.image or "").encode() + b"\n")
    return "sha256:" + h.hexdigest()


def test_fingerprint_covers_images_and_frame_lists(video_collection, small_collection, tmp_path):
    items, root = video_collection
    base = items_fingerprint(read_items(items, root))
    rows = [json.loads(x) for x in items.read_text().splitlines()]

    def changed(edit) -> str:
        new = [dict(r) for r in rows]
        edit(new)
        p = tmp_path / "items.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in new))
        return items_fingerprint(read_items(p, root))

    assert changed(lambda r: None) == base
    assert changed(lambda r: r[1].update(video=r[1]["video"][:4])) != base  # a frame less
    assert changed(lambda r: r[1].update(video=r[1]["video"][::-1])) != base  # reordered
    assert changed(lambda r: r[2].update(images=r[2]["images"][::-1])) != base
    assert changed(lambda r: r[0].update(video="vid/b")) != base  # another folder
    # Items without images/video keep their old fingerprint (earlier builds still resume).
    plain = read_items(*small_collection)
    assert items_fingerprint(plain) == _old_fingerprint(plain)


def test_changed_frame_list_invalidates_the_resume(video_collection, tiny_dirs, emb_model,
                                                   tmp_path, monkeypatch, caplog):
    src, src_root = video_collection
    root = tmp_path / "data"
    shutil.copytree(src_root, root)
    items = root / "items.jsonl"
    calls: list[int] = []
    kill = [True]
    real = build_mod.embed

    def flaky(model, its, **kw):
        calls.append(len(its))
        if kill[0] and len(calls) == 2:  # dies in the second shard (shards of 2, batches of 2)
            raise _Killed
        return real(model, its, **kw)

    monkeypatch.setattr(build_mod, "embed", flaky)
    out = tmp_path / "idx"
    kw = dict(model=tiny_dirs["qwen2_vl"], image_root=root, shard_size=2, batch_size=2,
              progress=False, embedding_model=emb_model)
    with pytest.raises(_Killed):
        build_index(out, items, **kw)
    assert sorted(p.name for p in (tmp_path / ".idx.build").glob("shard-*")) == \
        ["shard-00000.safetensors"]
    # The first shard's video now has other frames (same texts, same folder names otherwise).
    rows = [json.loads(x) for x in items.read_text().splitlines()]
    rows[1]["video"] = rows[1]["video"][1:]
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls.clear()
    kill[0] = False
    with caplog.at_level(logging.WARNING):
        build_index(out, items, **kw)
    assert "starting over" in caplog.text
    assert sum(calls) == 4  # every item encoded again, the stale shard not reused
    fresh = build_index(tmp_path / "fresh", items, **kw)
    resumed, ref = Index.load(out).vectors.embeddings, Index.load(fresh).vectors.embeddings
    # float32 unit vectors, same items and batches in both builds: summation order only
    assert torch.allclose(resumed, ref, atol=1e-6)
