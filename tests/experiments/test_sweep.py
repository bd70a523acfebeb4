"""``fam ablate --sweep``: preset validation, point identity, the table, the curves, and a
tiny end-to-end sweep."""
from __future__ import annotations

import json
import math

import pytest

from fam.cli import main
from fam.errors import ConfigError
from fam.experiments.curves import format_curves, load_curve
from fam.experiments.presets import PRESETS_DIR
from fam.experiments.sweep import Sweep, format_sweep, load_sweep, sweep_table


def _write(tmp_path, text: str):
    p = tmp_path / "sweep_t.yaml"
    p.write_text(text)
    return str(p)


def test_shipped_sweep_presets_load():
    names = sorted(p.stem.removeprefix("sweep_") for p in PRESETS_DIR.glob("sweep_*.yaml"))
    assert {"recipe", "mac", "order"} <= set(names)
    rec = load_sweep("recipe")
    assert rec.configs == ("baseline",)  # chosen on the baseline alone
    base = rec.points[0]
    assert base.overrides == ()
    by = {p.label: p for p in rec.points}
    assert by["lr=2e-4"].plan.adapt.optim.lr == 2e-4
    assert by["batch=64 (GradCache 32)"].plan.adapt.gradcache_chunk == 32
    # Only the stage-0 point changes stage 0: the other points share the base's models.
    assert {p.stage0_key for p in rec.points if p.label != "stage0=800"} == {base.stage0_key}
    assert by["stage0=800"].stage0_key != base.stage0_key
    assert len({p.key for p in rec.points}) == len(rec.points)
    # The mac sweep's base point is the recipe sweep's: one run when they share --out.
    assert load_sweep("mac").points[0].key == base.key


def test_the_demo_video_part_leaves_ablations_and_sweeps_image_only(tmp_path):
    """The demo_media presets turn the demo's video/document part on (the demo keeps it off);
    the ablation sizes and the sweeps drop it, so their recipe keys (the folders of earlier
    runs) and recorded settings are those of the preset without the media section."""
    import yaml

    from fam.config import DemoConfig, DemoMediaConfig, to_dict
    from fam.experiments.ablation import SIZES, plan_for_size
    from fam.experiments.demo import demo_config
    from fam.experiments.presets import _read, load_preset
    assert not demo_config().media.enabled and not demo_config(quick=True).media.enabled
    assert all(load_preset(DemoConfig, n).media.enabled for n in ("demo_media", "demo_media_quick"))
    default = to_dict(DemoMediaConfig())
    for size in SIZES:
        assert to_dict(plan_for_size(size).media) == default, size
    for name in ("recipe", "mac", "order"):
        assert all(to_dict(p.plan.media) == default for p in load_sweep(name).points)
    # a sweep on the demo preset written without its media section: the same keys
    plain = _read("demo")
    assert plain.pop("media")["enabled"] is False
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain))
    ours = load_sweep("order")
    theirs = load_sweep("order", base=str(tmp_path / "plain.yaml"))
    assert [p.key for p in ours.points] == [p.key for p in theirs.points]
    assert [p.stage0_key for p in ours.points] == [p.stage0_key for p in theirs.points]
    media = load_sweep("order", base="demo_media")  # on: still the image-only keys
    assert [p.key for p in media.points] == [p.key for p in ours.points]
    assert isinstance(ours.points[0].plan, DemoConfig)


def test_equal_recipes_share_a_key_and_bad_presets_fail(tmp_path):
    sw = load_sweep(_write(tmp_path, "sweep:\n  base: ablation_quick\n  points:\n"
                                     "    a: []\n    b: [adapt.optim.lr=5.0e-4]\n"))
    assert sw.points[0].key == sw.points[1].key and sw.configs == ("baseline",)
    for text, words in [
        ("points: {}\n", "one 'sweep:' mapping"),
        ("sweep:\n  basis: demo\n  points: {a: []}\n", "unknown sweep key"),
        ("sweep:\n  points: {}\n", "must map each point"),
        ("sweep:\n  points: {a: adapt.optim.lr=1}\n", "list of key=value"),
        ("sweep:\n  points: {a: [adapt.optim.nope=1]}\n", "sweep.points.a"),
        ("sweep:\n  points: {a: [scenes.eval_rows=3]}\n", "changes 'scenes'"),
    ]:
        with pytest.raises(ConfigError, match=words):
            load_sweep(_write(tmp_path, text))


def _rec(point, config, seed, overall, key):
    return {"point": point, "config": config, "seed": seed, "key": key,
            "results": {"overall": overall, "IND": overall + 1, "OOD": overall - 1,
                        "datasets": {}},
            "timings_s": {"adapt": 10.0, "eval": 2.0}}


def test_table_gives_across_seed_sd_and_paired_difference(tmp_path):
    sw = load_sweep(_write(tmp_path, "sweep:\n  base: ablation_quick\n  configs: [baseline, "
                                     "mac_only]\n  points:\n    a: []\n"))
    mac = "mac1-1-1__veinoff"
    recs = {"a": [_rec("a", "baseline", s, x, "macnone__veinoff")
                  for s, x in enumerate([34.6, 41.5, 43.3])] +
            [_rec("a", "mac_only", s, x, mac) for s, x in enumerate([43.5, 43.4, 43.6])]}
    rows = {r["config"]: r for r in sweep_table(recs, sw)}
    b = rows["baseline"]
    assert b["seeds"] == [0, 1, 2] and b["overall"]["n"] == 3
    assert math.isclose(b["overall"]["mean"], (34.6 + 41.5 + 43.3) / 3)
    assert math.isclose(b["overall"]["sd"], 4.5924, abs_tol=1e-3)  # sample sd, quoted to 4 decimals
    assert b["overall"]["min"] == 34.6 and b["train_eval_s"] == 12.0
    d = rows["mac_only − baseline"]
    assert math.isclose(d["difference"]["mean"], (8.9 + 1.9 + 0.3) / 3,
                        abs_tol=1e-9)  # float rounding of 43.5 − 34.6 etc.
    # The README's ablation: ± 1 needs 82 seeds, ± 2 needs 23; ± 1.5 lies between.
    assert 23 < d["seeds_needed"] < 82
    md = format_sweep({"sweep": "t", "base": "ablation_quick", "table": list(rows.values())})
    assert "| a | (base) | baseline | 3 | 39.8 | 4.6 | 34.6–43.3 | 34.6 41.5 43.3 |" in md
    assert "seeds for ±1.5" in md


