"""The stage registry: stage name → config class → recipe (the one table of training stages).

The CLI builds ``fam train <stage>`` from it, the experiments and the tests run stages
through :func:`run_stage`. Adding a stage is one recipe module, one config dataclass (in
:mod:`fam.config.stages`) and one line here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fam.config import AdaptConfig, AlignConfig, ProjectorConfig, Stage0Config
from fam.errors import ConfigError

__all__ = ["Stage", "STAGES", "stage_for", "run_stage"]


@dataclass(frozen=True)
class Stage:
    """One training stage.

    Attributes:
        name: ``fam train <name>``.
        config: the stage's config dataclass.
        runner: ``"module:function"`` running the stage (imported on first use, so the
            registry stays cheap to import).
        help: one line for ``fam train --help``.
        flags: extra CLI flags: ``{flag: (help, overrides it adds)}``.
    """

    name: str
    config: type
    runner: str
    help: str
    flags: dict[str, tuple[str, tuple[str, ...]]] | None = None

    def load(self) -> Callable[[Any], Path]:
        module, attr = self.runner.split(":")
        return getattr(importlib.import_module(module), attr)


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("stage0", Stage0Config, "fam.train.stage0:run_stage0",
          "generative pre-training of a tiny LVLM"),
    Stage("align", AlignConfig, "fam.train.align:run_align",
          "FAM stage 1: MAC on image-caption pairs"),
    Stage("adapt", AdaptConfig, "fam.train.adapt:run_adapt",
          "VLM2Vec adaptation (--vein: FAM stage 2)",
          {"--vein": ("add the VEIN loss", ("vein.enabled=true",))}),
    Stage("projector", ProjectorConfig, "fam.projector.recipe:run_projector",
          "patch-aligned projector pre-training (towers frozen)"),
)}


def stage_for(cfg: Any) -> Stage:
    """The registered stage whose config class ``cfg`` is."""
    for stage in STAGES.values():
        if type(cfg) is stage.config:
            return stage
    raise ConfigError(f"no training stage takes a {type(cfg).__name__}; stages: "
                      f"{ {s.name: s.config.__name__ for s in STAGES.values()} }")


def run_stage(cfg: Any) -> Path:
    """Run the stage ``cfg`` configures; returns the exported model folder.

    The config is validated first, inputs included, so a bad value fails before any work.
    """
    stage = stage_for(cfg)
    cfg.validate()
    return stage.load()(cfg)
