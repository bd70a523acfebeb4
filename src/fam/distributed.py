"""Everything distributed in fam: process set-up, DDP/FSDP wrapping, full states, gathering.

Set-up (:func:`init_from_env`, :func:`resolve_device`, :func:`barrier`,
:func:`run_on_main_rank`), the two strategies of the trainer (:func:`wrap_ddp`,
:func:`shard_fsdp`), full (unsharded) states for checkpoints and export
(:func:`full_trainable_state`, :func:`full_state_dict`), and the cross-rank gathering of
contrastive losses described below (method.md §1, "Many processes").

Contrastive losses want every rank to see the *global* batch as negatives. The pattern is
open_clip's ``gather_features(..., gather_with_grad=False)``: ``all_gather`` the local
tensors (the received copies carry no graph) and put the local tensor back into slot
``rank`` so that its autograd graph is kept.

Gradient-scaling convention (read this before using :func:`gather_with_grad`)
-----------------------------------------------------------------------------
Every rank computes the **same global loss** ``L`` over the gathered tensors (all query
rows against all targets; ``L`` is the mean over the ``W·b`` global rows, exactly the
loss one process would compute on the concatenated batch). Rank ``r`` can only
back-propagate through its own slice ``x_r``, so its autograd gives
``∂L/∂x_r · ∂x_r/∂θ``. The full gradient is the sum over slices,
``dL/dθ = Σ_r ∂L/∂x_r · ∂x_r/∂θ``, whereas DDP *averages* gradients over ranks (÷W).
:func:`gather_with_grad` therefore multiplies the gradient flowing into the local slice by
``W`` (identity in the forward pass), and after DDP's average every rank holds

    (1/W) · Σ_r W · ∂L/∂x_r · ∂x_r/∂θ = dL/dθ,

the single-process gradient of the concatenated batch, bit-for-bit up to float
summation order. The reported loss value is also the single-process value (no ``× W`` on
the loss, unlike tevatron/VLM2Vec which scale the loss itself). This holds for any loss
that is a function of gathered tensors only, and equally under GradCache (the cached
gradient w.r.t. the local embeddings already carries the factor ``W``).

Do **not** combine :func:`gather_with_grad` with a "local loss" (only local query rows):
with detached copies the gradient through other ranks' rows would be lost.

Requirements: every rank must call the gather functions in the same order with tensors
of the same shape (equal local batch sizes); a mismatch raises ``ValueError`` on all
ranks instead of hanging or corrupting memory.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = ["is_dist", "rank", "world_size", "gather_with_grad", "gather_no_grad",
           "gather_tokens_with_grad",
           "init_from_env", "resolve_device", "barrier", "run_on_main_rank", "wrap_ddp",
           "shard_fsdp", "full_trainable_state", "load_full_trainable_state", "full_state_dict",
           "mean_over_ranks", "all_ranks_true"]


def is_dist() -> bool:
    """True when ``torch.distributed`` is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Rank of this process in the default group (0 when not distributed)."""
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_dist() else 1


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # noqa: D102
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return grad * ctx.scale, None


_MAX_DIMS = 8  # shapes are exchanged as a fixed-size vector: [ndim, d0, ..., d7]


def _check_equal_shapes(x: Tensor, what: str) -> None:
    """All-gather the shapes and raise on every rank if they differ (avoids a hang).

    One tiny collective: the shape is padded into a fixed-size vector so that ranks with
    different numbers of dimensions can still exchange it.
    """
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"{what}: tensors with more than {_MAX_DIMS} dims are not supported "
                         f"(got shape {tuple(x.shape)}).")
    vec = torch.full((_MAX_DIMS + 1,), -1, dtype=torch.long, device=x.device)
    vec[0] = x.dim()
    if x.dim():
        vec[1:x.dim() + 1] = torch.tensor(list(x.shape), dtype=torch.long, device=x.device)
    vecs = [torch.empty_like(vec) for _ in range(world_size())]
    dist.all_gather(vecs, vec)
    shapes = [tuple(int(v) for v in s[1:int(s[0]) + 1].tolist()) for s in vecs]
    if len(set(shapes)) != 1:
        raise ValueError(
            f"{what}: ranks passed tensors of different shapes {shapes} (list index = rank). "
            "Gathering requires equal local batch sizes on every rank: use the same "
            "per-device batch size and drop_last=True in the sampler.")


def _all_gather(x: Tensor, what: str) -> list[Tensor]:
    _check_equal_shapes(x, what)
    x_c = x.detach().contiguous()
    out = [torch.empty_like(x_c) for _ in range(world_size())]
    dist.all_gather(out, x_c)
    return out


def gather_with_grad(x: Tensor, always: bool = False) -> Tensor:
    """All-gather ``x`` along dim 0, keeping the local slice's autograd graph.

    The slices received from other ranks are detached copies; the local slice is ``x``
    itself, wrapped so that its gradient is multiplied by ``world_size`` (see the module
    docstring for why: it makes DDP's gradient average equal the single-process gradient
    of a loss that every rank computes over the whole gathered batch).

    Args:
        x: ``(b, ...)`` local tensor; ``b`` and the trailing shape must be equal on every
            rank.
        always: run the collective even in a group of one process (``fam bench gpu``
            checks the backend's round trip on one device this way).

    Returns:
        ``(W·b, ...)`` tensor, rank ``r``'s rows at ``[r·b, (r+1)·b)``. When not
        distributed (or ``W == 1`` and not ``always``) this is ``x`` itself.

    Raises:
        ValueError: when ranks pass different shapes (raised on every rank).
    """
    ws = world_size()
    if ws == 1 and not (always and is_dist()):
        return x
    parts = _all_gather(x, "gather_with_grad")
    parts[rank()] = _ScaleGrad.apply(x, float(ws))
    return torch.cat(parts, dim=0)


def gather_tokens_with_grad(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Gather per-row token tensors whose token count differs between ranks.

    Each rank pads ``x`` ``(b, n, d)`` and ``mask`` ``(b, n)`` with masked-out zero tokens to
    the largest ``n`` of any rank (one small all-reduce), then gathers as
    :func:`gather_with_grad` / :func:`gather_no_grad`. Not distributed: the inputs unchanged.
    """
    if world_size() == 1:
        return x, mask
    n = torch.tensor([x.shape[1]], dtype=torch.long, device=x.device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    extra = int(n) - x.shape[1]
    if extra:
        x = torch.cat([x, x.new_zeros((x.shape[0], extra, *x.shape[2:]))], dim=1)
        mask = torch.cat([mask, mask.new_zeros((mask.shape[0], extra))], dim=1)
    return gather_with_grad(x), gather_no_grad(mask)


def gather_no_grad(x: Tensor, always: bool = False) -> Tensor:
    """All-gather ``x`` along dim 0 without any gradient (masks, labels, counts).

    Bool tensors are sent as ``uint8`` (not every backend all-gathers bool).

    Args:
        x: ``(b, ...)`` local tensor, same shape on every rank.
        always: as in :func:`gather_with_grad`.

    Returns:
        ``(W·b, ...)`` tensor (``x`` itself when not distributed).
    """
    if world_size() == 1 and not (always and is_dist()):
        return x
    is_bool = x.dtype == torch.bool
    parts = _all_gather(x.to(torch.uint8) if is_bool else x, "gather_no_grad")
    out = torch.cat(parts, dim=0)
    return out.bool() if is_bool else out


# ---------------------------------------------------------------------------- set-up
def resolve_device(spec: str) -> torch.device:
    """``run.device``: ``"auto"`` is this rank's CUDA device (``LOCAL_RANK``) or the CPU."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(spec)


def init_from_env() -> bool:
    """Initialise the default process group when launched by torchrun (``WORLD_SIZE > 1``).

    Backend: NCCL on CUDA, gloo otherwise. Returns whether a group is (now) initialised.
    A no-op when a group already exists (tests spawn their own) or for a single process.
    """
    if is_dist():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    logger.info("distributed: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(),
                dist.get_backend())
    return True


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_dist():
        dist.barrier()


def run_on_main_rank(fn: Callable[[], Any]) -> bool:
    """Run ``fn()`` on rank 0 only, then wait for all ranks; returns whether it ran here.

    Every rank holds the same weights after DDP training; concurrent writers of one folder
    would race on its atomic rename.
    """
    ran = rank() == 0
    if ran:
        fn()
    barrier()
    return ran


# ---------------------------------------------------------------------------- strategies
def wrap_ddp(module: nn.Module, device: torch.device, find_unused_parameters: bool) -> nn.Module:
    """``DistributedDataParallel`` around ``module`` (replicated weights, averaged grads)."""
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters)


def shard_fsdp(module: nn.Module) -> int:
    """FSDP2: shard every transformer block, then the root (in place); returns #blocks.

    The language model's decoder layers are found by class name (``*DecoderLayer``, the
    transformer-based auto-wrap policy of accelerate/FSDP); everything else (vision tower,
    embeddings, VEIN decoders) stays in the root unit. Each sharded block all-gathers in its
    forward, so every rank must run the same forwards: the vision tower runs only for
    batches with images, which is why it is not sharded on its own. Gradients are averaged
    over ranks like DDP's, so the gather-with-gradient scaling above holds.
    """
    from torch.distributed.fsdp import fully_shard
    blocks = [m for m in module.modules()
              if type(m).__name__.endswith("DecoderLayer") and any(True for _ in m.parameters())]
    for m in blocks:
        fully_shard(m)
    fully_shard(module)
    return len(blocks)


def full_trainable_state(module: nn.Module, names: Sequence[str], params: Sequence[nn.Parameter],
                         optimizer: torch.optim.Optimizer, sharded: bool,
                         ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Full (unsharded) trainable tensors and optimizer state, on the CPU.

    Collective under FSDP (every rank calls it; every rank gets the full tensors).
    """
    if not sharded:
        return ({n: p.detach().cpu().contiguous() for n, p in zip(names, params)},
                optimizer.state_dict())
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict)
    state = {n: p.detach().full_tensor().cpu().contiguous() for n, p in zip(names, params)}
    osd = get_optimizer_state_dict(module, optimizer,
                                   options=StateDictOptions(full_state_dict=True,
                                                            cpu_offload=True))
    return state, osd


