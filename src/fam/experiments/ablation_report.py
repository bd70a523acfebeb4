"""The ablation's report: aggregation over seeds, paired differences with 95 % intervals
(Student t over seeds, bootstrap over eval rows; :mod:`fam.analysis.stats`), the mechanism
checks, the markdown tables and the plot."""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from fam.config import DemoConfig, to_dict
from fam.config.experiments import ABLATION_DEFAULT_GROUPS, ABLATION_GROUPS
from fam.analysis.stats import paired_bootstrap_ci, paired_t_ci, seeds_for_half_width
from fam.utils.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from fam.experiments.ablation import AblationRun

__all__ = ["GROUPS", "DEFAULT_GROUPS", "METRICS", "COMPARISONS", "INVERSION_WEIGHT",
           "aggregate_runs", "paired_differences", "mechanism_checks", "mechanism_summary", "format_ablation",
           "write_report"]

#: Ablation groups in report order, and those run when none is named (defined with the
#: other CLI choices in fam.config.experiments, so ``fam --help`` needs no numpy).
GROUPS, DEFAULT_GROUPS = ABLATION_GROUPS, ABLATION_DEFAULT_GROUPS
#: λ of the inversion variant and of the paper's VEIN in ``vein_weight``: the official
#: fine-tuning ran on 32 GPUs (its run.sh), where its L_rec weighs 32 × λ (method.md §3.1).
INVERSION_WEIGHT: float = 32.0
#: Relative gap below which own and shuffled L_rec count as equal (the rule of
#: fam.losses.vein.vein_verdict, SAME_RTOL; a test keeps the two equal).
VEIN_SAME_RTOL = 0.01
#: Paired comparisons besides "config − baseline": (config, reference).
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("fam", "mac_only"), ("fam_inversion", "mac_only"),
    ("vein_inversion", f"vein_only_w{INVERSION_WEIGHT:g}"),
    (f"vein_only_w{INVERSION_WEIGHT:g}", "vein_only"), ("mac_only", "control"))
#: Half-widths (points overall) for which the report gives the seeds a t interval needs.
HALF_WIDTHS: tuple[float, ...] = (1.0, 1.5, 2.0)
#: Beyond this many seeds the report says "more than" (the search is numeric).
SEEDS_NEEDED_MAX = 1000
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
            agg[m]["ci95"] = _t_interval([0.0] * len(vals), vals)["ci95"]  # of the mean
            diffs = [_get(seeds[s], m) - _get(base[s], m) for s in sorted(seeds)
                     if s in base and _get(seeds[s], m) is not None
                     and _get(base[s], m) is not None]
            delta[m] = _mean_std(diffs)
            delta[m]["ci95"] = _t_interval([0.0] * len(diffs), diffs)["ci95"]
        agg["delta"] = delta
        agg["seeds"] = sorted(seeds)
        out[key] = agg
    return out


