"""The learning-rate schedule and the resumable data order of the training loop."""
from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
from torch.utils.data import Sampler

from fam.config import OptimConfig
from fam.errors import FamError

__all__ = ["lr_lambda", "ResumableBatchSampler"]


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
