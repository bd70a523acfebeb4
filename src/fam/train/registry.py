"""The stage registry: stage name → config class → recipe (the one table of training stages).

The CLI builds ``fam train <stage>`` from it; :func:`fam.train.runner.run_stage` finds a
config's stage here. Adding a stage is one recipe module (a
:class:`fam.train.runner.Recipe`), one config dataclass (in :mod:`fam.config.stages`) and
one line here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from fam.config import (AdaptConfig, AlignConfig, ProjectorConfig, SftConfig, Stage0Config,
                        TowerConfig)
from fam.errors import ConfigError

__all__ = ["Stage", "STAGES", "stage_for"]


@dataclass(frozen=True)
class Stage:
    """One training stage.

    Attributes:
        name: ``fam train <name>``.
        config: the stage's config dataclass.
        recipe_path: ``"module:Class"`` of the stage's recipe (imported on first use, so the
            registry stays cheap to import).
        help: one line for ``fam train --help``.
        flags: extra CLI flags: ``{flag: (help, overrides it adds)}``.
    """

    name: str
    config: type
    recipe_path: str
    help: str
    flags: dict[str, tuple[str, tuple[str, ...]]] | None = None

    def recipe(self) -> type:
        """The stage's :class:`fam.train.runner.Recipe` subclass."""
        module, attr = self.recipe_path.split(":")
        return getattr(importlib.import_module(module), attr)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("stage0", Stage0Config, "fam.train.stage0:Stage0Recipe",
          "generative pre-training of a tiny LVLM"),
    Stage("align", AlignConfig, "fam.train.align:AlignRecipe",
          "FAM stage 1: MAC on image-caption pairs"),
    Stage("adapt", AdaptConfig, "fam.train.adapt:AdaptRecipe",
          "VLM2Vec adaptation (--vein: FAM stage 2)",
          {"--vein": ("add the VEIN loss", ("vein.enabled=true",))}),
    Stage("projector", ProjectorConfig, "fam.projector.recipe:ProjectorRecipe",
          "patch-aligned projector pre-training (towers frozen)"),
    Stage("tower", TowerConfig, "fam.projector.tower:TowerRecipe",
          "contrastive (CLIP/SigLIP) pretraining of a LLaVA's vision tower"),
    Stage("sft", SftConfig, "fam.projector.sft:SftRecipe",
          "LLaVA stage 2: projector + LLM LoRA on instruction data (tower frozen)"),
)}


def stage_for(cfg: Any) -> Stage:
    """The registered stage whose config class ``cfg`` is."""
    for stage in STAGES.values():
        if type(cfg) is stage.config:
            return stage
    raise ConfigError(f"no training stage takes a {type(cfg).__name__}; stages: "
                      f"{ {s.name: s.config.__name__ for s in STAGES.values()} }")
