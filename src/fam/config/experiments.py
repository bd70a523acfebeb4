"""Configs of the experiments (``fam demo``, ``fam ablate``, ``fam projector-compare``).

An experiment config is made of the stage configs it runs, used as *templates*: the
budgets (optim, LoRA, VEIN, …) come from the YAML preset (``configs/experiments/``), the
inputs and run folders are filled in by the experiment (:mod:`fam.experiments`). Every
experiment starts with the same pipeline, Scenes → tiny model → stage 0, whose settings
are the shared base :class:`SceneModelConfig`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from fam.config.checks import Validated, choice, fail, integer, number
from fam.config.scenes import ScenesConfig, ScenesMediaConfig
from fam.config.stages import (BETA_SCHEDULES, PROJECTOR_TYPES, AdaptConfig, AlignConfig,
                               ProjectorConfig, SftConfig, Stage0Config, TowerConfig, VeinConfig)
from fam.config.training import OptimConfig

__all__ = ["TinyModelConfig", "SceneModelConfig", "DemoMediaConfig", "DemoConfig", "CompareConfig", "TINY_SIZES",
           "TINY_FAMILIES", "TINY_LLMS", "SCENES_POOLS", "ABLATION_SIZES", "ABLATION_GROUPS",
           "ABLATION_DEFAULT_GROUPS"]

TINY_SIZES = ("xs", "s", "m")
#: Families a tiny model can be built for offline (fam.backbones.NATIVE_FAMILIES; a test
#: keeps the two equal).
TINY_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next", "idefics3", "smolvlm")
#: Language models a tiny LLaVA can carry (fam.backbones.llava.TINY_TEXT_MODELS; a test
#: keeps the two equal).
TINY_LLMS = ("llama", "qwen2")
#: Scenes pools (fam.data.scenes.sampling.POOL_PREFIX without "train").
SCENES_POOLS = ("eval", "novel", "crowded", "striped")
#: ``fam ablate --size``: the sizes and their presets (fam.experiments.ablation.SIZES).
ABLATION_SIZES: dict[str, str] = {"quick": "ablation_quick", "small": "ablation_small",
                                  "demo": "demo"}
#: Ablation groups in report order (fam.experiments.ablation_report.GROUPS).
ABLATION_GROUPS: tuple[str, ...] = ("main", "multivector", "inversion", "vein_weight",
                                    "mac_terms", "control", "mask_ratio", "vein_layers")
#: Groups run when none is named: the decisive comparison (the γ and layer sweeps are
#: opt-in with ``--only``).
ABLATION_DEFAULT_GROUPS: tuple[str, ...] = ("main", "inversion", "vein_weight", "mac_terms",
                                            "control")


@dataclass
class TinyModelConfig(Validated):
    family: str = "qwen2_vl"  # backbone family of the random-initialised model
    size: str = "s"  # tiny preset: "xs" | "s" (hidden 128, 4 layers) | "m"

    def check(self, prefix: str) -> None:
        choice(prefix + "size", self.size, TINY_SIZES)
        choice(prefix + "family", self.family, TINY_FAMILIES)


@dataclass
class SceneModelConfig(Validated):
    """Scenes → tiny model → stage 0, the start every experiment shares."""

    scenes: ScenesConfig = field(default_factory=ScenesConfig)  # the benchmark (its seed: see the experiment)
    model: TinyModelConfig = field(default_factory=TinyModelConfig)  # the random initialisation
    qa: bool = True  # the Scenes QA pairs join the tokenizer corpus and stage 0
    stage0: Stage0Config = field(default_factory=Stage0Config)  # template: budget of stage 0
    save_every: int = 100  # steps between checkpoints of every stage (0: only at the end)
    threads: int = 1  # torch threads of every stage and evaluation (0: torch's default)

    BOOKKEEPING = frozenset({"save_every", "threads"})  # see Validated.BOOKKEEPING

    def check(self, prefix: str) -> None:
        integer(prefix + "save_every", self.save_every, 0)
        integer(prefix + "threads", self.threads, 0)


@dataclass
class DemoMediaConfig(Validated):
    """The demo's video and document part (docs/mmeb_v2.md): Scenes-Video and Scenes-Docs,
    one more adaptation of the baseline and of FAM (with VEIN) on their training rows with
    image rows replayed, and the MMEB-V2 evaluation (nine groups, image/video/visdoc/overall).

    Off by default: ``fam ablate`` and the sweeps build on the demo's budgets and stay
    image-only (they drop this section); the ``demo`` preset turns it on."""

    enabled: bool = False  # train and evaluate the video and document tasks too
    scenes: ScenesMediaConfig = field(default_factory=ScenesMediaConfig)  # Scenes-Video/Docs sizes (seed: the run's)
    image_replay: int = 64  # image training rows per Scenes dataset mixed into the media stage (a seeded sample)
    # Qwen2-VL pixel floor of every model's load in the demo (0: the model's own). The tiny
    # models' floor is the 112-px image's, which would upscale 56-px frames 4x; the images
    # (112 px, inside the budget) are unchanged by it.
    min_pixels: int = 0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, steps=150))  # the media stage

    def check(self, prefix: str) -> None:
        integer(prefix + "image_replay", self.image_replay, 0)
        integer(prefix + "min_pixels", self.min_pixels, 0)


@dataclass
class DemoConfig(SceneModelConfig):
    """The main job and the ablations: stage 0, the VLM2Vec baseline and FAM from it."""

    align: AlignConfig = field(default_factory=AlignConfig)  # template: FAM stage 1 (MAC)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)  # template: adaptation (baseline and FAM)
    vein: VeinConfig = field(default_factory=lambda: VeinConfig(enabled=True))  # FAM's VEIN
    fam: bool = True  # also train FAM (MAC + VEIN) and compare
    adapt_seed_offset: int = 0  # added to the seed of every adaptation: another batch order with the same initialisation and stage 0 (docs/baseline_stability.md)
    media: DemoMediaConfig = field(default_factory=DemoMediaConfig)  # video and documents (off: image-only)

    def image_only(self) -> "DemoConfig":
        """These budgets without the video and document part (``media`` back to its
        default, off): what ``fam ablate`` and the sweeps run, so their runs, recipe keys
        and recorded settings are those of the image-only demo whatever ``media`` says."""
        return dataclasses.replace(self, media=DemoMediaConfig())

    def check(self, prefix: str) -> None:
        super().check(prefix)
        integer(prefix + "adapt_seed_offset", self.adapt_seed_offset, 0)
        if self.adapt.vein.enabled:
            fail(prefix + "adapt.vein.enabled", True, "the baseline adapts without VEIN; set "
                 f"FAM's VEIN under {prefix}vein")


@dataclass
class CompareConfig(SceneModelConfig):
    """The projector study (``fam projector-compare``): a frozen pretrained tower, one
    stage-0 LLM per language model, fresh projectors (β sweep, projector types, LLMs,
    seeds), the same SFT from each, and FAM from the SFT'd LVLMs (docs/projector_study.md)."""

    model: TinyModelConfig = field(default_factory=lambda: TinyModelConfig(family="llava", size="xs"))
    tower: TowerConfig = field(default_factory=TowerConfig)  # template: the tower pretraining (then frozen everywhere)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)  # template; beta_max/beta_schedule: the patch arm of the cross-architecture check
    sft: SftConfig = field(default_factory=SftConfig)  # template: stage-2 SFT, the same for every projector
    align: AlignConfig = field(default_factory=AlignConfig)  # template: FAM stage 1 (MAC)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)  # template: FAM stage 2
    vein: VeinConfig = field(default_factory=lambda: VeinConfig(enabled=True))  # FAM's VEIN
    sweep_projector: str = "mlp"  # projector type of the β sweep (with the first LLM)
    betas: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.5, 5.0])  # β sweep (first projector type and LLM)
    schedules: list[str] = field(default_factory=lambda: ["ramped", "constant"])  # β schedules of the sweep
    projectors: list[str] = field(default_factory=lambda: ["linear", "mlp", "cabstractor"])  # cross-architecture check
    llms: list[str] = field(default_factory=lambda: ["llama", "qwen2"])  # language models of the tiny LLaVA
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # projector init + data order (paired across arms)
    stage0_sft: bool = True  # stage 0 also trains on the SFT training rows (the "pretrained LLM" knows the formats)
    downstream: bool = True  # SFT from every cross-architecture projector, then VQA/REC
    fam: bool = True  # FAM (MAC + VEIN) from the SFT'd caption-only vs patch-aligned LVLM (sweep projector and LLM)
    eval_pools: list[str] = field(default_factory=lambda: ["eval"])  # Scenes pools of the SFT evaluation rows
    sft_eval_per_task: int = 200  # SFT evaluation rows per task (at most)
    analysis_images: int = 64  # evaluation images analysed per model
    heldout_captions: int = 200  # held-out captions for the caption loss
    caption_images: int = 48  # greedy captions scored per model (caption quality)
    mmeb_rows: int = 0  # FAM evaluation rows per Scenes dataset (0: all written)
    k_max: int = 10  # matching-pursuit steps
    multisemantic_k: int = 5  # atoms per patch of the multi-semantic check (paper: 5)
    workers: int = 2  # processes running independent runs at once (1: in this process)
    bootstrap: int = 2000  # replicates of the hierarchical paired bootstrap

    # Seeds train in their own folders, the analysis is redone on every run: a rerun may
    # change these without invalidating what is on disk.
    # Arms live in folders named by projector, LLM, β, schedule and seed, so other seeds,
    # β values or schedules add runs next to the finished ones; the report and its
    # bootstrap are recomputed on every call. Analysis sizes are NOT bookkeeping here:
    # each run caches its analysed result.
    BOOKKEEPING = SceneModelConfig.BOOKKEEPING | {"seeds", "betas", "schedules", "workers",
                                                  "bootstrap"}

    def check(self, prefix: str) -> None:
        super().check(prefix)
        for name in ("seeds", "betas", "schedules", "projectors", "llms"):
            if not getattr(self, name):
                fail(prefix + name, getattr(self, name), "give at least one value")
            if len(set(getattr(self, name))) != len(getattr(self, name)):
                fail(prefix + name, getattr(self, name), "a value is listed twice")
        for i, s in enumerate(self.seeds):
            integer(f"{prefix}seeds[{i}]", s, 0)
        for i, b in enumerate(self.betas):
            number(f"{prefix}betas[{i}]", b, 0.0)
        for i, v in enumerate(self.schedules):
            choice(f"{prefix}schedules[{i}]", v, BETA_SCHEDULES)
        for i, v in enumerate(self.projectors):
            choice(f"{prefix}projectors[{i}]", v, PROJECTOR_TYPES)
        if self.sweep_projector not in self.projectors:
            fail(prefix + "sweep_projector", self.sweep_projector,
                 f"must be one of {prefix}projectors={self.projectors}")
        for i, v in enumerate(self.llms):
            choice(f"{prefix}llms[{i}]", v, TINY_LLMS)
        for i, v in enumerate(self.eval_pools):
            choice(f"{prefix}eval_pools[{i}]", v, SCENES_POOLS)
        if self.model.family != "llava":
            fail(prefix + "model.family", self.model.family,
                 "the projector study needs a LLaVA (vision tower → projector → LLM)")
        if self.projector.beta_max <= 0:
            fail(prefix + "projector.beta_max", self.projector.beta_max,
                 "the patch arm needs beta_max > 0 (the caption-only arm is beta 0)")
        if self.adapt.vein.enabled:
            fail(prefix + "adapt.vein.enabled", True, "set FAM's VEIN under "
                 f"{prefix}vein (the adaptation template is shared)")
        for name in ("analysis_images", "heldout_captions", "caption_images", "k_max",
                     "multisemantic_k", "workers", "sft_eval_per_task", "bootstrap"):
            integer(prefix + name, getattr(self, name), 1)
        integer(prefix + "mmeb_rows", self.mmeb_rows, 0)
        if self.multisemantic_k > self.k_max:
            fail(prefix + "multisemantic_k", self.multisemantic_k,
                 f"must be <= k_max={self.k_max} (matching-pursuit steps run)")
