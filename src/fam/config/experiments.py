"""Configs of the experiments (``fam demo``, ``fam ablate``, ``fam projector-compare``).

An experiment config is made of the stage configs it runs, used as *templates*: the
budgets (optim, LoRA, VEIN, …) come from the YAML preset (``configs/experiments/``), the
inputs and run folders are filled in by the experiment (:mod:`fam.experiments`). Every
experiment starts with the same pipeline, Scenes → tiny model → stage 0, whose settings
are the shared base :class:`SceneModelConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fam.config.checks import Validated, choice, fail, integer
from fam.config.scenes import ScenesConfig
from fam.config.stages import AdaptConfig, AlignConfig, ProjectorConfig, Stage0Config, VeinConfig

__all__ = ["TinyModelConfig", "SceneModelConfig", "DemoConfig", "CompareConfig", "TINY_SIZES",
           "TINY_FAMILIES"]

TINY_SIZES = ("xs", "s", "m")
#: Families a tiny model can be built for offline (fam.backbones.NATIVE_FAMILIES; a test
#: keeps the two equal).
TINY_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next", "idefics3", "smolvlm")


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

    def check(self, prefix: str) -> None:
        integer(prefix + "save_every", self.save_every, 0)
        integer(prefix + "threads", self.threads, 0)


@dataclass
class DemoConfig(SceneModelConfig):
    """The main job and the ablations: stage 0, the VLM2Vec baseline and FAM from it."""

    align: AlignConfig = field(default_factory=AlignConfig)  # template: FAM stage 1 (MAC)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)  # template: adaptation (baseline and FAM)
    vein: VeinConfig = field(default_factory=lambda: VeinConfig(enabled=True))  # FAM's VEIN
    fam: bool = True  # also train FAM (MAC + VEIN) and compare

    def check(self, prefix: str) -> None:
        super().check(prefix)
        if self.adapt.vein.enabled:
            fail(prefix + "adapt.vein.enabled", True, "the baseline adapts without VEIN; set "
                 f"FAM's VEIN under {prefix}vein")


@dataclass
class CompareConfig(SceneModelConfig):
    """Caption-only vs patch-aligned projectors from one stage-0 tiny LLaVA."""

    projector: ProjectorConfig = field(default_factory=ProjectorConfig)  # template; its beta_max: the patch arm
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # projector init + data order
    analysis_images: int = 64  # evaluation images analysed per model
    heldout_captions: int = 200  # held-out captions for the caption loss
    k_max: int = 10  # matching-pursuit steps

    def check(self, prefix: str) -> None:
        super().check(prefix)
        if not self.seeds:
            fail(prefix + "seeds", self.seeds, "give at least one seed")
        for i, s in enumerate(self.seeds):
            integer(f"{prefix}seeds[{i}]", s, 0)
        for name in ("analysis_images", "heldout_captions", "k_max"):
            integer(prefix + name, getattr(self, name), 1)