def paired_differences(records: Sequence[Mapping[str, Any]],
                       pairs: Sequence[tuple[str, str, str, str]], n_boot: int = 2000,
                       ) -> list[dict[str, Any]]:
    """Paired differences ``config − reference`` per metric, with two 95 % intervals.

    ``ci95``: Student t over the per-seed differences (the seeds both configs ran; each
    seed's two runs share the stage-0 model). ``bootstrap_ci95``: resampling each eval
    dataset's rows (same rows for both runs of a seed), the seed-averaged difference —
    the evaluation noise alone (:func:`fam.analysis.stats.paired_bootstrap_ci` with the
    datasets as strata and the seeds fixed).

    Args:
        records: result records (``key``, ``seed``, ``results`` with per-row credits).
        pairs: ``(label, key, reference label, reference key)``.
        n_boot: bootstrap replicates (0: no bootstrap interval).

    Returns:
        ``[{"config", "reference", "key", "reference_key", "seeds", "metrics": {metric:
        {"mean", "sd", "n", "ci95": [lo, hi] | None, "bootstrap_ci95": [lo, hi] | None}},
        "seeds_needed": {"1": n, "1.5": n, "2": n} | None}]``: ``seeds_needed`` = seeds
        whose t interval of the overall difference would be ± 1 / ± 1.5 / ± 2 points at the
        measured sd
        (None: fewer than 2 seeds or no bootstrap requested; a value None: more than
        :data:`SEEDS_NEEDED_MAX`).
    """
    by_key: dict[str, dict[int, Mapping[str, Any]]] = {}
    for r in records:
        by_key.setdefault(r["key"], {})[int(r["seed"])] = r["results"]
    out = []
    for label, key, ref_label, ref_key in pairs:
        a, b = by_key.get(key, {}), by_key.get(ref_key, {})
        seeds = sorted(set(a) & set(b))
        if not seeds or key == ref_key:
            continue
        metrics: dict[str, Any] = {}
        for m in METRICS:
            both = [s for s in seeds if _get(a[s], m) is not None and _get(b[s], m) is not None]
            metrics[m] = {**_t_interval([_get(b[s], m) for s in both],
                                        [_get(a[s], m) for s in both]), "bootstrap_ci95": None}
        have = [s for s in seeds if all("credits" in d for d in a[s]["datasets"].values())
                and all("credits" in d for d in b[s]["datasets"].values())]
        if have and n_boot > 0:
            for m, names in _group_members(a[have[0]]["datasets"]).items():
                ref, cfg, strata = [], [], []
                for s in have:
                    ref.append([c for n in names for c in b[s]["datasets"][n]["credits"]])
                    cfg.append([c for n in names for c in a[s]["datasets"][n]["credits"]])
                    strata.append([n for n in names for _ in b[s]["datasets"][n]["credits"]])
                boot = paired_bootstrap_ci(ref, cfg, n_boot=n_boot, strata=strata,
                                           resample_seeds=False)
                if m in metrics:
                    metrics[m]["bootstrap_ci95"] = [100.0 * boot["lo"], 100.0 * boot["hi"]]
        o = metrics["overall"]
        # The budget that would tell a difference of the paper's size (1-2 points overall)
        # from zero: seeds for a t interval of ± 1 / ± 1.5 / ± 2 points at this sd.
        need = ({f"{w:g}": seeds_for_half_width(o["sd"], w, max_n=SEEDS_NEEDED_MAX)
                 for w in HALF_WIDTHS} if n_boot > 0 and o.get("sd") is not None else None)
        out.append({"config": label, "reference": ref_label, "key": key,
                    "reference_key": ref_key, "seeds": seeds, "metrics": metrics,
                    "seeds_needed": need})
    return out


def _t_interval(ref: Sequence[float], cfg: Sequence[float]) -> dict[str, Any]:
    """Mean of ``cfg − ref`` over seeds with its Student-t 95 % interval (None with < 2)."""
    if not cfg:
        return {"mean": None, "sd": None, "n": 0, "ci95": None}
    r = paired_t_ci(ref, cfg)
    ok = r["n"] >= 2
    return {"mean": r["mean"], "sd": r["sd"] if ok else None, "n": r["n"],
            "ci95": [r["lo"], r["hi"]] if ok else None}


