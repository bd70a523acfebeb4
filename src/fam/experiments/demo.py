"""The main job: the whole pipeline on the embedded default, offline, on a CPU.

Scenes benchmark → tiny Qwen2-VL → stage 0 (generative pre-training) → from the same
stage-0 checkpoint and with the same adaptation budget: the VLM2Vec baseline (contrastive
adaptation) and FAM (MAC alignment, then adaptation with VEIN) → MMEB-protocol evaluation,
every model in one table, FAM against the baseline with the difference. Budgets are the
``demo`` preset (``configs/experiments/demo.yaml``); ``--quick`` runs the same path at a
tiny size (``demo_quick``).

Everything lands under ``--out``: ``data/`` (the benchmark), ``models/tiny`` (the random
initialisation), ``stage0/``, ``baseline/``, ``fam_align/``, ``fam/`` (each with ``model/``,
checkpoints and tensorboard logs), ``results.json`` and ``results.md``, ``results.png``
(precision@1 per meta-task, IND, OOD and overall for each model, the chance line) and
``gallery.png``/``gallery.json`` (the baseline's and FAM's top-3 retrievals for a few text
and image queries). Re-running with the same ``--out`` resumes: finished stages are
skipped, interrupted ones continue from their last checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from fam.config import AdaptConfig, DemoConfig, to_dict
from fam.experiments.demo_media import combine_v2, media_train_dir, prepare_media, v2_report
from fam.experiments.pipeline import (Timings, prepare_scenes, prepare_tiny, stage0_config,
                                      stage_run, start_experiment)
from fam.experiments.presets import load_preset
from fam.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["demo_config", "run_demo", "format_report"]


def demo_config(quick: bool = False) -> DemoConfig:
    """The demo's budgets: the ``demo`` preset, or ``demo_quick``."""
    return load_preset(DemoConfig, "demo_quick" if quick else "demo")


def _peak_rss_mb(children: bool = False) -> float:
    import resource
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024.0


def run_stages(stages: list[tuple[str, Any]]) -> dict[str, float]:
    """Run stage configs in order (:func:`fam.train.runner.run_stage`); wall seconds of each.
    Module level: the second process of ``workers=2`` runs it."""
    from fam.train.runner import run_stage
    times = {}
    for name, cfg in stages:
        t = time.time()
        run_stage(cfg)
        times[name] = time.time() - t
    return times


