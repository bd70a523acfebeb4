"""GradCache under 2-rank gloo DDP when one rank's loss is not finite.

Before the fix, the rank with the NaN loss skipped the gradient re-runs while its peer ran
them and waited in the last re-run's all-reduce: the run hung (here: gloo's timeout). Now
both ranks skip, both report a non-finite loss, and no gradient is written.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fam.train import gradcache as gc

WORLD = 2


@dataclass
class _Rows:
    x: torch.Tensor  # (n, d)

    def split(self, size: int) -> list["_Rows"]:
        return [_Rows(c) for c in self.x.split(size)]


class _Module(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4).double()

    def forward(self, rows: _Rows, step: int) -> dict[str, torch.Tensor]:
        return {"emb": self.lin(rows.x)}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        module = _Module()
        ddp = DDP(module)

        def loss(emb, batch, step):  # finite on rank 0, NaN on rank 1
            value = (emb ** 2).mean()
            return {"loss": value * float("nan") if rank == 1 else value}

        rows = _Rows(torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator()
                                 .manual_seed(rank)))
        terms = gc.gradcache_step(module, loss, rows, 0, 2, ddp_module=ddp)
        ok = (not torch.isfinite(terms["loss"])) and all(p.grad is None
                                                          for p in module.parameters())
        # A finite step afterwards still works on both ranks (nothing left half-done).
        finite = gc.gradcache_step(module, lambda emb, batch, step: {"loss": (emb ** 2).mean()},
                                   rows, 0, 2, ddp_module=ddp)
        ok = ok and bool(torch.isfinite(finite["loss"])) and all(
            p.grad is not None for p in module.parameters())
        with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
            f.write("ok" if ok else "bad")
        dist.barrier()
        import sys
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # skip gloo teardown at exit (see tests/test_distributed.py)
    finally:
        dist.destroy_process_group()


def test_a_nan_loss_on_one_rank_stops_every_rank_without_hanging(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "pg_init"), str(tmp_path)), nprocs=WORLD, join=True)
    assert [(tmp_path / f"rank{r}").read_text() for r in range(WORLD)] == ["ok", "ok"]
