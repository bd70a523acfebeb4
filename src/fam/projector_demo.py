"""Caption-only vs patch-aligned projector training from one set of frozen towers (SPEC §4–5).

The experiment of arXiv 2505.17316 at CPU scale, offline:

1. the Scenes benchmark (:mod:`fam.data.scenes`): captions and PAD region masks;
2. a tiny random LLaVA-1.5 and stage 0 (:func:`fam.train.stage0.run_stage0`): generative
   pre-training of the whole model on the Scenes captions, which gives a working vision tower
   and LLM (the stand-in for pretrained CLIP + Vicuna);
3. from that ONE checkpoint, two FRESH projectors per seed with the same budget, data order
   and initialisation, towers frozen (:func:`fam.train.projector.run_projector`):
   ``β = 0`` (caption-only, LLaVA's projector pre-training) and ``β: 0 → β_max`` (patch-aligned);
4. the alignment report (:func:`fam.analysis.report.analyze_alignment`) of each model on the
   held-out evaluation images, the held-out caption loss, and region → phrase retrieval.

Results: ``projector_results.json`` (per seed and mean ± std) and ``projector_results.md``
(a side-by-side table saying, per metric, which side is ahead and whether the gap exceeds
the seed spread), plus comparison figures. The stage-0 model's own (jointly trained)
projector is reported as a reference column. Re-running with the same ``out`` reuses
finished stages.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fam.config import OptimConfig, RunConfig, Stage0Config
from fam.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class ComparePlan:
    """Sizes of one comparison run (defaults: the full run, ≤ 10 min on 2 CPU cores)."""

    n_train_images: int = 500  # Scenes training scenes (+ their counterfactuals as captions)
    n_eval_images: int = 100  # held-out scenes for the analysis and the caption loss
    n_ood_images: int = 40  # Scenes OOD pools (unused here; kept small to save time)
    image_size: int = 112  # px; LLaVA patch 14 → 8×8 = 64 image tokens
    model_size: str = "xs"  # tiny LLaVA preset (xs: LM hidden 64 × 2 layers, vision 32)
    stage0_steps: int = 300  # generative pre-training of the whole model
    stage0_batch: int = 32
    stage0_lr: float = 2e-3
    projector: str = "mlp"  # projector type trained in both arms ("mlp" | "linear")
    proj_steps: int = 120  # projector steps (same budget in both arms)
    proj_batch: int = 32
    proj_lr: float = 2e-3
    beta_max: float = 5.0  # patch-aligned arm: β ramps 0 → β_max over the stage (paper: 5)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # projector init + data order
    analysis_images: int = 64  # evaluation images analysed per model
    heldout_captions: int = 200  # held-out captions for the caption loss
    k_max: int = 10  # matching-pursuit steps
    threads: int = 0  # torch threads (0: torch's default)
    save_every: int = 100


def quick_plan() -> ComparePlan:
    """A very small run for tests and a first look (well under 2 minutes)."""
    return ComparePlan(n_train_images=40, n_eval_images=24, n_ood_images=24, stage0_steps=10,
                       stage0_batch=16, proj_steps=8, proj_batch=16, seeds=[0],
                       analysis_images=6, heldout_captions=16, k_max=5, save_every=0)


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
    lines = [f"# Projector pre-training: caption-only vs patch-aligned (β → "
             f"{res['plan']['beta_max']:g})", "",
             f"Seeds {res['plan']['seeds']}, {res['plan']['proj_steps']} projector steps "
             f"(batch {res['plan']['proj_batch']}, {res['plan']['projector']} projector), "
             f"frozen towers from one stage-0 tiny LLaVA ({res['plan']['model_size']}); "
             f"metrics on {res['counts']['eval_images']} held-out images, "
             f"{res['counts']['eval_regions']} regions, {res['counts']['label_candidates']} "
             f"label phrases (retrieval chance {1 / res['counts']['label_candidates']:.3f}); "
             f"MP: K = {res['plan']['k_max']}. Mean ± std over seeds.", "",
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
                          progress: bool = True, plan: ComparePlan | None = None,
                          ) -> dict[str, Any]:
    """Run the comparison; returns (and writes) ``projector_results.json``'s content.

    Args:
        out: output folder (``data/``, ``models/tiny``, ``stage0/``, ``caption-s<seed>/``,
            ``patch-s<seed>/``, ``analysis/<name>/``, the results files and figures).
        quick: use :func:`quick_plan` (tests).
        seeds: override the plan's seeds.
        progress: progress bars.
        plan: explicit sizes (overrides ``quick``).
    """
    from fam.analysis.plots import plot_entropy_comparison, plot_explained_energy
    from fam.projector.report import analyze_alignment
    from fam.backbones import build_tiny, load_backbone
    from fam.data.scenes import ScenesConfig, generate_scenes
    from fam.projector.recipe import ProjectorConfig, run_projector
    from fam.train.stage0 import generative_eval_loss, load_captions, run_stage0

    plan = plan or (quick_plan() if quick else ComparePlan())
    if seeds:
        plan.seeds = list(seeds)
    if plan.threads:
        torch.set_num_threads(plan.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.time()

    # 1. data ------------------------------------------------------------------------
    t = time.time()
    data = out / "data"
    if not (data / "scenes.json").exists():
        generate_scenes(ScenesConfig(seed=0, image_size=plan.image_size,
                                     n_train_images=plan.n_train_images,
                                     n_eval_images=plan.n_eval_images,
                                     n_ood_images=plan.n_ood_images, eval_rows=16,
                                     n_candidates=8), data)
    timings["data"] = time.time() - t

    # 2. tiny LLaVA + stage 0 (one set of towers for every projector) -----------------
    t = time.time()
    tiny = out / "models" / "tiny"
    if not (tiny / "config.json").exists():
        caps = json.loads((data / "captions.json").read_text())
        build_tiny("llava", tiny, size=plan.model_size, image_size=plan.image_size,
                   corpus=[c["caption"] for c in caps], seed=0)

    def run_cfg(name: str, seed: int) -> RunConfig:
        return RunConfig(out_dir=str(out / name), seed=seed, save_every=plan.save_every,
                         progress=progress, log_every=max(1, (plan.save_every or 50) // 2))

    s0 = run_stage0(Stage0Config(
        model=str(tiny), captions=str(data / "captions.json"), image_root=str(data),
        optim=OptimConfig(lr=plan.stage0_lr, batch_size=plan.stage0_batch,
                          steps=plan.stage0_steps, warmup_ratio=0.05),
        run=run_cfg("stage0", 0)))
    timings["stage0"] = time.time() - t

    # 3. two fresh projectors per seed, same budget --------------------------------------
    t = time.time()
    arms = {"caption": 0.0, "patch": plan.beta_max}
    models: dict[str, Path] = {}
    for seed in plan.seeds:
        for arm, beta in arms.items():
            name = f"{arm}-s{seed}"
            models[name] = run_projector(ProjectorConfig(
                model=str(s0), captions=str(data / "captions.json"), pad=str(data / "pad.jsonl"),
                image_root=str(data), projector=plan.projector, reinit=True, beta_max=beta,
                optim=OptimConfig(lr=plan.proj_lr, batch_size=plan.proj_batch,
                                  steps=plan.proj_steps, warmup_ratio=0.03, weight_decay=0.0),
                run=run_cfg(name, seed)))
    timings["projectors"] = time.time() - t

    # 4. analysis on held-out images -----------------------------------------------------
    t = time.time()
    held = load_captions(data / "captions_eval.json", data)
    # primary scenes only: counterfactual re-renders (<id>-swap etc.) would repeat them
    held = [s for s in held if "-" not in s.image.stem][:plan.heldout_captions]
    reports: dict[str, dict[str, Any]] = {}
    flat: dict[str, dict[str, float]] = {}
    for name, path in {"stage0": s0, **models}.items():
        adapter = load_backbone(path)
        rep = analyze_alignment(adapter, data / "pad.jsonl", data, out / "analysis" / name,
                                max_images=plan.analysis_images, k_max=plan.k_max,
                                select="images/eval/", captions=data / "captions_eval.json",
                                name=name, n_heatmaps=2)
        nll = generative_eval_loss(adapter, held)
        reports[name] = rep
        flat[name] = _flat(rep, nll)
    timings["analysis"] = time.time() - t

    summary = {arm: {key: _stats([flat[f"{arm}-s{s}"][key] for s in plan.seeds])
                     for key, _, _ in METRICS} for arm in arms}
    s0name = plan.seeds[0]
    plot_entropy_comparison({n: (flat[n]["H_before"], flat[n]["H_after"], flat[n]["H_text"])
                             for n in ("stage0", f"caption-s{s0name}", f"patch-s{s0name}")},
                            out / "entropy_compare.png")
    plot_explained_energy({n: reports[n]["matching_pursuit"]["explained_energy"]
                           for n in ("stage0", f"caption-s{s0name}", f"patch-s{s0name}")},
                          out / "explained_energy_compare.png")
    timings["total"] = time.time() - t0
    rep0 = reports["stage0"]
    res = {"plan": asdict(plan), "per_seed": flat, "summary": summary,
           "stage0": flat["stage0"], "paths": {k: str(v) for k, v in models.items()},
           "counts": {"eval_images": rep0["counts"]["images"],
                      "eval_regions": rep0["counts"]["regions"],
                      "label_candidates": rep0["retrieval"]["n_candidates"]},
           "timings_s": timings, "torch_threads": torch.get_num_threads()}
    from fam.projector.report import jsonable
    atomic_write_json(out / "projector_results.json", jsonable(res))
    atomic_write_text(out / "projector_results.md", format_results(res))
    log.info("projector comparison written to %s (%.0f s)", out / "projector_results.md",
             timings["total"])
    return res


__all__ = ["ComparePlan", "METRICS", "format_results", "quick_plan", "run_projector_compare"]
