"""The alignment report (method.md §5) and the caption-only vs patch-aligned comparison."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fam.pad.records import read_pad as read_pad_records  # the one PAD reader
from fam.projector.geometry import clip_transform, processor_transform
from fam.projector.report import analyze_alignment
from fam.data.rle import rle_encode
from fam.errors import ConfigError, DataError


@pytest.fixture
def pad_data(tmp_path):
    """Three images of different sizes with 1-2 labelled regions each, as a PAD file."""
    root = tmp_path / "pad"
    (root / "img").mkdir(parents=True)
    specs = [((112, 112), [("red circle", (10, 10, 60, 60), (220, 40, 40)),
                           ("blue square", (70, 60, 105, 100), (50, 90, 230))]),
             ((150, 100), [("blue square", (20, 30, 80, 90), (50, 90, 230))]),
             ((90, 130), [("red circle", (5, 40, 70, 110), (220, 40, 40)),
                          ("green star", (60, 5, 85, 30), (40, 170, 60))])]
    lines, caps = [], []
    for i, ((w, h), regs) in enumerate(specs):
        im = Image.new("RGB", (w, h), (128, 128, 128))
        d = ImageDraw.Draw(im)
        regions = []
        for lab, box, col in regs:
            d.rectangle(box, fill=col)
            m = np.zeros((h, w), bool)
            m[box[1]:box[3] + 1, box[0]:box[2] + 1] = True
            regions.append({"label": lab, "score": 0.9, "box": list(box), "mask": rle_encode(m)})
        name = f"img/{i}.png"
        im.save(root / name)
        lines.append(json.dumps({"image": name, "width": w, "height": h,
                                 "tags": [r["label"] for r in regions], "regions": regions}))
        caps.append({"image": name, "caption": "a picture of " + " and ".join(
            f"a {r['label']}" for r in regions)})
    (root / "pad.jsonl").write_text("\n".join(lines) + "\n")
    (root / "captions.json").write_text(json.dumps(caps))
    return root


def _finite(obj, path="report"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _finite(v, f"{path}[{i}]")
    elif isinstance(obj, float):
        assert math.isfinite(obj), path


def test_analyze_alignment_writes_finite_json_and_figures(tiny_dirs, pad_data, tmp_path):
    out = tmp_path / "report"
    rep = analyze_alignment(tiny_dirs["llava"], pad_data / "pad.jsonl", pad_data, out,
                            k_max=4, captions=pad_data / "captions.json", n_heatmaps=2)
    saved = json.loads((out / "alignment.json").read_text())
    for key in ("entropy", "align", "retrieval", "matching_pursuit", "counts"):
        _finite(saved[key], key)
    assert saved["counts"] == {"images": 3, "regions": 5, "tokens_per_image": 64,
                               "grid": [8, 8], "text_sequences": 3}
    e = saved["entropy"]
    assert 0 <= e["H_before"] <= e["H_max_before"] + 1e-9
    assert 0 <= e["H_after"] <= e["H_max_after"] + 1e-9
    assert e["delta_H"] == pytest.approx(e["H_before"] - e["H_after"])
    assert 0 <= saved["align"]["miou"] <= 1
    assert saved["retrieval"]["n_candidates"] == 3
    mp = saved["matching_pursuit"]
    assert len(mp["explained_energy"]) == 5
    assert all(b >= a - 1e-6 for a, b in zip(mp["explained_energy"], mp["explained_energy"][1:]))
    assert set(mp["recovery"]) >= {"region@1", "patch@1", "region@4", "chance_patch@4"}
    for f in ("entropy.png", "explained_energy.png", "heatmaps_0.png", "heatmaps_1.png",
              "atoms.md"):
        assert (out / f).stat().st_size > 0, f
    assert "| row | atom 1 |" in (out / "atoms.md").read_text()
    assert rep["align"]["miou"] == pytest.approx(saved["align"]["miou"])


def test_select_and_errors(tiny_dirs, pad_data, tmp_path):
    assert len(read_pad_records(pad_data / "pad.jsonl", select="img/1")) == 1
    with pytest.raises(DataError, match="no PAD record"):
        analyze_alignment(tiny_dirs["llava"], pad_data / "pad.jsonl", pad_data, tmp_path,
                          select="nothing-matches", plots=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "img/0.png", "width": 112, "height": 112,
                               "regions": [{"label": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"line 1.*regions\[0\]"):
        read_pad_records(bad)
    with pytest.raises(ConfigError, match="multi_modal_projector"):
        analyze_alignment(tiny_dirs["qwen2_vl"], pad_data / "pad.jsonl", pad_data, tmp_path,
                          plots=False)


def test_processor_transform_matches_clip_transform():
    from transformers import CLIPImageProcessorPil
    proc = CLIPImageProcessorPil(size={"shortest_edge": 112},
                                 crop_size={"height": 112, "width": 112})
    for hw in [(112, 112), (100, 150), (130, 90)]:
        assert processor_transform(proc, hw, 14) == clip_transform(hw, 112, 112, 14)
    fixed = CLIPImageProcessorPil(size={"height": 56, "width": 84}, do_center_crop=False)
    tf = processor_transform(fixed, (100, 150), 14)
    assert tf.resized_size == (56, 84) and tf.crop_box is None and tf.grid_size() == (4, 6)


def _parser():
    from fam.cli import build_parser
    return build_parser()


def test_cli_subcommands(tiny_dirs, pad_data, tmp_path, capsys):
    p = _parser()
    a = p.parse_args(["train", "projector", "beta_max=0", "projector=linear"])
    assert a.func.__name__ == "cmd_train_projector" and a.overrides == ["projector=linear"]
    a = p.parse_args(["projector-compare", "--out", "x", "--quick", "--seeds", "0", "1"])
    assert a.quick and a.seeds == [0, 1]
    a = p.parse_args(["analyze", "alignment", "--model", str(tiny_dirs["llava"]), "--pad",
                      str(pad_data / "pad.jsonl"), "--out", str(tmp_path / "cli"),
                      "--k-max", "3", "--no-plots"])
    assert a.func(a) == 0
    assert "mIoU" in capsys.readouterr().out
    assert (tmp_path / "cli" / "alignment.json").exists()
