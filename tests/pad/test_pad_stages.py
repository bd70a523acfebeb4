"""PAD stages: taggers, NMS, ground-truth replay and tiny random Grounding DINO / SAM."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fam.data.rle import rle_encode
from fam.errors import DataError
from fam.pad import (
    CaptionNounTagger,
    Detection,
    Detector,
    GroundTruthProvider,
    ImageMeta,
    ListTagger,
    Segmenter,
    Tagger,
    batched_nms,
    box_iou,
    extract_noun_phrases,
    nms,
)
from fam.pad.detect import _nms_detections

LABELS = ["red circle", "blue square", "green star"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Saved tiny random Grounding DINO and SAM folders (built once per module)."""
    from pad_tiny_models import save_tiny_grounding_dino, save_tiny_sam
    root = tmp_path_factory.mktemp("pad_models")
    return (save_tiny_grounding_dino(root / "gdino", LABELS),
            save_tiny_sam(root / "sam"))


def _image(w=120, h=90):
    im = Image.new("RGB", (w, h), (128, 128, 128))
    d = ImageDraw.Draw(im)
    d.ellipse([10, 10, 40, 40], fill=(220, 40, 40))
    d.rectangle([60, 30, 100, 70], fill=(50, 90, 230))
    return im


# --------------------------------------------------------------------------- taggers


def test_noun_phrases_chunk_at_stop_words():
    cap = "A small red circle is left of a large blue square, with a green star."
    assert extract_noun_phrases(cap) == ["small red circle", "large blue square", "green star"]
    assert extract_noun_phrases("a very big shiny red circle", max_words=2) == ["red circle"]
    assert extract_noun_phrases("a picture of the the") == []


def test_caption_tagger_vocabulary_longest_match_and_order(tmp_path):
    caps = [{"image": "a.png", "caption": "a small blue square above a red circle"},
            {"image": "b.png", "blip_caption": "a picture of a circle"}]
    f = tmp_path / "captions.json"
    f.write_text(json.dumps(caps))
    t = CaptionNounTagger(f, vocabulary=["circle", "red circle", "blue square", "star"])
    meta = lambda rel: ImageMeta(rel, tmp_path / rel)  # noqa: E731
    # "red circle" wins over "circle" (longest first); caption order is kept.
    assert t.tags(None, meta("a.png")) == ["blue square", "red circle"]
    assert t.tags(None, meta("b.png")) == ["circle"]  # falls back to blip_caption
    assert CaptionNounTagger(f).tags(None, meta("a.png")) == ["small blue square",
                                                               "red circle"]
    with pytest.raises(DataError, match="no caption for image 'c.png'"):
        t.tags(None, meta("c.png"))
    assert isinstance(t, Tagger)


def test_list_tagger():
    t = ListTagger(["Red Circle", "red circle", " blue square ", ""])
    assert t.tags(None, None) == ["red circle", "blue square"]
    with pytest.raises(ValueError):
        ListTagger([" "])


# --------------------------------------------------------------------------- NMS


def test_box_iou_by_hand():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[50 / 150, 0.0, 1.0]]))


def test_nms_by_hand():
    boxes = torch.tensor([[0.0, 0, 10, 10],   # 0: score .9, kept
                          [1, 0, 11, 10],      # 1: IoU 9/11=.82 with 0 -> suppressed
                          [5, 0, 15, 10],      # 2: IoU 1/3 with 0 -> kept
                          [50, 50, 60, 60],    # 3: alone -> kept
                          [0, 0, 10, 10]])     # 4: exact copy of 0, lower score
    scores = torch.tensor([0.9, 0.8, 0.7, 0.3, 0.5])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2, 3]
    # IoU exactly at the threshold is kept (suppression is strictly greater).
    two = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 20]])  # IoU 0.5
    assert nms(two, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0, 1]
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0
    # Class-aware: the same box under another class survives.
    cls = torch.tensor([0, 0, 0, 0, 1])
    assert batched_nms(boxes, scores, cls, 0.5).tolist() == [0, 2, 4, 3]


def test_nms_detections_class_aware():
    dets = [Detection("a", 0.9, (0, 0, 10, 10)), Detection("a", 0.8, (1, 1, 10, 10)),
            Detection("b", 0.7, (1, 1, 10, 10))]
    assert _nms_detections(dets, 0.5) == [dets[0], dets[2]]


# --------------------------------------------------------------------------- ground truth


