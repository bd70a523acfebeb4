"""Ablations of FAM on the Scenes benchmark, over several seeds (``fam ablate``).

Groups (SPEC §6 reference: MAC only 56.4, VEIN only 55.9, FAM 57.3 vs VLM2Vec 55.0 on
MMEB with Qwen2-VL-2B; VEIN position: none 55.0, all 54.2, last 55.3, second-to-last
55.6, last three 55.9):

* ``main`` — the VLM2Vec baseline; MAC only (MAC, then plain adaptation); VEIN only
  (adaptation with the paper's VEIN from stage 0, λ = 1); both (FAM).
* ``inversion`` — the inversion variant of VEIN (``vein.memory=embedding``: the decoder
  reads ``e`` alone) at λ = :data:`INVERSION_WEIGHT`, alone and after MAC (FAM).
* ``vein_weight`` — the paper's VEIN at λ = :data:`INVERSION_WEIGHT`: the official code
  weighs L_rec ``W`` times more than its stated λ on ``W`` GPUs (docs/vein.md), and it is
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
    seed<s>/results/<run key>.json         evaluation + timings of a finished run
    ablation.json, ablation.md             all runs, aggregates (mean ± std), tables

Re-running with the same ``--out`` skips finished runs and resumes interrupted stages.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from fam.config import AdaptConfig, LoraConfig, OptimConfig, RunConfig, VeinConfig
from fam.data.types import IMAGE_PLACEHOLDER
from fam.demo import DemoPlan, quick_plan
from fam.errors import ConfigError
from fam.eval.stats import group_members, paired_bootstrap, paired_t
from fam.train.align import AlignConfig
from fam.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["AblationRun", "GROUPS", "DEFAULT_GROUPS", "SIZES", "plan_for_size", "expand_groups", "vein_layer_sets",
           "align_config", "adapt_config", "run_ablation", "aggregate_runs", "format_ablation",
           "add_ablate_subcommand"]

#: Ablation groups in report order.
GROUPS: tuple[str, ...] = ("main", "inversion", "vein_weight", "mac_terms", "control",
                           "mask_ratio", "vein_layers")
#: Groups run when none is named: the decisive comparison (the γ and layer sweeps are
#: opt-in with ``--only``).
DEFAULT_GROUPS: tuple[str, ...] = ("main", "inversion", "vein_weight", "mac_terms", "control")
#: λ of the inversion variant and of the paper's VEIN in ``vein_weight``: the official
#: fine-tuning ran on 32 GPUs (its run.sh), where its L_rec weighs 32 × λ (docs/vein.md).
INVERSION_WEIGHT: float = 32.0
#: Extra paired comparisons besides "config − baseline": (config, reference).
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("fam", "mac_only"), ("fam_inversion", "mac_only"), ("vein_inversion", "vein_only_w32"),
    ("vein_only_w32", "vein_only"), ("mac_only", "control"))
#: Name of the caption subset the control adds to the task pairs.
CAPTION_SUBSET = "Scenes-Captions"
#: Metrics aggregated over seeds (keys of :func:`fam.eval.mmeb.evaluate`'s summary).
META_TASKS: tuple[str, ...] = ("classification", "vqa", "retrieval", "grounding")
METRICS: tuple[str, ...] = META_TASKS + ("IND", "OOD", "overall")
MASK_RATIOS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.8)
MAC_ALL: tuple[float, float, float] = (1.0, 1.0, 1.0)


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
    """

    align_weights: tuple[float, float, float] | None = None
    vein: bool = False
    mask_ratio: float = 0.3
    vein_layers: tuple[int, ...] = (-3, -2, -1)
    vein_memory: str = "unmasked"
    vein_weight: float = 1.0
    captions: bool = False

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
        return f"mac{mac}__vein{vein}" + ("__captions" if self.captions else "")


