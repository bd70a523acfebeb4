"""2-process gloo DDP run of the real Trainer == 1 process on the global batch.

ContrastiveModule on a tiny xs Qwen2-VL with LoRA and hard negatives: each rank gets half of
each global batch from ResumableBatchSampler (rows r, r+2, ...), embeddings are gathered
with gradient (fam.distributed) and DDP averages the gradients, so after 2 optimizer steps
the LoRA weights must equal those of one process with the whole batch. The same holds with
GradCache on (chunk re-runs under ``no_sync``, one all-reduce per step).

The runs are in float64, where the maths is exact up to summation order: in float32 the first
Adam steps normalise tiny gradients (LoRA A has zero gradient at step 1), which amplified
summation-order noise to 1e-5 of a tensor's scale on one CPU type and failed the suite there.
In float64 the same noise measured 2.5e-14 of the scale, so a 1e-9 relative bound is both tight
and machine-independent.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_gradcache import make_module, make_pairs  # same directory (pytest rootdir import)

from fam.config import OptimConfig, RunConfig
from fam.train.adapt import PairCollator
from fam.train.schedule import ResumableBatchSampler
from fam.train.trainer import Trainer

WORLD = 2
GLOBAL_BATCH = 8
STEPS = 2
DTYPE = torch.float64
RTOL = 1e-9  # of each tensor's max |value|; measured float64 noise: 2.5e-14 of it


def _differing(got: dict, ref: dict) -> dict[str, tuple[float, float]]:
    """Tensors whose max difference exceeds RTOL of their scale: name -> (diff, scale)."""
    out = {}
    for n in ref:
        diff, scale = float((got[n] - ref[n]).abs().max()), float(ref[n].abs().max())
        if diff > RTOL * max(scale, 1e-12):
            out[n] = (diff, scale)
    return out


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def position_masks(valid, gamma, generator=None):
    """VEIN's masking rule with positions that depend on the token index only, so that a
    row's mask is the same whichever batch (rank, chunk) it is in."""
    b, n = valid.shape
    n_valid = valid.sum(1)
    k = torch.minimum((n_valid.double() * gamma + 1e-9).floor().long().clamp(min=1), n_valid - 1)
    noise = ((torch.arange(n) * 7 % n).double() / n)[None].expand(b, n)
    order = noise.masked_fill(~valid, 2.0).argsort(dim=1, stable=True)
    idx = order[:, :int(k.max())]
    slot = torch.arange(idx.shape[1])[None] < k[:, None]
    masked = torch.zeros(b, n, dtype=torch.bool).scatter_(1, idx, slot)
    return masked, idx, k


def _train(out, pairs, batch_size: int, chunk: int, strategy: str = "ddp",
           steps: int = STEPS, vein: bool = False) -> dict[str, torch.Tensor]:
    module, loss = make_module("task", dtype=DTYPE, vein=vein)
    if vein:
        # VEIN with its diagnostic: the shuffled-e pass every step and, every step here,
        # the gradient norms (extra autograd.grad calls before DDP's backward).
        module.vein_diagnose = True
        loss.grad_norm_every = 1
    opt = OptimConfig(lr=5e-3, batch_size=batch_size, steps=steps, warmup_ratio=0.0)
    # save_every=1: checkpoint writes (rank 0 only, with barriers) happen mid-run too.
    run = RunConfig(out_dir=str(out), save_every=1, progress=False, log_every=1, device="cpu",
                    strategy=strategy)
    # hard_negatives=True, as run_adapt sets it from AdaptConfig.hard_negatives
    trainer = Trainer(module, pairs, PairCollator(module.embedder.adapter, True), opt, run,
                      strategy, loss=loss, gradcache_chunk=chunk)
    trainer.train()
    full = trainer.full_state_dict()  # collective under FSDP: full tensors on every rank
    return {n: full[n].detach().clone() for n, p in module.named_parameters()
            if p.requires_grad}


