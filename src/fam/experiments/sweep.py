"""Recipe sweeps over seeds (``fam ablate --sweep NAME``): which training recipe makes the
baseline's score stop depending on the seed.

A sweep preset (``configs/experiments/sweep_<name>.yaml``) names a base preset (the
ablation size, e.g. ``demo``), the ablation configs trained at every point (the baseline,
by default: a recipe is chosen on the baseline alone, since choosing it on MAC's result
would bias the MAC-vs-baseline comparison) and its points, each a list of ``key=value``
overrides of the base (the ``fam train`` override syntax)::

    sweep:
      base: demo
      configs: [baseline]
      points:
        demo: []                                  # the base recipe itself
        lr=2e-4: [adapt.optim.lr=2.0e-4]

Every point is trained and evaluated exactly as an ablation run
(:func:`fam.experiments.ablation.train_and_eval`: same benchmark, same per-seed
initialisation and stage 0, same evaluation), for each seed. Points are identified by
their resolved recipe, not their label, so the base point of every sweep (and any point two
sweeps share) trains once per seed when the sweeps share ``--out``; stage 0 is shared by
every point whose stage-0 recipe is the same. Tasks are taken seed by seed (every point on
the first seed, then every point on the next), so a sweep stopped early compares every
point on the same seeds. Stage-0 models and runs are tasks under file locks
(:mod:`fam.experiments.workers`): ``--workers N`` processes, or separate calls, share the
folder, and re-running the same command resumes.

Layout under ``--out``::

    data/                                      the benchmark (shared)
    stage0/<stage-0 key>/seed<s>/              tiny model and stage 0 of a stage-0 recipe
    points/<point key>/point.json              a point's labels, overrides and recipe
    points/<point key>/seed<s>/{align,runs,results}/   as in an ablation seed folder
    sweep_<name>.json, sweep_<name>.md         the table: per point the across-seed mean,
                                               sd and range of overall precision@1, time
    curves_<name>.json, curves_<name>.md/.png  training curves (:mod:`fam.experiments.curves`)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from fam.config import DemoConfig, apply_overrides, to_dict
from fam.config.loader import read_yaml
from fam.errors import ConfigError
from fam.experiments.ablation import AblationRun, expand_groups, train_and_eval
from fam.experiments.ablation_report import GROUPS, METRICS, paired_differences
from fam.experiments.pipeline import base_model, num_layers, prepare_scenes, start_experiment
from fam.experiments.presets import load_preset, preset_path
from fam.experiments.workers import run_workers, try_lock
from fam.utils.io import atomic_write_json, atomic_write_text
from fam.utils.threads import use_threads

log = logging.getLogger(__name__)

__all__ = ["SweepPoint", "Sweep", "load_sweep", "run_sweep", "sweep_table", "format_sweep",
           "export_results"]

#: Half-width (points of overall precision@1) the issue's decisive comparison aims at.
TARGET_HALF_WIDTH = 1.5


@dataclass(frozen=True)
class SweepPoint:
    """One recipe of a sweep: its label, overrides and resolved budgets."""

    label: str
    overrides: tuple[str, ...]
    plan: DemoConfig

    @property
    def key(self) -> str:
        """Identity of the whole recipe (equal recipes share their runs)."""
        return _digest(_changed(to_dict(self.plan)))

    @property
    def stage0_key(self) -> str:
        """Identity of what stage 0 depends on (equal ones share the stage-0 models)."""
        d = to_dict(self.plan)
        return _digest(_changed({k: d[k] for k in ("scenes", "model", "qa", "stage0")}))


@dataclass(frozen=True)
class Sweep:
    name: str
    base: str
    configs: tuple[str, ...]
    points: tuple[SweepPoint, ...]


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _changed(d: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a (part of a) :class:`DemoConfig` dict that differ from the class
    defaults: a field added later with its default leaves every key unchanged."""
    default = _flat(to_dict(DemoConfig()))
    return {k: v for k, v in _flat(d).items() if k not in default or default[k] != v}


