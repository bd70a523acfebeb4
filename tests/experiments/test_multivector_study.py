"""``fam ablate --only multivector``: the group's runs (shared with main's), the report's rows
and comparisons, one encoding for every scoring, the MaxSim map check, and a tiny
end-to-end run."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fam.experiments.ablation import (AblationRun, _seed_runs, adapt_config, expand_groups,
                                      plan_for_size, run_ablation)
from fam.experiments.ablation_report import (BASELINE_KEY, _comparison_pairs, format_ablation,
                                             write_report)
from fam.experiments.multivector_study import (LATE_SCORINGS, CachedReadings, collect,
                                               format_study, map_check, report_groups,
                                               study_file, summary_table)

MAC = (1.0, 1.0, 1.0)


def _tiny_root(tmp_path, layers=4):
    tiny = tmp_path / "models" / "tiny"
    tiny.mkdir(parents=True)
    (tiny / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": layers}}))
    return tmp_path


def test_group_runs_share_the_main_checkpoints_and_add_two_adaptations(tmp_path):
    g = dict(expand_groups(["multivector"], num_layers=4)["multivector"])
    main = dict(expand_groups(["main"], num_layers=4)["main"])
    assert list(g) == ["baseline", "mac_only", "baseline+mv", "mac_only+mv", "fam"]
    for lab in ("baseline", "mac_only", "fam"):  # zero-shot readings: main's very runs
        assert g[lab].key == main[lab].key and not g[lab].multivector
    assert g["baseline+mv"] == AblationRun(multivector=True)
    assert g["mac_only+mv"] == AblationRun(align_weights=MAC, multivector=True)
    assert g["baseline+mv"].key == BASELINE_KEY + "__mv"
    plan = plan_for_size("quick")
    on = adapt_config(g["mac_only+mv"], tmp_path, tmp_path, tmp_path / "r", 0, plan)
    off = adapt_config(g["mac_only"], tmp_path, tmp_path, tmp_path / "r", 0, plan)
    assert on.multivector.enabled and not off.multivector.enabled
    assert dataclasses.replace(on.multivector, enabled=False) == off.multivector
    # With main, every shared run trains once: 4 main configs + the 2 multi-vector ones.
    _, runs = _seed_runs(_tiny_root(tmp_path), ["main", "multivector"], plan, None)
    layers = plan.vein.layers or (-3, -2, -1)
    main_keys = [r.key for _, r in expand_groups(["main"], 4, layers)["main"]]
    assert len(runs) == 6 and list(runs)[:4] == main_keys


def test_report_rows_and_paired_comparisons():
    exp = {"multivector": expand_groups(["multivector"], num_layers=4)["multivector"]}
    rows = report_groups(exp)["multivector"]
    labels = [lab for lab, _ in rows]
    assert labels[:3] == ["baseline", "baseline · maxsim", "baseline · hybrid"]
    assert labels[6:9] == ["fam", "fam · maxsim", "fam · hybrid"]  # zero-shot rows first
    keys = dict(rows)
    assert keys["baseline"].key == BASELINE_KEY
    assert keys["mac_only+mv · hybrid"].key == AblationRun(MAC, multivector=True).key + "@hybrid"
    listed = [(a, b) for a, _, b, _ in _comparison_pairs(report_groups(exp))]
    pairs = set(listed)
    assert len(pairs) == len(listed)  # each comparison once
    assert ("mac_only · maxsim", "mac_only") in pairs  # late vs pooled, one checkpoint
    assert ("mac_only · maxsim", "baseline · maxsim") in pairs  # MAC's effect, zero-shot
    assert ("mac_only+mv · maxsim", "baseline+mv · maxsim") in pairs  # and trained
    assert ("baseline+mv", "baseline") in pairs  # the late loss's effect on the pooled vector


def _results(credits):
    ds = {"T": {"meta_task": "retrieval", "split": "IND", "credits": credits[:4],
                "precision@1": 100 * sum(credits[:4]) / 4},
          "G": {"meta_task": "grounding", "split": "OOD", "credits": credits[4:],
                "precision@1": 100 * sum(credits[4:]) / 4}}
    p = [d["precision@1"] for d in ds.values()]
    return {"datasets": ds, "meta_task": {"retrieval": p[0], "grounding": p[1]}, "IND": p[0],
            "OOD": p[1], "overall": sum(p) / 2, "chance": {"overall": 25.0}}


def _maps(miou):
    ex = {"image": "images/eval/x.png", "caption": "a red circle", "tokens": ["red", "circle"],
          "maps": [[0.0] * 4, [1.0] * 4], "object_coverage": [0.0] * 4, "grid": [2, 2]}
    return {"miou": miou, "miou_shuffled": 0.1, "pointing": 0.5, "contrast": 0.01,
            "n_regions": 7, "n_images": 3, "grid": [2, 2], "example": ex}


def test_collect_and_the_report_read_the_study_files(tmp_path):
    """Late scorings become rows with the ablation's paired statistics; the map check gets
    its own section with paired differences by seed."""
    exp = {"multivector": expand_groups(["multivector"], num_layers=4)["multivector"]}
    runs = dict(exp["multivector"])
    records = []
    for seed in (0, 1):
        for lab in ("baseline", "mac_only"):
            key = runs[lab].key
            base = [1, 0, 0, 1, 0, 0, 1, 0] if lab == "baseline" else [1, 1, 0, 1, 0, 1, 1, 0]
            records.append({"key": key, "seed": seed, "results": _results(base),
                            "timings_s": {"eval": 1.0}})
            late = [{"key": f"{key}@{s}", "seed": seed, "scoring": s,
                     "results": _results([1] * 6 + [0, seed]), "timings_s": {"eval": 1.0}}
                    for s in LATE_SCORINGS]
            f = study_file(tmp_path / f"seed{seed}", key)
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps({"key": key, "seed": seed, "head": {"dim": 0},
                                     "trained_head": False, "records": late,
                                     "maps": _maps(0.2 + 0.1 * (lab == "mac_only") + 0.01 * seed)}))
    groups, late, study = collect(tmp_path, [0, 1], exp)
    assert {r["key"] for r in late} == {f"{runs[l].key}@{s}" for l in ("baseline", "mac_only")
                                        for s in LATE_SCORINGS}
    assert study["maps"]["mac_only"]["miou"]["mean"] == pytest.approx(0.305)  # exact sum of floats
    (p,) = [p for p in study["paired"] if p["config"] == "mac_only"]
    assert p["metrics"]["miou"]["mean"] == pytest.approx(0.1)  # exact sum of floats
    assert p["metrics"]["miou"]["ci95"] is not None and p["seeds"] == [0, 1]
    rep = write_report(tmp_path, records + late, groups, [0, 1], "test", plan_for_size("quick"),
                       [], 0.0, final=False, study=study)
    md = format_ablation(rep)
    assert "| mac_only · maxsim | " in md and "| mac_only · maxsim − baseline · maxsim | 2 |" in md
    assert "## MaxSim maps vs object masks" in md and "| mac_only − baseline | 2 |" in md
    assert "| baseline+mv · maxsim |" in md  # not run: shown as such
    assert format_study({}) == []
    table = summary_table(rep)  # the README's: a row per checkpoint that ran
    assert len(table) == 4 and table[2].startswith("| baseline | 2 | 37.5 | 81.2 | 81.2 | +43.8 [")
    assert "0.305 (0.100)" in table[3] and "## One vector or many: summary" in md


# --------------------------------------------------------------------------- tiny model

@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from fam.backbones import build_tiny
    from fam.data.scenes import ScenesConfig, generate_scenes
    root = tmp_path_factory.mktemp("mvstudy")
    generate_scenes(ScenesConfig(seed=0, n_train_images=8, n_eval_images=6, n_ood_images=3,
                                 eval_rows=4, n_candidates=4), root / "data", progress=False)
    caps = [c["caption"] for c in json.loads((root / "data" / "captions.json").read_text())]
    build_tiny("qwen2_vl", root / "tiny", size="xs", corpus=caps, vocab_size=400)
    return root


def test_one_encoding_serves_every_scoring_and_single_is_the_plain_model(scenes):
    from fam.eval.mmeb import evaluate
    from fam.model.encode import load_embedding_model
    from fam.model.multivector import TwoReadings, load_multivector
    model = load_embedding_model(scenes / "tiny")
    readings = TwoReadings(model, load_multivector(scenes / "tiny", model.adapter.hidden_size))
    calls = []
    inner = readings.encode_multi_all
    readings.encode_multi_all = lambda items, **kw: calls.append(len(items)) or inner(items, **kw)
    enc = CachedReadings(readings)
    kw = dict(progress=False, per_row=True, datasets=["Scenes-T2I", "Scenes-Grounding"])
    data = scenes / "data" / "eval"
    late = {s: evaluate(enc, data, scenes / "data", scoring=s, **kw) for s in LATE_SCORINGS}
    n = len(calls)
    cached_single = evaluate(enc, data, scenes / "data", **kw)
    assert len(calls) == n == 2  # one encoding per dataset, reused by the later scorings
    plain = evaluate(model, data, scenes / "data", **kw)
    direct = evaluate(readings, data, scenes / "data", scoring="maxsim", **kw)
    for name in plain["datasets"]:
        assert cached_single["datasets"][name]["credits"] == plain["datasets"][name]["credits"]
        assert late["maxsim"]["datasets"][name]["credits"] == \
            direct["datasets"][name]["credits"]


def test_map_check_on_scenes(scenes):
    res = map_check(scenes / "tiny", scenes / "data", max_images=4)
    assert res["n_images"] == 4 and res["n_regions"] >= 4
    gh, gw = res["grid"]
    ex = res["example"]
    assert len(ex["maps"]) == len(ex["tokens"]) >= 1 and len(ex["maps"][0]) == gh * gw
    assert 0.0 <= res["miou"] <= 1.0 and 0.0 <= res["pointing"] <= 1.0
    assert 0.0 <= res["miou_shuffled"] <= 1.0


@pytest.mark.slow
def test_quick_study_end_to_end_and_resume(tmp_path):
    from fam.experiments.demo import demo_config
    plan = demo_config(quick=True)
    plan.scenes = dataclasses.replace(plan.scenes, n_train_images=60, n_eval_images=24,
                                      n_ood_images=12, eval_rows=4)
    for stage in (plan.stage0, plan.align, plan.adapt):
        stage.optim.steps, stage.optim.batch_size = 2, 4
    out = tmp_path / "abl"
    rep = run_ablation(out, seeds=[0], groups=["multivector"], plan=plan, size="test",
                       probes=False)
    keys = {r["key"] for r in rep["runs"]}
    mv = AblationRun(MAC, multivector=True).key
    assert {mv, mv + "@maxsim", mv + "@hybrid", BASELINE_KEY + "@maxsim"} <= keys
    assert len(keys) == 15  # 5 checkpoints x 3 scorings
    assert (out / "seed0" / "runs" / mv / "model" / "fam_multivector.json").is_file()
    assert set(rep["multivector"]["maps"]) == {"baseline", "mac_only", "fam", "baseline+mv",
                                               "mac_only+mv"}
    assert (out / "multivector_maps.png").is_file()
    files = sorted((out / "seed0" / "results" / "multivector").glob("*.json"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = run_ablation(out, seeds=[0], groups=["multivector"], plan=plan, size="test",
                         probes=False)  # resumes: nothing trained or read again
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert {r["key"]: r["results"]["overall"] for r in again["runs"]} == \
        {r["key"]: r["results"]["overall"] for r in rep["runs"]}
