"""The stage contract: a recipe per stage, and the one function that runs any of them.

A stage is a :class:`Recipe` built from its config: it builds the module, the loss over
the module's named outputs, the data and the collate function (:class:`StageParts`), and
exports the trained result. :func:`run_stage` owns everything around that for every
stage: validation, skip-if-done, threads and seed, the training loop (resume included,
:class:`fam.train.trainer.Trainer`), and the export — on rank 0 only, from unsharded
weights — so a stage module holds no start-up or export boilerplate.

Adding a stage: a recipe module (a :class:`Recipe` subclass), a config dataclass in
:mod:`fam.config.stages`, and one line in :data:`fam.train.registry.STAGES`.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from fam import distributed as dist_utils
from fam.config import to_dict
from fam.train.gradcache import Loss
from fam.train.registry import stage_for
from fam.train.trainer import Trainer, TrainResult
from fam.utils.threads import use_threads

log = logging.getLogger(__name__)

__all__ = ["Recipe", "StageParts", "run_stage"]


@dataclass
class StageParts:
    """What a stage trains: the trainer's inputs (see :class:`fam.train.trainer.Trainer`)."""

    module: nn.Module  # every trainable parameter; forward(batch, step) -> named outputs
    loss: Loss | None  # loss(**outputs, batch=, step=) -> {"loss", **terms}
    dataset: Sequence[Any]
    collate: Callable[[list[Any]], Any]
    to_device: Callable[[Any, torch.device], Any] | None = None
    gradcache_chunk: int = 0  # GradCache chunk (the batch must have .split(size))


class Recipe(ABC):
    """One training stage, built from its config (``self.cfg``)."""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @property
    @abstractmethod
    def name(self) -> str:
        """Name in logs, tensorboard and ``train_metrics.json``."""

    @abstractmethod
    def build(self) -> StageParts:
        """Module, loss, data and collate of the stage (the module via :meth:`module`)."""

    @abstractmethod
    def module(self) -> nn.Module:
        """A fresh module (loads the checkpoint, chooses what trains). Also used for the
        unsharded export after FSDP training."""

    @abstractmethod
    def export(self, module: nn.Module, final: Path, result: TrainResult) -> None:
        """Write the trained result to ``final`` (called on rank 0, full weights)."""


def run_stage(cfg: Any) -> Path:
    """Run the stage ``cfg`` configures; returns the exported model folder.

    Validates the config (inputs included) before any work; skips the stage when
    ``<run.out_dir>/model`` already holds a model and ``run.resume`` is set; otherwise sets
    the threads and the seed, builds the recipe's parts, trains (resuming from the newest
    complete checkpoint) and exports on rank 0 from full weights while the other ranks wait.
    """
    stage = stage_for(cfg)
    cfg.validate()
    final = Path(cfg.run.out_dir) / "model"
    if (final / "config.json").exists() and cfg.run.resume:
        log.info("%s: %s already holds a trained model; skipping", stage.name, final)
        return final
    use_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    recipe = stage.recipe()(cfg)
    parts = recipe.build()
    trainer = Trainer(parts.module, parts.dataset, parts.collate, cfg.optim, cfg.run,
                      recipe.name, to_device=parts.to_device, config_dump=to_dict(cfg),
                      loss=parts.loss, gradcache_chunk=parts.gradcache_chunk)
    result = trainer.train()
    module = trainer.unsharded(recipe.module)  # collective under FSDP
    if module is not None:
        recipe.export(module, final, result)
        log.info("%s: saved the model to %s", recipe.name, final)
    dist_utils.barrier()
    return final
