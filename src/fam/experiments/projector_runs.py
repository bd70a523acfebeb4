"""The runs of the projector study (``fam projector-compare``): arms, work units, a pool.

Every unit is a top-level function of picklable arguments that trains what it needs
through :func:`fam.train.runner.run_stage` (which skips finished stages and resumes
interrupted ones), evaluates, and caches its result as ``result.json`` in its run folder,
so a re-run of the study recomputes nothing that finished. :func:`run_units` runs units in
a pool of ``workers`` processes (``concurrent.futures`` with the spawn context, one torch
thread each), or in this process when ``workers == 1``.

Layout under the study's ``out``::

    data/                          Scenes (textured), sft_train.json, sft_eval.json
    models/tiny-<llm>/             random initialisations (one tokenizer for all LLMs)
    models/tower-<llm>/            each tiny LLaVA with THE pretrained tower (shared)
    tower/                         fam train tower (on the first LLM's checkpoint)
    stage0-<llm>/                  stage 0, tower frozen
    runs/<arm>/                    projector stage, result.json (alignment, captions)
    analysis/<arm>/                the alignment report
    sft/<arm>/                     SFT from that projector, result.json (VQA, REC)
    fam/<arm>/align, fam/<arm>/adapt   FAM from the SFT'd model, result.json (MMEB/Scenes)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fam.config import CompareConfig
from fam.experiments.pipeline import stage_run
from fam.utils.io import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["Arm", "caption_only", "fam_unit", "projector_unit", "run_units", "stage0_unit"]


@dataclass(frozen=True)
class Arm:
    """One projector run: type, language model, β and its schedule, seed.

    ``β = 0`` is the caption-only baseline (its schedule is irrelevant and written
    ``"none"``).
    """

    projector: str
    llm: str
    beta: float
    schedule: str
    seed: int

    def __post_init__(self) -> None:
        if self.beta == 0:
            object.__setattr__(self, "schedule", "none")

    @property
    def setting(self) -> str:
        """The arm without its seed, e.g. ``mlp-llama-b5-ramped``."""
        tail = "b0" if self.beta == 0 else f"b{self.beta:g}-{self.schedule}"
        return f"{self.projector}-{self.llm}-{tail}"

    @property
    def name(self) -> str:
        return f"{self.setting}-s{self.seed}"


def caption_only(arm: Arm) -> Arm:
    """The caption-only arm paired with ``arm`` (same projector, LLM and seed)."""
    return Arm(arm.projector, arm.llm, 0.0, "none", arm.seed)


def _cached(path: Path, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    t = time.time()
    res = make()
    res["wall_s"] = time.time() - t
    atomic_write_json(path, _jsonable(res))
    return res


def _jsonable(obj: Any) -> Any:
    import math
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj


# ----------------------------------------------------------------------------- units


def stage0_unit(exp: CompareConfig, out: Path, llm: str, start: Path) -> str:
    """Stage 0 of one language model from its towered tiny LLaVA (tower frozen)."""
    from fam.train.runner import run_stage
    data = out / "data"
    qa = data / "sft_train.json" if exp.stage0_sft else None
    return str(run_stage(dataclasses.replace(
        exp.stage0, model=str(start), captions=str(data / "captions.json"),
        qa=str(qa) if qa else "", image_root=str(data),
        freeze_vision=True,  # the pretrained tower stays as it is, as LLaVA keeps CLIP
        run=stage_run(exp.stage0.run, out / f"stage0-{llm}", 0, exp, False))))


def _flat_alignment(rep: dict[str, Any]) -> dict[str, float]:
    mp = rep["matching_pursuit"]
    k = mp["k_max"]
    ms = rep.get("multisemantic") or {}
    out = {key: rep["entropy"][key] for key in
           ("H_tower", "H_before", "H_after", "delta_H", "H_text",
            "H_tower_c", "H_before_c", "H_after_c", "delta_H_c", "H_text_c")}
    out.update({
        "miou": rep["align"]["miou"], "in_mask_cos": rep["align"]["in_mask_cos"],
        "contrast": rep["align"]["contrast"],
        "retrieval_top1": rep["retrieval"]["top1"], "retrieval_top5": rep["retrieval"]["top5"],
        "mp_recovery_region": mp["recovery"][f"region@{k}"],
        "mp_recovery_patch": mp["recovery"][f"patch@{k}"],
        "mp_energy": mp["explained_energy"][-1],
        "ms_precision": ms.get("precision", float("nan")),
        "ms_recall": ms.get("recall", float("nan")),
        "ms_recall_colour": ms.get("recall_colour", float("nan")),
        "ms_recall_shape": ms.get("recall_shape", float("nan")),
        "ms_recall_relation": ms.get("recall_relation", float("nan"))})
    return out


def projector_unit(exp: CompareConfig, out: Path, arm: Arm, start: Path) -> dict[str, Any]:
    """Train one projector from the stage-0 model ``start``, then analyse it.

    Returns (and caches): the arm, the alignment metrics (:func:`_flat_alignment`), the
    held-out caption loss, Scenes caption quality of greedy captions (with per-caption
    object F1 for paired statistics) and the model path.
    """
    def make() -> dict[str, Any]:
        from fam.backbones import load_backbone
        from fam.data.captions import load_captions
        from fam.eval.sft import evaluate_captions
        from fam.projector.report import analyze_alignment
        from fam.train.runner import run_stage
        from fam.train.stage0 import generative_eval_loss
        data = out / "data"
        model = run_stage(dataclasses.replace(
            exp.projector, model=str(start), captions=str(data / "captions.json"),
            pad=str(data / "pad.jsonl"), image_root=str(data), projector=arm.projector,
            beta_max=arm.beta,
            beta_schedule=arm.schedule if arm.beta > 0 else exp.projector.beta_schedule,
            run=stage_run(exp.projector.run, out / "runs" / arm.name, arm.seed, exp, False)))
        adapter = load_backbone(model)
        rep = analyze_alignment(adapter, data / "pad.jsonl", data, out / "analysis" / arm.name,
                                max_images=exp.analysis_images, k_max=exp.k_max,
                                select="images/eval/ev", captions=data / "captions_eval.json",
                                name=arm.name, n_heatmaps=2 if arm.seed == exp.seeds[0] else 0,
                                multisemantic_k=exp.multisemantic_k)
        held = [s for s in load_captions(data / "captions_eval.json", data)
                if "-" not in s.image.stem][:exp.heldout_captions]
        caps = evaluate_captions(adapter, data / "pad.jsonl", data / "captions_eval.json", data,
                                 select="images/eval/ev", max_images=exp.caption_images)
        return {"arm": dataclasses.asdict(arm), "model": str(model),
                "metrics": {**_flat_alignment(rep), "caption_nll": generative_eval_loss(adapter, held),
                            **{f"cap_{k}": v for k, v in caps.items()
                               if isinstance(v, (int, float)) and k != "n"}},
                "caption_f1_items": caps["per_caption"], "caption_examples": caps["examples"],
                "counts": rep["counts"], "chance": {
                    "retrieval": rep["retrieval"]["chance"],
                    "mp_patch": rep["matching_pursuit"]["recovery"].get(
                        f"chance_patch@{exp.k_max}")}}
    return _cached(out / "runs" / arm.name / "result.json", make)


def sft_unit(exp: CompareConfig, out: Path, arm: Arm, start: Path) -> dict[str, Any]:
    """SFT (the same settings for every arm) from a projector model, then VQA and REC."""
    def make() -> dict[str, Any]:
        from fam.backbones import load_backbone
        from fam.eval.sft import evaluate_sft
        from fam.train.runner import run_stage
        data = out / "data"
        model = run_stage(dataclasses.replace(
            exp.sft, model=str(start), data=str(data / "sft_train.json"), image_root=str(data),
            run=stage_run(exp.sft.run, out / "sft" / arm.name, arm.seed, exp, False)))
        res = evaluate_sft(load_backbone(model), data / "sft_eval.json", data)
        return {"arm": dataclasses.asdict(arm), "model": str(model), "tasks": res}
    return _cached(out / "sft" / arm.name / "result.json", make)


def fam_unit(exp: CompareConfig, out: Path, arm: Arm, start: Path) -> dict[str, Any]:
    """FAM (MAC alignment, then adaptation with VEIN) from an SFT'd LVLM; MMEB on Scenes."""
    def make() -> dict[str, Any]:
        from fam.backbones import load_backbone
        from fam.eval.mmeb import evaluate
        from fam.model import EmbeddingModel
        from fam.train.runner import run_stage
        data = out / "data"
        root = out / "fam" / arm.name
        aligned = run_stage(dataclasses.replace(
            exp.align, model=str(start), captions=str(data / "captions.json"),
            image_root=str(data), run=stage_run(exp.align.run, root / "align", arm.seed, exp,
                                                False)))
        adapted = run_stage(dataclasses.replace(
            exp.adapt, model=str(aligned), train_dir=str(data / "train"), image_root=str(data),
            vein=exp.vein, run=stage_run(exp.adapt.run, root / "adapt", arm.seed, exp, False)))
        res = evaluate(EmbeddingModel(load_backbone(adapted)), data / "eval", data,
                       max_rows=exp.mmeb_rows or None, progress=False, per_row=True)
        return {"arm": dataclasses.asdict(arm), "model": str(adapted), "mmeb": res}
    return _cached(out / "fam" / arm.name / "result.json", make)