def test_format_curves_reads_points_at_fractions():
    curve = [{"step": s, "task_loss": 10.0 / s, "accuracy": s / 100, "grad_norm": 50.0 - s / 10}
             for s in range(10, 101, 10)]
    md = format_curves({("demo", "baseline", 0): curve, ("demo", "mac_only", 0): []})
    assert "| demo | baseline | 0 | 1 | 1 | 0.5 | 0.2 | 0.1 |" in md  # steps 10 10 20 50 100
    assert "| 49 | 49 | 48 | 45 | 40 | 49 |" in md  # grad_norm row, then its max
    assert "mac_only" not in md  # no curve, no row
    assert "No training curves" in format_curves({("a", "b", 0): []})


@pytest.mark.slow
def test_quick_sweep_end_to_end(tmp_path):
    """Two labels of one recipe train once; a second point trains too; the report has the
    table and every run's training curve with the embedding gauges; a rerun resumes."""
    spec = _write(tmp_path, "sweep:\n  base: ablation_quick\n  points:\n    base: []\n"
                            "    same: [adapt.optim.lr=5.0e-4]\n"
                            "    tau: [adapt.temperature=0.05]\n")
    out = tmp_path / "sw"
    args = ["ablate", "--sweep", spec, "--seeds", "0", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    rep = json.loads((out / "sweep_t.json").read_text())
    rows = {r["point"]: r for r in rep["table"]}
    assert rows["base"]["overall_per_seed"] == rows["same"]["overall_per_seed"]
    assert rows["base"]["overall"]["n"] == rows["tau"]["overall"]["n"] == 1
    assert len(list((out / "points").glob("*/seed0/results/*.json"))) == 2
    assert len(list((out / "stage0").iterdir())) == 1  # one stage 0 for every point
    curves = json.loads((out / "curves_t.json").read_text())["curves"]
    assert {c["point"] for c in curves} == {"base", "same", "tau"}
    h = curves[0]["history"]
    assert h and h[-1]["step"] == 4  # the quick adaptation's 4 steps, last point closed
    for g in ("task_loss", "accuracy", "grad_norm", "q_anisotropy", "q_eff_rank", "lr"):
        assert g in h[-1]
    run_dir = next((out / "points").glob("*/seed0/runs/*"))
    assert load_curve(run_dir) in [c["history"] for c in curves]
    assert "### q_anisotropy" in (out / "curves_t.md").read_text()
    mtime = {p: p.stat().st_mtime for p in (out / "points").glob("*/seed0/results/*.json")}
    assert main(args) == 0  # resumes: nothing retrained
    assert {p: p.stat().st_mtime for p in mtime} == mtime
    # The exported results (no models) copied into a fresh folder resume without retraining.
    exp = tmp_path / "exported"
    assert main(args + ["--report-only", "--export", str(exp)]) == 0
    assert not list(exp.rglob("*.safetensors")) and not list(exp.rglob("checkpoints"))
    assert len(list(exp.glob("points/*/seed0/results/*.json"))) == 2
    assert (exp / "sweep_t.md").exists() and (exp / "curves_t.png").exists()
    args2 = ["ablate", "--sweep", spec, "--seeds", "0", "--out", str(exp), "--no-progress"]
    before = {p: p.stat().st_mtime for p in exp.glob("points/*/seed0/results/*.json")}
    assert main(args2) == 0
    assert not list(exp.glob("stage0/*/seed0/models"))  # no stage 0 retrained
    assert {p: p.stat().st_mtime for p in before} == before


def test_adapt_seed_offset_moves_only_the_adaptation_seed(tmp_path):
    import dataclasses

    from fam.experiments.ablation import AblationRun, adapt_config, align_config, plan_for_size
    plan = dataclasses.replace(plan_for_size("quick"), adapt_seed_offset=3)
    a = adapt_config(AblationRun(), tmp_path / "s0", tmp_path / "d", tmp_path / "o", 5, plan)
    m = align_config((1.0, 1.0, 1.0), tmp_path / "s0", tmp_path / "d", tmp_path / "o", 5, plan)
    assert a.run.seed == 8 and m.run.seed == 5
    by = {p.label: p for p in load_sweep("order").points}
    assert by["order+1"].plan.adapt_seed_offset == 1
    assert by["order+1"].stage0_key == by["demo"].stage0_key  # same initialisation, stage 0
    with pytest.raises(ConfigError, match="adapt_seed_offset"):
        load_sweep(_write(tmp_path, "sweep:\n  points: {a: [adapt_seed_offset=-1]}\n"))


def test_baseline_stability_page_quotes_the_committed_results():
    """Every run's overall precision@1 in docs/results/sweep appears, to one decimal, on the
    page that reports the sweep (issue 22's rule: quoted numbers come from the JSON)."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    runs = list((root / "docs" / "results" / "sweep").glob("points/*/seed*/results/*.json"))
    page = (root / "docs" / "baseline_stability.md").read_text()
    assert runs
    for f in runs:
        assert f"{json.loads(f.read_text())['results']['overall']:.1f}" in page, f
