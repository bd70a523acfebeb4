"""The projector study (``fam projector-compare``): patch-aligned training, tested where the
paper (arXiv 2505.17316) makes its claims, at CPU scale, offline (docs/projector_study.md).

1. **Data.** Scenes with textured backgrounds (``scenes.background_texture``), captions,
   PAD masks, and the instruction data of the SFT stage (:mod:`fam.data.instructions`).
2. **A frozen pretrained tower.** Tiny LLaVAs, one per language model (``llms``: Llama,
   Qwen2), built with one tokenizer; ``fam train tower`` pretrains the vision tower
   contrastively on the first one, and the same tower goes into every LLaVA. Its patch
   entropy before any projector is measured against the random initialisation.
3. **Stage 0 per language model**, the tower frozen: the stand-in for a pretrained LLM.
4. **Projectors** (fresh, towers and LLM frozen), every arm × seed:
   the β sweep (``betas`` × ``schedules`` on ``sweep_projector`` and the first LLM) and the
   cross-architecture check (``projectors`` × ``llms`` × {0, ``projector.beta_max``}); each
   analysed on held-out images (ΔH uncentred and centred, patch mIoU, matching-pursuit
   recovery, the multi-semantic check, region → phrase retrieval, held-out caption loss,
   caption quality of greedy captions).
5. **SFT** (``downstream``) from every cross-architecture projector with identical settings:
   VQA (count, colour, relation) and REC (box text, IoU ≥ 0.5), gated on the caption-only
   arms being above the no-image baseline.
6. **FAM** (``fam``): MAC + VEIN from the SFT'd caption-only vs patch-aligned LVLM (sweep
   projector, first LLM), evaluated with the MMEB protocol on Scenes.

Independent runs go to ``workers`` processes (1 torch thread each). Results:
``projector_results.json`` (every run, every comparison with paired CIs),
``projector_results.md`` and figures (:mod:`fam.experiments.projector_report`). Re-running
with the same ``out`` reuses everything that finished.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from fam.config import CompareConfig, to_dict
from fam.experiments.pipeline import Timings, prepare_scenes, stage_run, start_experiment
from fam.experiments.presets import load_preset
from fam.experiments.projector_report import (format_results, measure_tower, summarise,
                                              write_figures)
from fam.experiments.projector_runs import (Arm, arm_unit, caption_only, fam_unit, run_units,
                                            stage0_unit)
from fam.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["compare_config", "format_results", "plan_arms", "run_projector_compare"]


def compare_config(quick: bool = False) -> CompareConfig:
    """The study's budgets: the ``projector_compare`` preset, or its ``_quick`` form."""
    return load_preset(CompareConfig, "projector_compare_quick" if quick else "projector_compare")


def plan_arms(exp: CompareConfig) -> tuple[list[Arm], list[Arm], list[Arm]]:
    """``(all arms, cross-architecture arms, FAM arms)``, each arm once.

    The sweep: ``betas`` × ``schedules`` on ``sweep_projector`` and ``llms[0]`` (β = 0 once);
    the cross-architecture check: ``projectors`` × ``llms`` × {0, ``projector.beta_max``
    with ``projector.beta_schedule``}; FAM: the cross-architecture pair of the sweep
    projector and ``llms[0]``. All for every seed.
    """
    b_star, s_star = exp.projector.beta_max, exp.projector.beta_schedule
    arms: dict[str, Arm] = {}
    cross: list[Arm] = []
    for seed in exp.seeds:
        for beta in exp.betas:
            for sched in exp.schedules:
                a = Arm(exp.sweep_projector, exp.llms[0], float(beta), sched, seed)
                arms.setdefault(a.name, a)
        for kind in exp.projectors:
            for llm in exp.llms:
                for beta in (0.0, b_star):
                    a = Arm(kind, llm, beta, s_star, seed)
                    arms.setdefault(a.name, a)
                    cross.append(arms[a.name])
    fam = [a for a in cross if a.projector == exp.sweep_projector and a.llm == exp.llms[0]]
    return list(arms.values()), cross, fam


def _tiny(out: Path, data: Path, exp: CompareConfig, llm: str) -> Path:
    """``models/tiny-<llm>``: a random tiny LLaVA; every LLM gets the same tokenizer
    (trained on the captions and the instruction rows)."""
    from fam.backbones import build_tiny
    from fam.data.captions import caption_texts, read_json_list
    path = out / "models" / f"tiny-{llm}"
    if not (path / "config.json").exists():
        corpus = caption_texts(data / "captions.json")
        corpus += [r["question"] + " " + r["answer"]
                   for r in read_json_list(data / "sft_train.json")]
        build_tiny("llava", path, size=exp.model.size, image_size=exp.scenes.image_size,
                   corpus=corpus, seed=0, text_model=llm)
    return path


