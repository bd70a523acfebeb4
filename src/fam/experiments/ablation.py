"""Ablations of FAM on the Scenes benchmark, over several seeds (``fam ablate``).

Groups (method.md §6 reference: MAC only 56.4, VEIN only 55.9, FAM 57.3 vs VLM2Vec 55.0 on
MMEB with Qwen2-VL-2B; VEIN position: none 55.0, all 54.2, last 55.3, second-to-last
55.6, last three 55.9):

* ``main`` — the VLM2Vec baseline; MAC only (MAC, then plain adaptation); VEIN only
  (adaptation with the paper's VEIN from stage 0, λ = 1); both (FAM).
* ``inversion`` — the inversion variant of VEIN (``vein.memory=embedding``: the decoder
  reads ``e`` alone) at λ = :data:`INVERSION_WEIGHT`, alone and after MAC (FAM).
* ``vein_weight`` — the paper's VEIN at λ = :data:`INVERSION_WEIGHT`: the official code
  weighs L_rec ``W`` times more than its stated λ on ``W`` GPUs (method.md §3.1), and it is
  the like-for-like reference of the inversion variant.
* ``mac_terms`` — MAC terms added one at a time, each followed by *plain* adaptation so
  the group isolates MAC: coarse; coarse + c2f; coarse + c2f + fine (= MAC only).
* ``control`` — the paper's Table 3 control: the baseline adapted on the task pairs plus
  the *same* image-caption pairs MAC uses, as retrieval data (image → caption, MAC's
  prompts), for as many steps as MAC + adaptation together. It tells MAC's gain from the
  gain of seeing more data.
* ``mask_ratio`` — VEIN only with γ ∈ {0.1, 0.3, 0.5, 0.8} (paper: 0.3 best, > 0.8 worse
  than none).
* ``vein_layers`` — VEIN only at the last, the second-to-last, the last three and all
  layers (paper's position ablation, also VEIN only).
* ``multivector`` — one vector or many (:mod:`fam.experiments.multivector_study`): the
  baseline, MAC only and FAM read zero-shot as MaxSim over their token states, and the
  baseline and MAC only adapted with ``multivector.enabled=true``; each scored single,
  maxsim and hybrid, plus MaxSim maps against the objects' masks.

For each seed the Scenes data (generated once, with seed 0, shared by every seed: the
seed varies the model's initialisation, stage 0 and the training order, not the
benchmark), one tiny model and one stage-0 checkpoint are built; every config of every
group starts from that stage-0 checkpoint with the same adaptation budget. Runs are
identified by their settings, not their labels, so a config that appears in two groups
(e.g. γ = 0.3 at the default layers is "VEIN only") trains once, and the three MAC
variants' aligned checkpoints are shared by every config that adapts from them.

Layout under ``--out``::

    data/                                  the benchmark (shared by seeds)
    seed<s>/models/tiny, seed<s>/stage0/   per-seed initialisation and stage 0
    seed<s>/align/<w_c>-<w_c2f>-<w_f>/     MAC stage-1 checkpoints
    seed<s>/runs/<run key>/                adaptation runs (model/, checkpoints)
    seed<s>/results/<run key>.json         evaluation (per-row credits) + mechanism checks
    ablation.json, ablation.md             all runs, aggregates (mean ± std), paired
                                           differences with 95 % intervals, mechanisms
    ablation.png                           precision@1 per config with t 95 % whiskers

Re-running with the same ``--out`` skips finished runs and resumes interrupted stages.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from fam.config import AdaptConfig, AlignConfig, DemoConfig
from fam.config.experiments import ABLATION_SIZES
from fam.errors import ConfigError
from fam.experiments.ablation_report import (DEFAULT_GROUPS, GROUPS, INVERSION_WEIGHT,
                                             mechanism_checks, write_report)
from fam.experiments.control import CAPTION_SUBSET, caption_pairs_train_dir
from fam.experiments.pipeline import (base_model, num_layers, prepare_scenes, stage_run,
                                      start_experiment)
from fam.experiments.presets import load_preset
from fam.experiments.workers import run_workers, try_lock
from fam.utils.io import atomic_write_json
from fam.utils.threads import use_threads

log = logging.getLogger(__name__)

__all__ = ["AblationRun", "GROUPS", "DEFAULT_GROUPS", "SIZES", "plan_for_size", "expand_groups",
           "vein_layer_sets", "align_config", "adapt_config", "caption_pairs_train_dir",
           "mechanism_checks", "run_ablation", "train_and_eval", "CAPTION_SUBSET"]

MASK_RATIOS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.8)
MAC_ALL: tuple[float, float, float] = (1.0, 1.0, 1.0)
#: Order in which groups' runs are trained (every seed of a config before the next
#: config): the paper's comparison, the inversion variant, the data control, the MAC
#: terms, then the extra references and the sweeps.
RUN_PRIORITY: tuple[str, ...] = ("main", "multivector", "inversion", "control", "mac_terms",
                                 "vein_weight", "mask_ratio", "vein_layers")


@dataclass(frozen=True)
class AblationRun:
    """One training configuration (what differs from the VLM2Vec baseline).

    Attributes:
        align_weights: (w_c, w_c2f, w_f) of the MAC stage, or ``None`` for no MAC stage
            (adaptation starts from stage 0).
        vein: adaptation with VEIN.
        mask_ratio: VEIN's γ.
        vein_layers: VEIN's layers (negative: from the end).
        vein_memory: ``"unmasked"`` (paper) or ``"embedding"`` (inversion).
        vein_weight: λ.
        captions: the Table 3 control: MAC's image-caption pairs join the task pairs and
            the adaptation runs as many steps as MAC + adaptation.
        multivector: adaptation with the late-interaction loss (``multivector.enabled``).
    """

    align_weights: tuple[float, float, float] | None = None
    vein: bool = False
    mask_ratio: float = 0.3
    vein_layers: tuple[int, ...] = (-3, -2, -1)
    vein_memory: str = "unmasked"
    vein_weight: float = 1.0
    captions: bool = False
    multivector: bool = False

    @property
    def key(self) -> str:
        """A file-name-safe identity: equal settings share one run (and one folder)."""
        w = self.align_weights
        mac = "none" if w is None else "-".join(f"{x:g}" for x in w)
        vein = "off"
        if self.vein:
            vein = f"g{self.mask_ratio:g}_L{'_'.join(str(l) for l in self.vein_layers)}"
            if self.vein_memory != "unmasked":
                vein += f"_{self.vein_memory}"
            if self.vein_weight != 1.0:
                vein += f"_w{self.vein_weight:g}"
        return (f"mac{mac}__vein{vein}" + ("__captions" if self.captions else "")
                + ("__mv" if self.multivector else ""))


def plan_for_size(size: str) -> DemoConfig:
    """Budgets of one ablation size (a preset in ``configs/experiments``).

    ``quick``: a few steps per stage (every group's code path in CI time). ``small``: a 4-layer
    tiny model with short stages, sized so that every group with 2 seeds fits in about 40
    minutes on 2 shared CPU cores. ``demo``: the full demo's, image-only (hours on a CPU).
    """
    if size not in SIZES:
        raise ConfigError(f"unknown ablation size {size!r}; choose one of {list(SIZES)}")
    return load_preset(DemoConfig, SIZES[size]).image_only()


SIZES = ABLATION_SIZES  #: ablation sizes and their presets (fam.config.experiments)


def vein_layer_sets(num_layers: int) -> dict[str, tuple[int, ...]]:
    """The position ablation's layer sets for a ``num_layers``-layer LM (negative indices).

    ``last_three`` is cut to the layers that exist, so with fewer than 4 layers some sets
    coincide (and then share one run).
    """
    if num_layers < 1:
        raise ConfigError(f"num_layers must be ≥ 1, got {num_layers}")
    return {"last": (-1,), "second_to_last": (-2,) if num_layers >= 2 else (-1,),
            "last_three": tuple(range(-min(3, num_layers), 0)),
            "all": tuple(range(-num_layers, 0))}


def expand_groups(groups: Sequence[str], num_layers: int,
                  default_layers: Sequence[int] = (-3, -2, -1), default_ratio: float = 0.3,
                  ) -> dict[str, list[tuple[str, AblationRun]]]:
    """``{group: [(config label, run)]}``; the baseline is always part of ``main``.

    Args:
        groups: subset of :data:`GROUPS`.
        num_layers: LM layers of the backbone (for the layer sets and to cut
            ``default_layers`` to what exists).
        default_layers: VEIN layers of "VEIN only"/FAM and of the γ sweep.
        default_ratio: γ of "VEIN only"/FAM and of the layer sweep.
    """
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise ConfigError(f"unknown ablation group(s) {bad}; choose from {list(GROUPS)}")
    layers = tuple(sorted({l for l in default_layers if -num_layers <= l < 0}))
    if not layers:
        raise ConfigError(f"vein layers {list(default_layers)} do not exist in a "
                          f"{num_layers}-layer model")
    vein = dict(vein=True, mask_ratio=default_ratio, vein_layers=layers)
    inv = dict(vein, vein_memory="embedding", vein_weight=INVERSION_WEIGHT)
    out: dict[str, list[tuple[str, AblationRun]]] = {}
    for g in groups:
        if g == "main":
            out[g] = [("baseline", AblationRun()),
                      ("mac_only", AblationRun(align_weights=MAC_ALL)),
                      ("vein_only", AblationRun(**vein)),
                      ("fam", AblationRun(align_weights=MAC_ALL, **vein))]
        elif g == "inversion":
            out[g] = [("vein_inversion", AblationRun(**inv)),
                      ("fam_inversion", AblationRun(align_weights=MAC_ALL, **inv))]
        elif g == "vein_weight":
            out[g] = [(f"vein_only_w{INVERSION_WEIGHT:g}",
                       AblationRun(**vein, vein_weight=INVERSION_WEIGHT))]
        elif g == "control":
            out[g] = [("control", AblationRun(captions=True))]
        elif g == "mac_terms":
            out[g] = [("coarse", AblationRun(align_weights=(1.0, 0.0, 0.0))),
                      ("coarse+c2f", AblationRun(align_weights=(1.0, 1.0, 0.0))),
                      ("coarse+c2f+fine", AblationRun(align_weights=MAC_ALL))]
        elif g == "mask_ratio":
            out[g] = [(f"gamma={r:g}", AblationRun(vein=True, mask_ratio=r, vein_layers=layers))
                      for r in MASK_RATIOS]
        elif g == "vein_layers":
            out[g] = [(name, AblationRun(vein=True, mask_ratio=default_ratio, vein_layers=ls))
                      for name, ls in vein_layer_sets(num_layers).items()]
        elif g == "multivector":
            from fam.experiments.multivector_study import study_runs
            out[g] = study_runs(MAC_ALL, vein)
    return out


# --------------------------------------------------------------------------- configs

def align_config(weights: Sequence[float], stage0: str | Path, data: str | Path, out: str | Path,
                 seed: int, plan: DemoConfig, progress: bool = False) -> AlignConfig:
    """The MAC stage of a run: the preset's align settings with the given term weights."""
    data = Path(data)
    return dataclasses.replace(plan.align, model=str(stage0), captions=str(data / "captions.json"),
                               image_root=str(data), weights=tuple(float(w) for w in weights),
                               run=stage_run(plan.align.run, Path(out), seed, plan, progress))


def adapt_config(run: AblationRun, start: str | Path, data: str | Path, out: str | Path,
                 seed: int, plan: DemoConfig, progress: bool = False) -> AdaptConfig:
    """The adaptation of a run, seeded ``seed + adapt_seed_offset`` (the control: below)."""
    vein = dataclasses.replace(plan.vein, enabled=True, mask_ratio=run.mask_ratio,
                               layers=list(run.vein_layers), memory=run.vein_memory,
                               weight=run.vein_weight) if run.vein else plan.adapt.vein
    optim = plan.adapt.optim
    if run.captions:  # task pairs + MAC's caption pairs, for align + adapt steps
        optim = dataclasses.replace(optim, steps=optim.steps + plan.align.optim.steps)
    data = Path(data)
    mv = dataclasses.replace(plan.adapt.multivector, enabled=run.multivector or
                             plan.adapt.multivector.enabled)
    return dataclasses.replace(plan.adapt, model=str(start), image_root=str(data), vein=vein,
                               multivector=mv,
                               train_dir=str(data / ("train_captions" if run.captions else
                                                     "train")), optim=optim,
                               run=stage_run(plan.adapt.run, Path(out),
                                             seed + plan.adapt_seed_offset, plan, progress))


# --------------------------------------------------------------------------- running

def train_and_eval(run: AblationRun, root: Path, stage0: Path, data: Path, seed: int,
                    plan: DemoConfig, progress: bool, probes: bool = True) -> dict[str, Any]:
    """Train one run (reusing finished stages), evaluate it (keeping per-row credits for
    the bootstrap) and run the mechanism checks; returns its result record."""
    from fam.backbones import load_backbone
    from fam.eval.mmeb import evaluate
    from fam.model import EmbeddingModel
    from fam.train.runner import run_stage

    if run.captions:
        caption_pairs_train_dir(data, plan)
    timings: dict[str, float] = {}
    start: Path = stage0
    if run.align_weights is not None:
        t = time.time()
        wkey = "-".join(f"{w:g}" for w in run.align_weights)
        start = run_stage(align_config(run.align_weights, stage0, data, root / "align" / wkey,
                                       seed, plan, progress))
        timings["align"] = time.time() - t  # ~0 when the checkpoint is shared
    t = time.time()
    model = run_stage(adapt_config(run, start, data, root / "runs" / run.key, seed, plan,
                                   progress))
    timings["adapt"] = time.time() - t
    t = time.time()
    res = evaluate(EmbeddingModel(load_backbone(model)), data / "eval", data, progress=progress,
                   per_row=True)
    timings["eval"] = time.time() - t
    rec = {"key": run.key, "seed": seed, "run": dataclasses.asdict(run), "model": str(model),
           "results": res, "timings_s": timings}
    if probes:
        t = time.time()
        rec["mechanism"] = mechanism_checks(model, root / "runs" / run.key, data, plan)
        timings["probes"] = time.time() - t
    return rec


def run_ablation(out: str | Path, seeds: Sequence[int] = (0, 1), size: str = "small",
                 groups: Sequence[str] | None = None, progress: bool = False,
                 plan: DemoConfig | None = None, threads: int = 1,
                 configs: Sequence[str] | None = None, report_only: bool = False,
                 probes: bool = True, workers: int = 1) -> dict[str, Any]:
    """Run (or resume) the ablation; writes and returns ``ablation.json``'s content.

    Args:
        out: output folder.
        seeds: training seeds (each gets its own tiny model and stage-0 checkpoint).
        size: one of :data:`SIZES` (ignored when ``plan`` is given).
        groups: subset of :data:`GROUPS` (default: :data:`DEFAULT_GROUPS`).
        progress: progress bars in the stages.
        plan: explicit budgets (tests).
        configs: run only the configs with these labels (e.g. ``fam``, ``gamma=0.5``);
            the baseline always runs. Default: every config of the groups.
        threads: torch intra-op threads for every stage and the evaluation (0: torch's
            default). 1 is the default because the tiny models gain nothing from more,
            and on a shared 2-core machine oversubscribed OpenMP threads made an adaptation
            step 10-40x slower (measured: 7-9 s vs 0.6 s per step).
        report_only: train nothing; rebuild ``ablation.json``/``.md`` from the finished
            runs' result files.
        probes: run the mechanism checks (FAM probes, VEIN diagnostic) on every run.
        workers: processes that train runs at once (each with ``threads`` threads); every
            stage-0 model, MAC stage and run is a task under a file lock in ``<out>/locks``
            (:mod:`fam.experiments.workers`).
    """
    if not seeds:
        raise ConfigError("give at least one seed (--seeds 0 1 2)")
    if workers < 1:
        raise ConfigError(f"--workers must be ≥ 1, got {workers}")
    import torch

    before = torch.get_num_threads()
    try:
        plan = (plan or plan_for_size(size)).image_only()  # image-only, whatever the preset
        plan, out = start_experiment(plan, out, "ablate", threads=threads)
        groups = list(groups or DEFAULT_GROUPS)
        t_start = time.time()
        if report_only:
            return _report(out, seeds, size, groups, plan, configs, t_start, final=True)
        # The benchmark is generated once, with seed 0, and shared by every seed (which varies
        # the initialisation, stage 0 and training order), before any worker starts.
        prepare_scenes(out / "data", dataclasses.replace(plan.scenes, seed=0), progress=False)
        if workers == 1:
            _work(out, seeds, groups, plan, configs, progress, probes,
                  on_run=lambda: _report(out, seeds, size, groups, plan, configs, t_start,
                                         final=False))
        else:
            _run_workers(workers, out, seeds, groups, plan, configs, progress, probes)
        return _report(out, seeds, size, groups, plan, configs, t_start, final=True)
    finally:
        torch.set_num_threads(before)  # the stages change it too; leave the caller's setting


def _seed_runs(root: Path, groups: Sequence[str], plan: DemoConfig,
               configs: Sequence[str] | None
               ) -> tuple[dict[str, list[tuple[str, AblationRun]]], dict[str, AblationRun]]:
    """The groups expanded for a seed's model, and its distinct runs (baseline first)."""
    # The preset's VEIN layers; unset means the paper's default for the backbone size,
    # which for these tiny models (< 3B parameters) is the last three.
    expanded = expand_groups(groups, num_layers(root / "models" / "tiny"),
                             plan.vein.layers or (-3, -2, -1))
    if configs:
        expanded = {g: [(lab, r) for lab, r in cfgs if lab in configs or lab == "baseline"]
                    for g, cfgs in expanded.items()}
        expanded = {g: cfgs for g, cfgs in expanded.items() if cfgs}
    # main's baseline is always needed: every Δ is taken against it.
    runs = {AblationRun().key: AblationRun()}
    for g in sorted(expanded, key=RUN_PRIORITY.index):
        for _, r in expanded[g]:
            runs.setdefault(r.key, r)
    return expanded, runs


def _work(out: Path, seeds: Sequence[int], groups: Sequence[str], plan: DemoConfig,
          configs: Sequence[str] | None, progress: bool, probes: bool,
          on_run: Callable[[], Any] | None = None, poll_s: float = 5.0) -> None:
    """Train and evaluate every run of every seed that no other process is training.

    Tasks are taken config by config (every seed's stage 0 first, then each config for
    every seed, configs in :data:`RUN_PRIORITY` order), so an ablation stopped early has the
    decisive configs on every seed rather than every config on fewer seeds; tasks another
    worker holds, or whose stage-0/MAC checkpoint another worker is still training, are
    skipped. Returns when every task is finished or held by another worker.
    """
    from fam.train.runner import run_stage

    data = out / "data"
    locks = out / "locks"
    pending: list[tuple[int, str]] = [(s, "stage0") for s in seeds]
    rank: dict[str, int] = {}  # run key -> priority (:data:`RUN_PRIORITY`)
    runs_of: dict[int, tuple[dict[str, list[tuple[str, AblationRun]]], dict[str, AblationRun]]] = {}
    while pending:
        did = waiting = False
        for task in list(pending):
            seed, key = task
            root = out / f"seed{seed}"
            if key == "stage0":
                if (root / "stage0" / "model" / "config.json").exists():
                    pending.remove(task)
                    runs = _seed_runs(root, groups, plan, configs)[1]
                    rank.update({k: i for i, k in enumerate(runs)})
                    pending += [(seed, k) for k in runs if (seed, k) not in pending]
                    pending.sort(key=lambda t: (-1 if t[1] == "stage0" else rank[t[1]],
                                                list(seeds).index(t[0])))
                    did = True
                    break
                with try_lock(locks / f"seed{seed}-stage0.lock") as got:
                    if got:
                        log.info("ablate seed %d: stage 0", seed)
                        base_model(root, data, plan, seed, progress)
                        did = True
                    else:
                        waiting = True
                if did:
                    break
                continue
            expanded, runs = runs_of.setdefault(seed, _seed_runs(root, groups, plan, configs))
            study = _study_todo(root, key, expanded)  # the multi-vector study's reading
            done = (root / "results" / f"{key}.json").exists()
            if done and study is None:
                pending.remove(task)
                continue
            run = runs[key]
            with try_lock(locks / f"seed{seed}-{key}.lock") as got:
                if not got:  # another worker trains it and reports it (then: its reading)
                    waiting |= study is not None
                    if study is None:
                        pending.remove(task)
                    continue
                align = (not done and run.align_weights
                         and "-".join(f"{w:g}" for w in run.align_weights))
                if align and not (root / "align" / align / "model" / "config.json").exists():
                    with try_lock(locks / f"seed{seed}-align-{align}.lock") as got_align:
                        if not got_align:
                            waiting = True  # another worker is training this MAC stage
                            continue
                        log.info("ablate seed %d: MAC stage %s", seed, align)
                        run_stage(align_config(run.align_weights, root / "stage0" / "model",
                                               data, root / "align" / align, seed, plan,
                                               progress))
                if not done:
                    log.info("ablate seed %d: run %s", seed, key)
                    rec = train_and_eval(run, root, root / "stage0" / "model", data, seed, plan,
                                         progress, probes)
                    atomic_write_json(root / "results" / f"{key}.json", rec)
                    log.info("ablate seed %d: %s overall %.1f (IND %.1f, OOD %.1f) in %.0f s",
                             seed, key, rec["results"]["overall"], rec["results"]["IND"],
                             rec["results"]["OOD"], sum(rec["timings_s"].values()))
                if study is not None:
                    from fam.experiments.multivector_study import study_eval
                    log.info("ablate seed %d: multi-vector readings of %s", seed, key)
                    atomic_write_json(study, study_eval(run, root, data, seed, plan, progress))
            pending.remove(task)
            did = True
            if on_run is not None:
                # Rewrite the report after every run so a long ablation can be read while
                # it runs (without the bootstrap and the plot, which the final one adds).
                on_run()
            break  # back to the first pending task: earlier seeds first
        if not did:
            if not waiting:
                return
            time.sleep(poll_s)  # a checkpoint this worker needs is being trained elsewhere


def _study_todo(root: Path, key: str, expanded: dict[str, list[tuple[str, AblationRun]]]
                ) -> Path | None:
    """The multi-vector study's result file of run ``key`` if the study wants it and it is
    not written yet (:mod:`fam.experiments.multivector_study`)."""
    from fam.experiments.multivector_study import STUDY_GROUP, study_file
    if all(r.key != key for _, r in expanded.get(STUDY_GROUP, ())):
        return None
    f = study_file(root, key)
    return None if f.exists() else f


def _worker_main(out: str, seeds: list[int], groups: list[str], plan: DemoConfig,
                 configs: list[str] | None, progress: bool, probes: bool, level: int) -> None:
    """Entry point of a worker process (spawned: a fresh interpreter, no inherited torch)."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(processName)s "
                                             "%(name)s: %(message)s", datefmt="%H:%M:%S")
    use_threads(plan.threads)  # settings were checked and recorded by the parent
    _work(Path(out), seeds, groups, plan, configs, progress, probes)


def _run_workers(n: int, out: Path, seeds: Sequence[int], groups: Sequence[str],
                 plan: DemoConfig, configs: Sequence[str] | None, progress: bool,
                 probes: bool) -> None:
    level = logging.getLogger("fam").getEffectiveLevel()
    run_workers(n, _worker_main, (str(out), list(seeds), list(groups), plan,
                                  list(configs) if configs else None, progress, probes, level),
                what="ablation")


def _report(out: Path, seeds: Sequence[int], size: str, groups: Sequence[str],
            plan: DemoConfig, configs: Sequence[str] | None, t_start: float,
            final: bool) -> dict[str, Any]:
    """Collect the finished runs' result files and write the report."""
    records: list[dict[str, Any]] = []
    expanded: dict[str, list[tuple[str, AblationRun]]] = {}
    stage0_times: list[float] = []
    for seed in seeds:
        root = out / f"seed{seed}"
        if not (root / "models" / "tiny" / "config.json").exists():
            log.warning("ablate: seed %d has no model under %s; nothing to report", seed, root)
            continue
        expanded, runs = _seed_runs(root, groups, plan, configs)
        metrics = root / "stage0" / "train_metrics.json"
        if metrics.exists():
            stage0_times.append(float(json.loads(metrics.read_text()).get("seconds") or 0.0))
        for key in runs:
            rpath = root / "results" / f"{key}.json"
            if rpath.exists():
                records.append(json.loads(rpath.read_text()))
            elif final:
                log.info("ablate seed %d: %s not finished; left out of the report", seed, key)
    from fam.experiments.multivector_study import collect
    expanded, late, study = collect(out, seeds, expanded)
    return write_report(out, records + late, expanded, seeds, size, plan, stage0_times,
                        t_start, final=final, study=study)