def arm_unit(exp: CompareConfig, out: Path, arm: Arm, start: Path, sft: bool,
             ) -> dict[str, Any]:
    """A projector run, its analysis and (``sft``) the SFT from it, in one process."""
    res = {"projector": projector_unit(exp, out, arm, start)}
    if sft:
        res["sft"] = sft_unit(exp, out, arm, Path(res["projector"]["model"]))
    return res


# ----------------------------------------------------------------------------- the pool


def _init_worker(threads: int, level: int) -> None:
    from fam.utils.threads import use_threads
    logging.basicConfig(level=level, format="%(asctime)s %(processName)s %(name)s: %(message)s")
    use_threads(threads)


def run_units(fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], workers: int,
              threads: int, what: str = "runs") -> list[Any]:
    """``[fn(*job) for job in jobs]``, in a pool of ``workers`` processes (spawned; each
    with ``threads`` torch threads), results in job order. ``workers == 1`` runs here."""
    if not jobs:
        return []
    t = time.time()
    if workers <= 1 or len(jobs) == 1:
        out = [fn(*job) for job in jobs]
    else:
        ctx = multiprocessing.get_context("spawn")
        level = logging.getLogger().getEffectiveLevel()
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx,
                                 initializer=_init_worker, initargs=(threads, level)) as pool:
            futures = [pool.submit(fn, *job) for job in jobs]
            out = []
            for i, f in enumerate(futures):
                out.append(f.result())
                log.info("%s: %d/%d done (%.0f s)", what, i + 1, len(jobs), time.time() - t)
    log.info("%s: %d finished in %.0f s on %d process(es)", what, len(jobs), time.time() - t,
             max(1, min(workers, len(jobs))))
    return out
