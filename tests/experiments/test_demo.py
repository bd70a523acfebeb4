"""The main job end to end (`fam demo` at the quick size, with its video/document part) and the CLI on its artefacts."""
from __future__ import annotations

import json

import pytest
import torch

from fam.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--preset", "demo_media_quick", "--out", str(out), "--no-progress"]) == 0
    return out


def _model(demo_out, name="fam"):
    """The model the demo reports as ``name`` (FAM: after its media stage)."""
    return json.loads((demo_out / "results.json").read_text())["paths"][name]


def test_demo_results_hold_every_model_and_aggregate(demo_out):
    res = json.loads((demo_out / "results.json").read_text())
    assert set(res["models"]) == {"untrained", "stage0", "vlm2vec", "fam"}
    for name, r in res["models"].items():
        for key in ("IND", "OOD", "overall"):
            assert 0.0 <= r[key] <= 100.0, (name, key)
        assert set(r["meta_task"]) == {"classification", "vqa", "retrieval", "grounding"}
        assert all(v is not None for v in r["meta_task"].values())
        assert r["chance"]["overall"] > 0
    # stage 0 learned the language of the captions
    assert res["caption_nll"]["stage0"] < res["caption_nll"]["untrained"]
    for stage in ("stage0", "baseline", "fam_align", "fam", "baseline_media", "fam_media"):
        assert (demo_out / stage / "model" / "config.json").exists()
    # the reported trained models are the ones after the video/document stage
    assert res["paths"]["vlm2vec"] == str(demo_out / "baseline_media" / "model")
    assert res["paths"]["fam"] == str(demo_out / "fam_media" / "model")
    md = (demo_out / "results.md").read_text()
    assert "FAM vs the VLM2Vec baseline" in md and "MMEB-V2" in md and "visdoc/retrieval" in md


def test_demo_reports_the_nine_groups_per_model(demo_out):
    from fam.eval.mmeb_v2 import V2_GROUPS
    res = json.loads((demo_out / "results.json").read_text())
    assert set(res["mmeb_v2"]) == set(res["models"])
    groups = {f"{m}/{g}" for m, gs in V2_GROUPS.items() for g in gs}
    for name, r in res["mmeb_v2"].items():
        assert set(r["groups"]) == groups and all(v is not None for v in r["groups"].values())
        ds = r["datasets"]
        # 14 image datasets and the 7 Scenes-Video/Docs datasets, equal weight each
        assert sum(d["modality"] == "image" for d in ds.values()) == 14
        assert {n for n, d in ds.items() if d["modality"] != "image"} == {
            "SceneVideoCls", "SceneVideoCls-OOD", "SceneVideoQA", "SceneVideoRet",
            "SceneMomentRet", "SceneDocRet", "SceneDocRet-OOD"}
        for key in ("image", "video", "visdoc"):
            vals = [d["score"] for d in ds.values() if d["modality"] == key]
            assert r[key] == pytest.approx(sum(vals) / len(vals))
        assert r["overall"] == pytest.approx(sum(d["score"] for d in ds.values()) / len(ds))
        assert r["chance"]["video"] > 0 and r["chance"]["visdoc"] is None
        # image hit@1 is the image table's precision@1 without tie credit: never above it
        for n, d in ds.items():
            if d["modality"] == "image":
                assert d["score"] <= res["models"][name]["datasets"][n]["precision@1"] + 1e-9


def test_image_hit1_equals_an_evaluation_with_pessimistic_ties(demo_out):
    """The V2 image scores (from the expected-tie credits) equal evaluating again with
    ties="pessimistic"; the media scores equal fam eval on eval_media (same model)."""
    from fam.backbones import load_backbone
    from fam.eval.mmeb import evaluate
    from fam.model import EmbeddingModel
    res = json.loads((demo_out / "results.json").read_text())
    for name in ("untrained", "fam"):
        model = EmbeddingModel(load_backbone(res["paths"][name], min_pixels=56 * 56))
        again = evaluate(model, demo_out / "data" / "eval", demo_out / "data", progress=False,
                         ties="pessimistic")
        for n, d in again["datasets"].items():
            got = res["mmeb_v2"][name]["datasets"][n]["score"]
            # the same credits averaged the same way: only float summation order differs
            assert got == pytest.approx(d["precision@1"], abs=1e-9), (name, n)


def test_fam_eval_on_eval_media_gives_the_demo_media_scores(demo_out, tmp_path):
    out = tmp_path / "media.json"
    assert main(["eval", "--model", _model(demo_out), "--data",
                 str(demo_out / "data" / "eval_media"), "--out", str(out),
                 "--no-progress"]) == 0
    mine = json.loads(out.read_text())["datasets"]
    demo = json.loads((demo_out / "results.json").read_text())["mmeb_v2"]["fam"]["datasets"]
    # the same model on the same rows: equal up to float summation order
    assert mine and all(demo[n]["score"] == pytest.approx(d["score"], abs=1e-9)
                        for n, d in mine.items())


