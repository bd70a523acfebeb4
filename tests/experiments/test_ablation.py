"""``fam ablate``: config expansion, the configs each run trains with, aggregation, and a
tiny end-to-end run."""
from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from fam.cli import main
from fam.cli.experiments import add_ablate_subcommand
from fam.experiments.ablation import (DEFAULT_GROUPS, GROUPS, MASK_RATIOS, RUN_PRIORITY,
                                      AblationRun, _seed_runs, adapt_config,
                                      align_config, expand_groups, plan_for_size, run_ablation,
                                      vein_layer_sets)
from fam.experiments.ablation_report import BASELINE_KEY, aggregate_runs, format_ablation
from fam.experiments.demo import demo_config
from fam.experiments.workers import try_lock as _try_lock
from fam.errors import ConfigError


def _by_label(cfgs):
    return dict(cfgs)


def test_main_group():
    g = _by_label(expand_groups(["main"], num_layers=4)["main"])
    assert list(g) == ["baseline", "mac_only", "vein_only", "fam"]
    assert g["baseline"] == AblationRun(align_weights=None, vein=False)
    assert g["mac_only"].align_weights == (1.0, 1.0, 1.0) and not g["mac_only"].vein
    assert g["vein_only"].align_weights is None and g["vein_only"].vein
    assert g["vein_only"].mask_ratio == 0.3 and g["vein_only"].vein_layers == (-3, -2, -1)
    assert g["fam"].align_weights == (1.0, 1.0, 1.0) and g["fam"].vein
    assert len({r.key for r in g.values()}) == 4


def test_mac_terms_group_adds_one_term_at_a_time():
    g = _by_label(expand_groups(["mac_terms"], num_layers=4)["mac_terms"])
    assert [r.align_weights for r in g.values()] == [(1.0, 0.0, 0.0), (1.0, 1.0, 0.0),
                                                     (1.0, 1.0, 1.0)]
    assert not any(r.vein for r in g.values())  # plain adaptation isolates MAC
    main = _by_label(expand_groups(["main"], num_layers=4)["main"])
    assert g["coarse+c2f+fine"].key == main["mac_only"].key  # shared run


def test_mask_ratio_and_layer_groups():
    ex = expand_groups(["mask_ratio", "vein_layers"], num_layers=4)
    ratios = _by_label(ex["mask_ratio"])
    assert [r.mask_ratio for r in ratios.values()] == list(MASK_RATIOS)
    assert all(r.vein and r.align_weights is None and r.vein_layers == (-3, -2, -1)
               for r in ratios.values())
    layers = _by_label(ex["vein_layers"])
    assert {k: r.vein_layers for k, r in layers.items()} == {
        "last": (-1,), "second_to_last": (-2,), "last_three": (-3, -2, -1),
        "all": (-4, -3, -2, -1)}
    assert all(r.mask_ratio == 0.3 and r.align_weights is None for r in layers.values())
    main = _by_label(expand_groups(["main"], num_layers=4)["main"])
    # gamma=0.3, last_three and "VEIN only" are one run.
    assert ratios["gamma=0.3"].key == layers["last_three"].key == main["vein_only"].key


def test_layer_sets_on_a_two_layer_model():
    sets = vein_layer_sets(2)
    assert sets == {"last": (-1,), "second_to_last": (-2,), "last_three": (-2, -1),
                    "all": (-2, -1)}
    ex = expand_groups(["main"], num_layers=2)  # default (-3, -2, -1) cut to what exists
    assert _by_label(ex["main"])["fam"].vein_layers == (-2, -1)
    with pytest.raises(ConfigError):
        expand_groups(["nope"], num_layers=4)