def _digest(d: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def load_sweep(name: str, base: str | None = None) -> Sweep:
    """The sweep preset ``sweep_<name>`` (or a YAML path), validated: every point's recipe
    loads as a :class:`~fam.config.DemoConfig` and no point changes the benchmark.

    Args:
        base: override the preset's base (e.g. ``ablation_small`` to try a sweep cheaply).
    """
    path = preset_path(name if name.endswith((".yaml", ".yml")) else f"sweep_{name}")
    raw = read_yaml(path)
    sw = raw.get("sweep")
    if not isinstance(sw, dict) or set(raw) != {"sweep"}:
        raise ConfigError(f"{path}: a sweep preset holds one 'sweep:' mapping (base, configs, "
                          f"points); got keys {sorted(raw)}")
    bad = sorted(set(sw) - {"base", "configs", "points"})
    if bad:
        raise ConfigError(f"{path}: unknown sweep key(s) {bad}; use base, configs, points")
    base = base or sw.get("base") or "demo"
    configs = sw.get("configs") or ["baseline"]
    points = sw.get("points")
    if not isinstance(configs, list) or not all(isinstance(c, str) for c in configs):
        raise ConfigError(f"{path}: sweep.configs must be a list of config labels")
    if not isinstance(points, dict) or not points:
        raise ConfigError(f"{path}: sweep.points must map each point's label to a list of "
                          "key=value overrides")
    # Sweeps are image-only (DemoConfig.image_only): the demo's video part is not swept.
    base_dict = to_dict(load_preset(DemoConfig, base).image_only())
    out = []
    for label, ovs in points.items():
        if not isinstance(ovs, list) or not all(isinstance(o, str) for o in ovs):
            raise ConfigError(f"{path}: sweep.points.{label} must be a list of key=value "
                              f"strings, got {ovs!r}")
        try:
            plan = load_preset(DemoConfig, base, ovs).image_only()
        except ConfigError as e:
            raise ConfigError(f"{path}: sweep.points.{label}: {e}") from None
        if to_dict(plan.scenes) != base_dict["scenes"]:
            raise ConfigError(f"{path}: sweep.points.{label} changes 'scenes'; every point is "
                              "evaluated on the same benchmark (sweep it with another base)")
        out.append(SweepPoint(str(label), tuple(ovs), plan))
    return Sweep(path.stem.removeprefix("sweep_"), base, tuple(configs), tuple(out))


def _runs(sweep: Sweep, model_dir: Path, plan: DemoConfig) -> dict[str, AblationRun]:
    """``{config label: run}`` of the sweep's configs (labels of every ablation group)."""
    labelled = {lab: r for cfgs in expand_groups(list(GROUPS), num_layers(model_dir),
                                                 plan.vein.layers or (-3, -2, -1)).values()
                for lab, r in cfgs}
    bad = [c for c in sweep.configs if c not in labelled]
    if bad:
        raise ConfigError(f"sweep {sweep.name}: unknown config label(s) {bad}; choose from "
                          f"{sorted(labelled)}")
    return {c: labelled[c] for c in sweep.configs}


def _stage0_root(out: Path, p: SweepPoint, seed: int) -> Path:
    return out / "stage0" / p.stage0_key / f"seed{seed}"


def _point_root(out: Path, p: SweepPoint, seed: int) -> Path:
    return out / "points" / p.key / f"seed{seed}"


def _work(out: Path, sweep: Sweep, seeds: Sequence[int], progress: bool,
          poll_s: float = 5.0) -> None:
    """Train every (seed, point, config) no other process holds, seed by seed."""
    data, locks = out / "data", out / "locks"
    tasks: list[tuple[int, SweepPoint, str | None]] = []
    for s in seeds:
        for p in sweep.points:
            tasks.append((s, p, None))  # its stage 0 (shared; usually already there)
            tasks += [(s, p, c) for c in sweep.configs]
    while tasks:
        did = waiting = False
        for task in list(tasks):
            seed, p, label = task
            if label is not None and label in _finished(out, p, seed):
                tasks.remove(task)
                continue
            s0 = _stage0_root(out, p, seed)
            s0_done = (s0 / "stage0" / "model" / "config.json").exists()
            if label is None:
                # Stage 0 only where a run still needs it (results copied from elsewhere,
                # e.g. docs/results, need no model).
                needed = any(t[0] == seed and t[2] is not None and
                             t[1].stage0_key == p.stage0_key and
                             t[2] not in _finished(out, t[1], seed) for t in tasks)
                if needed and not s0_done:
                    with try_lock(locks / f"stage0-{p.stage0_key}-seed{seed}.lock") as got:
                        if not got:
                            waiting = True
                            continue
                        log.info("sweep seed %d: stage 0 %s (point %s)", seed, p.stage0_key,
                                 p.label)
                        base_model(s0, data, p.plan, seed, progress)
                tasks.remove(task)
                did = True
                break
            if not s0_done:
                waiting = True
                continue
            root = _point_root(out, p, seed)
            run = _runs(sweep, s0 / "models" / "tiny", p.plan)[label]
            if (root / "results" / f"{run.key}.json").exists():
                tasks.remove(task)
                continue
            # A run's lock, and the lock of the MAC stage it trains first (configs of one
            # point and seed that share MAC weights share that stage).
            align = "-".join(f"{w:g}" for w in run.align_weights or ())
            with try_lock(locks / f"{p.key}-seed{seed}-{run.key}.lock") as got, \
                    try_lock(locks / f"{p.key}-seed{seed}-align-{align or 'none'}.lock") as got_a:
                if not got:
                    tasks.remove(task)  # another worker trains and reports it
                    continue
                if align and not got_a and not (root / "align" / align / "model" /
                                                "config.json").exists():
                    waiting = True  # another worker is training this MAC stage
                    continue
                log.info("sweep seed %d: point %s, %s", seed, p.label, label)
                rec = train_and_eval(run, root, s0 / "stage0" / "model", data, seed, p.plan,
                                     progress, probes=False)
                rec["point"], rec["config"] = p.label, label
                atomic_write_json(root / "results" / f"{run.key}.json", rec)
                log.info("sweep seed %d: %s %s overall %.1f in %.0f s", seed, p.label, label,
                         rec["results"]["overall"], sum(rec["timings_s"].values()))
            tasks.remove(task)
            did = True
            break
        if not did:
            if not waiting:
                return
            time.sleep(poll_s)


def _finished(out: Path, p: SweepPoint, seed: int) -> set[str]:
    """Config labels of the point's finished runs on ``seed`` (from their result files)."""
    res = _point_root(out, p, seed) / "results"
    return {json.loads(f.read_text()).get("config") for f in res.glob("*.json")} \
        if res.is_dir() else set()


def _worker_main(out: str, sweep: Sweep, seeds: list[int], progress: bool, level: int,
                 threads: int) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(processName)s "
                                             "%(name)s: %(message)s", datefmt="%H:%M:%S")
    use_threads(threads)
    _work(Path(out), sweep, seeds, progress)


