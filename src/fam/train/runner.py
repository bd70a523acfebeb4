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
from fam.train import rerun
from fam.train.gradcache import Loss
from fam.train.registry import stage_for
from fam.train.trainer import Trainer, TrainResult
from fam.utils.threads import use_threads

log = logging.getLogger(__name__)

__all__ = ["Recipe", "StageParts", "run_stage"]


@dataclass
class StageParts:
    """What a stage trains: the trainer's inputs (see :class:`fam.train.trainer.Trainer`).

    Examples that reference images expose ``image_refs()`` (the images with the data file,
    line and field that name them), so :func:`run_stage` checks them all before training.
    """

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


def _input_rules(module: nn.Module) -> Any:
    """The input rules of the backbone inside ``module`` (the contract's defaults without one)."""
    from fam.backbones.base import BackboneAdapter
    from fam.data.items import InputRules
    adapter = next((m for m in module.modules() if isinstance(m, BackboneAdapter)), None)
    return adapter.input_rules if adapter is not None else InputRules()


def run_stage(cfg: Any) -> Path:
    """Run the stage ``cfg`` configures; returns the exported model folder.

    Validates the config (inputs included) and the output folder before any work; compares
    the config with the run recorded in ``run.out_dir`` (:mod:`fam.train.rerun`): the same
    finished run is skipped, the same unfinished one resumes, other settings are refused
    unless ``run.on_change`` says to extend (``optim.steps`` raised) or restart. Then sets
    the threads and the seed, builds the recipe's parts, checks every image the data
    references (``run.check_images``), trains (resuming from the newest complete
    checkpoint) and exports on rank 0 from full weights, with the resolved config beside
    the model (``fam_config.json``), while the other ranks wait.
    """
    from fam.data.images import check_images
    from fam.data.items import check_mm_item
    from fam.utils.io import output_dir

    stage = stage_for(cfg)
    cfg.validate()
    out = output_dir(cfg.run.out_dir, "run.out_dir")
    final = out / "model"
    dist_utils.init_from_env()  # every rank decides alike; a restart clears on rank 0 only
    action = rerun.decide(cfg, stage.name)
    dist_utils.barrier()  # every rank has read the folder before rank 0 changes it
    if action == "skip":
        log.info("%s: %s already holds the model of this run; skipping (--extend with a "
                 "higher optim.steps trains it further)", stage.name, final)
        return final
    if action == "restart":
        dist_utils.run_on_main_rank(lambda: rerun.clear_outputs(out))
    use_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    recipe = stage.recipe()(cfg)
    parts = recipe.build()
    # Every item and image the data references, through the input contract with the
    # backbone's rules, before the first step (a bad one would otherwise stop the run when
    # its batch comes up, possibly hours in).
    rules = _input_rules(parts.module)
    for ex in parts.dataset:
        for it in getattr(ex, "items", list)():
            check_mm_item(it, rules)
    n = check_images((r for ex in parts.dataset for r in getattr(ex, "image_refs", list)()),
                     cfg.run.check_images, progress=cfg.run.progress and dist_utils.rank() == 0,
                     desc=f"{recipe.name}: check images", rules=rules.images)
    log.info("%s: %d images checked (%s)", recipe.name, n, cfg.run.check_images)
    trainer = Trainer(parts.module, parts.dataset, parts.collate, cfg.optim, cfg.run,
                      recipe.name, to_device=parts.to_device,
                      config_dump=rerun.resolved_config(cfg), loss=parts.loss,
                      gradcache_chunk=parts.gradcache_chunk)
    result = trainer.train()
    module = trainer.unsharded(recipe.module)  # collective under FSDP
    if module is not None:
        recipe.export(module, final, result)
        rerun.write_model_record(final, stage.name, recipe.name, cfg, result.steps)
        log.info("%s: saved the model to %s", recipe.name, final)
    dist_utils.barrier()
    return final