def _with_tower(tiny: Path, tower_model: Path, dst: Path) -> Path:
    """``tiny`` with the vision tower of ``tower_model`` (weights copied key for key)."""
    from fam.backbones import load_backbone
    from fam.projector.tower import llava_vision_tower
    if not (dst / "config.json").exists():
        src = load_backbone(tower_model)
        adapter = load_backbone(tiny)
        llava_vision_tower(adapter.hf_model).load_state_dict(
            llava_vision_tower(src.hf_model).state_dict(), strict=True)
        adapter.save_pretrained(dst)
    return dst


def run_projector_compare(out: str | Path, quick: bool = False, seeds: list[int] | None = None,
                          progress: bool = True, plan: CompareConfig | None = None,
                          threads: int | None = None, betas: list[float] | None = None,
                          schedules: list[str] | None = None,
                          projectors: list[str] | None = None, llms: list[str] | None = None,
                          workers: int | None = None) -> dict[str, Any]:
    """Run the study; returns (and writes) ``projector_results.json``'s content.

    Args:
        out: output folder (module docstring of :mod:`fam.experiments.projector_runs`).
        quick: the ``projector_compare_quick`` preset (CI).
        seeds, betas, schedules, projectors, llms, workers: override the preset's.
        progress: progress bars of the stages run in this process.
        plan: explicit budgets (overrides ``quick``).
        threads: torch threads per process (overrides the preset's; 0 = torch's default).
    """
    from fam.data.instructions import write_instructions
    from fam.train.runner import run_stage

    exp, out = start_experiment(plan or compare_config(quick), out, "projector-compare",
                                seeds=list(seeds) if seeds else None, betas=betas,
                                schedules=schedules, projectors=projectors, llms=llms,
                                workers=workers, threads=threads)
    timed = Timings()
    with timed("data"):
        data = prepare_scenes(out / "data", exp.scenes, progress)
        if not (data / "sft_eval.json").exists():
            write_instructions(data, eval_per_task=exp.sft_eval_per_task,
                               eval_pools=exp.eval_pools)
    with timed("tower"):
        tinies = {llm: _tiny(out, data, exp, llm) for llm in exp.llms}
        tower = run_stage(dataclasses.replace(
            exp.tower, model=str(tinies[exp.llms[0]]), captions=str(data / "captions.json"),
            image_root=str(data), run=stage_run(exp.tower.run, out / "tower", 0, exp, progress)))
        towered = {llm: tower if i == 0 else
                   _with_tower(tinies[llm], tower, out / "models" / f"tower-{llm}")
                   for i, llm in enumerate(exp.llms)}
        tower_rep = measure_tower(tinies[exp.llms[0]], tower, data, exp.analysis_images)
    with timed("stage0"):
        s0 = dict(zip(exp.llms, run_units(stage0_unit, [(exp, out, llm, towered[llm])
                                                        for llm in exp.llms],
                                          exp.workers, exp.threads, "stage 0")))
    arms, cross, fam_arms = plan_arms(exp)
    with_sft = {a.name for a in cross} if exp.downstream else set()
    # longest first (SFT, then the C-Abstractor), so the pool's tail is short
    order = sorted(arms, key=lambda a: (a.name not in with_sft, a.projector != "cabstractor"))
    with timed("projectors_sft"):
        done = run_units(arm_unit, [(exp, out, a, Path(s0[a.llm]), a.name in with_sft)
                                    for a in order], exp.workers, exp.threads, "projector runs")
    units = {a.name: r for a, r in zip(order, done)}
    fam_res: dict[str, Any] = {}
    if exp.fam and exp.downstream:
        with timed("fam"):
            jobs = [(exp, out, a, Path(units[a.name]["sft"]["model"])) for a in fam_arms]
            fam_res = dict(zip([a.name for a in fam_arms],
                               run_units(fam_unit, jobs, exp.workers, exp.threads, "FAM runs")))
    with timed("report"):
        res = summarise(exp, data, units, cross, fam_res, tower_rep)
    res.update({"config": to_dict(exp), "torch_threads": torch.get_num_threads(),
                "arms": {a.name: dataclasses.asdict(a) for a in arms},
                "pairs": {a.name: caption_only(a).name for a in arms if a.beta > 0}})
    res["timings_s"] = timed.finish()
    write_figures(res, out)
    from fam.projector.report import jsonable
    atomic_write_json(out / "projector_results.json", jsonable(res))
    atomic_write_text(out / "projector_results.md", format_results(res))
    log.info("projector study written to %s (%.0f s)", out / "projector_results.md",
             res["timings_s"]["total"])
    return res
