"""One (micro-)batch's forward and backward: plain, or GradCache (method.md §1).

The contract every stage follows (open_clip style): the module's ``forward(batch, step)``
returns **named outputs** and the stage's loss takes them by keyword,
``loss(**outputs, batch=batch, step=step) -> {"loss": scalar, **named terms}``. The plain
step is exactly that, then ``backward``. :func:`train_step` is what the trainer calls.

**GradCache** (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup", arXiv 2104.06174, §3) is the same loss computed another way, for any module
and loss following the contract whose batch can be cut into row chunks
(``batch.split(size) -> [batch, ...]``). A contrastive loss depends on the encoder only
through small per-sample outputs ``r`` (EOS embeddings; for MAC also the pooled token means),
so ``dL/dθ = Σ_i (∂L/∂r_i) · ∂r_i/∂θ`` and the step runs in three passes whose activation
memory is that of one *chunk*:

1. **Outputs** (no grad): run each chunk, keep its outputs.
2. **Loss** on the outputs combined over chunks (detached leaves) and ``g = ∂L/∂output``
   — the *cached gradient*.
3. **Re-run** each chunk with grad and back-propagate the surrogate ``Σ ⟨output, g⟩``,
   whose gradient w.r.t. θ is exactly that chunk's share of ``dL/dθ``.

Combining outputs over chunks (:func:`combine`): a tensor with a leading row dimension is
concatenated (rows of the batch, or rows of its hard negatives, in batch order); a scalar
(0-dim tensor or number) must be a *sum over the chunk's samples* and is added up. That is
how per-sample losses that need token states (VEIN's ``rec_sum`` with its count ``rec_n``)
take part: the loss is linear in the sum, so its cached gradient is the constant ``λ / N``.

Exactness needs the re-run to reproduce pass 1 bit for bit, dropout included: the RNG state
(torch CPU + the CUDA device's) is captured before each chunk's first pass and restored
before its re-run; after the step the RNG is left where pass 1 left it, so the run's later
random draws do not depend on whether GradCache is on. VEIN's random masks are drawn from
the global RNG, so they are replayed like dropout.

Memory: pass 1 holds one chunk's activations without graph, pass 3 one chunk's graph; the
full batch only ever exists as its small outputs (plus the inputs).

Less work, same gradients (single process): the last chunk's pass 1 runs with grad and its
graph is back-propagated first in pass 3 instead of being re-run (its graph is then the one
alive), and a module's ``frozen_memo()`` (:class:`fam.backbones.fastpath.OutputMemo`, a
frozen vision tower) records its outputs in pass 1 and replays them in pass 3.
"""
from __future__ import annotations

import contextlib
import logging
import math
from numbers import Number
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from fam import distributed as dist_utils
from fam.backbones.base import EncodedBatch

log = logging.getLogger(__name__)

__all__ = ["train_step", "gradcache_step", "combine", "split_encoded", "chunk_bounds",
           "RngState", "Loss", "grad_norms"]

#: ``loss(**outputs, batch=..., step=...) -> {"loss": scalar, **named terms}``
Loss = Callable[..., dict[str, torch.Tensor]]

#: Keys of ``EncodedBatch.inputs`` indexed by *image*, not by row (image i = the i-th row
#: with ``has_image``). ``pixel_values`` is per image too, except when ``image_grid_thw``
#: is present (Qwen2-VL family): then it is the flat ``(Σ patches, C)`` patch list and
#: image i owns ``prod(image_grid_thw[i])`` consecutive rows of it.
_PER_IMAGE_KEYS = ("pixel_values", "image_grid_thw", "image_sizes")
#: The same for videos (Qwen2-VL: ``pixel_values_videos`` rows by ``video_grid_thw``).
_PER_VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw")


