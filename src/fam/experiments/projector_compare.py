"""Caption-only vs patch-aligned projector training from one set of frozen towers (method.md §4–5).

The experiment of arXiv 2505.17316 at CPU scale, offline:

1. the Scenes benchmark (:mod:`fam.data.scenes`): captions and PAD region masks;
2. a tiny random LLaVA-1.5 and stage 0 (:mod:`fam.experiments.pipeline`): generative
   pre-training of the whole model on the Scenes captions, which gives a working vision tower
   and LLM (the stand-in for pretrained CLIP + Vicuna);
3. from that ONE checkpoint, two FRESH projectors per seed with the same budget, data order
   and initialisation, towers frozen (:mod:`fam.projector.recipe`):
   ``β = 0`` (caption-only, LLaVA's projector pre-training) and ``β: 0 → β_max`` (patch-aligned);
4. the alignment report (:func:`fam.projector.report.analyze_alignment`) of each model on the
   held-out evaluation images, the held-out caption loss, and region → phrase retrieval.

Budgets: the ``projector_compare`` preset (``configs/experiments/``). Results:
``projector_results.json`` (per seed and mean ± std) and ``projector_results.md``
(a side-by-side table saying, per metric, which side is ahead and whether the gap exceeds
the seed spread), plus comparison figures. The stage-0 model's own (jointly trained)
projector is reported as a reference column. Re-running with the same ``out`` reuses
finished stages.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fam.config import CompareConfig, to_dict
from fam.experiments.pipeline import (Timings, base_model, prepare_scenes, stage_run,
                                      start_experiment)
from fam.experiments.presets import load_preset
from fam.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def compare_config(quick: bool = False) -> CompareConfig:
    """The comparison's budgets: the ``projector_compare`` preset, or its ``_quick`` form."""
    return load_preset(CompareConfig, "projector_compare_quick" if quick else "projector_compare")


#: (key in the flat metrics, label, direction: +1 higher is better, -1 lower, 0 descriptive)
METRICS: list[tuple[str, str, int]] = [
    ("delta_H", "ΔH = H(before P) − H(after P) (nats; paper: higher with patch loss)", 0),
    ("H_before", "H vision tokens before P", 0),
    ("H_after", "H vision tokens after P", 0),
    ("H_text", "H caption token embeddings (text reference)", 0),
    ("miou", "Align(V,W) patch mIoU", 1),
    ("in_mask_cos", "in-mask cos(P(X)_i, t_k)", 1),
    ("contrast", "in − out cos contrast", 1),
    ("retrieval_top1", "region→phrase retrieval top-1", 1),
    ("retrieval_top5", "region→phrase retrieval top-5", 1),
    ("mp_recovery_region", "MP label recovery, regions (any in-mask patch, top-K)", 1),
    ("mp_recovery_patch", "MP label recovery, in-mask patches (top-K)", 1),
    ("mp_energy", "MP explained energy at K", 0),
    ("caption_nll", "held-out caption loss (nats/token)", -1),
]


def _flat(report: dict[str, Any], nll: float) -> dict[str, float]:
    mp = report["matching_pursuit"]
    k = mp["k_max"]
    return {
        "delta_H": report["entropy"]["delta_H"], "H_before": report["entropy"]["H_before"],
        "H_after": report["entropy"]["H_after"], "H_text": report["entropy"]["H_text"],
        "miou": report["align"]["miou"], "in_mask_cos": report["align"]["in_mask_cos"],
        "contrast": report["align"]["contrast"],
        "retrieval_top1": report["retrieval"]["top1"],
        "retrieval_top5": report["retrieval"]["top5"],
        "mp_recovery_region": mp["recovery"][f"region@{k}"],
        "mp_recovery_patch": mp["recovery"][f"patch@{k}"],
        "mp_energy": mp["explained_energy"][-1],
        "caption_nll": nll,
    }


