"""2-rank gloo DDP == 1 process on the concatenated batch (method.md §1 gathering).

Each rank holds half the batch, the losses gather with ``fam.distributed.gather_with_grad``
and DDP averages the gradients; the loss value and every parameter gradient must equal
those of a single process computing the same loss on the whole batch.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fam import distributed as fdist
from fam.losses.contrastive import info_nce
from fam.losses.mac import mac_loss
from fam.losses.vein import VeinHead, global_mean, vein_mask_positions

WORLD = 2
B = 8  # global batch; B // WORLD per rank


class _TinyEncoder(nn.Module):
    """Token states = a linear map of the inputs; embedding = a head on their mean."""

    def __init__(self, d_in: int = 6, d: int = 8):
        super().__init__()
        self.proj = nn.Linear(d_in, d)
        self.head = nn.Linear(d, d)

    def forward(self, x: torch.Tensor):  # (B, L, d_in) -> ((B, d), (B, L, d))
        tokens = self.proj(x)
        return self.head(torch.tanh(tokens).mean(1)), tokens


def _exit_cleanly() -> None:
    """End a spawned worker that finished its checks, skipping interpreter teardown.

    With torch 2.13 + gloo, tearing down a process group at exit occasionally aborts with
    "terminate called without an active exception" (a joinable thread destroyed), which
    fails the whole spawn although every check passed (seen twice in ~10 CI runs). The
    results are already on disk; exit 0 without running destructors.
    """
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _check_info_nce(rank: int) -> None:
    torch.manual_seed(0)
    model = _TinyEncoder().double()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    xq, xt, xn = (torch.randn(B, 3, 6, generator=g, dtype=torch.float64) for _ in range(3))
    neg_mask = torch.tensor([True, False, True, True, True, True, False, True])  # gaps on both ranks

    # Reference: one process, whole batch, no gathering.
    q, t, n = (ref(x)[0] for x in (xq, xt, xn))
    want = info_nce(q, t, hard_negatives=n, hard_negative_mask=neg_mask, gather=False)
    want["loss"].backward()

    b = B // WORLD
    sl = slice(rank * b, (rank + 1) * b)
    ddp = DDP(model)
    emb, _ = ddp(torch.cat([xq[sl], xt[sl], xn[sl]]))  # one forward: DDP expects one per backward
    q, t, n = emb.split(b)
    got = info_nce(q, t, hard_negatives=n, hard_negative_mask=neg_mask[sl])
    got["loss"].backward()
    torch.testing.assert_close(got["loss"], want["loss"].detach())
    torch.testing.assert_close(got["accuracy"], want["accuracy"])
    for a, w in zip(_grads(model), _grads(ref)):
        # float64 (eps 1.1e-16): DDP's all-reduce only reorders gradient sums
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12)


def _check_mac(rank: int) -> None:
    torch.manual_seed(0)
    img_model, txt_model = _TinyEncoder().double(), _TinyEncoder().double()
    ref_img, ref_txt = copy.deepcopy(img_model), copy.deepcopy(txt_model)
    g = torch.Generator().manual_seed(2)
    x_img = torch.randn(B, 5, 6, generator=g, dtype=torch.float64)
    x_txt = torch.randn(B, 4, 6, generator=g, dtype=torch.float64)
    img_mask = torch.arange(5)[None] < torch.tensor([5, 3, 5, 1, 2, 5, 4, 5])[:, None]
    txt_mask = torch.arange(4)[None] < torch.tensor([4, 1, 2, 4, 3, 4, 1, 2])[:, None]
    kw = dict(temperature=0.05, weights=(1.0, 0.5, 2.0), c2f_reduction="sum")

    e_i, h_i = ref_img(x_img)
    e_t, h_t = ref_txt(x_txt)
    want = mac_loss(e_i, e_t, h_i, h_t, img_mask, txt_mask, gather=False, **kw)
    want["loss"].backward()

    b = B // WORLD
    sl = slice(rank * b, (rank + 1) * b)
    ddp_img, ddp_txt = DDP(img_model), DDP(txt_model)
    e_i, h_i = ddp_img(x_img[sl])
    e_t, h_t = ddp_txt(x_txt[sl])
    # Pools tokens locally; only the (b, d) pooled reps and embeddings are gathered.
    got = mac_loss(e_i, e_t, h_i, h_t, img_mask[sl], txt_mask[sl], **kw)
    got["loss"].backward()
    for key in ("loss", "coarse_loss", "c2f_loss", "fine_loss"):
        torch.testing.assert_close(got[key], want[key].detach())
    for a, w in zip(_grads(img_model) + _grads(txt_model), _grads(ref_img) + _grads(ref_txt)):
        # float64 (eps 1.1e-16): DDP's all-reduce only reorders gradient sums
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12)


class _VeinModel(nn.Module):
    """A tiny encoder whose token states and embedding feed a VEIN head (one module for DDP)."""

    def __init__(self):
        super().__init__()
        self.enc = _TinyEncoder()
        self.head = VeinHead(8, layers=[0], num_layers=1, detach_target=False)

    def forward(self, x, valid, sample, masks):
        emb, tokens = self.enc(x)
        return self.head({0: tokens}, {0: emb}, valid, sample, masks={0: masks})


def _check_vein_global_mean(rank: int) -> None:
    """L_rec over the global batch: ranks with 3 and 1 eligible samples (and images of
    different token counts) give exactly the one-process loss and gradient."""
    torch.manual_seed(0)
    model = _VeinModel().double()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, 6, 6, generator=g, dtype=torch.float64)
    valid = torch.arange(6)[None] < torch.tensor([6, 4, 5, 2, 6, 3, 6, 6])[:, None]
    sample = torch.tensor([True, True, True, False, False, True, False, False])
    masks = vein_mask_positions(valid, 0.3, torch.Generator().manual_seed(4))[0]

    want = ref(x, valid, sample, masks)
    (0.7 * want["sum"] / want["count"]).backward()

    b = B // WORLD
    sl = slice(rank * b, (rank + 1) * b)
    ddp = DDP(model)  # keep a reference: the reducer must outlive the backward
    out = ddp(x[sl], valid[sl], sample[sl], masks[sl])
    term, value, n = global_mean(out["sum"], out["count"], weight=0.7)
    term.backward()
    assert n == want["count"]
    torch.testing.assert_close(value, (want["sum"] / want["count"]).detach())
    for a, w in zip(_grads(model), _grads(ref)):
        # float64 (eps 1.1e-16): DDP's all-reduce only reorders gradient sums
        torch.testing.assert_close(a, w, rtol=1e-10, atol=1e-12)


def _check_unequal_sizes_raise(rank: int) -> None:
    x = torch.randn(3 + rank, 4)
    with pytest.raises(ValueError, match="equal local batch sizes"):
        fdist.gather_with_grad(x)


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        assert fdist.is_dist() and fdist.rank() == rank and fdist.world_size() == WORLD
        _check_info_nce(rank)
        _check_mac(rank)
        _check_vein_global_mean(rank)
        _check_unequal_sizes_raise(rank)
        # Both ranks reach here before either tears down: a rank destroying its gloo group
        # while the peer still completes the last collective can abort the peer.
        dist.barrier()
        _exit_cleanly()
    finally:
        dist.destroy_process_group()


def test_two_rank_ddp_equals_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "pg_init"),), nprocs=WORLD, join=True)


def test_identity_when_not_distributed():
    x = torch.randn(3, 4, requires_grad=True)
    assert not fdist.is_dist() and fdist.rank() == 0 and fdist.world_size() == 1
    assert fdist.gather_with_grad(x) is x and fdist.gather_no_grad(x) is x