def plan_for_size(size: str) -> DemoPlan:
    """Budgets of one ablation size.

    ``quick``: the demo's quick plan (seconds per config; tests). ``small``: a 4-layer tiny
    model with short stages, sized so that every group with 2 seeds fits in about 40
    minutes on 2 shared CPU cores. ``demo``: the full demo's budgets (hours on a CPU).
    """
    if size == "quick":
        # CI-sized: every group's code path, not a measurement (a few steps each).
        return dataclasses.replace(
            quick_plan(), n_train_images=64, n_eval_images=16, n_ood_images=8, eval_rows=6,
            n_candidates=4, stage0_steps=4, stage0_batch=8, adapt_steps=4, adapt_batch=8,
            align_steps=2, align_batch=8, save_every=2)
    if size == "small":
        return DemoPlan(n_train_images=600, n_eval_images=64, n_ood_images=32, eval_rows=32,
                        n_candidates=8, model_size="s", stage0_steps=200, stage0_batch=32,
                        adapt_steps=80, adapt_batch=16, align_steps=40, align_batch=32,
                        vein_layers=(-3, -2, -1), save_every=50)
    if size == "demo":
        return DemoPlan()
    raise ConfigError(f"unknown ablation size {size!r}; choose one of {list(SIZES)}")


SIZES: tuple[str, ...] = ("quick", "small", "demo")


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
    return out


# --------------------------------------------------------------------------- configs

