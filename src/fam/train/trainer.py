"""The training loop shared by every stage.

A stage supplies a module holding all its trainable parameters, whose ``forward(batch,
step)`` returns named outputs, the loss over them (``loss(**outputs, batch=, step=)`` →
named terms with ``"loss"``; :mod:`fam.train.gradcache`), a dataset and a collate function.
The loop owns the rest: AdamW with warm-up and decay (:mod:`fam.train.schedule`), gradient
accumulation and clipping, GradCache as a strategy for any such stage, autocast,
tensorboard logging, a progress bar, atomic checkpoints and exact resume
(:mod:`fam.train.checkpoints`), divergence detection, and DDP or FSDP under torchrun
(:mod:`fam.distributed`). One optimizer step:

    chunks = collate(examples of this step)               # grad_accum micro-batches
    for chunk in chunks: terms = train_step(module, loss, chunk, ...)   # forward + backward
    clip gradients; stop on a non-finite loss or gradient; optimizer.step(); log; checkpoint
"""
from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from fam import distributed as dist_utils
from fam.config import OptimConfig, RunConfig
from fam.errors import FamError
from fam.train import checkpoints as ckpt
from fam.train.gradcache import Loss, train_step
from fam.train.schedule import ResumableBatchSampler, lr_lambda
from fam.utils.io import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "CURVE_EVERY"]

#: Steps averaged into one point of ``train_metrics.json``'s ``history`` (the training
#: curve: every logged term, the gradient norm and the learning rate), independent of
#: ``run.log_every`` (which also paces diagnostics that cost extra backward passes).
CURVE_EVERY = 10


