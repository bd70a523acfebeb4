"""Cross-rank gathering for contrastive losses (method.md §1, "Under DDP ...").

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

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["is_dist", "rank", "world_size", "gather_with_grad", "gather_no_grad"]


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


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` along dim 0, keeping the local slice's autograd graph.

    The slices received from other ranks are detached copies; the local slice is ``x``
    itself, wrapped so that its gradient is multiplied by ``world_size`` (see the module
    docstring for why: it makes DDP's gradient average equal the single-process gradient
    of a loss that every rank computes over the whole gathered batch).

    Args:
        x: ``(b, ...)`` local tensor; ``b`` and the trailing shape must be equal on every
            rank.

    Returns:
        ``(W·b, ...)`` tensor, rank ``r``'s rows at ``[r·b, (r+1)·b)``. When not
        distributed (or ``W == 1``) this is ``x`` itself.

    Raises:
        ValueError: when ranks pass different shapes (raised on every rank).
    """
    ws = world_size()
    if ws == 1:
        return x
    parts = _all_gather(x, "gather_with_grad")
    parts[rank()] = _ScaleGrad.apply(x, float(ws))
    return torch.cat(parts, dim=0)


def gather_no_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` along dim 0 without any gradient (masks, labels, counts).

    Bool tensors are sent as ``uint8`` (not every backend all-gathers bool).

    Args:
        x: ``(b, ...)`` local tensor, same shape on every rank.

    Returns:
        ``(W·b, ...)`` tensor (``x`` itself when not distributed).
    """
    if world_size() == 1:
        return x
    is_bool = x.dtype == torch.bool
    parts = _all_gather(x.to(torch.uint8) if is_bool else x, "gather_no_grad")
    out = torch.cat(parts, dim=0)
    return out.bool() if is_bool else out
