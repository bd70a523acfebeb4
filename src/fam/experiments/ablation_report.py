"""The ablation's report: aggregation over seeds (paired deltas) and the markdown tables."""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from fam.config import DemoConfig, to_dict
from fam.utils.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from fam.experiments.ablation import AblationRun

__all__ = ["GROUPS", "METRICS", "aggregate_runs", "format_ablation", "write_report"]

#: Ablation groups in report order.
GROUPS: tuple[str, ...] = ("main", "mac_terms", "mask_ratio", "vein_layers")
#: Metrics aggregated over seeds (keys of :func:`fam.eval.mmeb.evaluate`'s summary).
META_TASKS: tuple[str, ...] = ("classification", "vqa", "retrieval", "grounding")
METRICS: tuple[str, ...] = META_TASKS + ("IND", "OOD", "overall")
#: The baseline run's key (``AblationRun().key``): no MAC stage, no VEIN.
BASELINE_KEY = "macnone__veinoff"


def _get(res: Mapping[str, Any], metric: str) -> float | None:
    if metric in META_TASKS:
        return res.get("meta_task", {}).get(metric)
    return res.get(metric)


def _mean_std(xs: Sequence[float]) -> dict[str, Any]:
    n = len(xs)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    m = sum(xs) / n
    # Sample standard deviation over seeds (ddof=1); 0 for a single seed.
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return {"mean": m, "std": s, "n": n}


def aggregate_runs(records: Sequence[Mapping[str, Any]], baseline_key: str | None = None,
                   ) -> dict[str, dict[str, Any]]:
    """``{run key: {metric: {mean, std, n}, "delta": {metric: {mean, std, n}}}}``.

    The deltas to the baseline are paired by seed (``run − baseline`` per seed, then mean ±
    std), which removes the seed-to-seed variation both share.
    """
    by_key: dict[str, dict[int, Mapping[str, Any]]] = {}
    for r in records:
        by_key.setdefault(r["key"], {})[int(r["seed"])] = r["results"]
    base = by_key.get(baseline_key or BASELINE_KEY, {})
    out: dict[str, dict[str, Any]] = {}
    for key, seeds in by_key.items():
        agg: dict[str, Any] = {}
        delta: dict[str, Any] = {}
        for m in METRICS:
            vals = [v for v in (_get(seeds[s], m) for s in sorted(seeds)) if v is not None]
            agg[m] = _mean_std(vals)
            diffs = [_get(seeds[s], m) - _get(base[s], m) for s in sorted(seeds)
                     if s in base and _get(seeds[s], m) is not None
                     and _get(base[s], m) is not None]
            delta[m] = _mean_std(diffs)
        agg["delta"] = delta
        agg["seeds"] = sorted(seeds)
        out[key] = agg
    return out


def _cell(d: Mapping[str, Any], signed: bool = False) -> str:
    if d.get("mean") is None:
        return "-"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return fmt.format(d["mean"]) + (f" ± {d['std']:.1f}" if d["n"] > 1 else "")


def format_ablation(report: Mapping[str, Any]) -> str:
    """Markdown: per group, mean ± std over seeds, then the paired differences to baseline."""
    agg = report["aggregates"]
    groups = report["groups"]
    heads = ["Class.", "VQA", "Retr.", "Ground.", "IND", "OOD", "Overall"]
    seeds = report.get("seeds", [])
    lines = [f"# Ablations on Scenes ({report.get('size', '?')} size, seeds {seeds})", "",
             "Precision@1 (%), mean ± sample std over seeds; Δ = config − baseline, paired "
             "by seed. Chance: " + _chance_line(report) + ".", ""]
    base_key = BASELINE_KEY
    for g, cfgs in groups.items():
        lines += [f"## {g}", "", "| config | " + " | ".join(heads) + " |",
                  "|---|" + "---|" * len(heads)]
        rows = list(cfgs)
        if all(key != base_key for _, key in rows):
            rows = [("baseline", base_key)] + rows  # every table shows its reference
        for label, key in rows:
            a = agg.get(key)
            cells = [_cell(a[m]) if a else "(not run)" for m in METRICS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "| Δ vs baseline | " + " | ".join(heads) + " |",
                  "|---|" + "---|" * len(heads)]
        for label, key in rows:
            if key == base_key:
                continue
            a = agg.get(key)
            cells = [_cell(a["delta"][m], signed=True) if a else "(not run)" for m in METRICS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    t = report.get("time_per_config_s")
    if t and t.get("median"):
        line = (f"Time per config (median over runs, training + evaluation): "
                f"{t['median']:.0f} s")
        # A report-only rebuild did not time stage 0 or the whole run: say nothing then.
        if t.get("stage0_median"):
            line += f"; stage 0 {t['stage0_median']:.0f} s per seed"
        if report.get("wall_s", 0) > 60:
            line += f"; total wall time {report['wall_s'] / 60:.1f} min"
        lines.append(line + ".")
    return "\n".join(lines) + "\n"


def _chance_line(report: Mapping[str, Any]) -> str:
    for r in report.get("runs", []):
        ch = r["results"].get("chance", {})
        if ch.get("overall") is not None:
            return f"{ch['overall']:.1f}"
    return "-"




def write_report(out: Path, records: list[dict[str, Any]],
                  expanded: Mapping[str, list[tuple[str, AblationRun]]], seeds: Sequence[int],
                  size: str, plan: DemoConfig, stage0_times: Sequence[float], t_start: float,
                  ) -> dict[str, Any]:
    per_run = sorted(sum(r["timings_s"].values()) for r in records)
    s0 = sorted(stage0_times)
    report = {
        "size": size, "seeds": list(seeds),
        "config": to_dict(plan),
        "groups": {g: [(label, r.key) for label, r in cfgs] for g, cfgs in expanded.items()},
        "configs": {r.key: dataclasses.asdict(r) for cfgs in expanded.values() for _, r in cfgs},
        "aggregates": aggregate_runs(records),
        "runs": records,
        "time_per_config_s": {"median": per_run[len(per_run) // 2] if per_run else 0.0,
                              "stage0_median": s0[len(s0) // 2] if s0 else 0.0},
        "wall_s": time.time() - t_start,
    }
    atomic_write_json(out / "ablation.json", report)
    atomic_write_text(out / "ablation.md", format_ablation(report))
    return report