class TrainingDiverged(FamError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    steps: int
    final_metrics: dict[str, float]
    seconds: float
    out_dir: Path


class Trainer:
    """Runs one training stage.

    Args:
        module: holds every parameter the stage may train (those with ``requires_grad``);
            ``module(batch, step)`` returns named outputs (the batch is what ``collate``
            returned, moved to the device by ``to_device``).
        dataset: indexable examples.
        collate: list of examples -> batch (e.g. tokenised pairs); runs in DataLoader workers.
        optim: optimisation settings; run: bookkeeping settings.
        name: stage name for logs.
        to_device: moves a collated batch to the device.
        config_dump: the stage's config, stored in each checkpoint's state.json.
        loss: the stage's loss over the module's outputs; ``None`` when the module returns
            the loss terms (``{"loss": ..., **terms}``) itself. A loss with a
            ``log_notes(metrics) -> [sentence]`` method has its warnings logged (once per
            kind; an :class:`InfoNote` as information) and written to
            ``train_metrics.json``'s ``notes``.
        gradcache_chunk: GradCache chunk size in rows (0: plain steps).
    """

    def __init__(self, module: nn.Module, dataset: Sequence[Any],
                 collate: Callable[[list[Any]], Any], optim: OptimConfig, run: RunConfig,
                 name: str, to_device: Callable[[Any, torch.device], Any] | None = None,
                 config_dump: dict[str, Any] | None = None, *, loss: Loss | None = None,
                 gradcache_chunk: int = 0):
        self.module = module
        self.dataset = dataset
        self.collate = collate
        self.loss = loss
        self.gradcache_chunk = gradcache_chunk
        self.optim_cfg = optim
        self.run_cfg = run
        self.name = name
        self.to_device = to_device or (lambda b, d: b.to(d) if hasattr(b, "to") else b)
        self.config_dump = config_dump or {}
        self.out_dir = Path(run.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        optim.validate("optim.")  # configs built in code are checked like loaded ones
        run.validate("run.")
        self.device = dist_utils.resolve_device(run.device)
        if not any(p.requires_grad for p in module.parameters()):
            raise FamError(f"{name}: no trainable parameters")
        self.sharded = False
        self._build_optimizer()
        self.step = 0

    def _build_optimizer(self) -> None:
        optim = self.optim_cfg
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.param_names = [n for n, p in self.module.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=optim.lr, betas=tuple(optim.betas),
                                           weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(optim))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's full state dict (every rank calls it under FSDP; all get it)."""
        return dist_utils.full_state_dict(self.module, self.sharded)

    def unsharded(self, rebuild: Callable[[], nn.Module]) -> nn.Module | None:
        """The trained module with full weights on rank 0 (None on other ranks).

        Without sharding that is the module itself; under FSDP every rank gathers the full
        state (a collective) and rank 0 loads it into a fresh copy from ``rebuild()``.
        """
        if not self.sharded:
            return self.module if dist_utils.rank() == 0 else None
        full = self.full_state_dict()
        if dist_utils.rank() != 0:
            return None
        fresh = rebuild()
        fresh.load_state_dict(full)
        return fresh

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_dirs(self) -> list[Path]:
        return ckpt.list_checkpoints(self.ckpt_root)

    def _last_good(self) -> str:
        """The newest checkpoint, for error messages (every saved one holds finite tensors)."""
        found = self._ckpt_dirs()
        return str(found[-1]) if found else "none"

    def save_checkpoint(self) -> Path | None:
        """Write a resumable checkpoint atomically (rank 0 only); prune old ones.

        All ranks call it; they wait for rank 0's write to finish, so no rank can start
        a resume from (or end the job before) a half-written checkpoint. Non-finite
        parameters are never saved: the run stops with :class:`TrainingDiverged` instead,
        naming the newest (good) checkpoint.
        """
        state, opt_state = dist_utils.full_trainable_state(  # collective under FSDP
            self.module, self.param_names, self.params, self.optimizer, self.sharded)
        bad = ckpt.non_finite(state)  # identical on every rank (replicated or gathered)
        if bad:
            raise TrainingDiverged(
                f"{self.name}: {len(bad)} of {len(state)} trainable tensors are not finite "
                f"after step {self.step} (e.g. {bad[0]}); not saving them. Last good "
                f"checkpoint: {self._last_good()} (lower optim.lr or check the data)")
        if dist_utils.rank() != 0:
            dist_utils.barrier()
            return None
        path = ckpt.write_checkpoint(self.ckpt_root / f"step-{self.step}", self.step, state,
                                     opt_state, self.scheduler.state_dict(),
                                     {"name": self.name, "config": self.config_dump,
                                      "world_size": dist_utils.world_size()})
        keep = max(1, self.run_cfg.keep_checkpoints)
        for old in self._ckpt_dirs()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        dist_utils.barrier()
        return path

    def _expected_shapes(self) -> dict[str, torch.Size]:
        """Full shapes of the trainable tensors (a DTensor's ``shape`` is the global one)."""
        return {n: torch.Size(p.shape) for n, p in zip(self.param_names, self.params)}

    def load_checkpoint(self, path: Path | ckpt.Checkpoint) -> None:
        """Apply a checkpoint (a folder, read and validated first, or a read one)."""
        c = path if isinstance(path, ckpt.Checkpoint) else \
            ckpt.read_checkpoint(Path(path), self._expected_shapes())
        dist_utils.load_full_trainable_state(self.module, self.param_names, self.params,
                                             self.optimizer, c.params, c.optimizer,
                                             self.sharded)
        self.scheduler.load_state_dict(c.scheduler)
        self.step = c.step
        # The restored learning rate is the one the saved run's schedule set for this step;
        # recompute it from this run's schedule, so a run extended to more steps (a new
        # optim.steps) continues on its own schedule instead of the old one's final lr.
        f = lr_lambda(self.optim_cfg)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * f(self.step)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        ckpt.restore_rng(c.rng)
        log.info("%s: resumed from %s (step %d)", self.name, c.path, self.step)

    # ------------------------------------------------------------------ loop
    def _autocast(self):
        prec = self.run_cfg.precision
        if prec == "fp32":
            return contextlib.nullcontext()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[prec]
        return torch.autocast(self.device.type, dtype=dtype)

    def _prepare(self) -> None:
        """Process group, device, FSDP sharding and resume."""
        dist_utils.init_from_env()
        self.module.to(self.device)
        if dist_utils.is_dist() and self.run_cfg.strategy == "fsdp" and not self.sharded:
            n = dist_utils.shard_fsdp(self.module)
            self.sharded = True
            self._build_optimizer()
            log.info("%s: FSDP over %d ranks, %d blocks sharded", self.name,
                     dist_utils.world_size(), n)
        if self.run_cfg.resume:
            # The newest checkpoint that validates; corrupt ones are skipped with a warning.
            found = ckpt.newest_loadable(self.ckpt_root, self._expected_shapes())
            if found is not None:
                self.load_checkpoint(found)

    def _wrapped(self) -> nn.Module:
        """The module the steps run through: DDP's wrapper when replicated, else itself."""
        if dist_utils.is_dist() and not self.sharded:
            return dist_utils.wrap_ddp(self.module, self.device,
                                       self.run_cfg.ddp_find_unused_parameters)
        return self.module

    def _loader(self) -> DataLoader:
        run, opt = self.run_cfg, self.optim_cfg
        sampler = ResumableBatchSampler(len(self.dataset), opt.batch_size, opt.steps, run.seed,
                                        self.step, dist_utils.rank(), dist_utils.world_size())
        return DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self._collate_chunks,
                          num_workers=run.num_workers, persistent_workers=False,
                          # Own generator: creating the iterator must not draw from the
                          # global RNG, or a resumed run's dropout would be shifted.
                          generator=torch.Generator().manual_seed(run.seed))

    def _step(self, chunks: list[Any], wrapped: nn.Module) -> dict[str, float]:
        """One optimizer step over its micro-batches; returns the step's mean terms."""
        ddp = wrapped if wrapped is not self.module else None
        self.optimizer.zero_grad(set_to_none=True)
        terms_sum: dict[str, float] = {}
        for ci, chunk in enumerate(chunks):
            chunk = self.to_device(chunk, self.device)
            last = ci == len(chunks) - 1
            # Plain steps: all but the last micro-batch accumulate without all-reduce
            # (GradCache handles no_sync inside, per chunk re-run).
            ctx = wrapped.no_sync() if (not last and dist_utils.is_dist() and ddp is not None
                                        and not self.gradcache_chunk) \
                else contextlib.nullcontext()
            with ctx, self._autocast():
                terms = train_step(self.module, self.loss, chunk, self.step,
                                   self.gradcache_chunk, ddp, len(chunks), sync=last)
            loss = terms["loss"]
            if not torch.isfinite(loss) and not dist_utils.is_dist():
                # (Under DDP a rank must not leave alone: its NaN reaches every rank's
                # gradients through the all-reduce and stops all of them below.)
                raise TrainingDiverged(
                    f"{self.name}: loss is {loss.item()} at step {self.step}; last good "
                    f"checkpoint: {self._last_good()} (lower optim.lr, check the data for "
                    "NaN, or use fp32)")
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + float(v) / len(chunks)
        gn = self._grad_norm(self.optim_cfg.grad_clip)
        terms_sum["grad_norm"] = gn
        if not math.isfinite(gn) or not math.isfinite(terms_sum["loss"]):
            # Never step on a non-finite gradient: the weights stay those of the last step,
            # and every saved checkpoint holds finite tensors.
            raise TrainingDiverged(
                f"{self.name}: loss {terms_sum['loss']:.4g}, gradient norm {gn:.4g} at step "
                f"{self.step}; the optimizer did not step. Last good checkpoint: "
                f"{self._last_good()} (lower optim.lr, check the data for NaN, or use fp32)")
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return terms_sum

    def train(self) -> TrainResult:
        """Run (or finish) the stage; returns the last logged metrics."""
        run, opt = self.run_cfg, self.optim_cfg
        t0 = time.time()
        self._prepare()
        if self.step >= opt.steps:
            log.info("%s: already complete (%d steps)", self.name, self.step)
            return TrainResult(self.step, {}, 0.0, self.out_dir)
        wrapped = self._wrapped()
        loader = self._loader()
        logger = _MetricLog(self.name, self.out_dir, opt.steps, self.step, run.progress,
                            getattr(self.loss, "log_notes", None))
        self.module.train()
        try:
            for chunks in loader:
                logger.add(self._step(chunks, wrapped))
                logger.curve_point(self.step, self.scheduler.get_last_lr()[0])
                if self.step % run.log_every == 0 or self.step == opt.steps:
                    logger.flush(self.step, self.scheduler.get_last_lr()[0])
                if run.save_every and self.step % run.save_every == 0 and self.step < opt.steps:
                    self.save_checkpoint()
        finally:
            logger.close()
        self.save_checkpoint()
        seconds = time.time() - t0
        if dist_utils.rank() == 0:
            summary = {"stage": self.name, "steps": self.step, "seconds": seconds,
                       "final": logger.last, "curve_every": CURVE_EVERY,
                       "history": logger.history}
            notes = logger.summary_notes()
            if notes:
                summary["notes"] = notes
                for note in notes:
                    _log_note(note, "%s summary: %s", self.name, note)
            atomic_write_json(self.out_dir / "train_metrics.json", summary)
        return TrainResult(self.step, logger.last, seconds, self.out_dir)

    def _grad_norm(self, clip: float) -> float:
        """Global gradient norm (identical on every rank), clipping to ``clip`` when > 0."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        if clip > 0:
            gn = torch.nn.utils.clip_grad_norm_(self.params, clip)
        else:
            gn = torch.nn.utils.get_total_norm(grads)
        if hasattr(gn, "full_tensor"):  # FSDP: the norm is a DTensor
            gn = gn.full_tensor()
        return float(gn)

    def _collate_chunks(self, examples: list[Any]) -> list[Any]:
        """Split one step's examples into ``grad_accum`` micro-batches and collate each."""
        k = max(1, self.optim_cfg.grad_accum)
        size = len(examples) // k
        return [self.collate(examples[i * size:(i + 1) * size]) for i in range(k)]


class InfoNote(str):
    """A ``log_notes`` sentence that is a diagnostic, logged as information (not a warning)."""


def _log_note(note: str, fmt: str, *args: Any) -> None:
    log.log(logging.INFO if isinstance(note, InfoNote) else logging.WARNING, fmt, *args)


class _MetricLog:
    """Averages the step terms between log lines; tensorboard (rank 0), tqdm, log lines."""

    def __init__(self, name: str, out_dir: Path, total: int, start: int, progress: bool,
                 notes: Callable[[dict[str, float]], list[str]] | None = None):
        self.name, self.total = name, total
        self.last: dict[str, float] = {}
        self.agg: dict[str, float] = {}
        self.n: dict[str, int] = {}  # per term: some are only measured at some steps
        # The curve (rank 0's own terms: no collective per point): CURVE_EVERY-step means.
        self.history: list[dict[str, float]] = []
        self.cagg: dict[str, float] = {}
        self.cn: dict[str, int] = {}
        self.notes = notes
        self.said: set[str] = set()
        main = dist_utils.rank() == 0
        self.writer = None
        if main:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:  # tensorboard is an optional extra
                log.warning("tensorboard not installed; logging to the console only")
        self.bar = None
        if progress and main:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=start, desc=name, dynamic_ncols=True)

    def add(self, terms: dict[str, float]) -> None:
        for k, v in terms.items():
            self.agg[k] = self.agg.get(k, 0.0) + v
            self.n[k] = self.n.get(k, 0) + 1
            self.cagg[k] = self.cagg.get(k, 0.0) + v
            self.cn[k] = self.cn.get(k, 0) + 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{terms['loss']:.4f}")

    def curve_point(self, step: int, lr: float) -> None:
        """Close a point of the training curve every :data:`CURVE_EVERY` steps (and at the
        last step): the mean of each term since the previous point, at ``step`` and ``lr``."""
        if (step % CURVE_EVERY and step != self.total) or not self.cn:
            return
        point: dict[str, float] = {"step": step, "lr": lr}
        point.update({k: v / self.cn[k] for k, v in self.cagg.items()})
        self.history.append(point)
        self.cagg, self.cn = {}, {}

    def flush(self, step: int, lr: float) -> None:
        self.last = dist_utils.mean_over_ranks({k: v / self.n[k] for k, v in self.agg.items()})
        self.last["lr"] = lr
        self.agg, self.n = {}, {}
        if self.writer is not None:
            for k, v in self.last.items():
                self.writer.add_scalar(f"{self.name}/{k}", v, step)
        if dist_utils.rank() == 0:
            log.info("%s step %d/%d %s", self.name, step, self.total,
                     " ".join(f"{k}={v:.4g}" for k, v in self.last.items()))
            for note in self.summary_notes():
                kind = note.split(":")[0]  # each kind once here, again in the summary
                if kind not in self.said:
                    self.said.add(kind)
                    _log_note(note, "%s step %d: %s", self.name, step, note)

    def summary_notes(self) -> list[str]:
        """The stage's warnings about the last logged metrics (e.g. VEIN's verdict)."""
        return self.notes(self.last) if self.notes is not None and self.last else []

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