def _group_members(datasets: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """``{meta_task | "IND" | "OOD" | "overall": [dataset, ...]}`` of a results dict."""
    groups: dict[str, list[str]] = {}
    for name, d in datasets.items():
        for g in (d["meta_task"], d["split"], "overall"):
            groups.setdefault(g, []).append(name)
    return groups


def _comparison_pairs(expanded: Mapping[str, Sequence[tuple[str, AblationRun]]]
                      ) -> list[tuple[str, str, str, str]]:
    """Every config against the baseline, then :data:`COMPARISONS` that were run."""
    keys: dict[str, str] = {}
    for cfgs in expanded.values():
        for label, r in cfgs:
            keys.setdefault(label, r.key)
    base = BASELINE_KEY
    from fam.experiments.multivector_study import STUDY_COMPARISONS
    pairs = [(label, k, "baseline", base) for label, k in keys.items() if k != base]
    pairs += [(a, keys[a], b, keys[b]) for a, b in COMPARISONS + STUDY_COMPARISONS
              if a in keys and b in keys]
    return list(dict.fromkeys(pairs))  # a study pair may also be "config − baseline"


def _cell(d: Mapping[str, Any], signed: bool = False) -> str:
    if d.get("mean") is None:
        return "-"
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return fmt.format(d["mean"]) + (f" ± {d['std']:.1f}" if d["n"] > 1 else "")


def _ci(ci: Sequence[float] | None) -> str:
    return f"[{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "-"


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
            cells = [(_cell(a["delta"][m], signed=True) +
                      (f" {_ci(a['delta'][m].get('ci95'))}" if a["delta"][m].get("ci95") else ""))
                     if a else "(not run)" for m in METRICS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    paired = report.get("paired") or []
    if paired:
        lines += ["## Paired differences", "",
                  "Mean over seeds of `config − reference` (same seed = same stage-0 model); "
                  "t: 95 % Student-t interval over seeds; rows: 95 % bootstrap interval over "
                  "eval rows (evaluation noise alone).", "",
                  "Seeds for ±1/±1.5/±2: how many seeds the t interval of the overall "
                  "difference would need to be ± 1 / ± 1.5 / ± 2 points wide at the measured sd (the budget to "
                  "tell a difference of the paper's size, 1-2 points, from zero).", "",
                  "| comparison | seeds | Overall (t / rows) | IND | OOD | Class. | VQA | "
                  "Retr. | Ground. | seeds for ±1/±1.5/±2 |", "|---|---|---|---|---|---|---|---|---|---|"]
        for p in paired:
            ms = p["metrics"]
            o = ms["overall"]
            head = (f"{o['mean']:+.1f} {_ci(o['ci95'])} / {_ci(o['bootstrap_ci95'])}"
                    if o["mean"] is not None else "-")
            rest = [f"{ms[m]['mean']:+.1f} {_ci(ms[m]['ci95'])}" if ms[m]["mean"] is not None
                    else "-" for m in ("IND", "OOD") + META_TASKS]
            lines.append(f"| {p['config']} − {p['reference']} | {len(p['seeds'])} | {head} | "
                         + " | ".join(rest) + f" | {_needed(p.get('seeds_needed'))} |")
        lines.append("")
    mech = report.get("mechanism") or {}
    if mech:
        lines += ["## Mechanism checks", "",
                  "FAM probes on the adapted checkpoints (mean over seeds): gap = matched − "
                  "mismatched cosine (global image vs its object crops; object crop vs its "
                  "referring expression), win = fraction of crops closer to their own "
                  "expression; image attention = the EOS token's attention mass on image "
                  "tokens at the last layer. VEIN runs: L_rec with own vs shuffled `e` "
                  "(e-gap = relative increase when shuffled; below 1 % the decoder ignores "
                  "e and VEIN teaches the model nothing, marked *ignores e*) and the ratio "
                  "of the gradient norms λ·L_rec / L_task sent into the backbone.",
                  "", "| config | global-local gap | object-caption gap | win | image attn. "
                  "(last) | L_rec own / shuffled | e-gap | grad ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, m in mech.items():
            v = m.get("vein") or {}
            fmt = lambda x, f="{:.3f}": "-" if x is None else f.format(x)  # noqa: E731
            lines.append(
                f"| {label} | {fmt(m.get('global_local_gap'), '{:+.3f}')} | "
                f"{fmt(m.get('object_caption_gap'), '{:+.3f}')} | "
                f"{fmt(m.get('object_caption_win_rate'), '{:.2f}')} | "
                f"{fmt(m.get('image_attention_last'), '{:.3f}')} | "
                f"{fmt(v.get('rec_loss'), '{:.4f}')} / "
                f"{fmt(v.get('rec_loss_shuffled'), '{:.4f}')} | "
                f"{fmt(v.get('e_gap'), '{:+.2%}')}{_ignored(v)} | "
                f"{fmt(v.get('grad_ratio'), '{:.2g}')} |")
        lines.append("")
    if report.get("multivector"):
        from fam.experiments.multivector_study import format_study, summary_table
        lines += format_study(report["multivector"], summary_table(report))

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


def _needed(need: Mapping[str, int | None] | None) -> str:
    if not need:
        return "-"
    return "/".join(str(n) if n is not None else f">{SEEDS_NEEDED_MAX}" for n in need.values())


def _ignored(vein: Mapping[str, Any]) -> str:
    """`` *ignores e*`` when own and shuffled L_rec are equal by VEIN's verdict rule."""
    gap = vein.get("e_gap")
    return " *ignores e*" if gap is not None and abs(gap) < VEIN_SAME_RTOL else ""


def _chance_line(report: Mapping[str, Any]) -> str:
    for r in report.get("runs", []):
        ch = r["results"].get("chance", {})
        if ch.get("overall") is not None:
            return f"{ch['overall']:.1f}"
    return "-"


def write_report(out: Path, records: list[dict[str, Any]],
                 expanded: Mapping[str, list[tuple[str, AblationRun]]], seeds: Sequence[int],
                 size: str, plan: DemoConfig, stage0_times: Sequence[float], t_start: float,
                 final: bool = True, study: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``ablation.json``/``.md`` (and, when ``final``, the bootstrap intervals and
    ``ablation.png``, which the intermediate reports during a run skip). ``study``: the
    multi-vector study's map summary (:func:`fam.experiments.multivector_study.collect`),
    its section and, when final, its figure ``multivector_maps.png``."""
    per_run = sorted(sum(r["timings_s"].values()) for r in records)
    s0 = sorted(stage0_times)
    report = {
        "size": size, "seeds": list(seeds),
        "config": to_dict(plan),
        "groups": {g: [(label, r.key) for label, r in cfgs] for g, cfgs in expanded.items()},
        "configs": {r.key: dataclasses.asdict(r) for cfgs in expanded.values() for _, r in cfgs},
        "aggregates": aggregate_runs(records),
        "paired": paired_differences(records, _comparison_pairs(expanded),
                                     n_boot=2000 if final else 0),
        "mechanism": mechanism_summary(records, expanded),
        "runs": records,
        "time_per_config_s": {"median": per_run[len(per_run) // 2] if per_run else 0.0,
                              "stage0_median": s0[len(s0) // 2] if s0 else 0.0},
        "wall_s": time.time() - t_start,
    }
    report["plot"] = _plot(out / "ablation.png", report, expanded) if final else None
    if study:
        from fam.experiments.multivector_study import plot_examples
        report["multivector"] = dict(study)
        report["multivector"]["plot"] = (plot_examples(out / "multivector_maps.png", study,
                                                       out / "data") if final else None)
    atomic_write_json(out / "ablation.json", report)
    atomic_write_text(out / "ablation.md", format_ablation(report))
    return report


def _probe_config(plan: DemoConfig):
    from fam.config import ProbeConfig
    n = min(48, max(2, plan.scenes.n_eval_images // 2))
    return ProbeConfig(max_images=n, attention_images=min(16, n))


def mechanism_checks(model_dir: str | Path, run_dir: str | Path, data: str | Path,
                     plan: DemoConfig) -> dict[str, Any]:
    """Why a config helps or not: the FAM probes on its checkpoint and, for VEIN runs, the
    VEIN diagnostic of its training (the last logging window).

    Returns:
        ``{"global_local_gap", "object_caption_gap", "object_caption_win_rate",
        "image_attention": [the EOS token's raw image mass per layer], "vision_centric":
        [layers, negative], "vein": {rec_loss, rec_loss_shuffled, e_gap, grad_ratio} | None}``;
        ``e_gap`` = (shuffled − own) / own; ``grad_ratio`` = ‖∇λL_rec‖ / ‖∇L_task‖, the
        gradient norms into the backbone.
    """
    import json

    from fam.analysis.probes import (attention_probe, load_probe_images, load_probe_model,
                                     similarity_probes)
    cfg = _probe_config(plan)
    images = load_probe_images(data, cfg.split, cfg.max_images)
    model = load_probe_model(model_dir)
    sim = similarity_probes(model, images, cfg)
    att = attention_probe(model, images, cfg)
    out: dict[str, Any] = {
        "global_local_gap": sim["global_local"]["gap"],
        "object_caption_gap": sim["object_caption"]["gap"],
        "object_caption_win_rate": sim["object_caption"]["win_rate"],
        "image_attention": att["image_mass"],
        "vision_centric": att["vision_centric_layers_neg"],
        "vein": None}
    metrics = Path(run_dir) / "train_metrics.json"
    final = json.loads(metrics.read_text()).get("final", {}) if metrics.exists() else {}
    if "rec_loss" in final:
        own, shuf = final["rec_loss"], final.get("rec_loss_shuffled")
        task, vein = final.get("task_grad_norm"), final.get("vein_grad_norm")
        out["vein"] = {"rec_loss": own, "rec_loss_shuffled": shuf,
                       "e_gap": (shuf - own) / own if shuf is not None and own else None,
                       "grad_ratio": vein / task if task and vein is not None else None}
    return out


def mechanism_summary(records: Sequence[Mapping[str, Any]],
                      expanded: Mapping[str, Sequence[tuple[str, AblationRun]]]
                      ) -> dict[str, dict[str, Any]]:
    """Mean over seeds of each config's mechanism checks (``{label: {check: value}}``)."""
    labels: dict[str, str] = {}
    for cfgs in expanded.values():
        for label, r in cfgs:
            labels.setdefault(r.key, label)
    labels.setdefault(BASELINE_KEY, "baseline")
    acc: dict[str, dict[str, list[float]]] = {}
    for r in records:
        m = r.get("mechanism")
        if not m or r["key"] not in labels:
            continue
        flat = {k: m.get(k) for k in ("global_local_gap", "object_caption_gap",
                                      "object_caption_win_rate")}
        if m.get("image_attention"):
            flat["image_attention_last"] = m["image_attention"][-1]
        for k, v in (m.get("vein") or {}).items():
            flat[k] = v
        d = acc.setdefault(labels[r["key"]], {})
        for k, v in flat.items():
            if v is not None:
                d.setdefault(k, []).append(float(v))
    out: dict[str, dict[str, Any]] = {}
    for label in dict.fromkeys(labels.values()):
        if label in acc:
            out[label] = {k: sum(v) / len(v) for k, v in acc[label].items()}
            vein = {k: out[label].pop(k) for k in ("rec_loss", "rec_loss_shuffled", "e_gap",
                                                   "grad_ratio") if k in out[label]}
            out[label]["vein"] = vein or None
            out[label]["n_seeds"] = max(len(v) for v in acc[label].values())
    return out


def _plot(path: Path, report: Mapping[str, Any],
          expanded: Mapping[str, Sequence[tuple[str, AblationRun]]]) -> str | None:
    """precision@1 per meta-task, IND, OOD and overall per config (t 95 % whiskers over
    seeds, the chance line); None without matplotlib."""
    try:
        from fam.analysis.plots import plot_precision
    except ImportError:  # pragma: no cover - matplotlib is an optional extra
        return None
    agg = report["aggregates"]
    models: dict[str, dict[str, Any]] = {}
    labels = {BASELINE_KEY: "baseline"}
    for cfgs in expanded.values():
        for label, r in cfgs:
            labels.setdefault(r.key, label)
    for key, label in labels.items():
        if key in agg:
            models[label] = {m: {"mean": agg[key][m]["mean"], "ci95": agg[key][m].get("ci95")}
                             for m in METRICS}
    chance: dict[str, float | None] = {}
    for r in report.get("runs", []):
        ch = r["results"].get("chance", {})
        chance = {m: (ch.get("meta_task", {}) or {}).get(m) if m in META_TASKS else ch.get(m)
                  for m in METRICS}
        break
    if not models:
        return None
    try:
        return str(plot_precision(models, chance, path,
                                  title=f"precision@1 (%), mean over seeds {report['seeds']}"))
    except ImportError:  # pragma: no cover
        return None
