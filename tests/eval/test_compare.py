"""``fam eval --compare`` on the results files fam writes, columns named by their run folders.

The demo's ``results.json`` and ablation files are compared in the slow tests that run
them (tests/experiments/test_demo.py, test_ablation.py); here ``fam eval``'s own files."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from fam.cli import main
from fam.eval.compare import load_runs, run_labels

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 40, 230)}


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    """A one-dataset MMEB JSONL (a real MMEB name: no datasets.json needed) and its images."""
    root = tmp_path_factory.mktemp("cmp")
    rng = np.random.default_rng(0)
    (root / "images" / "VOC2007").mkdir(parents=True)
    for c, rgb in COLOURS.items():
        arr = np.clip(np.array(rgb)[None, None] + rng.integers(-20, 20, (48, 48, 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(root / "images" / "VOC2007" / f"{c}.png")
    names = list(COLOURS)
    rows = [{"qry_text": "<|image_1|>\nRepresent the given image for classification.",
             "qry_img_path": f"VOC2007/{c}.png", "tgt_text": [c] + [o for o in names if o != c],
             "tgt_img_path": [""] * 3} for c in names]
    (root / "data").mkdir()
    (root / "data" / "VOC2007.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def runs(eval_data, tiny_dirs, tmp_path_factory):
    """Two models evaluated with fam eval's default output, <model>/eval_results.json, in
    run folders of the same name under two parents (runs/x/fam, runs/y/fam), and a third."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for run in ("x/fam", "y/fam", "y/baseline"):
        model = base / run / "model"
        shutil.copytree(tiny_dirs["qwen2_vl"], model)
        assert main(["eval", "--model", str(model), "--data", str(eval_data / "data"),
                     "--image-root", str(eval_data / "images"), "--no-progress"]) == 0
        out[run] = model / "eval_results.json"
        assert out[run].is_file()
    return out


def _header(out: str) -> list[str]:
    return out.splitlines()[0].split()


def test_eval_results_of_two_runs_are_named_by_their_run_folders(runs, capsys):
    capsys.readouterr()
    assert main(["eval", "--compare", str(runs["y/fam"]), str(runs["y/baseline"])]) == 0
    assert _header(capsys.readouterr().out)[2:] == ["fam", "baseline", "chance", "diff"]
    # Same run folder name under different parents: the parent tells them apart.
    assert main(["eval", "--compare", str(runs["x/fam"]), str(runs["y/fam"])]) == 0
    assert _header(capsys.readouterr().out)[2:] == ["x/fam", "y/fam", "chance", "diff"]
    # A run folder or its model folder is understood too.
    model_folder, run_folder = runs["x/fam"].parent, runs["y/baseline"].parent.parent
    assert main(["eval", "--compare", str(model_folder), str(run_folder)]) == 0
    assert _header(capsys.readouterr().out)[2:4] == ["fam", "baseline"]


def test_labels_of_the_same_file_and_of_picked_models(runs):
    p = str(runs["x/fam"])
    assert run_labels([p, p]) == [f"A:{'/'.join(runs['x/fam'].parent.parent.parts[1:])}",
                                  f"B:{'/'.join(runs['x/fam'].parent.parent.parts[1:])}"]
    assert run_labels([p + ":fam", p + ":vlm2vec"]) == ["fam", "fam"]  # the caller adds :NAME


def test_what_is_not_a_results_file_gets_one_line(runs, tmp_path, caplog):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"format": "fam-index", "dim": 4}))
    with caplog.at_level(logging.ERROR):
        assert main(["eval", "--compare", str(manifest), str(runs["x/fam"])]) == 2
    msg = caplog.records[-1].getMessage()
    assert "not a fam results file" in msg and "'dim'" in msg and "\n" not in msg
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["eval", "--compare", str(runs["x/fam"]) + ":fam",
                     str(runs["y/fam"])]) == 2
    assert "no model 'fam'" in caplog.records[-1].getMessage()
    with caplog.at_level(logging.ERROR):
        assert main(["eval", "--compare", str(runs["x/fam"])]) == 2  # one run only
    assert "give two or more" in caplog.records[-1].getMessage()
    assert len(load_runs(runs["x/fam"])) == 1