def test_ground_truth_provider(tmp_path):
    m1 = np.zeros((20, 30), bool)
    m1[2:6, 3:9] = True
    m2 = np.zeros((20, 30), bool)
    m2[10:15, 20:25] = True
    rec = {"image": "a.png", "width": 30, "height": 20, "tags": ["cat", "dog"],
           "regions": [{"label": "cat", "score": 1.0, "box": [3, 2, 9, 6], "mask": rle_encode(m1)},
                       {"label": "dog", "score": 0.5, "box": [20, 10, 25, 15],
                        "mask": rle_encode(m2)}]}
    (tmp_path / "pad.jsonl").write_text(json.dumps(rec) + "\n")
    gt = GroundTruthProvider(tmp_path / "pad.jsonl")
    meta = ImageMeta("a.png", tmp_path / "a.png")
    assert gt.tags(None, meta) == ["cat", "dog"]
    dets = gt.detect(None, ["dog"], meta=meta)
    assert dets == [Detection("dog", 0.5, (20, 10, 25, 15))]
    masks = gt.segment(None, [d.box for d in gt.detect(None, ["cat", "dog"], meta=meta)],
                       meta=meta)
    assert np.array_equal(masks[0], m1) and np.array_equal(masks[1], m2)
    with pytest.raises(DataError, match="no ground-truth record"):
        gt.tags(None, ImageMeta("b.png", tmp_path / "b.png"))
    assert isinstance(gt, Detector) and isinstance(gt, Segmenter)


# --------------------------------------------------------------------------- HF models


def test_grounding_dino_tiny_plumbing(tiny_models):
    from fam.pad import HFGroundingDinoDetector
    det = HFGroundingDinoDetector(tiny_models[0])
    # Without torchvision, AutoProcessor must resolve the PIL image processor.
    assert type(det.processor.image_processor).__name__.endswith("Pil")
    im = _image()
    dets = det.detect(im, ["red circle", "blue square", "green star"])
    assert dets, "a random tiny model at box threshold 0.25 keeps some of its 20 queries"
    for d in dets:
        assert d.label in LABELS
        assert d.score > 0.25
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 < x1 <= 120 and 0 <= y0 < y1 <= 90
    assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
    # NMS held: no two same-label boxes overlap above 0.5.
    for lab in {d.label for d in dets}:
        b = torch.tensor([d.box for d in dets if d.label == lab])
        iou = box_iou(b, b) - torch.eye(len(b))
        assert (iou <= 0.5 + 1e-6).all()
    # Labels come back as the caller spelled them, even when the prompt had to change.
    odd = ["Red Circle", "blue. square"]
    assert {d.label for d in det.detect(im, odd)} <= set(odd)
    # Thresholds are honoured: a higher box threshold keeps a subset, 1.0 keeps none.
    det.box_threshold = 0.6
    assert all(d.score > 0.6 for d in det.detect(im, LABELS))
    det.box_threshold = 1.0
    assert det.detect(im, LABELS) == []
    det.box_threshold, det.text_threshold = 0.25, 1.0  # no token can pass
    assert det.detect(im, LABELS) == []
    assert det.detect(im, []) == []


def test_grounding_dino_splits_long_prompts(tiny_models):
    from fam.pad import HFGroundingDinoDetector
    det = HFGroundingDinoDetector(tiny_models[0])
    det.max_text_len = 12  # force several prompts
    groups = det._prompts(LABELS * 2)
    assert len(groups) > 1 and sum(map(len, groups)) == 6
    tok = det.processor.tokenizer
    for g in groups:
        assert len(tok(". ".join(g) + ".")["input_ids"]) <= 12
    assert all(d.label in LABELS for d in det.detect(_image(), LABELS))


def test_sam_tiny_masks_image_size(tiny_models):
    from fam.pad import HFSamSegmenter
    seg = HFSamSegmenter(tiny_models[1], box_batch=2)
    assert type(seg.processor.image_processor).__name__.endswith("Pil")
    im = _image(120, 90)
    boxes = [[10, 10, 40, 40], [60, 30, 100, 70], [0, 0, 120, 90]]
    masks = seg.segment(im, boxes)
    assert len(masks) == 3
    for m in masks:
        assert m.shape == (90, 120) and m.dtype == bool
    assert seg.segment(im, []) == []
    # Chunking the boxes does not change the result.
    seg.box_batch = 64
    for a, b in zip(masks, seg.segment(im, boxes)):
        assert np.array_equal(a, b)


def test_model_dir_must_exist(tmp_path):
    from fam.pad import HFSamSegmenter
    with pytest.raises(DataError, match="no config.json"):
        HFSamSegmenter(tmp_path)