def test_stage_configs(tmp_path):
    plan = plan_for_size("small")
    main = _by_label(expand_groups(list(GROUPS), num_layers=4)["main"])
    acfg = align_config((1.0, 1.0, 0.0), tmp_path / "s0", tmp_path / "data", tmp_path / "al", 3,
                        plan)
    assert acfg.weights == (1.0, 1.0, 0.0)
    assert acfg.model == str(tmp_path / "s0") and acfg.run.seed == 3
    assert acfg.optim.steps == plan.align.optim.steps and \
        acfg.optim.batch_size == plan.align.optim.batch_size
    assert acfg.captions == str(tmp_path / "data" / "captions.json")

    base = adapt_config(main["baseline"], "s0", tmp_path / "data", tmp_path / "b", 0, plan)
    assert not base.vein.enabled and base.optim.steps == plan.adapt.optim.steps
    fam = adapt_config(main["fam"], "al", tmp_path / "data", tmp_path / "f", 0, plan)
    assert fam.vein.enabled and fam.vein.mask_ratio == 0.3 and fam.vein.layers == [-3, -2, -1]
    assert fam.train_dir == str(tmp_path / "data" / "train")
    # Everything else equal: the same adaptation budget for every config.
    assert base.optim == fam.optim and base.full_finetune == fam.full_finetune
    g08 = adapt_config(AblationRun(vein=True, mask_ratio=0.8, vein_layers=(-1,)), "s0",
                       tmp_path, tmp_path / "g", 0, plan)
    assert g08.vein.mask_ratio == 0.8 and g08.vein.layers == [-1]


def _res(overall, ind=None):
    return {"overall": overall, "IND": ind if ind is not None else overall, "OOD": overall,
            "meta_task": {"classification": overall, "vqa": overall, "retrieval": overall,
                          "grounding": overall}, "chance": {"overall": 12.5}}


def test_aggregate_pairs_deltas_by_seed():
    base, fam = AblationRun().key, "famkey"
    recs = [{"key": base, "seed": 0, "results": _res(10.0)},
            {"key": base, "seed": 1, "results": _res(20.0)},
            {"key": fam, "seed": 0, "results": _res(12.0)},
            {"key": fam, "seed": 1, "results": _res(23.0)}]
    agg = aggregate_runs(recs)
    assert agg[fam]["overall"]["mean"] == pytest.approx(17.5)
    assert agg[fam]["overall"]["std"] == pytest.approx(7.7782, abs=1e-3)  # ddof=1
    assert agg[fam]["delta"]["overall"]["mean"] == pytest.approx(2.5)
    # hand value √2/2 written to 4 decimals
    assert agg[fam]["delta"]["overall"]["std"] == pytest.approx(0.7071, abs=1e-3)
    assert agg[base]["delta"]["overall"]["mean"] == 0.0
    md = format_ablation({"aggregates": agg, "groups": {"main": [("baseline", base),
                                                                 ("fam", fam)]},
                          "seeds": [0, 1], "runs": recs, "size": "t"})
    assert "| fam | 17.5 ± 7.8" in md and "+2.5 ± 0.7" in md


def test_cli_registration():
    parser = argparse.ArgumentParser()
    add_ablate_subcommand(parser.add_subparsers())
    a = parser.parse_args(["ablate", "--out", "x", "--seeds", "0", "1", "2", "--size", "quick",
                           "--only", "main", "mask_ratio"])
    assert a.seeds == [0, 1, 2] and a.only == ["main", "mask_ratio"] and a.size == "quick"


