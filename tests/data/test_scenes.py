"""The Scenes benchmark generator: determinism, annotations vs pixels, MMEB rows, OOD splits."""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fam.data.rle import rle_decode
from fam.data.scenes import (COLOURS, EVAL_FIELDS, NUMBER_WORDS, TRAIN_FIELDS, ScenesConfig,
                             crop_window, dataset_specs, generate_scenes)
from fam.data.types import IMAGE_PLACEHOLDER
from fam.errors import ConfigError

TINY = dict(n_train_images=40, n_eval_images=24, n_ood_images=16, eval_rows=12,
            n_candidates=10)
TOL = 2.0  # px: relations are decided on placement boxes, tests see tight mask boxes


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes_a")
    summary = generate_scenes(ScenesConfig(seed=3, **TINY), out)
    return out, summary


def _load(out: Path, name: str):
    return json.loads((out / name).read_text())


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pad(out: Path) -> dict[str, dict]:
    return {r["image"]: r for r in _jsonl(out / "pad.jsonl")}


def _pixels(out: Path, rel: str) -> np.ndarray:
    with Image.open(out / rel) as im:
        return np.asarray(im.convert("RGB"))


def _centre(box):
    return ((box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0)


# ----------------------------------------------------------------- determinism


def _snapshot(out: Path) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    texts = {str(p.relative_to(out)): p.read_bytes()
             for p in sorted(out.rglob("*")) if p.suffix in (".json", ".jsonl")}
    pix = {str(p.relative_to(out)): _pixels(out, str(p.relative_to(out)))
           for p in sorted(out.rglob("*.png"))}
    return texts, pix


def test_same_seed_identical_different_seed_differs(gen, tmp_path):
    out_a, summary = gen
    out_b = tmp_path / "b"
    assert generate_scenes(ScenesConfig(seed=3, **TINY), out_b) == summary
    texts_a, pix_a = _snapshot(out_a)
    texts_b, pix_b = _snapshot(out_b)
    assert texts_a.keys() == texts_b.keys() and pix_a.keys() == pix_b.keys()
    for k in texts_a:
        assert texts_a[k] == texts_b[k], k
    for k in pix_a:
        np.testing.assert_array_equal(pix_a[k], pix_b[k], err_msg=k)

    out_c = tmp_path / "c"
    generate_scenes(ScenesConfig(seed=4, **TINY), out_c)
    assert (out_c / "train/Scenes-T2I.jsonl").read_bytes() != texts_a["train/Scenes-T2I.jsonl"]
    assert not np.array_equal(_pixels(out_c, "images/train/tr00000.png"),
                              pix_a["images/train/tr00000.png"])


# ----------------------------------------------------------------- layout and rows


def test_datasets_json_and_summary(gen):
    out, summary = gen
    meta = _load(out, "datasets.json")
    assert _load(out, "scenes.json") == summary
    assert list(meta) == [s.name for s in dataset_specs()]
    by = defaultdict(lambda: defaultdict(int))
    for name, m in meta.items():
        assert set(m) == {"meta_task", "split", "n_candidates", "chance", "description",
                          "has_train"}
        assert m["chance"] == pytest.approx(1.0 / m["n_candidates"])
        assert m["has_train"] == (m["split"] == "IND") == (out / "train" / f"{name}.jsonl").exists()
        assert (out / "eval" / f"{name}.jsonl").exists()
        assert summary["datasets"][name]["eval_rows"] == len(_jsonl(out / "eval" / f"{name}.jsonl"))
        by[m["meta_task"]][m["split"]] += 1
    assert by["classification"]["IND"] >= 2 and by["classification"]["OOD"] >= 1
    assert by["vqa"]["IND"] >= 2 and by["vqa"]["OOD"] >= 1
    assert by["retrieval"]["IND"] >= 2 and by["retrieval"]["OOD"] >= 2
    assert by["grounding"]["IND"] >= 1 and by["grounding"]["OOD"] >= 1


def _check_side(out: Path, text: str, img: str, split: str | None):
    assert isinstance(text, str) and isinstance(img, str)
    # The placeholder marks exactly the sides that carry an image (MMEB convention).
    assert (IMAGE_PLACEHOLDER in text) == bool(img), (text, img)
    if img:
        assert not Path(img).is_absolute() and ".." not in Path(img).parts
        assert (out / img).is_file(), img
        if split is not None:
            assert img.startswith((f"images/{split}/", f"crops/{split}/")), img


def test_train_rows_have_exact_fields_and_train_images_only(gen):
    out, _ = gen
    files = sorted((out / "train").glob("*.jsonl"))
    assert files
    for f in files:
        rows = _jsonl(f)
        assert rows, f
        for r in rows:
            assert tuple(r) == TRAIN_FIELDS
            assert all(isinstance(v, str) for v in r.values())
            _check_side(out, r["qry"], r["qry_image_path"], "train")
            _check_side(out, r["pos_text"], r["pos_image_path"], "train")
            _check_side(out, r["neg_text"], r["neg_image_path"], "train")
            assert r["neg_text"] or r["neg_image_path"]  # every row has a hard negative
            assert (r["neg_text"], r["neg_image_path"]) != (r["pos_text"], r["pos_image_path"])


def test_eval_rows_fields_candidates_unique_and_same_length(gen):
    out, _ = gen
    meta = _load(out, "datasets.json")
    for name, m in meta.items():
        rows = _jsonl(out / "eval" / f"{name}.jsonl")
        assert 0 < len(rows) <= TINY["eval_rows"]
        for r in rows:
            assert tuple(r) == EVAL_FIELDS
            assert len(r["tgt_text"]) == len(r["tgt_img_path"]) == m["n_candidates"]
            assert len(set(zip(r["tgt_text"], r["tgt_img_path"]))) == m["n_candidates"]
            _check_side(out, r["qry_text"], r["qry_img_path"], "eval")
            for t, i in zip(r["tgt_text"], r["tgt_img_path"]):
                _check_side(out, t, i, "eval")


def test_train_and_eval_images_disjoint(gen):
    out, _ = gen
    train_imgs = {p.read_bytes() for p in (out / "images/train").glob("*.png")}
    eval_imgs = {p.read_bytes() for p in (out / "images/eval").glob("*.png")}
    assert train_imgs and eval_imgs and not (train_imgs & eval_imgs)


# ----------------------------------------------------------------- positives are right


def _crop_object(path: str) -> tuple[str, int]:
    """crops/eval/ev00003_2.png -> (images/eval/ev00003.png, 2)."""
    m = re.fullmatch(r"crops/(train|eval)/(.+)_(\d+)\.png", path)
    assert m, path
    return f"images/{m.group(1)}/{m.group(2)}.png", int(m.group(3))


def test_eval_positive_first_and_negatives_wrong(gen):
    out, _ = gen
    pad = _pad(out)
    caps = {c["image"]: c["caption"] for c in _load(out, "captions_eval.json")}
    meta = _load(out, "datasets.json")
    specs = {s.name: s for s in dataset_specs()}
    for name in meta:
        task = specs[name].task
        for r in _jsonl(out / "eval" / f"{name}.jsonl"):
            pos_t, pos_i = r["tgt_text"][0], r["tgt_img_path"][0]
            negs = list(zip(r["tgt_text"][1:], r["tgt_img_path"][1:]))
            if task in ("t2i",):
                cap = r["qry_text"].split("matches the given caption: ", 1)[1]
                assert caps[pos_i] == cap
                assert all(caps[i] != cap for _, i in negs)
                continue
            regions = pad[r["qry_img_path"]]["regions"]
            if task == "i2t":
                assert pos_t == caps[r["qry_img_path"]]
            elif task == "count":
                n = len(regions)
                assert pos_t == NUMBER_WORDS[n - 1] + (" object" if n == 1 else " objects")
            elif task == "dominant":
                large = [g for g in regions if g["attributes"]["size"] == "large"]
                dom = regions[0] if len(regions) == 1 else large[0]
                assert len(regions) == 1 or len(large) == 1
                assert pos_t == dom["label"]
            elif task == "vqa_colour":
                desc = re.search(r"What colour is the (.+)\?$", r["qry_text"]).group(1).split()
                match = [g for g in regions if g["attributes"]["shape"] == desc[-1]
                         and (len(desc) == 1 or g["attributes"]["size"] == desc[0])]
                assert len(match) == 1 and pos_t == match[0]["attributes"]["colour"]
            elif task == "vqa_relation":
                q = re.search(r"What is (left of|right of|above|below) the (.+)\?$", r["qry_text"])
                rel, desc = q.group(1), q.group(2).split()
                refs = [g for g in regions if g["label"] == " ".join(desc[-2:])
                        and (len(desc) == 2 or g["attributes"]["size"] == desc[0])]
                assert len(refs) == 1
                hits = [g for g in regions if g is not refs[0]
                        and _holds(g["box"], refs[0]["box"], rel, strict=True)]
                assert len(hits) == 1 and pos_t == hits[0]["label"]
            elif task == "grounding":
                expr = re.search(r'labeled as "(.+)"$', r["qry_text"]).group(1)
                img, k = _crop_object(pos_i)
                assert img == r["qry_img_path"] and regions[k]["expression"] == expr
                assert all(i != pos_i for _, i in negs)
            if task not in ("grounding", "t2i"):
                assert all(i == "" for _, i in negs) and pos_i == ""


def _holds(box, anchor, rel: str, strict: bool) -> bool:
    """Relation on tight boxes: strict = clearly holds; else = not clearly excluded."""
    axis = 0 if rel in ("left of", "right of") else 1
    sign = -1 if rel in ("left of", "above") else 1
    d = sign * (_centre(box)[axis] - _centre(anchor)[axis])
    margin = ScenesConfig().relation_margin
    return d >= margin - TOL if strict else d >= margin / 2.0 - TOL


# ----------------------------------------------------------------- annotations vs pixels


def test_pad_masks_boxes_colours_and_crops_match_pixels(gen):
    out, _ = gen
    cfg = ScenesConfig(**TINY)
    colours = {tuple(v) for v in COLOURS.values()}
    records = _jsonl(out / "pad.jsonl")
    n_images = len(list((out / "images").rglob("*.png")))
    assert len(records) == n_images  # one record per image, train and eval
    for rec in records:
        img = _pixels(out, rec["image"])
        assert img.shape == (rec["height"], rec["width"], 3)
        assert rec["tags"] == sorted({g["label"] for g in rec["regions"]})
        union = np.zeros(img.shape[:2], bool)
        for k, g in enumerate(rec["regions"]):
            m = rle_decode(g["mask"])
            assert m.shape == img.shape[:2] and m.any()
            assert not (m & union).any()  # objects never overlap
            union |= m
            a = g["attributes"]
            assert g["label"] == f"{a['colour']} {a['shape']}" and g["score"] == 1.0
            assert (img[m] == COLOURS[a["colour"]]).all()
            ys, xs = np.nonzero(m)
            tight = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            assert np.abs(np.array(g["box"]) - tight).max() <= 1
            side = max(g["box"][2] - g["box"][0], g["box"][3] - g["box"][1])
            assert side <= (cfg.large_size if a["size"] == "large" else cfg.small_size)
            # squares are drawn inset by 10% per side so they do not look bigger than circles
            assert side >= 0.75 * (cfg.large_size if a["size"] == "large" else cfg.small_size)
            crop = out / rec["image"].replace("images/", "crops/").replace(".png", f"_{k}.png")
            if crop.exists():
                x0, y0, x1, y1 = crop_window(g["box"], rec["width"], cfg.crop_size)
                np.testing.assert_array_equal(_pixels(out, str(crop.relative_to(out))),
                                              img[y0:y1, x0:x1])
        # Outside the objects there is only background: greys, never an object colour.
        bg = img[~union]
        assert (bg[:, 0] == bg[:, 1]).all() and (bg[:, 1] == bg[:, 2]).all()
        assert not any((bg == c).all(axis=1).any() for c in colours)
        n_levels = len(np.unique(bg[:, 0]))
        striped = Path(rec["image"]).name.startswith("st")
        assert n_levels == (2 if striped else 1), rec["image"]  # OOD style only in st*
    # every primary eval/train image has all its crops
    for rec in records:
        if "-" not in Path(rec["image"]).stem:
            for k in range(len(rec["regions"])):
                assert (out / rec["image"].replace("images/", "crops/")
                        .replace(".png", f"_{k}.png")).exists()


_EXPR = re.compile(r"^the (?:(small|large) )?(\w+) (\w+)"
                   r"(?: (left of|right of|above|below) the (\w+) (\w+))?$")


def test_referring_expressions_resolve_to_exactly_their_object(gen):
    out, _ = gen
    n_rel = 0
    for rec in _jsonl(out / "pad.jsonl"):
        regions = rec["regions"]
        exprs = [g["expression"] for g in regions]
        assert len(set(exprs)) == len(exprs)
        for k, g in enumerate(regions):
            m = _EXPR.match(g["expression"])
            assert m, g["expression"]
            size, colour, shape, rel, acol, ashape = m.groups()
            a = g["attributes"]
            assert (colour, shape) == (a["colour"], a["shape"]) and size in (None, a["size"])
            cands = [j for j, h in enumerate(regions) if h["label"] == f"{colour} {shape}"
                     and (size is None or h["attributes"]["size"] == size)]
            if rel is None:
                assert cands == [k]
                continue
            n_rel += 1
            anchors = [h for h in regions if h["label"] == f"{acol} {ashape}"]
            assert len(anchors) == 1
            assert _holds(g["box"], anchors[0]["box"], rel, strict=True)
            for j in cands:
                if j != k:  # every confuser is clearly *not* in that relation
                    assert not _holds(regions[j]["box"], anchors[0]["box"], rel, strict=False)
    assert n_rel > 0


def test_captions_name_every_object_and_a_true_relation(gen):
    out, _ = gen
    pad = _pad(out)
    caps = _load(out, "captions.json") + _load(out, "captions_eval.json")
    assert {c["image"] for c in caps} == set(pad)
    for c in caps:
        assert set(c) == {"id", "image", "caption", "blip_caption"}
        split = "train" if c["id"].startswith("tr") else "eval"
        assert c["image"] == f"images/{split}/{c['id']}.png"
        regions = pad[c["image"]]["regions"]
        for g in regions:
            a = g["attributes"]
            assert f"a {a['size']} {a['colour']} {a['shape']}" in c["caption"]
        if len(regions) > 1:
            m = re.match(r"^a (small|large) (\w+) (\w+) is (left of|right of|above|below) "
                         r"a (small|large) (\w+) (\w+)", c["caption"])
            assert m, c["caption"]
            s1, c1, sh1, rel, s2, c2, sh2 = m.groups()
            one = [g for g in regions if g["label"] == f"{c1} {sh1}"]
            two = [g for g in regions if g["label"] == f"{c2} {sh2}"]
            if "-" not in c["id"]:  # primary scenes relate two uniquely named objects
                assert len(one) == 1 and len(two) == 1
            # (a counterfactual keeps its scene's caption plan, so a swap may duplicate a
            # name; the caption is still true for the objects it was written about)
            assert any(_holds(a["box"], b["box"], rel, strict=True) for a in one for b in two)
    qa = _load(out, "qa.json")
    assert qa and all(set(q) == {"image", "question", "answer"} for q in qa)
    assert all(q["image"].startswith("images/train/") for q in qa)


# ----------------------------------------------------------------- OOD splits


def test_heldout_pairs_counts_and_styles(gen):
    out, _ = gen
    cfg = ScenesConfig(**TINY)
    heldout = {f"{c} {s}" for c, s in cfg.heldout_pairs}
    novel_seen = 0
    for rec in _jsonl(out / "pad.jsonl"):
        labels = {g["label"] for g in rec["regions"]}
        stem = Path(rec["image"]).stem
        if rec["image"].startswith("images/train/"):
            assert not labels & heldout, rec["image"]
            assert cfg.min_objects <= len(rec["regions"]) <= cfg.max_objects
        elif stem.startswith("nv"):
            if "-" not in stem:  # counterfactuals may swap the novel object away
                assert labels & heldout
                novel_seen += 1
        elif stem.startswith("cw"):
            assert len(rec["regions"]) == cfg.ood_n_objects
        else:  # IND eval and striped scenes follow the training distribution
            assert not labels & heldout
            assert cfg.min_objects <= len(rec["regions"]) <= cfg.max_objects
    assert novel_seen == cfg.n_ood_images
    # No training text names a held-out pair either.
    train_text = "\n".join(p.read_text() for p in (out / "train").glob("*.jsonl"))
    train_text += (out / "captions.json").read_text() + (out / "qa.json").read_text()
    assert not [h for h in heldout if h in train_text]
    # The novel grounding set only asks for held-out objects.
    for r in _jsonl(out / "eval" / "Scenes-Grounding-Novel.jsonl"):
        m = _EXPR.match(re.search(r'labeled as "(.+)"$', r["qry_text"]).group(1))
        assert f"{m.group(2)} {m.group(3)}" in heldout


def test_train_t2i_negatives_are_counterfactuals_with_other_captions(gen):
    out, _ = gen
    caps = {c["image"]: c["caption"] for c in _load(out, "captions.json")}
    for r in _jsonl(out / "train" / "Scenes-T2I.jsonl"):
        cap = r["qry"].split("matches the given caption: ", 1)[1]
        assert caps[r["pos_image_path"]] == cap
        assert caps[r["neg_image_path"]] != cap
        assert Path(r["neg_image_path"]).stem.startswith(Path(r["pos_image_path"]).stem + "-")
    for r in _jsonl(out / "train" / "Scenes-I2T.jsonl"):
        assert caps[r["qry_image_path"]] == r["pos_text"] != r["neg_text"]


def test_config_validation():
    with pytest.raises(ConfigError, match="ood_n_objects"):
        ScenesConfig(max_objects=4, ood_n_objects=4)
    with pytest.raises(ConfigError, match="heldout_pairs"):
        ScenesConfig(heldout_pairs=(("red", "hexagon"),))
    with pytest.raises(ConfigError, match="n_candidates"):
        ScenesConfig(n_candidates=1)
    assert ScenesConfig(heldout_pairs=[["red", "star"]]).heldout_pairs == (("red", "star"),)


def test_background_texture_varies_the_background_only(tmp_path):
    flat = tmp_path / "flat"
    tex = tmp_path / "tex"
    cfg = dict(seed=5, n_train_images=6, n_eval_images=4, n_ood_images=4, eval_rows=2,
               n_candidates=3)
    generate_scenes(ScenesConfig(**cfg), flat, progress=False)
    generate_scenes(ScenesConfig(background_texture=25, **cfg), tex, progress=False)
    # the texts and annotations do not change, the pixels of the objects neither
    for name in ("captions.json", "pad.jsonl", "qa.json"):
        assert (flat / name).read_bytes() == (tex / name).read_bytes()
    pad = _pad(tex)
    rec = pad["images/train/tr00000.png"]
    a, b = _pixels(flat, rec["image"]), _pixels(tex, rec["image"])
    fg = np.logical_or.reduce([rle_decode(r["mask"]) for r in rec["regions"]])
    assert np.array_equal(a[fg], b[fg])
    assert not np.array_equal(a[~fg], b[~fg])
    # 14-px background patches of a flat image are identical; textured ones are not
    tiles = [b[r:r + 14, c:c + 14] for r in range(0, 112, 14) for c in range(0, 112, 14)
             if not fg[r:r + 14, c:c + 14].any()]
    assert len({t.tobytes() for t in tiles}) == len(tiles) > 1
    # a counterfactual re-render keeps its scene's background; other scenes differ
    cf = next(k for k in pad if k.startswith("images/train/tr00000-"))
    fg2 = np.logical_or.reduce([rle_decode(r["mask"]) for r in pad[cf]["regions"]])
    bg = ~(fg | fg2)
    assert np.array_equal(b[bg], _pixels(tex, cf)[bg])
    other = _pixels(tex, "images/train/tr00001.png")
    assert not np.array_equal(b[bg], other[bg])
    with pytest.raises(ConfigError, match="background_texture"):
        ScenesConfig(background_texture=-1)