def test_demo_writes_the_plot_and_the_gallery(demo_out):
    res = json.loads((demo_out / "results.json").read_text())
    for name in ("results", "gallery"):
        assert (demo_out / f"{name}.png").stat().st_size > 1000
        assert res["figures"][name] == str(demo_out / f"{name}.png")
    gal = json.loads((demo_out / "gallery.json").read_text())
    assert gal["models"] == ["VLM2Vec", "FAM"] and gal["k"] == 3
    assert gal["video"]["dataset"] == "SceneVideoCls"
    assert gal["visdoc"]["dataset"] == "SceneDocRet"
    assert len(gal["video"]["rows"][0]["query"]["video"]) == 4  # the quick clips' frames
    for d in ("video", "visdoc"):
        row = gal[d]["rows"][0]
        assert all("grade" in c for c in row["candidates"])
        for label in gal["models"]:
            assert len({i for i, _ in row["top"][label]}) == 3
    for d in ("t2i", "i2t"):
        assert gal[d]["dataset"].startswith("Scenes-") and len(gal[d]["rows"]) == 3
        for row in gal[d]["rows"]:
            for label in gal["models"]:
                idx = [i for i, _ in row["top"][label]]
                assert len(idx) == 3 and len(set(idx)) == 3  # three distinct candidates
                assert all(0 <= i < len(row["candidates"]) for i in idx)


def test_demo_rerun_resumes_without_retraining(demo_out, capsys):
    before = (demo_out / "fam_media" / "model" / "model.safetensors").stat().st_mtime
    assert main(["demo", "--preset", "demo_media_quick", "--out", str(demo_out), "--no-progress"]) == 0
    assert (demo_out / "fam_media" / "model" / "model.safetensors").stat().st_mtime == before
    assert "Overall" in capsys.readouterr().out


def test_cli_eval_and_encode(demo_out, tmp_path, capsys):
    model = _model(demo_out)
    out = tmp_path / "res.json"
    assert main(["eval", "--model", str(model), "--data", str(demo_out / "data" / "eval"),
                 "--image-root", str(demo_out / "data"), "--out", str(out),
                 "--no-progress"]) == 0
    res = json.loads(out.read_text())
    demo = json.loads((demo_out / "results.json").read_text())["models"]["fam"]
    assert res["overall"] == pytest.approx(demo["overall"])  # evaluation is deterministic
    items = tmp_path / "items.jsonl"
    img = sorted((demo_out / "data" / "images" / "eval").glob("*.png"))[0]
    items.write_text(json.dumps({"text": "<|image_1|>\nRepresent the given image.",
                                 "image": str(img.relative_to(demo_out / "data"))}) + "\n"
                     + json.dumps({"text": "a red circle"}) + "\n")
    emb_path = tmp_path / "emb.safetensors"
    assert main(["encode", "--model", str(model), "--input", str(items), "--image-root",
                 str(demo_out / "data"), "--out", str(emb_path)]) == 0
    from safetensors.torch import load_file
    emb = load_file(str(emb_path))["embeddings"]
    assert emb.shape[0] == 2
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


def test_cli_reports_bad_input_without_traceback(demo_out, tmp_path, capsys):
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"text": "x", "image": "../../escape.png"}) + "\n")
    rc = main(["encode", "--model", _model(demo_out), "--input", str(items),
               "--image-root", str(demo_out / "data"), "--out", str(tmp_path / "e.st")])
    assert rc == 2


def test_demo_items_index_and_search_at_once(demo_out, tmp_path, capsys):
    """The demo's items.jsonl feeds fam index build; an indexed image finds itself first;
    the demo's last lines say where the items are and what to run."""
    from fam.cli.experiments import next_steps
    res = json.loads((demo_out / "results.json").read_text())
    items = demo_out / "items.jsonl"
    assert res["items"] == str(items)
    rows = [json.loads(line) for line in items.read_text().splitlines()]
    assert len(rows) == len(json.loads((demo_out / "data" / "captions_eval.json").read_text()))
    assert all((demo_out / r["image"]).is_file() and set(r) == {"id", "image", "text"}
               for r in rows)
    steps = next_steps(res)
    assert str(items) in steps and "fam index build" in steps and "fam search" in steps
    index = tmp_path / "index"
    assert main(["index", "build", "--model", _model(demo_out), "--items",
                 str(items), "--out", str(index), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["search", "--index", str(index), "--image", str(demo_out / rows[3]["image"]),
                 "-k", "5", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # The query embeds exactly as its row did (cosine 1); the quick model's embeddings are
    # nearly collapsed, so other items may tie with it within float32 rounding (1e-5).
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert rows[3]["id"] in [h["id"] for h in hits if h["score"] >= hits[0]["score"] - 1e-5]


def test_compare_the_demo_results_with_fam_eval_results(demo_out, tmp_path, capsys):
    out = tmp_path / "mine" / "model" / "eval_results.json"
    assert main(["eval", "--model", _model(demo_out), "--data",
                 str(demo_out / "data" / "eval"), "--image-root", str(demo_out / "data"),
                 "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--compare", str(demo_out / "results.json")]) == 0  # its 4 models
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header[2:6] == [f"{demo_out.name}:{m}" for m in
                           ("untrained", "stage0", "vlm2vec", "fam")]
    assert main(["eval", "--compare", f"{demo_out / 'results.json'}:fam", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[2:] == [f"{demo_out.name}:fam", "mine", "chance", "diff"]
    overall = next(ln.split() for ln in lines if ln.startswith("Overall"))
    assert overall[-1] == "+0.0"  # the same model, evaluated again: the same numbers