def _worker(rank: int, port: int, out: str, pairs, chunks) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for chunk in chunks:
            params = _train(os.path.join(out, f"ddp-c{chunk}"), pairs, GLOBAL_BATCH // WORLD, chunk)
            if rank == 0:
                torch.save(params, os.path.join(out, f"ddp-c{chunk}.pt"))
        dist.barrier()  # no rank tears the group down while the other still communicates
        _exit_cleanly()
    finally:
        dist.destroy_process_group()


def _vein_worker(rank: int, port: int, out: str, pairs, runs) -> None:
    import fam.losses.vein as vein_mod
    vein_mod.vein_mask_positions = position_masks
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for strategy, chunk in runs:
            name = f"vein-{strategy}-c{chunk}"
            params = _train(os.path.join(out, name), pairs, GLOBAL_BATCH // WORLD, chunk,
                            strategy, vein=True)
            if rank == 0:
                torch.save(params, os.path.join(out, f"{name}.pt"))
        dist.barrier()
        _exit_cleanly()
    finally:
        dist.destroy_process_group()


def _resume_worker(rank: int, port: int, out: str, pairs, strategy: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        # 1 step, then the run is extended to 2 and resumes from its (full-state) checkpoint
        _train(os.path.join(out, strategy), pairs, GLOBAL_BATCH // WORLD, 0, strategy, steps=1)
        params = _train(os.path.join(out, strategy), pairs, GLOBAL_BATCH // WORLD, 0, strategy)
        if rank == 0:
            torch.save(params, os.path.join(out, f"{strategy}.pt"))
        dist.barrier()  # no rank tears the group down while the other still communicates
        _exit_cleanly()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_rank_resumed_run_equals_one_process(strategy, scene_images, tmp_path):
    """DDP and FSDP2 (fully_shard per decoder layer) on 2 gloo ranks, stopped after step 1
    and resumed from the checkpoint, give the single-process parameters after 2 steps."""
    torch.set_num_threads(1)
    pairs = make_pairs(scene_images, 16)
    mp.spawn(_resume_worker, args=(_free_port(), str(tmp_path), pairs, strategy), nprocs=WORLD,
             join=True)
    ref = _train(tmp_path / "single", pairs, GLOBAL_BATCH, 0)
    got = torch.load(tmp_path / f"{strategy}.pt", weights_only=True)
    assert got.keys() == ref.keys()
    bad = _differing(got, ref)
    assert not bad, f"{len(bad)} of {len(ref)} tensors differ: {bad}"


@pytest.mark.slow
def test_two_rank_trainer_equals_one_process(scene_images, tmp_path):
    torch.set_num_threads(1)
    pairs = make_pairs(scene_images, 16)
    chunks = (0, 2)
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), pairs, chunks), nprocs=WORLD, join=True)
    ref = _train(tmp_path / "single", pairs, GLOBAL_BATCH, 0)
    init = {n: p for n, p in make_module("task", dtype=DTYPE)[0].named_parameters()
            if p.requires_grad}
    assert any(not torch.allclose(init[n], ref[n]) for n in ref)  # the weights moved
    for chunk in chunks:
        got = torch.load(tmp_path / f"ddp-c{chunk}.pt", weights_only=True)
        assert got.keys() == ref.keys()
        bad = _differing(got, ref)
        assert not bad, f"chunk {chunk}: {len(bad)} of {len(ref)} tensors differ: {bad}"
    # rank 0 alone wrote the checkpoints; the final one is complete
    assert (tmp_path / "ddp-c0" / "checkpoints" / f"step-{STEPS}" / "state.json").exists()


def mixed_negative_pairs(images, n: int = 16) -> list:
    """Pairs whose hard negatives sit on one rank only in each step (2 ranks, seed 0).

    Step 0: rank 0's rows have negatives, rank 1's none; step 1: the reverse. This is what a
    real MMEB mix does at random (only some subsets carry ``neg_*``), and what crashed the
    gather ("ranks passed tensors of different shapes") before.
    """
    pairs = make_pairs(images, n, neg_every=1)  # every row has a negative ...
    split = [list(ResumableBatchSampler(n, GLOBAL_BATCH // WORLD, STEPS, 0, rank=r,
                                        world_size=WORLD)) for r in range(WORLD)]
    keep = set(split[0][0]) | set(split[1][1])  # ... until stripped from the other rank's rows
    return [p if i in keep else dataclasses.replace(p, neg=None) for i, p in enumerate(pairs)]


def _mixed_worker(rank: int, port: int, out: str, pairs, strategy: str, chunk: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        params = _train(os.path.join(out, strategy), pairs, GLOBAL_BATCH // WORLD, chunk,
                        strategy)
        if rank == 0:
            torch.save(params, os.path.join(out, f"{strategy}.pt"))
        dist.barrier()
        _exit_cleanly()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("strategy,chunk", [("ddp", 0), ("ddp", 2), ("fsdp", 0)])
def test_ranks_disagreeing_on_hard_negatives_equal_one_process(strategy, chunk, scene_images,
                                                               tmp_path):
    """In each step one rank's local batch has hard negatives and the other's has none:
    DDP (plain and GradCache) and FSDP finish and equal one process on the global batch."""
    torch.set_num_threads(1)
    pairs = mixed_negative_pairs(scene_images)
    for step in range(STEPS):  # the premise: the ranks really disagree in every step
        has = [any(pairs[i].neg is not None for i in rows) for rows in
               (list(ResumableBatchSampler(16, GLOBAL_BATCH // WORLD, STEPS, 0, rank=r,
                                           world_size=WORLD))[step] for r in range(WORLD))]
        assert sorted(has) == [False, True]
    mp.spawn(_mixed_worker, args=(_free_port(), str(tmp_path), pairs, strategy, chunk),
             nprocs=WORLD, join=True)
    ref = _train(tmp_path / "single", pairs, GLOBAL_BATCH, 0)
    got = torch.load(tmp_path / f"{strategy}.pt", weights_only=True)
    assert got.keys() == ref.keys()
    bad = _differing(got, ref)
    assert not bad, f"{len(bad)} of {len(ref)} tensors differ: {bad}"


@pytest.mark.slow
def test_two_rank_vein_with_diagnostics_equals_one_process(scene_images, tmp_path, monkeypatch):
    """L_rec is the mean over the global batch's masked tokens (ranks hold different numbers
    of image sides, some a single one): 2 DDP ranks (plain and GradCache) and 2 FSDP ranks,
    with the diagnostic on, give the single-process weights (LoRA and VEIN decoders) after
    2 steps. (Under FSDP every rank runs each decoder equally often, and the gradient-norm
    probe is off.)"""
    import fam.losses.vein as vein_mod
    torch.set_num_threads(1)
    pairs = make_pairs(scene_images, 16)
    runs = (("ddp", 0), ("ddp", 2), ("fsdp", 0))
    mp.spawn(_vein_worker, args=(_free_port(), str(tmp_path), pairs, runs), nprocs=WORLD,
             join=True)
    monkeypatch.setattr(vein_mod, "vein_mask_positions", position_masks)
    ref = _train(tmp_path / "single", pairs, GLOBAL_BATCH, 0, vein=True)
    assert any("decoders" in n for n in ref)
    m = json.loads((tmp_path / "single" / "train_metrics.json").read_text())["final"]
    assert {"rec_loss", "rec_loss_shuffled", "vein_grad_norm", "task_grad_norm"} <= set(m)
    for strategy, chunk in runs:
        got = torch.load(tmp_path / f"vein-{strategy}-c{chunk}.pt", weights_only=True)
        assert got.keys() == ref.keys()
        bad = _differing(got, ref)
        assert not bad, f"{strategy}, chunk {chunk}: {len(bad)} of {len(ref)} differ: {bad}"
