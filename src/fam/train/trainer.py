"""A small, resumable training loop shared by every stage.

A stage (stage 0, MAC alignment, adaptation, projector training) supplies a module holding
all trainable parameters whose ``forward(batch, step)`` returns named loss terms (one forward
per backward, which is what DDP expects), a dataset and a collate function. The loop owns the rest: AdamW with warm-up and decay, gradient accumulation and
clipping, autocast, tensorboard logging, a progress bar, atomic checkpoints and exact resume
(same data order, optimizer, scheduler and RNG states), NaN detection, and DDP when launched
with torchrun.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from fam import distributed as dist_utils
from fam.config import OptimConfig, RunConfig
from fam.errors import FamError
from fam.train import checkpoints as ckpt
from fam.utils.io import atomic_write_json

log = logging.getLogger(__name__)


class TrainingDiverged(FamError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(spec)


def init_distributed_from_env() -> bool:
    """Initialise the default process group when launched by torchrun (``WORLD_SIZE > 1``).

    Backend: NCCL on CUDA, gloo otherwise. Returns whether a group is (now) initialised.
    A no-op when a group already exists (tests spawn their own) or for a single process.
    """
    import torch.distributed as dist
    if dist_utils.is_dist():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    log.info("distributed: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(),
             dist.get_backend())
    return True


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if dist_utils.is_dist():
        torch.distributed.barrier()


def save_on_main_rank(save: Callable[[], Any]) -> bool:
    """Run ``save()`` on rank 0 only, then wait for all ranks; returns whether it ran here.

    Every rank holds the same weights after DDP training; concurrent writers of one
    directory would race on its atomic rename.
    """
    ran = dist_utils.rank() == 0
    if ran:
        save()
    barrier()
    return ran


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute transformer-layer activations in backward (``run.gradient_checkpointing``).

    Uses transformers' non-reentrant checkpointing, which needs no input gradients (works
    with LoRA on frozen embeddings) and replays the RNG state, so dropout and therefore
    gradients are unchanged. Only active in ``train()`` mode (transformers' rule).

    Args:
        model: an :class:`fam.model.EmbeddingModel` (or anything with ``.adapter``).
    """
    hf = model.adapter.hf_model
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    log.info("gradient checkpointing on (%s)", type(hf).__name__)


