"""PAD pipeline: ground-truth replay, tiny Grounding DINO + SAM end to end, failures,
resume after a crash, filters, and record validation."""
from __future__ import annotations

import argparse
import json
import logging
import shutil

import numpy as np
import pytest

from fam.data.rle import rle_encode
from fam.errors import DataError
from fam.pad import (
    CaptionNounTagger,
    GroundTruthProvider,
    ListTagger,
    build_pad,
    filter_regions,
    list_images,
    parse_pad_record,
    read_pad,
    region_mask,
    stats_path,
)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """A small generated Scenes root (images, captions.json, ground-truth pad.jsonl)."""
    from fam.data.scenes import ScenesConfig, generate_scenes
    root = tmp_path_factory.mktemp("scenes")
    generate_scenes(ScenesConfig(n_train_images=6, n_eval_images=3, n_ood_images=1,
                                 eval_rows=2, n_candidates=2), root)
    return root


def _copy_scenes(scenes, tmp_path, n=6):
    """A private copy of the first ``n`` train images + ground truth (tests may break it)."""
    root = tmp_path / "data"
    gt = [r for r in read_pad(scenes / "pad.jsonl") if r.image.startswith("images/train/")][:n]
    for r in gt:
        (root / r.image).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(scenes / r.image, root / r.image)
    (root / "pad.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in gt))
    return root, gt


def test_ground_truth_provider_reproduces_gt(scenes, tmp_path):
    gt_provider = GroundTruthProvider(scenes / "pad.jsonl")
    images = list_images(scenes)
    assert all(rel.startswith("images/") for rel, _ in images)  # crops/ are not scenes
    out = tmp_path / "pad.jsonl"
    stats = build_pad(images, gt_provider, gt_provider, gt_provider, out, progress=False)
    gt = {r.image: r for r in read_pad(scenes / "pad.jsonl")}
    got = read_pad(out, scenes)
    assert stats.images_done == len(got) == len(images) == len(gt)
    assert stats.images_failed == 0 and stats.regions_filtered_small == 0
    n = 0
    for r in got:
        g = gt[r.image]
        assert (r.width, r.height, r.tags) == (g.width, g.height, g.tags)
        assert [(x.label, x.box, x.score) for x in r.regions] == \
               [(x.label, x.box, x.score) for x in g.regions]
        for a, b in zip(r.regions, g.regions):
            assert np.array_equal(region_mask(a), region_mask(b))
            assert a.mask == b.mask  # the RLE encoding is canonical
            n += 1
    assert stats.regions == n == sum(stats.labels.values())
    saved = json.loads(stats_path(out).read_text())
    assert saved["images_done"] == stats.images_done and saved["regions_in_file"] == n


def test_tiny_grounding_dino_sam_end_to_end(scenes, tmp_path):
    from fam.pad import HFGroundingDinoDetector, HFSamSegmenter
    from pad_tiny_models import save_tiny_grounding_dino, save_tiny_sam
    vocab = sorted({x.label for r in read_pad(scenes / "pad.jsonl") for x in r.regions})
    gd = HFGroundingDinoDetector(save_tiny_grounding_dino(tmp_path / "gd", vocab))
    sam = HFSamSegmenter(save_tiny_sam(tmp_path / "sam"))
    tagger = CaptionNounTagger(scenes / "captions.json", vocabulary=vocab)
    images = [x for x in list_images(scenes) if x[0].startswith("images/train/")]
    out = tmp_path / "pad.jsonl"
    stats = build_pad(images, tagger, gd, sam, out, limit=3, progress=False)
    assert stats.images_total == stats.images_done == 3 and stats.images_failed == 0
    recs = read_pad(out, scenes)  # validates boxes, mask sizes, paths
    assert [r.image for r in recs] == [rel for rel, _ in images[:3]]
    assert stats.regions == sum(len(r.regions) for r in recs) > 0
    for r in recs:
        assert r.tags and set(r.tags) <= set(vocab)
        for x in r.regions:
            assert x.label in r.tags and x.score > 0.25
            assert region_mask(x).shape == (r.height, r.width) and region_mask(x).any()


def test_corrupt_and_missing_images_are_counted_and_skipped(scenes, tmp_path, caplog):
    root, gt = _copy_scenes(scenes, tmp_path, n=4)
    (root / gt[1].image).write_bytes(b"\x89PNG garbage, not an image")
    images = list_images(root)
    images.append(("images/train/missing.png", root / "images/train/missing.png"))
    provider = GroundTruthProvider(root / "pad.jsonl")
    with caplog.at_level(logging.WARNING, logger="fam.pad"):
        stats = build_pad(images, provider, provider, provider, root / "out.jsonl",
                          progress=False)
    assert stats.images_failed == 2 and stats.images_done == 3
    assert [f["image"] for f in stats.failed] == [gt[1].image, "images/train/missing.png"]
    assert gt[1].image in caplog.text and "corrupt" in caplog.text
    assert "image not found" in caplog.text
    assert [r.image for r in read_pad(root / "out.jsonl", root)] == \
           [gt[0].image, gt[2].image, gt[3].image]


class _Crash(Exception):
    pass


class _CrashingSegmenter:
    """Delegates to a segmenter, then 'crashes' on the n-th image."""

    def __init__(self, inner, crash_at):
        self.inner, self.crash_at, self.calls = inner, crash_at, 0

    def segment(self, image, boxes, *, meta=None):
        self.calls += 1
        if self.calls == self.crash_at:
            raise _Crash
        return self.inner.segment(image, boxes, meta=meta)


def test_resume_after_crash_gives_the_same_file(scenes, tmp_path):
    root, _ = _copy_scenes(scenes, tmp_path, n=6)
    gt = GroundTruthProvider(root / "pad.jsonl")
    images = list_images(root)
    ref = tmp_path / "ref.jsonl"
    build_pad(images, gt, gt, gt, ref, progress=False)

    out = tmp_path / "out.jsonl"
    with pytest.raises(_Crash):
        build_pad(images, gt, gt, _CrashingSegmenter(gt, crash_at=4), out, progress=False)
    lines = out.read_text().splitlines(keepends=True)
    assert len(lines) == 3  # each finished image was flushed before the crash
    # The crash hit in the middle of writing the 4th line: half a line, no newline.
    full4 = ref.read_text().splitlines(keepends=True)[3]
    with out.open("a") as f:
        f.write(full4[: len(full4) // 2])
    stats = build_pad(images, gt, gt, gt, out, progress=False)
    assert stats.truncated_line_dropped
    assert stats.images_skipped == 3 and stats.images_done == 3
    assert out.read_bytes() == ref.read_bytes()
    assert stats.records_in_file == 6
    # Running again does nothing.
    again = build_pad(images, gt, gt, gt, out, progress=False)
    assert again.images_done == 0 and again.images_skipped == 6
    assert out.read_bytes() == ref.read_bytes()


def test_resume_refuses_a_corrupt_middle_line(scenes, tmp_path):
    root, _ = _copy_scenes(scenes, tmp_path, n=3)
    gt = GroundTruthProvider(root / "pad.jsonl")
    out = tmp_path / "out.jsonl"
    build_pad(list_images(root), gt, gt, gt, out, limit=2, progress=False)
    first, second = out.read_text().splitlines(keepends=True)
    out.write_text("{broken\n" + second)
    with pytest.raises(DataError) as e:
        build_pad(list_images(root), gt, gt, gt, out, progress=False)
    assert e.value.line == 1 and str(out) in str(e.value)


def test_limit_and_tagger_restrict_regions(scenes, tmp_path):
    root, gt_recs = _copy_scenes(scenes, tmp_path, n=4)
    gt = GroundTruthProvider(root / "pad.jsonl")
    label = gt_recs[0].regions[0].label
    stats = build_pad(list_images(root), ListTagger([label]), gt, gt, tmp_path / "o.jsonl",
                      limit=2, progress=False)
    recs = read_pad(tmp_path / "o.jsonl", root)
    assert stats.images_total == 2 and len(recs) == 2
    assert all(x.label == label for r in recs for x in r.regions)
    assert recs[0].tags == [label] and recs[0].regions


def test_filter_regions_min_area_and_dedup_by_hand():
    def m(y0, y1, x0, x1):
        a = np.zeros((20, 20), bool)
        a[y0:y1, x0:x1] = True
        return a
    big = m(0, 10, 0, 10)                     # 100 px
    almost = m(0, 10, 0, 9)                   # IoU 0.9 with big (not > 0.9)
    dup = m(0, 10, 0, 10)                     # IoU 1.0 with big
    regions = [("cat", 0.5, None, dup),      # 0: duplicate of 1 (lower score) -> dropped
               ("cat", 0.9, None, big),      # 1: kept
               ("dog", 0.4, None, big),      # 2: other label -> kept
               ("cat", 0.3, None, almost),   # 3: IoU exactly 0.9 -> kept
               ("cat", 0.8, None, m(15, 17, 15, 17)),  # 4: 4 px < 5 -> small
               ("cat", 0.2, None, np.zeros((20, 20), bool))]  # 5: empty -> small
    kept, n_small, n_dup = filter_regions(regions, min_pixels=5, dedup_iou=0.9)
    assert kept == [1, 2, 3] and n_small == 2 and n_dup == 1
    kept, _, n_dup = filter_regions(regions, min_pixels=0, dedup_iou=0.85)
    assert kept == [1, 4, 2] and n_dup == 2  # empty masks are always dropped


def _good_record():
    mask = np.zeros((20, 30), bool)
    mask[2:6, 3:9] = True
    return {"image": "a.png", "width": 30, "height": 20, "tags": ["cat"],
            "regions": [{"label": "cat", "score": 0.9, "box": [3, 2, 9, 6],
                         "mask": rle_encode(mask), "expression": "the cat"}]}


@pytest.mark.parametrize("mutate, field, msg", [
    (lambda r: r.pop("width"), "width", "missing field"),
    (lambda r: r["regions"][0].pop("mask"), "regions[0].mask", "missing 'mask'"),
    (lambda r: r["regions"][0].update(box=[3, 2, 31, 6]), "regions[0].box", "not inside"),
    (lambda r: r["regions"][0].update(box=[9, 2, 3, 6]), "regions[0].box", "not inside"),
    (lambda r: r["regions"][0]["mask"].update(size=[30, 20]), "regions[0].mask.size",
     "!= [height, width]"),
    (lambda r: r["regions"][0]["mask"].update(counts="0"), "regions[0].mask.counts",
     "cover 0 pixels"),
    (lambda r: r.update(image="../escape.png"), "image", "escapes the data root"),
    (lambda r: r.update(tags="cat"), "tags", "list of strings"),
    (lambda r: r["regions"][0].update(score="high"), "regions[0].score", "finite number"),
])
def test_record_validation_names_file_line_field(tmp_path, mutate, field, msg):
    good = _good_record()
    bad = _good_record()
    mutate(bad)
    f = tmp_path / "pad.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError) as e:
        read_pad(f, tmp_path)
    assert (e.value.path, e.value.line, e.value.field) == (str(f), 2, field)
    assert msg in str(e.value)


def test_read_pad_bad_json_and_round_trip(tmp_path):
    f = tmp_path / "pad.jsonl"
    f.write_text(json.dumps(_good_record()) + "\n{\"image\": \n")
    with pytest.raises(DataError) as e:
        read_pad(f)
    assert e.value.line == 2 and "invalid JSON" in str(e.value)
    rec = parse_pad_record(_good_record(), image_root=tmp_path)
    assert rec.path == (tmp_path / "a.png").resolve()
    assert rec.regions[0].extra == {"expression": "the cat"}
    assert rec.to_dict() == _good_record()  # extra keys survive a round trip


def test_cli_pad_build_gt(scenes, tmp_path, capsys):
    from fam.cli.pad import add_pad_subcommand
    parser = argparse.ArgumentParser(prog="fam")
    add_pad_subcommand(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "pad.jsonl"
    args = parser.parse_args(["pad", "build", "--images", str(scenes), "--out", str(out),
                              "--provider", "gt", "--limit", "4", "--no-progress"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["images_done"] == 4 and len(read_pad(out, scenes)) == 4
    assert json.loads(stats_path(out).read_text())["images_done"] == 4