def load_full_trainable_state(module: nn.Module, names: Sequence[str],
                              params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer,
                              state: dict[str, Tensor], optimizer_state: dict[str, Any],
                              sharded: bool) -> None:
    """Inverse of :func:`full_trainable_state`: copy full tensors into (sharded) parameters."""
    if not sharded:
        with torch.no_grad():
            for n, p in zip(names, params):
                p.copy_(state[n].to(p.device, p.dtype))
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_optimizer_state_dict)
    from torch.distributed.tensor import distribute_tensor
    with torch.no_grad():
        for n, p in zip(names, params):
            p.copy_(distribute_tensor(state[n].to(p.device, p.dtype), p.device_mesh,
                                      p.placements))
    set_optimizer_state_dict(module, optimizer, optimizer_state,
                             options=StateDictOptions(full_state_dict=True))


def full_state_dict(module: nn.Module, sharded: bool) -> dict[str, Tensor]:
    """The module's full state dict (collective under FSDP: every rank calls it, all get it)."""
    if not sharded:
        return module.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))


def mean_over_ranks(terms: dict[str, float]) -> dict[str, float]:
    """Average logged terms over ranks (local terms such as VEIN's differ per rank)."""
    if not is_dist() or not terms:
        return terms
    keys = sorted(terms)
    vec = torch.tensor([terms[k] for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        vec = vec.cuda()
    dist.all_reduce(vec)
    return {k: float(v) / world_size() for k, v in zip(keys, vec.tolist())}


def all_ranks_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (one all-reduce of a 0/1 value).

    For decisions every rank must take the same way (e.g. skipping a step's collectives):
    a rank that decided alone would leave its peers waiting in an all-reduce. Outside a
    process group it is ``flag``.
    """
    if not is_dist():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
