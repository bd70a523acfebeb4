"""``fam eval`` / ``fam encode`` for numbers comparable with published ones: MMEB as published
(Hugging Face layouts, images under eval_images/ or images/), VLM2Vec score files, tie rules,
``--compare``, ``--prompt-format`` and ``--adapter``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fam.cli import main

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 40, 230),
          "yellow": (230, 220, 30)}


def _rows() -> dict[str, list[dict]]:
    """Two real MMEB dataset names (so no datasets.json is needed) plus MMEB-eval's CIFAR-100."""
    names = list(COLORS)
    cls = [{"qry_text": "<|image_1|>\nRepresent the given image for classification.",
            "qry_img_path": f"VOC2007/{c}.png", "tgt_text": [c] + [o for o in names if o != c],
            "tgt_img_path": [""] * 4} for c in names]
    ret = [{"qry_text": f"Find me an everyday image that matches the given caption: a {c} image",
            "qry_img_path": "", "tgt_text": [""] * 4,
            "tgt_img_path": [f"VOC2007/{c}.png"] + [f"VOC2007/{o}.png" for o in names if o != c]}
           for c in names]
    return {"VOC2007": cls, "MSCOCO_t2i": ret, "CIFAR-100": cls[:2]}


def _images(root):
    rng = np.random.default_rng(0)
    (root / "VOC2007").mkdir(parents=True)
    for c, rgb in COLORS.items():
        arr = np.clip(np.array(rgb)[None, None] + rng.integers(-20, 20, (64, 80, 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(root / "VOC2007" / f"{c}.png")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same eval data as JSONL files and in MMEB-eval's two published folder layouts."""
    root = tmp_path_factory.mktemp("mmeb")
    rows = _rows()
    (root / "jsonl").mkdir()
    for name, rs in rows.items():
        if name != "CIFAR-100":
            (root / "jsonl" / f"{name}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rs))
    _images(root / "jsonl_images")
    for layout, images in (("shards", "eval_images"), ("converted", "images")):
        for name, rs in rows.items():
            d = root / layout / name
            if layout == "shards":
                d.mkdir(parents=True)
                pq.write_table(pa.Table.from_pylist(rs), d / "test-00000-of-00001.parquet")
            else:
                (d / "test").mkdir(parents=True)
                pq.write_table(pa.Table.from_pylist(rs), d / "test" / "0000.parquet")
        _images(root / layout / images)
    return root


def _eval(args, out):
    assert main(["eval", *args, "--out", str(out), "--no-progress"]) == 0
    return json.loads(out.read_text())


def test_published_layouts_give_the_jsonl_numbers(layouts, tiny_dirs, tmp_path, caplog):
    model = str(tiny_dirs["qwen2_vl"])
    common = ["--model", model, "--prompt-format", "vlm2vec", "--ties", "optimistic"]
    ref = _eval([*common, "--data", str(layouts / "jsonl"), "--image-root",
                 str(layouts / "jsonl_images")], tmp_path / "jsonl" / "results.json")
    assert set(ref["datasets"]) == {"VOC2007", "MSCOCO_t2i"}
    assert ref["ties"] == "optimistic"
    assert ref["settings"]["backbone"]["prompt_format"] == "vlm2vec"
    assert ref["settings"]["backbone"]["max_text_tokens"] is None
    for layout, images in (("shards", "eval_images"), ("converted", "images")):
        with caplog.at_level("WARNING"):
            res = _eval([*common, "--data", str(layouts / layout)],
                        tmp_path / layout / "results.json")
        assert "skipping CIFAR-100" in caplog.text  # in the repository, not in the benchmark
        assert res["settings"]["image_root"] == str(layouts / layout / images)  # found
        assert set(res["datasets"]) == set(ref["datasets"])
        for name, d in ref["datasets"].items():
            assert res["datasets"][name]["precision@1"] == d["precision@1"], (layout, name)
            assert res["datasets"][name]["n"] == d["n"] == 4
        assert res["overall"] == ref["overall"]
        # VLM2Vec's per-dataset score files beside results.json
        for name, d in res["datasets"].items():
            score = json.loads((tmp_path / layout / f"{name}_score.json").read_text())
            assert score == {"acc": pytest.approx(d["precision@1"] / 100),
                             "num_correct": round(d["precision@1"] * d["n"] / 100),
                             "num_pred": d["n"]}


def test_ties_are_recorded_and_stated(layouts, tiny_dirs, tmp_path, capsys):
    args = ["--model", str(tiny_dirs["qwen2_vl"]), "--data", str(layouts / "jsonl"),
            "--image-root", str(layouts / "jsonl_images")]
    for ties in ("expected", "pessimistic"):
        res = _eval([*args, "--ties", ties], tmp_path / ties / "results.json")
        assert res["ties"] == ties
        out = capsys.readouterr().out
        assert out.startswith(f"ties={ties}") and f"ties={ties}: " in out


def test_compare_a_fam_run_with_vlm2vec_score_files(layouts, tiny_dirs, tmp_path, capsys):
    res = _eval(["--model", str(tiny_dirs["qwen2_vl"]), "--data", str(layouts / "jsonl"),
                 "--image-root", str(layouts / "jsonl_images"), "--ties", "optimistic"],
                tmp_path / "fam" / "results.json")
    v2v = tmp_path / "vlm2vec"
    v2v.mkdir()
    # what VLM2Vec's eval.py writes: acc as a fraction
    (v2v / "VOC2007_score.json").write_text(json.dumps(
        {"acc": 0.75, "num_correct": 3, "num_pred": 4}))
    (v2v / "MSCOCO_t2i_score.json").write_text(json.dumps(
        {"acc": 0.5, "num_correct": 2, "num_pred": 4}))
    (v2v / "CIFAR-100_score.json").write_text(json.dumps(
        {"acc": 0.1, "num_correct": 1, "num_pred": 10}))
    capsys.readouterr()
    assert main(["eval", "--compare", str(tmp_path / "fam" / "results.json"), str(v2v)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert header.startswith("ties=optimistic") and "fam" in header and "vlm2vec" in header
    row = {ln.split()[0]: ln.split() for ln in out.splitlines()[2:] if ln.strip()
           and not ln.startswith("-")}
    fam_voc = res["datasets"]["VOC2007"]["precision@1"]
    # columns: fam, vlm2vec, chance (1/4 candidates), diff (vlm2vec - fam)
    assert row["VOC2007"][1:] == [f"{fam_voc:.1f}", "75.0", "25.0", f"{75.0 - fam_voc:+.1f}"]
    assert "CIFAR-100" not in out
    assert "prompt_format=fam" in out  # the fam run's input settings are listed
    # a bad path is one clear line, exit 2
    assert main(["eval", "--compare", str(tmp_path / "nope.json"), str(v2v)]) == 2
    assert main(["eval", "--data", str(layouts / "jsonl")]) == 2  # no --model


def test_adapter_and_input_options_through_eval_and_encode(layouts, tiny_dirs, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from fam.backbones import load_backbone
    base = tiny_dirs["qwen2_vl"]
    pm = get_peft_model(load_backbone(base).model, LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    pm.save_pretrained(str(tmp_path / "adapter"), safe_serialization=False)
    assert (tmp_path / "adapter" / "adapter_model.bin").is_file()
    merged = load_backbone(base)
    merged.model = pm.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")

    data = ["--data", str(layouts / "jsonl"), "--image-root", str(layouts / "jsonl_images")]
    a = _eval(["--model", str(base), "--adapter", str(tmp_path / "adapter"), *data],
              tmp_path / "a" / "results.json")
    b = _eval(["--model", str(tmp_path / "merged"), *data], tmp_path / "b" / "results.json")
    assert a["settings"]["adapter"] == str(tmp_path / "adapter")
    assert {k: v["precision@1"] for k, v in a["datasets"].items()} == \
        {k: v["precision@1"] for k, v in b["datasets"].items()}

    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"text": "<|image_1|>\nRepresent the given image.",
                                 "image": "VOC2007/red.png"}) + "\n"
                     + json.dumps({"text": "a red image " * 100}) + "\n")
    outs = {}
    for name, extra in (("adapter", ["--model", str(base), "--adapter", str(tmp_path / "adapter")]),
                        ("merged", ["--model", str(tmp_path / "merged")]),
                        ("resized", ["--model", str(tmp_path / "merged"), "--image-resolution",
                                     "low", "--max-text-tokens", "none"])):
        out = tmp_path / f"{name}.safetensors"
        assert main(["encode", *extra, "--input", str(items), "--image-root",
                     str(layouts / "jsonl_images"), "--out", str(out)]) == 0
        outs[name] = load_file(str(out))["embeddings"]
    assert torch.equal(outs["adapter"], outs["merged"])
    # must differ by more than float32 forward noise (~1e-6) to show the option took effect
    assert not torch.allclose(outs["resized"], outs["merged"], atol=1e-4)
    # bad option values are one clear line, exit 2
    assert main(["encode", "--model", str(base), "--input", str(items), "--out",
                 str(tmp_path / "x.safetensors"), "--image-resolution", "huge"]) == 2
    assert main(["encode", "--model", str(base), "--input", str(items), "--out",
                 str(tmp_path / "x.safetensors"), "--max-text-tokens", "lots"]) == 2