def run_sweep(out: str | Path, name: str, seeds: Sequence[int] = (0, 1, 2),
              progress: bool = False, threads: int = 1, workers: int = 1,
              report_only: bool = False, base: str | None = None,
              export: str | Path | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep; writes and returns ``sweep_<name>.json``'s content.

    Args:
        out: output folder (sweeps on the same base may share it: equal points train once).
        name: the preset ``sweep_<name>`` or a YAML path.
        seeds: training seeds of every point.
        threads: torch threads per process; workers: processes (file locks share tasks).
        report_only: train nothing; rebuild the table and curves from finished runs.
        base: override the preset's base preset.
        export: also copy the results (no checkpoints) there (:func:`export_results`).
    """
    if not seeds:
        raise ConfigError("give at least one seed (--seeds 0 1 2)")
    if workers < 1:
        raise ConfigError(f"--workers must be ≥ 1, got {workers}")
    import torch

    sweep = load_sweep(name, base)
    before = torch.get_num_threads()
    try:
        base_plan, out = start_experiment(load_preset(DemoConfig, sweep.base).image_only(), out,
                                          "sweep", threads=threads)
        t_start = time.time()
        if not report_only:
            prepare_scenes(out / "data", dataclasses.replace(base_plan.scenes, seed=0),
                           progress=False)
            for p in sweep.points:
                f = out / "points" / p.key / "point.json"
                labels = json.loads(f.read_text()).get("labels", []) if f.exists() else []
                atomic_write_json(f, {"labels": sorted({*labels, f"{sweep.name}:{p.label}"}),
                                      "overrides": list(p.overrides), "base": sweep.base,
                                      "config": to_dict(p.plan)})
            if workers == 1:
                _work(out, sweep, seeds, progress)
            else:
                level = logging.getLogger("fam").getEffectiveLevel()
                run_workers(workers, _worker_main,
                            (str(out), sweep, list(seeds), progress, level, base_plan.threads),
                            what="sweep")
        report = write_sweep_report(out, sweep, seeds, time.time() - t_start)
        if export:
            report["exported"] = export_results(out, sweep, Path(export))
        return report
    finally:
        torch.set_num_threads(before)


def _records(out: Path, sweep: Sweep, seeds: Sequence[int]
             ) -> dict[str, list[dict[str, Any]]]:
    """``{point label: [result records]}`` of the finished runs."""
    recs: dict[str, list[dict[str, Any]]] = {}
    for p in sweep.points:
        recs[p.label] = []
        for s in seeds:
            res = _point_root(out, p, s) / "results"
            if res.is_dir():
                recs[p.label] += [json.loads(f.read_text()) for f in sorted(res.glob("*.json"))]
    return recs


def _stats(xs: Sequence[float]) -> dict[str, Any]:
    n = len(xs)
    if not n:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    m = sum(xs) / n
    sd = (sum((x - m) ** 2 for x in xs) / (n - 1)) ** 0.5 if n > 1 else None
    return {"n": n, "mean": m, "sd": sd, "min": min(xs), "max": max(xs)}


def sweep_table(records: Mapping[str, Sequence[Mapping[str, Any]]], sweep: Sweep,
                out: Path | None = None) -> list[dict[str, Any]]:
    """One row per (point, config): across-seed statistics of overall precision@1 (mean,
    sample sd, range, per seed), IND/OOD means, mean training + evaluation seconds, and
    stage-0 seconds; with ``mac_only`` and ``baseline`` both run at a point, their paired
    difference and the seeds a ± :data:`TARGET_HALF_WIDTH` t interval would need."""
    from fam.analysis.stats import seeds_for_half_width
    from fam.experiments.ablation_report import BASELINE_KEY
    rows = []
    for p in sweep.points:
        recs = records.get(p.label, [])
        for label in sweep.configs:
            mine = sorted((r for r in recs if r.get("config") == label),
                          key=lambda r: r["seed"])
            overall = [float(r["results"]["overall"]) for r in mine]
            row = {"point": p.label, "overrides": list(p.overrides), "config": label,
                   "key": p.key, "seeds": [r["seed"] for r in mine],
                   "overall_per_seed": overall, "overall": _stats(overall)}
            for m in ("IND", "OOD"):
                row[m] = _stats([float(r["results"][m]) for r in mine])["mean"]
            row["train_eval_s"] = _stats([sum(r["timings_s"].values()) for r in mine])["mean"]
            if out is not None:
                s0 = [json.loads(f.read_text()).get("seconds", 0.0) for s in row["seeds"]
                      if (f := _stage0_root(out, p, s) / "stage0" / "train_metrics.json")
                      .exists()]
                row["stage0_s"] = _stats(s0)["mean"]
            rows.append(row)
        keys = {r["key"] for r in recs}
        mac = AblationRun(align_weights=(1.0, 1.0, 1.0)).key
        if mac in keys and BASELINE_KEY in keys:
            d = paired_differences(recs, [("mac_only", mac, "baseline", BASELINE_KEY)],
                                   n_boot=2000)
            if d:
                o = d[0]["metrics"]["overall"]
                rows.append({"point": p.label, "overrides": list(p.overrides),
                             "config": "mac_only − baseline", "key": p.key,
                             "seeds": d[0]["seeds"], "difference": o,
                             "seeds_needed": seeds_for_half_width(o["sd"], TARGET_HALF_WIDTH)
                             if o.get("sd") is not None else None})
    return rows


def _f(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def format_sweep(report: Mapping[str, Any]) -> str:
    """The sweep's markdown table."""
    lines = [f"# Sweep `{report['sweep']}` (base preset `{report['base']}`)", "",
             "Overall precision@1 (%) over seeds: mean, sample sd, range; time per run "
             "(training + evaluation, s) and per stage 0 (s). Load while measuring: "
             f"{report.get('load', '-')}.", "",
             "| point | overrides | config | seeds | mean | sd | min–max | per seed | IND | OOD "
             "| run s | stage-0 s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["table"]:
        ovs = ", ".join(f"`{o}`" for o in r["overrides"]) or "(base)"
        if "difference" in r:
            d = r["difference"]
            ci = d.get("ci95")
            lines.append(f"| {r['point']} | {ovs} | {r['config']} | {len(r['seeds'])} | "
                         f"{_f(d['mean'], '+.1f')} | {_f(d.get('sd'))} | t 95 %: "
                         f"{'-' if not ci else f'[{ci[0]:+.1f}, {ci[1]:+.1f}]'} | seeds for "
                         f"±{TARGET_HALF_WIDTH:g}: {r.get('seeds_needed') or '-'} | | | | |")
            continue
        o = r["overall"]
        lines.append(f"| {r['point']} | {ovs} | {r['config']} | {o['n']} | {_f(o['mean'])} | "
                     f"{_f(o['sd'])} | {_f(o['min'])}–{_f(o['max'])} | "
                     f"{' '.join(f'{x:.1f}' for x in r['overall_per_seed'])} | {_f(r['IND'])} | "
                     f"{_f(r['OOD'])} | {_f(r['train_eval_s'], '.0f')} | "
                     f"{_f(r.get('stage0_s'), '.0f')} |")
    return "\n".join(lines) + "\n"


def write_sweep_report(out: Path, sweep: Sweep, seeds: Sequence[int],
                       wall_s: float = 0.0) -> dict[str, Any]:
    """``sweep_<name>.json``/``.md`` and the training curves of the finished runs."""
    import os

    from fam.experiments.curves import write_curves
    records = _records(out, sweep, seeds)
    report = {"sweep": sweep.name, "base": sweep.base, "configs": list(sweep.configs),
              "seeds": list(seeds), "metrics": list(METRICS),
              "points": [{"label": p.label, "overrides": list(p.overrides), "key": p.key,
                          "stage0_key": p.stage0_key} for p in sweep.points],
              "table": sweep_table(records, sweep, out), "wall_s": wall_s,
              "load": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    atomic_write_json(out / f"sweep_{sweep.name}.json", report)
    atomic_write_text(out / f"sweep_{sweep.name}.md", format_sweep(report))
    write_curves(out, f"curves_{sweep.name}",
                 {(p.label, rec["config"], int(rec["seed"])):
                  _point_root(out, p, int(rec["seed"])) / "runs" / rec["key"]
                  for p in sweep.points for rec in records[p.label] if "config" in rec})
    return report


def export_results(out: Path, sweep: Sweep, dst: Path) -> int:
    """Copy what a sweep folder says (reports, curves, every run's result and
    ``train_metrics.json``, the point records; no checkpoints, models or data) to ``dst``,
    e.g. ``docs/results/sweep``; returns the number of files. Copied back into an empty
    folder it resumes the sweep without retraining the finished runs."""
    import shutil
    files = [out / "experiment.json"] + [f for pat in (f"sweep_{sweep.name}.*",
                                                       f"curves_{sweep.name}.*")
                                         for f in out.glob(pat)]
    for p in sweep.points:
        pt = out / "points" / p.key
        files += [pt / "point.json"] + list(pt.glob("seed*/results/*.json"))
        files += list(pt.glob("seed*/runs/*/train_metrics.json"))
        files += list(pt.glob("seed*/align/*/train_metrics.json"))
        files += list((out / "stage0" / p.stage0_key).glob("seed*/stage0/train_metrics.json"))
    n = 0
    for f in dict.fromkeys(files):
        if f.is_file():
            target = dst / f.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
            n += 1
    return n