def _run_cfg(out: Path, seed: int, plan: DemoPlan, progress: bool) -> RunConfig:
    return RunConfig(out_dir=str(out), seed=seed, save_every=plan.save_every, progress=progress,
                     log_every=max(1, plan.save_every // 2),
                     threads=int(plan.extra.get("threads", 0)))


def align_config(weights: Sequence[float], stage0: str | Path, data: str | Path, out: str | Path,
                 seed: int, plan: DemoPlan, progress: bool = False) -> AlignConfig:
    """The MAC stage of a run: the demo's align settings with the given term weights."""
    data = Path(data)
    return AlignConfig(model=str(stage0), captions=str(data / "captions.json"),
                       image_root=str(data), weights=tuple(float(w) for w in weights),
                       full_finetune=not plan.lora, lora=LoraConfig(enabled=plan.lora),
                       optim=OptimConfig(lr=plan.align_lr, batch_size=plan.align_batch,
                                         steps=plan.align_steps, warmup_ratio=0.1),
                       run=_run_cfg(Path(out), seed, plan, progress))


def adapt_config(run: AblationRun, start: str | Path, data: str | Path, out: str | Path,
                 seed: int, plan: DemoPlan, progress: bool = False) -> AdaptConfig:
    """The adaptation of a run: the demo's settings, VEIN as the run says."""
    data = Path(data)
    vein = VeinConfig(enabled=run.vein, mask_ratio=run.mask_ratio,
                      layers=list(run.vein_layers), memory=run.vein_memory,
                      weight=run.vein_weight) if run.vein else VeinConfig(enabled=False)
    steps = plan.adapt_steps + (plan.align_steps if run.captions else 0)
    return AdaptConfig(model=str(start), image_root=str(data),
                       train_dir=str(data / ("train_captions" if run.captions else "train")),
                       full_finetune=not plan.lora, lora=LoraConfig(enabled=plan.lora),
                       optim=OptimConfig(lr=plan.adapt_lr, batch_size=plan.adapt_batch,
                                         steps=steps, warmup_ratio=0.1),
                       vein=vein, run=_run_cfg(Path(out), seed, plan, progress))


def caption_pairs_train_dir(data: str | Path) -> Path:
    """``<data>/train_captions``: the task subsets plus MAC's image-caption pairs as a
    retrieval subset (the Table 3 control's training data).

    The pairs are exactly MAC's (:func:`fam.train.stage0.load_captions` on
    ``captions.json``, the caption field MAC reads) with MAC's prompts: query = the image
    after :attr:`AlignConfig.image_instruction`, positive = the caption after
    :attr:`AlignConfig.text_instruction`. Written once; the task subsets are linked.
    """
    from fam.train.stage0 import load_captions

    data = Path(data)
    out = data / "train_captions"
    done = out / f"{CAPTION_SUBSET}.jsonl"
    if done.exists():
        return out
    tmp = data / "train_captions.tmp"
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for f in sorted((data / "train").iterdir()):
        (tmp / f.name).symlink_to(f.resolve())
    mac = AlignConfig()
    lines = []
    for c in load_captions(data / "captions.json", data):
        rel = Path(c.image).resolve().relative_to(data.resolve())
        lines.append(json.dumps({"qry": f"{IMAGE_PLACEHOLDER}\n{mac.image_instruction}",
                                 "qry_image_path": str(rel),
                                 "pos_text": mac.text_instruction + c.target,
                                 "pos_image_path": ""}))
    (tmp / done.name).write_text("\n".join(lines) + "\n")
    tmp.rename(out)
    return out


# --------------------------------------------------------------------------- running

def _prepare_data(out: Path, plan: DemoPlan) -> Path:
    from fam.data.scenes import ScenesConfig, generate_scenes

    data = out / "data"
    if not (data / "scenes.json").exists():
        generate_scenes(ScenesConfig(seed=0, image_size=plan.image_size,
                                     n_train_images=plan.n_train_images,
                                     n_eval_images=plan.n_eval_images,
                                     n_ood_images=plan.n_ood_images, eval_rows=plan.eval_rows,
                                     n_candidates=plan.n_candidates), data, progress=False)
    return data


def _prepare_stage0(root: Path, data: Path, seed: int, plan: DemoPlan, progress: bool) -> Path:
    from fam.backbones import build_tiny
    from fam.config import Stage0Config
    from fam.train.stage0 import run_stage0

    tiny = root / "models" / "tiny"
    if not (tiny / "config.json").exists():
        corpus = [c["caption"] for c in json.loads((data / "captions.json").read_text())]
        qa_path = data / "qa.json"
        if qa_path.exists():
            corpus += [q["question"] + " " + q["answer"] for q in json.loads(qa_path.read_text())]
        build_tiny("qwen2_vl", tiny, size=plan.model_size, image_size=plan.image_size,
                   corpus=corpus, seed=seed)
    qa = data / "qa.json"
    return run_stage0(Stage0Config(
        model=str(tiny), captions=str(data / "captions.json"),
        qa=str(qa) if qa.exists() else "", image_root=str(data),
        optim=OptimConfig(lr=plan.stage0_lr, batch_size=plan.stage0_batch,
                          steps=plan.stage0_steps, warmup_ratio=0.05),
        run=_run_cfg(root / "stage0", seed, plan, progress)))


def _num_layers(model_dir: Path) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    text = cfg.get("text_config") or cfg
    return int(text["num_hidden_layers"])


def _probe_config(plan: DemoPlan):
    from fam.analysis.probes import ProbeConfig
    n = min(48, max(2, plan.n_eval_images // 2))
    return ProbeConfig(max_images=n, attention_images=min(16, n))


def mechanism_checks(model_dir: str | Path, run_dir: str | Path, data: str | Path,
                     plan: DemoPlan) -> dict[str, Any]:
    """Why a config helps or not: the FAM probes on its checkpoint and, for VEIN runs, the
    VEIN diagnostic of its training (last logging window).

    Returns:
        ``{"global_local_gap", "object_caption_gap", "object_caption_win_rate",
        "image_attention": [per layer raw image mass of the EOS token], "vision_centric":
        [layers, negative], "vein": {rec_loss, rec_loss_shuffled, e_gap, grad_ratio} | None}``.
    """
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


def _train_and_eval(run: AblationRun, root: Path, stage0: Path, data: Path, seed: int,
                    plan: DemoPlan, progress: bool, probes: bool = True) -> dict[str, Any]:
    """Train one run (reusing finished stages), evaluate it (keeping per-row credits for
    the bootstrap) and run the mechanism checks; returns its result record."""
    from fam.backbones import load_backbone
    from fam.eval.mmeb import evaluate
    from fam.model import EmbeddingModel
    from fam.train.adapt import run_adapt
    from fam.train.align import run_align

    if run.captions:
        caption_pairs_train_dir(data)
    timings: dict[str, float] = {}
    start: Path = stage0
    if run.align_weights is not None:
        t = time.time()
        wkey = "-".join(f"{w:g}" for w in run.align_weights)
        start = run_align(align_config(run.align_weights, stage0, data, root / "align" / wkey,
                                       seed, plan, progress))
        timings["align"] = time.time() - t  # ~0 when the checkpoint is shared
    t = time.time()
    model = run_adapt(adapt_config(run, start, data, root / "runs" / run.key, seed, plan,
                                   progress))
    timings["adapt"] = time.time() - t
    t = time.time()
    res = evaluate(EmbeddingModel(load_backbone(model)), data / "eval", data, progress=progress,
                   keep_credits=True)
    timings["eval"] = time.time() - t
    rec = {"key": run.key, "seed": seed, "run": dataclasses.asdict(run), "model": str(model),
           "results": res, "timings_s": timings}
    if probes:
        t = time.time()
        rec["mechanism"] = mechanism_checks(model, root / "runs" / run.key, data, plan)
        timings["probes"] = time.time() - t
    return rec


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
    base = by_key.get(baseline_key or AblationRun().key, {})
    out: dict[str, dict[str, Any]] = {}
    for key, seeds in by_key.items():
        agg: dict[str, Any] = {}
        delta: dict[str, Any] = {}
        for m in METRICS:
            vals = [v for v in (_get(seeds[s], m) for s in sorted(seeds)) if v is not None]
            agg[m] = _mean_std(vals)
            agg[m]["ci95"] = paired_t(vals)["ci95"]  # t interval of the mean over seeds
            diffs = [_get(seeds[s], m) - _get(base[s], m) for s in sorted(seeds)
                     if s in base and _get(seeds[s], m) is not None
                     and _get(base[s], m) is not None]
            delta[m] = _mean_std(diffs)
            delta[m]["ci95"] = paired_t(diffs)["ci95"]
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
    the evaluation noise alone (:mod:`fam.eval.stats`).

    Args:
        records: result records (``key``, ``seed``, ``results`` with per-row credits).
        pairs: ``(label, key, reference label, reference key)``.
        n_boot: bootstrap replicates (0: no bootstrap interval).

    Returns:
        ``[{"config", "reference", "key", "reference_key", "seeds", "metrics": {metric:
        {"mean", "sd", "n", "ci95": [lo, hi] | None, "bootstrap_ci95": [lo, hi] | None}}}]``.
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
            diffs = [_get(a[s], m) - _get(b[s], m) for s in seeds
                     if _get(a[s], m) is not None and _get(b[s], m) is not None]
            metrics[m] = {**paired_t(diffs), "bootstrap_ci95": None}
        have = [s for s in seeds if all("credits" in d for d in a[s]["datasets"].values())
                and all("credits" in d for d in b[s]["datasets"].values())]
        if have and n_boot > 0:
            groups = group_members(a[have[0]]["datasets"])
            boot = paired_bootstrap(
                [{n: d["credits"] for n, d in a[s]["datasets"].items()} for s in have],
                [{n: d["credits"] for n, d in b[s]["datasets"].items()} for s in have],
                groups, n_boot=n_boot)
            for m in METRICS:
                if m in boot:
                    metrics[m]["bootstrap_ci95"] = boot[m]["ci95"]
        out.append({"config": label, "reference": ref_label, "key": key,
                    "reference_key": ref_key, "seeds": seeds, "metrics": metrics})
    return out


def _comparison_pairs(expanded: Mapping[str, Sequence[tuple[str, AblationRun]]]
                      ) -> list[tuple[str, str, str, str]]:
    """Every config against the baseline, then :data:`COMPARISONS` that were run."""
    keys: dict[str, str] = {}
    for cfgs in expanded.values():
        for label, r in cfgs:
            keys.setdefault(label, r.key)
    base = AblationRun().key
    pairs = [(label, k, "baseline", base) for label, k in keys.items() if k != base]
    pairs += [(a, keys[a], b, keys[b]) for a, b in COMPARISONS if a in keys and b in keys]
    return pairs


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
    base_key = AblationRun().key
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
                  "| comparison | seeds | Overall (t / rows) | IND | OOD | Class. | VQA | "
                  "Retr. | Ground. |", "|---|---|---|---|---|---|---|---|---|"]
        for p in paired:
            ms = p["metrics"]
            o = ms["overall"]
            head = (f"{o['mean']:+.1f} {_ci(o['ci95'])} / {_ci(o['bootstrap_ci95'])}"
                    if o["mean"] is not None else "-")
            rest = [f"{ms[m]['mean']:+.1f} {_ci(ms[m]['ci95'])}" if ms[m]["mean"] is not None
                    else "-" for m in ("IND", "OOD") + META_TASKS]
            lines.append(f"| {p['config']} − {p['reference']} | {len(p['seeds'])} | {head} | "
                         + " | ".join(rest) + " |")
        lines.append("")
    mech = report.get("mechanism") or {}
    if mech:
        lines += ["## Mechanism checks", "",
                  "FAM probes on the adapted checkpoints (mean over seeds): gap = matched − "
                  "mismatched cosine (global image vs its object crops; object crop vs its "
                  "referring expression), win = fraction of crops closer to their own "
                  "expression; image attention = the EOS token's attention mass on image "
                  "tokens at the last layer. VEIN runs: L_rec with own vs shuffled `e` "
                  "(e-gap = relative increase when shuffled; ~0: the decoder ignores e) and "
                  "the ratio of the gradient norms λ·L_rec / L_task sent into the backbone.",
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
                f"{fmt(v.get('rec_loss'), '{:.4f}')} / {fmt(v.get('rec_loss_shuffled'), '{:.4f}')} | "
                f"{fmt(v.get('e_gap'), '{:+.2%}')} | {fmt(v.get('grad_ratio'), '{:.2g}')} |")
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


def run_ablation(out: str | Path, seeds: Sequence[int] = (0, 1), size: str = "small",
                 groups: Sequence[str] | None = None, progress: bool = False,
                 plan: DemoPlan | None = None, threads: int = 1,
                 configs: Sequence[str] | None = None, report_only: bool = False,
                 probes: bool = True) -> dict[str, Any]:
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
            runs' result files (e.g. after running seeds in separate processes, one
            ``--seeds`` each: two processes must never share a seed).
        probes: run the mechanism checks (FAM probes, VEIN diagnostic) on every run.
    """
    if not seeds:
        raise ConfigError("give at least one seed (--seeds 0 1 2)")
    import torch

    plan = dataclasses.replace(plan or plan_for_size(size))
    plan.extra = {**plan.extra, "threads": threads}
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_ablation(Path(out), seeds, size, list(groups or DEFAULT_GROUPS), progress,
                             plan, configs, report_only, probes)
    finally:
        torch.set_num_threads(before)  # the stages change it too; leave the caller's setting


def _run_ablation(out: Path, seeds: Sequence[int], size: str, groups: list[str],
                  progress: bool, plan: DemoPlan, configs: Sequence[str] | None,
                  report_only: bool = False, probes: bool = True) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    data = out / "data" if report_only else _prepare_data(out, plan)
    records: list[dict[str, Any]] = []
    stage0_times: list[float] = []
    expanded: dict[str, list[tuple[str, AblationRun]]] = {}
    for seed in seeds:
        root = out / f"seed{seed}"
        t = time.time()
        if report_only:
            tiny = root / "models" / "tiny"
            if not (tiny / "config.json").exists():
                log.warning("ablate: seed %d has no model under %s; nothing to report", seed,
                            tiny)
                continue
            n_layers = _num_layers(tiny)
        else:
            stage0 = _prepare_stage0(root, data, seed, plan, progress)
            stage0_times.append(time.time() - t)
            n_layers = _num_layers(stage0)
        expanded = expand_groups(groups, n_layers, plan.vein_layers)
        if configs:
            expanded = {g: [(lab, r) for lab, r in cfgs if lab in configs or lab == "baseline"]
                        for g, cfgs in expanded.items()}
            expanded = {g: cfgs for g, cfgs in expanded.items() if cfgs}
        # main's baseline is always needed: every Δ is taken against it.
        runs = {AblationRun().key: AblationRun()}
        for cfgs in expanded.values():
            for _, r in cfgs:
                runs.setdefault(r.key, r)
        for i, (key, run) in enumerate(runs.items(), 1):
            rpath = root / "results" / f"{key}.json"
            if rpath.exists():
                rec = json.loads(rpath.read_text())
                log.info("ablate seed %d: %s already evaluated; skipping", seed, key)
            elif report_only:
                log.info("ablate seed %d: %s not finished; left out of the report", seed, key)
                continue
            else:
                log.info("ablate seed %d: run %d/%d %s", seed, i, len(runs), key)
                rec = _train_and_eval(run, root, stage0, data, seed, plan, progress, probes)
                atomic_write_json(rpath, rec)
                log.info("ablate seed %d: %s overall %.1f (IND %.1f, OOD %.1f) in %.0f s", seed,
                         key, rec["results"]["overall"], rec["results"]["IND"],
                         rec["results"]["OOD"], sum(rec["timings_s"].values()))
            records.append(rec)
            if not report_only:
                # Rewrite the report after every run so a long ablation can be read while
                # it runs (without the bootstrap and the plot, which the final one adds).
                _write_report(out, records, expanded, seeds, size, plan, stage0_times, t_start,
                              final=False)
    return _write_report(out, records, expanded, seeds, size, plan, stage0_times, t_start)


def _write_report(out: Path, records: list[dict[str, Any]],
                  expanded: Mapping[str, list[tuple[str, AblationRun]]], seeds: Sequence[int],
                  size: str, plan: DemoPlan, stage0_times: Sequence[float], t_start: float,
                  final: bool = True) -> dict[str, Any]:
    per_run = sorted(sum(r["timings_s"].values()) for r in records)
    s0 = sorted(stage0_times)
    aggregates = aggregate_runs(records)
    report = {
        "size": size, "seeds": list(seeds),
        "plan": {k: v for k, v in dataclasses.asdict(plan).items() if k != "extra"},
        "groups": {g: [(label, r.key) for label, r in cfgs] for g, cfgs in expanded.items()},
        "configs": {r.key: dataclasses.asdict(r) for cfgs in expanded.values() for _, r in cfgs},
        "aggregates": aggregates,
        "paired": paired_differences(records, _comparison_pairs(expanded),
                                     n_boot=2000 if final else 0),
        "mechanism": mechanism_summary(records, expanded),
        "runs": records,
        "time_per_config_s": {"median": per_run[len(per_run) // 2] if per_run else 0.0,
                              "stage0_median": s0[len(s0) // 2] if s0 else 0.0},
        "wall_s": time.time() - t_start,
    }
    report["plot"] = _plot(out / "ablation.png", report, expanded) if final else None
    atomic_write_json(out / "ablation.json", report)
    atomic_write_text(out / "ablation.md", format_ablation(report))
    return report


def mechanism_summary(records: Sequence[Mapping[str, Any]],
                      expanded: Mapping[str, Sequence[tuple[str, AblationRun]]]
                      ) -> dict[str, dict[str, Any]]:
    """Mean over seeds of each config's mechanism checks (``{label: {check: value}}``)."""
    labels: dict[str, str] = {}
    for cfgs in expanded.values():
        for label, r in cfgs:
            labels.setdefault(r.key, label)
    labels.setdefault(AblationRun().key, "baseline")
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
    labels = {AblationRun().key: "baseline"}
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


# --------------------------------------------------------------------------- CLI

def cmd_ablate(args: argparse.Namespace) -> int:
    report = run_ablation(args.out, seeds=args.seeds, size=args.size, groups=args.only,
                          progress=not args.no_progress, threads=args.threads,
                          configs=args.configs, report_only=args.report_only,
                          probes=not args.no_probes)
    log.info("ablation written to %s\n%s", args.out, format_ablation(report))
    return 0


def add_ablate_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``fam ablate`` (returns the sub-parser)."""
    p = subparsers.add_parser(
        "ablate", help="FAM ablations on Scenes over seeds (MAC/VEIN, MAC terms, γ, layers)")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    p.add_argument("--size", choices=SIZES, default="small", help="budget preset")
    p.add_argument("--only", nargs="+", choices=GROUPS, default=None, metavar="GROUP",
                   help=f"run only these groups ({', '.join(GROUPS)}; default: "
                        f"{' '.join(DEFAULT_GROUPS)})")
    p.add_argument("--configs", nargs="+", default=None, metavar="LABEL",
                   help="run only these configs of the groups (e.g. fam gamma=0.5 last); "
                        "the baseline always runs")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: fastest for tiny models on shared CPUs; "
                        "0 = torch's default)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing; rebuild ablation.json/.md from finished runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-probes", action="store_true",
                   help="skip the mechanism checks (FAM probes) on the checkpoints")
    p.set_defaults(func=cmd_ablate)
    return p