def lr_lambda(cfg: OptimConfig) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine/linear decay to 0 (or constant) over ``cfg.steps``."""
    warm = int(round(cfg.warmup_ratio * cfg.steps))

    def f(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.steps - warm)
        prog = min(1.0, (step - warm) / span)
        if cfg.schedule == "linear":
            return 1.0 - prog
        return 0.5 * (1.0 + math.cos(math.pi * prog))
    return f


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields the index batches of steps ``start_step..total_steps-1``.

    The order is a fixed function of (seed, epoch), so a resumed run sees exactly the batches
    the uninterrupted run would have seen. Under DDP each global batch is split into equal
    per-rank slices (rank r takes positions r, r+W, ...), so the global batch is the same for
    any world size. The last incomplete batch of an epoch is dropped (contrastive losses want
    full batches).
    """

    def __init__(self, n: int, batch_size: int, total_steps: int, seed: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1):
        if n < batch_size * world_size:
            raise FamError(f"the dataset has {n} examples, fewer than one global batch "
                           f"({batch_size} × {world_size} processes); lower optim.batch_size")
        self.n, self.bs, self.total, self.seed = n, batch_size, total_steps, seed
        self.start, self.rank, self.world = start_step, rank, world_size
        self.per_epoch = n // (batch_size * world_size)

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        gbs = self.bs * self.world
        epoch_cache: dict[int, np.ndarray] = {}
        for step in range(self.start, self.total):
            epoch, pos = divmod(step, self.per_epoch)
            if epoch not in epoch_cache:
                epoch_cache.clear()
                epoch_cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            glob = epoch_cache[epoch][pos * gbs:(pos + 1) * gbs]
            yield glob[self.rank::self.world].tolist()


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
            ``module(batch, step) -> {"loss": scalar, **named terms}`` where the batch is what
            ``collate`` returned, already moved to the device by ``to_device``.
        dataset: indexable examples.
        collate: list of examples -> batch (e.g. tokenised pairs); runs in DataLoader workers.
        optim: optimisation settings; run: bookkeeping settings.
        name: stage name for logs.
        to_device: moves a collated batch to the device.
        config_dump: the stage's config, stored in each checkpoint's state.json.
    """

    def __init__(self, module: nn.Module, dataset: Sequence[Any],
                 collate: Callable[[list[Any]], Any], optim: OptimConfig, run: RunConfig,
                 name: str, to_device: Callable[[Any, torch.device], Any] | None = None,
                 config_dump: dict[str, Any] | None = None):
        self.module = module
        self.dataset = dataset
        self.collate = collate
        self.optim_cfg = optim
        self.run_cfg = run
        self.name = name
        self.to_device = to_device or (lambda b, d: b.to(d) if hasattr(b, "to") else b)
        self.config_dump = config_dump or {}
        self.out_dir = Path(run.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.device = resolve_device(run.device)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.param_names = [n for n, p in module.named_parameters() if p.requires_grad]
        if not self.params:
            raise FamError(f"{name}: no trainable parameters")
        if run.strategy not in ("ddp", "fsdp"):
            raise FamError(f"run.strategy must be 'ddp' or 'fsdp', got {run.strategy!r}")
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

    def _shard(self) -> None:
        """FSDP2: shard every transformer block, then the root; rebuild the optimizer.

        The language model's decoder layers are found by class name (``*DecoderLayer``, the
        transformer-based auto-wrap policy of accelerate/FSDP); everything else (vision
        tower, embeddings, VEIN decoders) stays in the root unit. Each sharded block
        all-gathers in its forward, so every rank must run the same forwards: the vision
        tower runs only for batches with images, which is why it is not sharded on its own.
        Gradients are averaged over ranks like DDP's, so the gather-with-gradient scaling of
        :mod:`fam.distributed` holds.
        """
        from torch.distributed.fsdp import fully_shard
        blocks = [m for m in self.module.modules()
                  if type(m).__name__.endswith("DecoderLayer")
                  and any(True for _ in m.parameters())]
        for m in blocks:
            fully_shard(m)
        fully_shard(self.module)
        self.sharded = True
        self._build_optimizer()
        log.info("%s: FSDP over %d ranks, %d blocks sharded", self.name,
                 dist_utils.world_size(), len(blocks))

    def _full_states(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Full (unsharded) trainable tensors and optimizer state; collective under FSDP."""
        if not self.sharded:
            return ({n: p.detach().cpu().contiguous() for n, p in
                     zip(self.param_names, self.params)}, self.optimizer.state_dict())
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)
        params = {n: p.detach().full_tensor().cpu().contiguous() for n, p in
                  zip(self.param_names, self.params)}
        osd = get_optimizer_state_dict(self.module, self.optimizer,
                                       options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))
        return params, osd

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The module's full state dict (every rank calls it under FSDP; all get it)."""
        if not self.sharded:
            return self.module.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True))

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
        state, opt_state = self._full_states()  # collective under FSDP: every rank calls it
        bad = ckpt.non_finite(state)  # identical on every rank (replicated or gathered)
        if bad:
            raise TrainingDiverged(
                f"{self.name}: {len(bad)} of {len(state)} trainable tensors are not finite "
                f"after step {self.step} (e.g. {bad[0]}); not saving them. Last good "
                f"checkpoint: {self._last_good()} (lower optim.lr or check the data)")
        if dist_utils.rank() != 0:
            barrier()
            return None
        path = ckpt.write_checkpoint(self.ckpt_root / f"step-{self.step}", self.step, state,
                                     opt_state, self.scheduler.state_dict(),
                                     {"name": self.name, "config": self.config_dump})
        keep = max(1, self.run_cfg.keep_checkpoints)
        for old in self._ckpt_dirs()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        barrier()
        return path

    def _expected_shapes(self) -> dict[str, torch.Size]:
        """Full shapes of the trainable tensors (a DTensor's ``shape`` is the global one)."""
        return {n: torch.Size(p.shape) for n, p in zip(self.param_names, self.params)}

    def load_checkpoint(self, path: Path | ckpt.Checkpoint) -> None:
        """Apply a checkpoint (a folder, read and validated first, or a read one)."""
        c = path if isinstance(path, ckpt.Checkpoint) else \
            ckpt.read_checkpoint(Path(path), self._expected_shapes())
        state = c.params
        if self.sharded:
            from torch.distributed.tensor import distribute_tensor
            from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                                 set_optimizer_state_dict)
            with torch.no_grad():
                for n, p in zip(self.param_names, self.params):
                    p.copy_(distribute_tensor(state[n].to(p.device, p.dtype), p.device_mesh,
                                              p.placements))
            set_optimizer_state_dict(self.module, self.optimizer, c.optimizer,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            with torch.no_grad():
                for n, p in zip(self.param_names, self.params):
                    p.copy_(state[n].to(p.device, p.dtype))
            self.optimizer.load_state_dict(c.optimizer)
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
        import contextlib
        prec = self.run_cfg.precision
        if prec == "fp32":
            return contextlib.nullcontext()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[prec]
        return torch.autocast(self.device.type, dtype=dtype)

    def train(self) -> TrainResult:
        """Run (or finish) the stage; returns the last logged metrics."""
        run, opt = self.run_cfg, self.optim_cfg
        t0 = time.time()
        init_distributed_from_env()
        self.module.to(self.device)
        if dist_utils.is_dist() and run.strategy == "fsdp" and not self.sharded:
            self._shard()
        if run.resume:
            # The newest checkpoint that validates; corrupt ones are skipped with a warning.
            found = ckpt.newest_loadable(self.ckpt_root, self._expected_shapes())
            if found is not None:
                self.load_checkpoint(found)
        if self.step >= opt.steps:
            log.info("%s: already complete (%d steps)", self.name, self.step)
            return TrainResult(self.step, {}, 0.0, self.out_dir)
        writer = None
        if dist_utils.rank() == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
                writer = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:  # tensorboard is an optional extra
                log.warning("tensorboard not installed; logging to the console only")
        ddp_module = self.module
        if dist_utils.is_dist() and not self.sharded:
            ddp_module = torch.nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=run.ddp_find_unused_parameters)
        micro = opt.batch_size // max(1, opt.grad_accum)
        if micro * opt.grad_accum != opt.batch_size:
            raise FamError(f"optim.batch_size {opt.batch_size} is not divisible by "
                           f"optim.grad_accum {opt.grad_accum}")
        sampler = ResumableBatchSampler(len(self.dataset), opt.batch_size, opt.steps, run.seed,
                                        self.step, dist_utils.rank(), dist_utils.world_size())
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self._collate_chunks,
                            num_workers=run.num_workers, persistent_workers=False,
                            # Own generator: creating the iterator must not draw from the
                            # global RNG, or a resumed run's dropout would be shifted.
                            generator=torch.Generator().manual_seed(run.seed))
        self.module.train()
        step_fn = getattr(self.module, "train_step", None)
        bar = None
        if run.progress and dist_utils.rank() == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=opt.steps, initial=self.step, desc=self.name, dynamic_ncols=True)
        last: dict[str, float] = {}
        agg: dict[str, float] = {}
        n_agg: dict[str, int] = {}  # per key: some terms are only measured at some steps
        notes_seen: list[str] = []
        notes = getattr(self.module, "log_notes", None)
        try:
            for chunks in loader:
                self.optimizer.zero_grad(set_to_none=True)
                terms_sum: dict[str, float] = {}
                for ci, chunk in enumerate(chunks):
                    chunk = self.to_device(chunk, self.device)
                    sync = ci == len(chunks) - 1 or not dist_utils.is_dist()
                    ctx = ddp_module.no_sync() if (not sync and hasattr(ddp_module, "no_sync")) \
                        else _null()
                    with ctx, self._autocast():
                        if step_fn is not None:
                            # The module does its own backward (GradCache: several
                            # forwards per step, all but the last under no_sync).
                            terms = step_fn(chunk, self.step, ddp_module if ddp_module is not
                                            self.module else None, 1.0 / len(chunks), sync)
                        else:
                            terms = ddp_module(chunk, self.step)
                        loss = terms["loss"]
                        if not torch.isfinite(loss) and not dist_utils.is_dist():
                            # (Under DDP a rank must not leave alone: its NaN reaches every
                            # rank's gradients through the all-reduce and stops all below.)
                            raise TrainingDiverged(
                                f"{self.name}: loss is {loss.item()} at step {self.step}; "
                                f"last good checkpoint: {self._last_good()} "
                                "(lower optim.lr, check the data for NaN, or use fp32)")
                        if step_fn is None:
                            (loss / len(chunks)).backward()
                    for k, v in terms.items():
                        terms_sum[k] = terms_sum.get(k, 0.0) + float(v.detach()) / len(chunks)
                gn = self._grad_norm(opt.grad_clip)
                terms_sum["grad_norm"] = gn
                if not math.isfinite(gn) or not math.isfinite(terms_sum["loss"]):
                    # Never step on a non-finite gradient: the weights stay those of the
                    # last step, and every saved checkpoint holds finite tensors.
                    raise TrainingDiverged(
                        f"{self.name}: loss {terms_sum['loss']:.4g}, gradient norm {gn:.4g} "
                        f"at step {self.step}; the optimizer did not step. Last good "
                        f"checkpoint: {self._last_good()} (lower optim.lr, check the data "
                        "for NaN, or use fp32)")
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                for k, v in terms_sum.items():
                    agg[k] = agg.get(k, 0.0) + v
                    n_agg[k] = n_agg.get(k, 0) + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{terms_sum['loss']:.4f}")
                if self.step % run.log_every == 0 or self.step == opt.steps:
                    last = _mean_over_ranks({k: v / n_agg[k] for k, v in agg.items()})
                    last["lr"] = self.scheduler.get_last_lr()[0]
                    agg, n_agg = {}, {}
                    if writer is not None:
                        for k, v in last.items():
                            writer.add_scalar(f"{self.name}/{k}", v, self.step)
                    if dist_utils.rank() == 0:
                        log.info("%s step %d/%d %s", self.name, self.step, opt.steps,
                                 " ".join(f"{k}={v:.4g}" for k, v in last.items()))
                        for note in (notes(last) if notes is not None else []):
                            kind = note.split(":")[0]  # say each kind once (and in the summary)
                            if kind not in notes_seen:
                                notes_seen.append(kind)
                                log.warning("%s step %d: %s", self.name, self.step, note)
                if run.save_every and self.step % run.save_every == 0 and self.step < opt.steps:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        self.save_checkpoint()
        seconds = time.time() - t0
        if dist_utils.rank() == 0:
            summary = {"stage": self.name, "steps": self.step, "seconds": seconds, "final": last}
            final_notes = notes(last) if notes is not None and last else []
            if final_notes:
                summary["notes"] = final_notes
                for note in final_notes:
                    log.warning("%s summary: %s", self.name, note)
            atomic_write_json(self.out_dir / "train_metrics.json", summary)
        return TrainResult(self.step, last, seconds, self.out_dir)

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


def _mean_over_ranks(terms: dict[str, float]) -> dict[str, float]:
    """Average logged terms over ranks (local terms such as VEIN's differ per rank)."""
    if not dist_utils.is_dist() or not terms:
        return terms
    keys = sorted(terms)
    vec = torch.tensor([terms[k] for k in keys], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        vec = vec.cuda()
    torch.distributed.all_reduce(vec)
    return {k: float(v) / dist_utils.world_size() for k, v in zip(keys, vec.tolist())}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