def run_demo(out: str | Path, quick: bool = False, seed: int = 0, progress: bool = True,
             plan: DemoConfig | None = None, threads: int | None = None,
             workers: int = 1) -> dict[str, Any]:
    """Run the main job; returns (and writes) ``results.json``'s content.

    Args:
        out: output folder.
        quick: the ``demo_quick`` preset (ignored when ``plan`` is given).
        seed: seeds the benchmark, the model's initialisation and every stage.
        progress: progress bars.
        plan: explicit budgets (a :class:`~fam.config.DemoConfig`).
        threads: torch threads (overrides the preset's; 0 = torch's default).
        workers: 2 trains FAM's stages in a second process beside the baseline's (the same
            models; on 2 cores the demo's wall time drops by about the FAM branch's).
    """
    from fam.backbones import load_backbone
    from fam.data.captions import load_captions
    from fam.eval.mmeb import evaluate
    from fam.eval.mmeb_v2 import evaluate_v2
    from fam.model import EmbeddingModel
    from fam.train.runner import run_stage
    from fam.train.stage0 import generative_eval_loss

    exp, out = start_experiment(plan or demo_config(quick), out, "demo", {"seed": seed},
                                threads=threads)
    media = exp.media if exp.media.enabled else None
    timed = Timings()
    with timed("data"):
        data = prepare_scenes(out / "data", dataclasses.replace(exp.scenes, seed=seed))
        if media is not None:
            eval_media = prepare_media(data, media, seed)
            mix = media_train_dir(data, media.image_replay, seed)
    with timed("model"):
        tiny = prepare_tiny(out, data, exp, seed)
    with timed("stage0"):
        s0 = run_stage(stage0_config(exp, data, tiny, out, seed, progress))

    def adapt(start: Path, name: str, show: bool, **kw: Any) -> AdaptConfig:
        return dataclasses.replace(
            exp.adapt, model=str(start), train_dir=str(data / "train"), image_root=str(data),
            run=stage_run(exp.adapt.run, out / name, seed + exp.adapt_seed_offset, exp, show),
            **kw)

    def adapt_media(start: Path, name: str, show: bool, **kw: Any) -> AdaptConfig:
        """The media stage: from an adapted model, on ``train_mix`` (media + image replay)."""
        backbone = dataclasses.replace(exp.adapt.backbone, min_pixels=media.min_pixels or None)
        return dataclasses.replace(
            exp.adapt, model=str(start), train_dir=str(mix), image_root=str(data),
            optim=media.optim, backbone=backbone,
            run=stage_run(exp.adapt.run, out / name, seed + exp.adapt_seed_offset, exp, show),
            **kw)

    # Two branches from stage 0: the baseline's, and FAM's (MAC, adaptation with VEIN);
    # each then gets the media stage. With workers=2 FAM's runs in a second process.
    apart = exp.fam and workers > 1
    baseline = [("baseline", adapt(s0, "baseline", progress))]
    fam_show = progress and not apart  # one progress bar at a time
    fam = [("fam_align", dataclasses.replace(
               exp.align, model=str(s0), captions=str(data / "captions.json"),
               image_root=str(data),
               run=stage_run(exp.align.run, out / "fam_align", seed, exp, fam_show))),
           ("fam_adapt", adapt(out / "fam_align" / "model", "fam", fam_show, vein=exp.vein))]
    if media is not None:
        baseline.append(("baseline_media", adapt_media(out / "baseline" / "model",
                                                       "baseline_media", progress)))
        fam.append(("fam_media", adapt_media(out / "fam" / "model", "fam_media", fam_show,
                                             vein=exp.vein)))
    models = {"untrained": tiny, "stage0": s0}
    with contextlib.ExitStack() as stack:
        pending = None
        if apart:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor
            pool = stack.enter_context(ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")))
            pending = pool.submit(run_stages, fam)
            log.info("demo: FAM's stages train in a second process (workers=2)")
        timed.update(run_stages(baseline))
        models["vlm2vec"] = Path(baseline[-1][1].run.out_dir) / "model"
        if exp.fam:
            timed.update(pending.result() if pending is not None else run_stages(fam))
            models["fam"] = Path(fam[-1][1].run.out_dir) / "model"

    results: dict[str, Any] = {"models": {}, "paths": {k: str(v) for k, v in models.items()}}
    held_out = load_captions(data / "captions_eval.json", data)
    results["caption_nll"] = {}
    gallery_models: dict[str, EmbeddingModel] = {}
    load_kw = {"min_pixels": media.min_pixels} if media is not None and media.min_pixels else {}
    splits = {n: d.get("split") for n, d in json.loads(
        (eval_media / "datasets.json").read_text()).items()} if media is not None else {}
    with timed("eval"):
        for name, path in models.items():
            adapter = load_backbone(path, **load_kw)
            model = EmbeddingModel(adapter)
            res = evaluate(model, data / "eval", data, progress=progress,
                           per_row=media is not None)
            if media is not None:
                results.setdefault("mmeb_v2", {})[name] = combine_v2(
                    res, evaluate_v2(model, eval_media, progress=progress), splits)
                for d in res["datasets"].values():
                    d.pop("credits", None)
            results["models"][name] = res
            if name in ("untrained", "stage0"):
                results["caption_nll"][name] = generative_eval_loss(adapter, held_out)
            if name in ("vlm2vec", "fam"):
                gallery_models[{"vlm2vec": "VLM2Vec", "fam": "FAM"}[name]] = model
    with timed("figures"):
        results["figures"] = _figures(out, results, gallery_models, data,
                                      eval_media if media is not None else None)
    results["items"] = str(write_items(out / "items.jsonl", data, out))
    results["timings_s"] = timed.finish()
    results["peak_rss_mb"] = _peak_rss_mb()
    if apart:  # the second process (a child: waited for when its pool closed)
        results["peak_rss_mb_worker"] = _peak_rss_mb(children=True)
    results["workers"] = 2 if apart else 1
    results["config"] = to_dict(exp)
    results["seed"] = seed
    results["torch_threads"] = torch.get_num_threads()
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", format_report(results))
    return results


#: The demo's items: one row per eval image, its text the prompt Scenes' image targets
#: carry; text queries take :data:`ITEMS_QUERY_PROMPT` (Scenes' text→image instruction).
ITEMS_DOCUMENT_TEXT = "<|image_1|>\nRepresent the given image."
ITEMS_QUERY_PROMPT = "Find me an everyday image that matches the given caption: "


def write_items(path: Path, data: Path, root: Path) -> Path:
    """``items.jsonl``: the benchmark's eval images as items ``fam encode`` and ``fam index
    build`` read (``id``, ``image`` relative to ``root``, the folder beside the file, and
    the document ``text``), so encode/index/search/serve have a collection at once."""
    from fam.data.captions import iter_captions
    rows = [{"id": Path(r.image).stem,
             "image": Path(os.path.relpath(data / r.image, root)).as_posix(),
             "text": ITEMS_DOCUMENT_TEXT} for r in iter_captions(data / "captions_eval.json")]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def _figures(out: Path, results: dict[str, Any], gallery_models: dict[str, Any],
             data: Path, eval_media: Path | None = None) -> dict[str, str]:
    """``results.png`` (per model: precision@1 per meta-task, IND, OOD, overall, chance
    line; with the media part, MMEB-V2's nine groups, image, video, visdoc and overall) and
    ``gallery.png``/``gallery.json`` (top-3 retrievals of the baseline and FAM for the first
    text→image and image→text rows, and with the media part the first video query and the
    first document query). Needs matplotlib (the ``plots`` extra); without it the demo
    still writes its tables."""
    from fam.experiments.gallery import media_gallery, retrieval_gallery
    figures: dict[str, str] = {}
    if gallery_models:
        gal = retrieval_gallery(gallery_models, data / "eval", data, n=3, k=3)
        if eval_media is not None:
            gal.update(media_gallery(gallery_models, eval_media, k=3))
        atomic_write_json(out / "gallery.json", gal)
        figures["gallery_json"] = str(out / "gallery.json")
    try:
        from fam.analysis.plots import plot_gallery, plot_precision
    except ImportError:  # pragma: no cover - optional extra
        log.warning("matplotlib not installed: no figures (pip install fam[plots])")
        return figures
    if "mmeb_v2" in results:
        scores, chance, metrics = _v2_bars(results["mmeb_v2"])
        heading = ("fam demo on Scenes, Scenes-Video, Scenes-Docs: MMEB-V2 score of each model "
                   "(hit@1; documents NDCG@5) per group, modality and overall (dashed: chance)")
    else:
        scores, chance, metrics = _image_bars(results["models"])
        heading = ("fam demo on Scenes: precision@1 of each model per meta-task, IND, OOD and "
                   "overall (dashed: chance)")
    figures["results"] = str(plot_precision(scores, chance, out / "results.png",
                                            title="score (%)", heading=heading,
                                            metrics=metrics))
    if gallery_models:
        figures["gallery"] = str(plot_gallery(gal, out / "gallery.png"))
    return figures


def _image_bars(ms: dict[str, Any]) -> tuple[dict, dict, list[str]]:
    from fam.eval.metrics import META_TASKS
    ch = next(iter(ms.values())).get("chance", {})
    chance = {m: ch.get("meta_task", {}).get(m) for m in META_TASKS}
    chance.update({m: ch.get(m) for m in ("IND", "OOD", "overall")})
    scores = {name: {**{m: r["meta_task"].get(m) for m in META_TASKS},
                     **{m: r.get(m) for m in ("IND", "OOD", "overall")}} for name, r in ms.items()}
    return scores, chance, [*META_TASKS, "IND", "OOD", "overall"]


def _v2_bars(v2: dict[str, Any]) -> tuple[dict, dict, list[str]]:
    from fam.eval.mmeb_v2 import V2_GROUPS
    groups = [f"{m}/{g}" for m, gs in V2_GROUPS.items() for g in gs]
    tops = [*V2_GROUPS, "overall"]
    ch = next(iter(v2.values()))["chance"]
    chance = {**{g: ch["groups"].get(g) for g in groups}, **{m: ch.get(m) for m in tops}}
    scores = {name: {**{g: r["groups"].get(g) for g in groups}, **{m: r.get(m) for m in tops}}
              for name, r in v2.items()}
    return scores, chance, groups + tops


def format_report(results: dict[str, Any]) -> str:
    """The demo's printed report: every model, then FAM vs the baseline with the difference."""
    from fam.eval.metrics import format_table
    ms = results["models"]
    table = format_table([(k, v) for k, v in ms.items()])
    if "fam" in ms:
        table += "\n\nFAM vs the VLM2Vec baseline (same stage-0 start, same adaptation budget):\n"
        table += format_table([("vlm2vec", ms["vlm2vec"]), ("fam", ms["fam"])], per_dataset=True)
    if "mmeb_v2" in results:
        table += ("\n\nMMEB-V2 (image: hit@1 with ties against the positive; video: hit@1; "
                  "documents: NDCG@5; chance: a random ranking's hit@1):\n")
        table += v2_report(results["mmeb_v2"])
    nll = results["caption_nll"]
    timings = results["timings_s"]
    worker = (f" (+ {results['peak_rss_mb_worker']:.0f} MB in the second process)"
              if "peak_rss_mb_worker" in results else "")
    return (f"{table}\n\nheld-out caption loss (nats/token): untrained "
            f"{nll['untrained']:.3f}, stage0 {nll['stage0']:.3f}\n"
            f"total {timings['total']:.0f} s, peak RSS {results['peak_rss_mb']:.0f} MB"
            f"{worker}\n")
