"""The main job: the whole pipeline on the embedded default, offline, on a CPU.

Scenes benchmark → tiny Qwen2-VL → stage 0 (generative pre-training) → from the same
stage-0 checkpoint and with the same adaptation budget: the VLM2Vec baseline (contrastive
adaptation) and FAM (MAC alignment, then adaptation with VEIN) → MMEB-protocol evaluation,
every model in one table, FAM against the baseline with the difference. ``--quick`` runs the same
path at a tiny size (for tests and a first look).

Everything lands under ``--out``: ``data/`` (the benchmark), ``models/tiny`` (the random
initialisation), ``stage0/``, ``baseline/``, ``fam_align/``, ``fam/`` (each with ``model/``, checkpoints and
tensorboard logs), ``results.json`` and ``results.md``. Re-running with the same ``--out``
resumes: finished stages are skipped, interrupted ones continue from their last checkpoint.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fam.config import (AdaptConfig, LoraConfig, OptimConfig, RunConfig, Stage0Config,
                        VeinConfig)
from fam.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class DemoPlan:
    """Sizes of one demo run (the defaults are the full demo; see :func:`quick_plan`)."""

    n_train_images: int = 2000  # Scenes training images
    n_eval_images: int = 300  # Scenes IND evaluation images (disjoint from training)
    n_ood_images: int = 100  # images in each OOD pool (novel combos, crowded, striped)
    eval_rows: int = 150  # rows per evaluation dataset (at most)
    n_candidates: int = 16  # candidates per evaluation row (chance = 1/16)
    image_size: int = 112  # pixels; 16 image tokens for Qwen2-VL after the 2×2 merge
    model_size: str = "s"  # tiny preset: hidden 128, 4 layers
    stage0_steps: int = 400  # generative pre-training steps
    stage0_batch: int = 32
    stage0_lr: float = 1e-3
    adapt_steps: int = 250  # contrastive adaptation steps (baseline and FAM alike)
    adapt_batch: int = 32
    adapt_lr: float = 5e-4
    align_steps: int = 100  # FAM stage 1 (MAC) steps on image-caption pairs
    align_batch: int = 32
    align_lr: float = 5e-4
    fam: bool = True  # also train FAM (MAC + VEIN) and compare
    vein_layers: tuple[int, ...] = (-3, -2, -1)  # paper's best for Qwen2-VL-2B: last three
    lora: bool = False  # LoRA (r=8) instead of full fine-tuning of the LM for adaptation
    save_every: int = 100
    threads: int = 1  # torch threads (0: torch default); 1 avoids OpenMP oversubscription
    extra: dict[str, Any] = field(default_factory=dict)


def quick_plan() -> DemoPlan:
    return DemoPlan(n_train_images=160, n_eval_images=48, n_ood_images=24, eval_rows=24,
                    n_candidates=8,
                    model_size="xs", stage0_steps=20, stage0_batch=16, adapt_steps=15,
                    adapt_batch=16, align_steps=10, align_batch=16, vein_layers=(-2, -1),
                    save_every=10)


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_demo(out: str | Path, quick: bool = False, seed: int = 0, progress: bool = True,
             plan: DemoPlan | None = None, threads: int | None = None) -> dict[str, Any]:
    """Run the main job; returns (and writes) ``results.json``'s content."""
    from fam.backbones import build_tiny, load_backbone
    from fam.data.scenes import ScenesConfig, generate_scenes
    from fam.eval.mmeb import evaluate
    from fam.model import EmbeddingModel
    from fam.train.adapt import run_adapt
    from fam.train.align import AlignConfig, run_align
    from fam.train.stage0 import generative_eval_loss, load_captions, run_stage0

    plan = plan or (quick_plan() if quick else DemoPlan())
    if threads is not None:
        plan.threads = threads
    if plan.threads > 0:
        # Tiny models gain little from intra-op threads, and on a busy 2-core machine
        # OpenMP spin-waiting makes 2 threads up to 10x slower than 1 (measured).
        torch.set_num_threads(plan.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_start = time.time()

    # 1. the benchmark -------------------------------------------------------------
    t = time.time()
    data = out / "data"
    if not (data / "scenes.json").exists():
        generate_scenes(ScenesConfig(seed=seed, image_size=plan.image_size,
                                     n_train_images=plan.n_train_images,
                                     n_eval_images=plan.n_eval_images,
                                     n_ood_images=plan.n_ood_images,
                                     eval_rows=plan.eval_rows, n_candidates=plan.n_candidates),
                        data)
    timings["data"] = time.time() - t

    # 2. the tiny model (offline tokenizer trained on the benchmark's texts) ----------
    t = time.time()
    tiny = out / "models" / "tiny"
    if not (tiny / "config.json").exists():
        caps = json.loads((data / "captions.json").read_text())
        corpus = [c["caption"] for c in caps]
        qa_path = data / "qa.json"
        if qa_path.exists():
            corpus += [q["question"] + " " + q["answer"] for q in json.loads(qa_path.read_text())]
        build_tiny("qwen2_vl", tiny, size=plan.model_size, image_size=plan.image_size,
                   corpus=corpus, seed=seed)
    timings["model"] = time.time() - t

    def run_cfg(name: str) -> RunConfig:
        return RunConfig(out_dir=str(out / name), seed=seed, save_every=plan.save_every,
                         progress=progress, log_every=max(1, plan.save_every // 2))

    # 3. stage 0: generative pre-training ------------------------------------------
    t = time.time()
    s0 = run_stage0(Stage0Config(
        model=str(tiny), captions=str(data / "captions.json"),
        qa=str(data / "qa.json") if (data / "qa.json").exists() else "", image_root=str(data),
        optim=OptimConfig(lr=plan.stage0_lr, batch_size=plan.stage0_batch,
                          steps=plan.stage0_steps, warmup_ratio=0.05),
        run=run_cfg("stage0")))
    timings["stage0"] = time.time() - t

    # 4. VLM2Vec baseline adaptation ---------------------------------------------------
    t = time.time()
    adapt_common = dict(train_dir=str(data / "train"), image_root=str(data),
                        full_finetune=not plan.lora, lora=LoraConfig(enabled=plan.lora),
                        optim=OptimConfig(lr=plan.adapt_lr, batch_size=plan.adapt_batch,
                                          steps=plan.adapt_steps, warmup_ratio=0.1))
    baseline = run_adapt(AdaptConfig(model=str(s0), run=run_cfg("baseline"), **adapt_common))
    timings["baseline"] = time.time() - t
    models = {"untrained": tiny, "stage0": s0, "vlm2vec": baseline}

    # 5. FAM: MAC alignment (LoRA, merged) then adaptation with VEIN -------------------
    if plan.fam:
        t = time.time()
        aligned = run_align(AlignConfig(
            model=str(s0), captions=str(data / "captions.json"), image_root=str(data),
            full_finetune=not plan.lora, lora=LoraConfig(enabled=plan.lora),
            optim=OptimConfig(lr=plan.align_lr, batch_size=plan.align_batch,
                              steps=plan.align_steps, warmup_ratio=0.1),
            run=run_cfg("fam_align")))
        timings["fam_align"] = time.time() - t
        t = time.time()
        fam = run_adapt(AdaptConfig(model=str(aligned), run=run_cfg("fam"),
                                    vein=VeinConfig(enabled=True, layers=list(plan.vein_layers)),
                                    **adapt_common))
        timings["fam_adapt"] = time.time() - t
        models["fam"] = fam

    # 6. evaluation ---------------------------------------------------------------------
    t = time.time()
    results: dict[str, Any] = {"models": {}, "paths": {k: str(v) for k, v in models.items()}}
    held_out = load_captions(data / "captions_eval.json", data)
    results["caption_nll"] = {}
    gallery_models: dict[str, EmbeddingModel] = {}
    for name, path in models.items():
        adapter = load_backbone(path)
        res = evaluate(EmbeddingModel(adapter), data / "eval", data, progress=progress)
        results["models"][name] = res
        if name in ("untrained", "stage0"):
            results["caption_nll"][name] = generative_eval_loss(adapter, held_out)
        if name in ("vlm2vec", "fam"):
            gallery_models[{"vlm2vec": "VLM2Vec", "fam": "FAM"}[name]] = EmbeddingModel(adapter)
    timings["eval"] = time.time() - t
    results["figures"] = _figures(out, results, gallery_models, data)
    timings["total"] = time.time() - t_start
    results["timings_s"] = timings
    results["peak_rss_mb"] = _peak_rss_mb()
    results["plan"] = {k: v for k, v in plan.__dict__.items() if k != "extra"}
    results["seed"] = seed
    results["torch_threads"] = torch.get_num_threads()
    atomic_write_json(out / "results.json", results)
    report = format_report(results)
    atomic_write_text(out / "results.md", report)
    return results


def _figures(out: Path, results: dict[str, Any], gallery_models: dict[str, Any],
             data: Path) -> dict[str, str]:
    """``results.png`` (precision@1 per meta-task, IND, OOD, overall per model, chance line)
    and ``gallery.png``/``gallery.json`` (top-3 retrievals of the baseline and FAM for the
    first text→image and image→text rows). Needs matplotlib (the ``plots`` extra); without
    it the demo still writes its tables."""
    from fam.eval.gallery import retrieval_gallery
    from fam.eval.metrics import META_TASKS
    figures: dict[str, str] = {}
    if gallery_models:
        gal = retrieval_gallery(gallery_models, data / "eval", data, n=3, k=3)
        atomic_write_json(out / "gallery.json", gal)
        figures["gallery_json"] = str(out / "gallery.json")
    try:
        from fam.analysis.plots import plot_precision
        from fam.eval.gallery import plot_gallery
    except ImportError:  # pragma: no cover - optional extra
        log.warning("matplotlib not installed: no figures (pip install fam[plots])")
        return figures
    ms = results["models"]
    first = next(iter(ms.values()))
    ch = first.get("chance", {})
    chance = {m: ch.get("meta_task", {}).get(m) for m in META_TASKS}
    chance.update({m: ch.get(m) for m in ("IND", "OOD", "overall")})
    scores = {name: {**{m: r["meta_task"].get(m) for m in META_TASKS},
                     **{m: r.get(m) for m in ("IND", "OOD", "overall")}} for name, r in ms.items()}
    figures["results"] = str(plot_precision(scores, chance, out / "results.png"))
    if gallery_models:
        figures["gallery"] = str(plot_gallery(gal, out / "gallery.png"))
    return figures


def format_report(results: dict[str, Any]) -> str:
    """The demo's printed report: every model, then FAM vs the baseline with the difference."""
    from fam.eval.metrics import format_table
    ms = results["models"]
    table = format_table([(k, v) for k, v in ms.items()])
    if "fam" in ms:
        table += "\n\nFAM vs the VLM2Vec baseline (same stage-0 start, same adaptation budget):\n"
        table += format_table([("vlm2vec", ms["vlm2vec"]), ("fam", ms["fam"])], per_dataset=True)
    nll = results["caption_nll"]
    timings = results["timings_s"]
    return (f"{table}\n\nheld-out caption loss (nats/token): untrained "
            f"{nll['untrained']:.3f}, stage0 {nll['stage0']:.3f}\n"
            f"total {timings['total']:.0f} s, peak RSS {results['peak_rss_mb']:.0f} MB\n")
