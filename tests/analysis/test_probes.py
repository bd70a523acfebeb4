"""FAM pilot probes on a tiny random Qwen2-VL and a 3-image Scenes-like folder."""
from __future__ import annotations

import json
from pathlib import Path
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fam.analysis.probes import (ProbeConfig, attention_probe, crop_region, load_probe_images,
                                 load_probe_model, run_probes, similarity_probes)
from fam.data.rle import rle_encode
from fam.errors import ConfigError, DataError

OBJECTS = [
    [("red circle", (10, 10, 40, 40), "the red circle"),
     ("blue square", (60, 50, 90, 80), "the blue square right of the red circle")],
    [("green triangle", (20, 60, 50, 90), "the green triangle")],
    [("yellow star", (5, 5, 30, 30), "the yellow star"),
     ("white cross", (70, 70, 100, 100), "the white cross below the yellow star")],
]


def _box_mask(box):
    """A valid PAD mask (COCO RLE of the 112x112 image) covering ``box``."""
    m = np.zeros((112, 112), dtype=bool)
    m[box[1]:box[3], box[0]:box[2]] = True
    return rle_encode(m)


@pytest.fixture
def scenes_dir(tmp_path):
    root = tmp_path / "scenes"
    (root / "images" / "eval").mkdir(parents=True)
    recs = []
    for i, objs in enumerate(OBJECTS):
        im = Image.new("RGB", (112, 112), (128, 128, 128))
        d = ImageDraw.Draw(im)
        for k, (_, box, _) in enumerate(objs):
            d.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(200, 40 * k, 30 * i))
        rel = f"images/eval/ev{i:05d}.png"
        im.save(root / rel)
        recs.append({"image": rel, "width": 112, "height": 112,
                     "regions": [{"label": lab, "box": list(box), "expression": ex, "score": 1.0,
                                  "mask": _box_mask(box)} for lab, box, ex in objs]})
    # A counterfactual render and a training image: both must be skipped.
    recs.append({**recs[0], "image": "images/eval/ev00000-swap.png"})
    recs.append({**recs[0], "image": "images/train/tr00000.png"})
    (root / "pad.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return root


def test_load_probe_images_filters(scenes_dir):
    ims = load_probe_images(scenes_dir, "eval", max_images=10)
    assert [p.path.name for p in ims] == ["ev00000.png", "ev00001.png", "ev00002.png"]
    assert ims[0].regions[1].box == (60, 50, 90, 80)
    with pytest.raises(DataError):
        load_probe_images(scenes_dir / "nope")


def test_crop_region_margin_and_clipping():
    im = Image.new("RGB", (112, 112))
    assert crop_region(im, (10, 10, 30, 30), margin=0.1, min_margin_px=2).size == (24, 24)
    # Clipped at the image border; exclusive end kept.
    assert crop_region(im, (0, 0, 20, 20), margin=0.5).size == (30, 30)


def test_probes_tiny_model(tiny_dirs, scenes_dir, tmp_path):
    cfg = ProbeConfig(max_images=3, attention_images=3, batch_size=2)
    model = load_probe_model(tiny_dirs["qwen2_vl"])
    ims = load_probe_images(scenes_dir, max_images=3)
    sim = similarity_probes(model, ims, cfg)
    for probe in ("global_local", "object_caption"):
        for kind in ("matched", "mismatched"):
            m = sim[probe][kind]["mean"]
            assert math.isfinite(m) and -1.0 - 1e-6 <= m <= 1.0 + 1e-6
        assert sim[probe]["n_crops"] == 5
        assert 0.0 <= sim[probe]["win_rate"] <= 1.0

    att = attention_probe(model, ims, cfg)
    n = model.num_layers
    assert att["layers"] == list(range(1, n + 1))
    for l in range(n):
        im, tx, ot = att["image_mass"][l], att["text_mass"][l], att["other_mass"][l]
        assert im > 0 and tx > 0 and ot >= -1e-6
        assert im + tx <= 1.0 + 1e-6
        assert abs(im + tx + ot - 1.0) < 1e-4  # softmax rows sum to one
    assert att["n_image_tokens"] > 0 and att["n_text_tokens"] > 0
    assert all(1 <= l <= n for l in att["vision_centric_layers"])


@pytest.mark.slow
def test_run_probes_writes_json_table_and_plots(tiny_dirs, scenes_dir, tmp_path):
    cfg = ProbeConfig(max_images=3, attention_images=2, batch_size=4)
    res = run_probes({"a": tiny_dirs["qwen2_vl"], "b": tiny_dirs["qwen2_vl"]}, scenes_dir,
                     tmp_path / "out", cfg)
    for key in ("similarity", "attention", "attention_per_token"):
        p = tmp_path / "out" / f"probes_{key}.png"
        assert p.exists() and p.stat().st_size > 1000
    saved = json.loads((tmp_path / "out" / "probes.json").read_text())
    assert set(saved["models"]) == {"a", "b"}
    # Same checkpoint, same numbers.
    assert res["models"]["a"]["global_local"] == res["models"]["b"]["global_local"]
    assert (tmp_path / "out" / "probes.md").read_text().startswith("| model |")


def test_attention_probe_needs_eager(tiny_dirs, scenes_dir):
    from fam.backbones import load_backbone
    from fam.model import EmbeddingModel

    model = EmbeddingModel(load_backbone(tiny_dirs["qwen2_vl"], attn_implementation="sdpa"))
    with pytest.raises(ConfigError, match="eager"):
        attention_probe(model, load_probe_images(scenes_dir, max_images=2))


def test_eager_attention_matches_manual_row(tiny_dirs, scenes_dir):
    """The EOS row of the returned maps is a probability distribution over the prefix."""
    model = load_probe_model(tiny_dirs["qwen2_vl"])
    ims = load_probe_images(scenes_dir, max_images=2)
    from fam.data.images import load_image
    from fam.data.types import MMItem
    items = [MMItem("<|image_1|>\nRepresent the given image.", ims[0].path)]
    batch = model.adapter.encode(items, [load_image(str(ims[0].path))])
    with torch.no_grad():
        out = model(batch, output_attentions=True)
    eos = int(batch.eos_index[0])
    for a in out.attentions:
        row = a[0, :, eos]  # (H, L)
        torch.testing.assert_close(row.sum(-1), torch.ones(row.shape[0]), atol=1e-5, rtol=0)


def _hand_made_embeddings(images, odd_one_out: int):
    """Unit embeddings whose probe values are known by construction (d = 16, orthonormal
    basis e_*): global image i = 0.8 e_i + 0.6 e_S (S: "a Scenes image"); crop j of image
    o(j) = 0.6 e_o(j) + 0.48 u_j + 0.64 e_S (u_j: the crop's own direction); expression j =
    u_j, except crop ``odd_one_out``'s expression, which is a direction w nothing else has.

    So cos(crop, own global) = 0.6·0.8 + 0.64·0.6 = 0.864, cos(crop, another global) = 0.384;
    cos(crop, own expression) = 0.48 (0 for the odd one out), cos(crop, any other) = 0."""
    eye = torch.eye(16, dtype=torch.float64)
    e_s, w = eye[3], eye[15]
    crops = [(i, k) for i, im in enumerate(images) for k in range(len(im.regions))]
    u = {ik: eye[4 + j] for j, ik in enumerate(crops)}
    by_expr = {images[i].regions[k].expression: (i, k) for i, k in crops}
    odd = crops[odd_one_out]

    def fake(model, items, pils, batch_size=16):
        out = []
        for it in items:
            if it.image is None:  # an expression after the retrieval instruction
                ik = by_expr[it.text[it.content[0]:it.content[1]]]
                out.append(w if ik == odd else u[ik])
            elif "#crop" in str(it.image):
                i = [p.path for p in images].index(Path(str(it.image).split("#crop")[0]))
                out.append(0.6 * eye[i] + 0.48 * u[(i, int(str(it.image).split("#crop")[1]))]
                           + 0.64 * e_s)
            else:
                i = [p.path for p in images].index(Path(it.image))
                out.append(0.8 * eye[i] + 0.6 * e_s)
        return torch.stack(out).float()
    return fake


def test_similarity_probes_on_hand_made_embeddings(scenes_dir, monkeypatch):
    """Known matched/mismatched means, gaps and win rates; fails if the matched and
    mismatched pairs were swapped anywhere in the probe (gaps and win rates would flip)."""
    import fam.analysis.probes as probes

    ims = load_probe_images(scenes_dir, max_images=3)
    monkeypatch.setattr(probes, "embed_items", _hand_made_embeddings(ims, odd_one_out=2))
    sim = similarity_probes(None, ims, ProbeConfig(max_images=3))
    gl, oc = sim["global_local"], sim["object_caption"]
    assert gl["n_crops"] == oc["n_crops"] == 5 and sim["n_images"] == 3
    # The embeddings are float32 sums of 3 exact-ish terms: rounding at 6e-8 relative.
    tol = dict(abs=1e-6)
    assert gl["matched"]["mean"] == pytest.approx(0.864, **tol)
    assert gl["mismatched"]["mean"] == pytest.approx(0.384, **tol)
    assert gl["gap"] == pytest.approx(0.48, **tol) and gl["win_rate"] == 1.0
    assert gl["matched"]["std"] == pytest.approx(0.0, **tol)
    # Object-caption: four crops score 0.48 with their own expression, the odd one out 0;
    # every mismatched expression is orthogonal (0), and a tie is not a win.
    assert oc["matched"]["mean"] == pytest.approx(4 * 0.48 / 5, **tol)
    assert oc["matched"]["std"] == pytest.approx(0.192, **tol)  # sqrt(4/5·0.48² − 0.384²)
    assert oc["mismatched"]["mean"] == pytest.approx(0.0, **tol)
    assert oc["gap"] == pytest.approx(0.384, **tol)
    assert oc["win_rate"] == pytest.approx(0.8)


def test_object_caption_mismatch_is_from_another_image(scenes_dir, monkeypatch):
    """Each crop's mismatched expression comes from another image: with crop and expression
    embeddings that encode their image, the mismatched cosine shows which, for 5 seeds."""
    import fam.analysis.probes as probes

    ims = load_probe_images(scenes_dir, max_images=3)
    eye = torch.eye(16)
    owner = {r.expression: i for i, im in enumerate(ims) for r in im.regions}

    def fake(model, items, pils, batch_size=16):
        out = []
        for it in items:
            if it.image is None:  # expression of image i: direction e_i
                out.append(eye[owner[it.text[it.content[0]:it.content[1]]]])
            elif "#crop" in str(it.image):  # crop of image i: e_i too
                out.append(eye[[p.path for p in ims].index(Path(str(it.image).split("#crop")[0]))])
            else:
                out.append(eye[15])
        return torch.stack(out)
    monkeypatch.setattr(probes, "embed_items", fake)
    for seed in range(5):
        oc = similarity_probes(None, ims, ProbeConfig(max_images=3, seed=seed))["object_caption"]
        # own image: cosine 1; another image: 0 — never a same-image "mismatch"
        assert oc["matched"]["mean"] == 1.0 and oc["mismatched"]["mean"] == 0.0
        assert oc["win_rate"] == 1.0