def _stats(values: list[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "n": int(v.size)}


def _fmt(s: dict[str, float]) -> str:
    if not math.isfinite(s["mean"]):
        return "n/a"
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if s["n"] > 1 else f"{s['mean']:.3f}"


def format_results(res: dict[str, Any]) -> str:
    """The markdown table of :func:`run_projector_compare`'s result."""
    cap, pat, ref = res["summary"]["caption"], res["summary"]["patch"], res["stage0"]
    cfg = res["config"]
    proj = cfg["projector"]
    lines = [f"# Projector pre-training: caption-only vs patch-aligned (β → "
             f"{proj['beta_max']:g})", "",
             f"Seeds {cfg['seeds']}, {proj['optim']['steps']} projector steps "
             f"(batch {proj['optim']['batch_size']}, {proj['projector']} projector), "
             f"frozen towers from one stage-0 tiny LLaVA ({cfg['model']['size']}); "
             f"metrics on {res['counts']['eval_images']} held-out images, "
             f"{res['counts']['eval_regions']} regions, {res['counts']['label_candidates']} "
             f"label phrases (retrieval chance {1 / res['counts']['label_candidates']:.3f}); "
             f"MP: K = {cfg['k_max']}. Mean ± std over seeds.", "",
             "| metric | stage 0 (joint P, ref.) | caption-only (β=0) | patch-aligned | "
             "Δ (patch − caption) | ahead |",
             "|---|---|---|---|---|---|"]
    for key, label, sign in METRICS:
        c, p = cap[key], pat[key]
        d = p["mean"] - c["mean"]
        if sign == 0 or not math.isfinite(d):
            ahead = "—"
        else:
            better = "patch-aligned" if d * sign > 0 else "caption-only"
            spread = max(c["std"], p["std"])
            ahead = better if abs(d) > 2 * spread else f"{better} (within 2σ)"
            if abs(d) == 0:
                ahead = "tie"
        r = ref.get(key)
        lines.append(f"| {label} | {r:.3f} | {_fmt(c)} | {_fmt(p)} | {d:+.3f} | {ahead} |"
                     if r is not None and math.isfinite(r) else
                     f"| {label} | n/a | {_fmt(c)} | {_fmt(p)} | {d:+.3f} | {ahead} |")
    t = res["timings_s"]
    lines += ["", f"Total {t['total']:.0f} s (data {t['data']:.0f} s, stage 0 {t['stage0']:.0f} s,"
              f" projectors {t['projectors']:.0f} s, analysis {t['analysis']:.0f} s), "
              f"torch threads: {res['torch_threads']}.", "",
              "\"ahead\" names the better side for metrics with a direction; \"within 2σ\" "
              "means the gap is smaller than twice the larger seed std, i.e. not a clear win."]
    return "\n".join(lines) + "\n"


def run_projector_compare(out: str | Path, quick: bool = False, seeds: list[int] | None = None,
                          progress: bool = True, plan: CompareConfig | None = None,
                          threads: int | None = None) -> dict[str, Any]:
    """Run the comparison; returns (and writes) ``projector_results.json``'s content.

    Args:
        out: output folder (``data/``, ``models/tiny``, ``stage0/``, ``caption-s<seed>/``,
            ``patch-s<seed>/``, ``analysis/<name>/``, the results files and figures).
        quick: the ``projector_compare_quick`` preset (tests).
        seeds: override the preset's seeds.
        progress: progress bars.
        plan: explicit budgets (overrides ``quick``).
        threads: torch threads (overrides the preset's; 0 = torch's default).
    """
    from fam.analysis.plots import plot_entropy_comparison, plot_explained_energy
    from fam.backbones import load_backbone
    from fam.data.captions import load_captions
    from fam.projector.report import analyze_alignment, jsonable
    from fam.train.runner import run_stage
    from fam.train.stage0 import generative_eval_loss

    exp, out = start_experiment(plan or compare_config(quick), out,
                                seeds=list(seeds) if seeds else None, threads=threads)
    timed = Timings()
    with timed("data"):
        data = prepare_scenes(out / "data", exp.scenes)
    with timed("stage0"):  # tiny LLaVA + stage 0: one set of towers for every projector
        _, s0 = base_model(out, data, exp, 0, progress)

    arms = {"caption": 0.0, "patch": exp.projector.beta_max}
    models: dict[str, Path] = {}
    with timed("projectors"):  # two fresh projectors per seed, same budget
        for seed in exp.seeds:
            for arm, beta in arms.items():
                name = f"{arm}-s{seed}"
                models[name] = run_stage(dataclasses.replace(
                    exp.projector, model=str(s0), captions=str(data / "captions.json"),
                    pad=str(data / "pad.jsonl"), image_root=str(data), beta_max=beta,
                    run=stage_run(exp.projector.run, out / name, seed, exp, progress)))

    # analysis on held-out images
    held = load_captions(data / "captions_eval.json", data)
    # primary scenes only: counterfactual re-renders (<id>-swap etc.) would repeat them
    held = [s for s in held if "-" not in s.image.stem][:exp.heldout_captions]
    reports: dict[str, dict[str, Any]] = {}
    flat: dict[str, dict[str, float]] = {}
    with timed("analysis"):
        for name, path in {"stage0": s0, **models}.items():
            adapter = load_backbone(path)
            rep = analyze_alignment(adapter, data / "pad.jsonl", data, out / "analysis" / name,
                                    max_images=exp.analysis_images, k_max=exp.k_max,
                                    select="images/eval/", captions=data / "captions_eval.json",
                                    name=name, n_heatmaps=2)
            nll = generative_eval_loss(adapter, held)
            reports[name] = rep
            flat[name] = _flat(rep, nll)

    summary = {arm: {key: _stats([flat[f"{arm}-s{s}"][key] for s in exp.seeds])
                     for key, _, _ in METRICS} for arm in arms}
    s0name = exp.seeds[0]
    plot_entropy_comparison({n: (flat[n]["H_before"], flat[n]["H_after"], flat[n]["H_text"])
                             for n in ("stage0", f"caption-s{s0name}", f"patch-s{s0name}")},
                            out / "entropy_compare.png")
    plot_explained_energy({n: reports[n]["matching_pursuit"]["explained_energy"]
                           for n in ("stage0", f"caption-s{s0name}", f"patch-s{s0name}")},
                          out / "explained_energy_compare.png")
    timings = timed.finish()
    rep0 = reports["stage0"]
    res = {"config": to_dict(exp), "per_seed": flat, "summary": summary,
           "stage0": flat["stage0"], "paths": {k: str(v) for k, v in models.items()},
           "counts": {"eval_images": rep0["counts"]["images"],
                      "eval_regions": rep0["counts"]["regions"],
                      "label_candidates": rep0["retrieval"]["n_candidates"]},
           "timings_s": timings, "torch_threads": torch.get_num_threads()}
    atomic_write_json(out / "projector_results.json", jsonable(res))
    atomic_write_text(out / "projector_results.md", format_results(res))
    log.info("projector comparison written to %s (%.0f s)", out / "projector_results.md",
             timings["total"])
    return res


__all__ = ["METRICS", "compare_config", "format_results", "run_projector_compare"]