@pytest.mark.slow
def test_tiny_end_to_end(tmp_path):
    plan = demo_config(quick=True)
    plan.scenes = dataclasses.replace(plan.scenes, n_train_images=60, n_eval_images=24,
                                      n_ood_images=12, eval_rows=4)
    for stage in (plan.stage0, plan.align, plan.adapt):
        stage.optim.steps, stage.optim.batch_size = 2, 4
    out = tmp_path / "abl"
    rep = run_ablation(out, seeds=[0], groups=["main"], configs=["vein_only"], plan=plan,
                       size="test")
    keys = {r["key"] for r in rep["runs"]}
    assert keys == {AblationRun().key, AblationRun(vein=True, vein_layers=(-2, -1)).key}
    saved = json.loads((out / "ablation.json").read_text())
    assert len(saved["runs"]) == 2 and all("overall" in r["results"] for r in saved["runs"])
    md = (out / "ablation.md").read_text()
    assert "| vein_only |" in md and "Δ vs baseline" in md
    # Resumable: a second call trains nothing and gives the same numbers.
    again = run_ablation(out, seeds=[0], groups=["main"], configs=["vein_only"], plan=plan,
                         size="test")
    assert [r["results"]["overall"] for r in again["runs"]] == \
        [r["results"]["overall"] for r in rep["runs"]]
    # Report-only: reads the finished runs, trains nothing (fam was never run).
    rep2 = run_ablation(out, seeds=[0], groups=["main"], plan=plan, size="test",
                        report_only=True)
    assert len(rep2["runs"]) == 2 and "| fam | (not run)" in (out / "ablation.md").read_text()
    # fam eval --compare reads the ablation's files: ablation.json (every run) and a run record.
    assert main(["eval", "--compare", str(out / "ablation.json")]) == 0
    rec = out / "seed0" / "results" / f"{AblationRun().key}.json"
    assert main(["eval", "--compare", str(rec),
                 f"{out / 'ablation.json'}:{AblationRun().key}"]) == 0


def test_baseline_key_of_the_report_is_the_baseline_run():
    assert BASELINE_KEY == AblationRun().key


@pytest.mark.slow
def test_quick_ablation_reports_paired_intervals_and_mechanisms(tmp_path):
    """``fam ablate --size quick --seeds 0 1 --workers 2``: every default group, trained by
    two worker processes, paired differences with mean and 95 % bounds (t over seeds,
    bootstrap over rows), mechanism checks, the plot."""
    out = tmp_path / "abl"
    assert main(["ablate", "--out", str(out), "--seeds", "0", "1", "--size", "quick",
                 "--workers", "2", "--no-progress"]) == 0
    rep = json.loads((out / "ablation.json").read_text())
    assert list(rep["groups"]) == list(DEFAULT_GROUPS)
    labels = [lab for cfgs in rep["groups"].values() for lab, _ in cfgs]
    for want in ("baseline", "mac_only", "vein_only", "fam", "vein_inversion", "fam_inversion",
                 "vein_only_w32", "coarse", "coarse+c2f", "coarse+c2f+fine", "control"):
        assert want in labels
    pairs = {(p["config"], p["reference"]): p for p in rep["paired"]}
    assert ("fam", "baseline") in pairs and ("mac_only", "control") in pairs
    assert ("vein_inversion", "vein_only_w32") in pairs
    for p in rep["paired"]:
        assert p["seeds"] == [0, 1]
        need = p["seeds_needed"]
        assert set(need) == {"1", "1.5", "2"} and need["1"] >= need["1.5"] >= need["2"] >= 2
        for m, d in p["metrics"].items():
            lo, hi = d["ci95"]
            assert lo <= d["mean"] <= hi
            blo, bhi = d["bootstrap_ci95"]
            assert blo <= bhi
    # The control trains on the task pairs plus MAC's caption pairs, for align + adapt steps.
    plan = plan_for_size("quick")
    ctrl = json.loads((out / "seed0" / "runs" / AblationRun(captions=True).key /
                       "train_metrics.json").read_text())
    assert ctrl["steps"] == plan.adapt.optim.steps + plan.align.optim.steps
    assert (out / "data" / "train_captions" / "Scenes-Captions.jsonl").exists()
    mech = rep["mechanism"]
    assert set(mech) >= {"baseline", "fam", "vein_inversion"}
    assert mech["baseline"]["vein"] is None
    for lab in ("vein_only", "fam", "vein_inversion", "fam_inversion", "vein_only_w32"):
        v = mech[lab]["vein"]
        assert v["rec_loss"] > 0 and v["rec_loss_shuffled"] > 0 and v["grad_ratio"] > 0
    assert -1 <= mech["fam"]["object_caption_gap"] <= 1
    assert (out / "ablation.png").stat().st_size > 1000 and rep["plot"] == str(out / "ablation.png")
    md = (out / "ablation.md").read_text()
    assert "## Paired differences" in md and "## Mechanism checks" in md
    assert "| fam − mac_only | 2 |" in md and "seeds for ±1/±1.5/±2" in md
    # Every run trained once, by one of the workers; the locks are free again.
    results = sorted(p.name for p in (out / "seed1" / "results").iterdir())
    assert len(results) == len({r["key"] for r in rep["runs"]}) == 10
    for lock in (out / "locks").iterdir():
        with _try_lock(lock) as got:
            assert got