def chunk_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering ``range(n)`` in chunks of at most ``size``."""
    if size <= 0:
        return [(0, n)]
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def split_encoded(batch: EncodedBatch, start: int, end: int) -> EncodedBatch:
    """Rows ``start:end`` of an encoded batch, with their images' pixel inputs.

    Trailing columns that are padding in every row of the chunk are dropped (right padding:
    a chunk of short texts is not run at the longest text's length of the whole batch), as
    sentence-transformers' cached losses do; real tokens keep their positions, so results
    change only by float rounding (other matrix shapes).

    Args:
        batch: B rows; ``inputs`` hold per-row ``(B, ...)`` tensors and per-image tensors
            (see ``_PER_IMAGE_KEYS``).
        start, end: row range.

    Returns:
        An :class:`EncodedBatch` of ``end - start`` rows.
    """
    counts = batch.visual_counts
    if counts is None:  # one image per row that has one
        counts = torch.stack([batch.has_image.long(), torch.zeros_like(batch.eos_index)], 1)
    counts = counts.cpu()
    i0 = int(counts[:start, 0].sum())
    i1 = i0 + int(counts[start:end, 0].sum())  # image index range of these rows
    v0 = int(counts[:start, 1].sum())
    v1 = v0 + int(counts[start:end, 1].sum())  # video index range
    inputs: dict[str, torch.Tensor] = {}
    grid = batch.inputs.get("image_grid_thw")
    vgrid = batch.inputs.get("video_grid_thw")

    def patch_rows(g: torch.Tensor, a: int, b: int) -> slice:
        per = g.prod(-1).tolist()  # patches per image / video
        return slice(sum(per[:a]), sum(per[:b]))

    B, L = batch.image_mask.shape
    attn = batch.inputs.get("attention_mask")
    keep = L
    if attn is not None and attn.dim() == 2 and end > start:
        cols = attn[start:end].bool().any(0).nonzero()
        keep = int(cols.max()) + 1 if cols.numel() else L
    for k, v in batch.inputs.items():
        if k == "pixel_values" and grid is not None:
            inputs[k] = v[patch_rows(grid, i0, i1)]
        elif k == "pixel_values_videos" and vgrid is not None:
            inputs[k] = v[patch_rows(vgrid, v0, v1)]
        elif k == "video_grid_thw":
            inputs[k] = v[v0:v1]
        elif k in _PER_IMAGE_KEYS:
            inputs[k] = v[i0:i1]
        elif v.dim() >= 2 and v.shape[:2] == (B, L):
            inputs[k] = v[start:end, :keep]
        else:
            inputs[k] = v[start:end]
    # A chunk without images (videos): the model must not receive empty pixel tensors.
    for keys, n in ((_PER_IMAGE_KEYS, i1 - i0), (_PER_VIDEO_KEYS, v1 - v0)):
        if n == 0:
            for k in keys:
                inputs.pop(k, None)
    return EncodedBatch(inputs, batch.image_mask[start:end, :keep],
                        batch.text_mask[start:end, :keep], batch.eos_index[start:end],
                        batch.has_image[start:end], counts[start:end].to(batch.eos_index.device))


class RngState:
    """The torch CPU RNG state and, when on CUDA, the device's CUDA RNG state."""

    def __init__(self, device: torch.device | None = None):
        self.cpu = torch.get_rng_state()
        self.device = device if device is not None and device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(self.device) if self.device is not None else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def combine(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The outputs of a batch from those of its chunks (see the module docstring).

    Tensors with rows are concatenated (chunks without the key contribute nothing; per-token
    ``(rows, L, ...)`` outputs are zero-padded to the longest chunk's L), scalars
    (0-dim tensors, numbers) are summed; a key whose values are all ``None`` stays ``None``.
    """
    keys = list(dict.fromkeys(k for p in parts for k in p))
    out: dict[str, Any] = {}
    for k in keys:
        vals = [p[k] for p in parts if p.get(k) is not None]
        if not vals:
            out[k] = None
        elif torch.is_tensor(vals[0]) and vals[0].dim() > 1 and len(
                {v.shape[1] for v in vals}) > 1:
            # Per-token outputs of chunks with different padded lengths (split_encoded drops
            # a chunk's padding columns): padded again with zeros (False for masks).
            n = max(v.shape[1] for v in vals)
            out[k] = torch.cat([torch.cat([v, v.new_zeros((v.shape[0], n - v.shape[1],
                                                           *v.shape[2:]))], 1)
                                if v.shape[1] < n else v for v in vals])
        elif torch.is_tensor(vals[0]) and vals[0].dim() > 0:
            out[k] = torch.cat(vals)
        elif torch.is_tensor(vals[0]):
            out[k] = torch.stack(vals).sum()
        elif isinstance(vals[0], Number):
            out[k] = sum(vals)
        else:
            raise TypeError(f"output {k!r}: GradCache combines tensors and numbers, got "
                            f"{type(vals[0]).__name__}")
    return out


def grad_norms(terms: Mapping[str, torch.Tensor], params: Iterable[torch.Tensor]
               ) -> dict[str, float]:
    """The L2 norm of the gradient each loss term alone sends into ``params``.

    Used to compare what VEIN and the task loss teach the backbone (e.g. ``{"task": L_task,
    "rec": λ·L_rec}`` over the LoRA weights). Keeps the graph (``retain_graph``) so the
    caller's backward still runs; costs one extra backward per term, so call it at logging
    steps only. Under DDP the norms are this rank's (no all-reduce).

    Args:
        terms: name → scalar loss with graph.
        params: the parameters (those without ``requires_grad`` are skipped).

    Returns:
        name → gradient norm (0.0 when the term does not reach the parameters).
    """
    ps = [p for p in params if p.requires_grad]
    out = {}
    for name, t in terms.items():
        if not ps or not torch.is_tensor(t) or t.grad_fn is None:
            out[name] = 0.0
            continue
        gs = torch.autograd.grad(t, ps, retain_graph=True, allow_unused=True)
        sq = sum(float(g.detach().double().pow(2).sum()) for g in gs if g is not None)
        out[name] = math.sqrt(sq)
    return out


def _device_of(module: nn.Module) -> torch.device:
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _detached(terms: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach() if torch.is_tensor(v) else v for k, v in terms.items()}


def train_step(module: nn.Module, loss: Loss | None, batch: Any, step: int,
               gradcache_chunk: int = 0, ddp_module: nn.Module | None = None,
               micro_batches: int = 1, sync: bool = True) -> dict[str, Any]:
    """Forward + backward of one (micro-)batch; gradients accumulate in ``.grad``.

    Args:
        module: the stage's module (unwrapped).
        loss: the stage's loss over the module's named outputs; ``None`` when the module
            returns the loss terms itself. A loss may add ``"grad_terms": {name: scalar with
            graph}``: the plain step then also reports ``<name>_grad_norm``, the norm of the
            gradient each sends into the module's ``grad_norm_params()`` (GradCache and
            FSDP-sharded parameters: not reported).
        batch: what the collator returned, on the device.
        step: the optimizer step (passed to the module and the loss).
        gradcache_chunk: rows per GradCache chunk; 0 = the plain step.
        ddp_module: the DDP wrapper of ``module`` (or None); forwards with grad go through
            it. (The plain step's caller handles ``no_sync``.)
        micro_batches: micro-batches of the optimizer step (``grad_accum``); the
            gradient is divided by it.
        sync: GradCache only: let the last re-run all-reduce (False for all but the last
            micro-batch).

    Returns:
        The named loss terms, detached. The plain step back-propagates even a non-finite
        loss (under DDP every rank must join the all-reduce; the trainer stops the run).
    """
    if gradcache_chunk > 0:
        if loss is None:
            raise ValueError("GradCache needs the stage's loss over the module's outputs")
        return gradcache_step(module, loss, batch, step, gradcache_chunk, ddp_module,
                              micro_batches, sync)
    fwd = ddp_module if ddp_module is not None else module
    out = fwd(batch, step)
    terms = out if loss is None else loss(**out, batch=batch, step=step)
    probe = terms.pop("grad_terms", None)
    params = (module.grad_norm_params() if hasattr(module, "grad_norm_params") else
              [p for p in module.parameters() if p.requires_grad]) if probe else []
    # (Not under FSDP: its backward hooks would fire inside autograd.grad and reduce the
    # probe's gradients into the sharded .grad.)
    if probe and not any(hasattr(p, "device_mesh") for p in params):
        # A diagnostic the loss asks for (e.g. VEIN's): the gradient norm each named part
        # of the loss alone sends into the module's ``grad_norm_params()`` (or all of them).
        for name, value in grad_norms(probe, params).items():
            terms[f"{name}_grad_norm"] = torch.tensor(value)
    (terms["loss"] / micro_batches).backward()
    return _detached(terms)


def gradcache_step(module: nn.Module, loss: Loss, batch: Any, step: int, chunk_size: int,
                   ddp_module: nn.Module | None = None, micro_batches: int = 1,
                   sync: bool = True) -> dict[str, Any]:
    """One GradCache forward/backward (module docstring); arguments as :func:`train_step`.

    ``batch.split(chunk_size)`` cuts the batch into row chunks. The re-runs go through
    ``ddp_module``, all but the last inside ``no_sync()`` so gradients are all-reduced once.
    When the loss is not finite (on any rank) the re-runs are skipped on every rank and the
    terms returned with a non-finite loss, for every rank's caller to stop on.
    """
    fwd = ddp_module if ddp_module is not None else module
    chunks = batch.split(chunk_size)
    device = _device_of(module)
    # Pass 1: outputs without graph. The unwrapped module is enough (no grad means nothing
    # for DDP to reduce) and avoids DDP's per-forward buffer broadcast.
    # A frozen vision tower computes the same features in pass 3: kept from pass 1.
    memo = module.frozen_memo() if (ddp_module is None and hasattr(module, "frozen_memo")) \
        else None
    # The last chunk's pass 1 runs with grad and its graph is kept for pass 3 (back-
    # propagated first, so one chunk's graph is alive at a time): no re-run for it.
    # (Not under DDP/FSDP, whose hooks must see the re-runs.)
    keep = len(chunks) - 1 if ddp_module is None else -1
    kept = None
    states, outs = [], []
    for ci, c in enumerate(chunks):
        states.append(RngState(device))
        if ci == keep:
            kept = module(c, step)
            outs.append(kept)
            continue
        with torch.no_grad(), memo.record(ci) if memo is not None else contextlib.nullcontext():
            outs.append(module(c, step))
    after = RngState(device)

    # Pass 2: the loss on detached leaves, and its gradient w.r.t. every float output.
    leaves = [{k: (v.detach().requires_grad_(True) if torch.is_tensor(v) and
                   v.is_floating_point() else v.detach() if torch.is_tensor(v) else v)
               for k, v in o.items()} for o in outs]
    terms = loss(**combine(leaves), batch=batch, step=step)
    # Gradient-norm diagnostics need the whole graph, which GradCache never holds.
    terms.pop("grad_terms", None)
    flat = [(ci, k, v) for ci, o in enumerate(leaves) for k, v in o.items()
            if torch.is_tensor(v) and v.requires_grad]
    grads = torch.autograd.grad(terms["loss"], [v for _, _, v in flat], allow_unused=True)
    cached: list[dict[str, torch.Tensor]] = [{} for _ in chunks]
    scale = 1.0 / micro_batches
    for (ci, k, v), g in zip(flat, grads):
        cached[ci][k] = (g if g is not None else torch.zeros_like(v)) * scale
    out_terms = _detached(terms)
    # Every rank takes the same branch: a rank that skipped the re-runs alone would leave
    # the others waiting in the last re-run's all-reduce (DDP) or parameter gathers (FSDP).
    if not dist_utils.all_ranks_true(bool(torch.isfinite(out_terms["loss"]))):
        after.restore()
        # A NaN loss on every rank, so that every rank's trainer stops (not only the rank
        # whose loss diverged: the others would wait in the next step's collectives).
        if torch.isfinite(out_terms["loss"]):
            out_terms["loss"] = torch.full_like(out_terms["loss"], float("nan"))
        return out_terms

    # Pass 3: re-run each chunk with grad, replaying its RNG, and back-propagate ⟨r, g⟩.
    # A module with ``forward_parts`` (its outputs in parts, e.g. the queries' then the
    # targets') has each part back-propagated before the next is computed, so only one
    # part's graph is alive at a time. (Not through a DDP wrapper: its hooks are on forward.)
    parts = getattr(module, "forward_parts", None) if ddp_module is None else None
    if kept is not None:
        _backward_surrogate(kept, cached[keep])
        kept = outs[keep] = None
    for ci, c in enumerate(chunks):
        if ci == keep:
            continue
        last = ci == len(chunks) - 1
        ctx = ddp_module.no_sync() if (ddp_module is not None and hasattr(ddp_module, "no_sync")
                                       and not (sync and last)) else contextlib.nullcontext()
        with ctx, memo.replay(ci) if memo is not None else contextlib.nullcontext():
            states[ci].restore()
            for out in (parts(c, step) if parts is not None else [fwd(c, step)]):
                _backward_surrogate(out, cached[ci])
    after.restore()
    return out_terms


def _backward_surrogate(out: Mapping[str, Any], cached: Mapping[str, torch.Tensor]) -> None:
    """Back-propagate ``Σ_k ⟨out[k], g_k⟩`` over the cached gradients of the keys in ``out``
    (a scalar of a part is its share of the chunk's sum, so the same ``g`` applies)."""
    terms = [(out[k] * g.to(out[k].dtype)).sum() for k, g in cached.items()
             if torch.is_tensor(out.get(k)) and out[k].numel() and out[k].requires_grad]
    if terms:
        sum(terms).backward()