def test_task_lock_is_exclusive_and_released(tmp_path):
    lock = tmp_path / "locks" / "seed0-x.lock"
    with _try_lock(lock) as first:
        assert first
        with _try_lock(lock) as second:  # another open file description: refused
            assert not second
    with _try_lock(lock) as again:
        assert again


def test_runs_are_ordered_by_priority(tmp_path):
    """The baseline, then the paper's comparison, the inversion variant, the data control,
    the MAC terms and the extra λ reference: the order workers take configs in."""
    tiny = tmp_path / "models" / "tiny"
    tiny.mkdir(parents=True)
    (tiny / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 4}}))
    plan = plan_for_size("quick")
    _, runs = _seed_runs(tmp_path, DEFAULT_GROUPS, plan, None)
    keys = list(runs)
    exp = expand_groups(DEFAULT_GROUPS, 4, plan.vein.layers or (-3, -2, -1))
    key = {lab: r.key for cfgs in exp.values() for lab, r in cfgs}
    assert keys[0] == BASELINE_KEY and len(keys) == 10
    order = ["mac_only", "vein_only", "fam", "vein_inversion", "fam_inversion", "control",
             "coarse", "coarse+c2f", "vein_only_w32"]
    assert keys[1:] == [key[lab] for lab in order]
    assert set(RUN_PRIORITY) == set(GROUPS)


def test_mechanism_checks_and_summary_carry_the_probe_values(tmp_path, monkeypatch):
    """The mechanism table's numbers are the probes' values, each under its own name, and
    their mean over seeds (a swap of the gaps, or of own/shuffled VEIN losses, fails)."""
    import fam.analysis.probes as probes
    from fam.experiments.ablation_report import mechanism_checks, mechanism_summary

    sim = {"global_local": {"gap": 0.25, "win_rate": 0.9},
           "object_caption": {"gap": 0.125, "win_rate": 0.75}}
    att = {"image_mass": [0.5, 0.375], "vision_centric_layers_neg": [-1]}
    monkeypatch.setattr(probes, "load_probe_images", lambda *a, **k: ["im"])
    monkeypatch.setattr(probes, "load_probe_model", lambda *a, **k: "model")
    monkeypatch.setattr(probes, "similarity_probes", lambda *a, **k: sim)
    monkeypatch.setattr(probes, "attention_probe", lambda *a, **k: att)
    (tmp_path / "train_metrics.json").write_text(json.dumps({"final": {
        "rec_loss": 2.0, "rec_loss_shuffled": 3.0, "task_grad_norm": 4.0,
        "vein_grad_norm": 1.0}}))
    m = mechanism_checks("model", tmp_path, "data", plan_for_size("quick"))
    assert (m["global_local_gap"], m["object_caption_gap"], m["object_caption_win_rate"]) == \
        (0.25, 0.125, 0.75)
    assert m["image_attention"] == [0.5, 0.375] and m["vision_centric"] == [-1]
    assert m["vein"] == {"rec_loss": 2.0, "rec_loss_shuffled": 3.0, "e_gap": 0.5,
                         "grad_ratio": 0.25}
    run = AblationRun(vein=True)
    other = dict(m, global_local_gap=0.75, vein=dict(m["vein"], rec_loss=4.0))
    recs = [{"key": run.key, "seed": 0, "mechanism": m},
            {"key": run.key, "seed": 1, "mechanism": other}]
    got = mechanism_summary(recs, {"g": [("vein_only", run)]})["vein_only"]
    assert got["global_local_gap"] == 0.5 and got["object_caption_gap"] == 0.125
    assert got["image_attention_last"] == 0.375 and got["n_seeds"] == 2
    assert got["vein"]["rec_loss"] == 3.0 and got["vein"]["rec_loss_shuffled"] == 3.0
