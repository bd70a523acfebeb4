"""GradCache: contrastive losses over batches far larger than fit in memory (SPEC §1).

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
(arXiv 2104.06174, §3). A contrastive loss depends on the encoder only through small
per-sample representations ``r`` (EOS embeddings; for MAC also the pooled token means v̄, t̄).
So the gradient factorises, ``dL/dθ = Σ_i (∂L/∂r_i) · ∂r_i/∂θ``, and can be computed in
three steps whose activation memory is that of one *chunk*, not of the batch:

1. **Representation pass** (no grad): embed the batch chunk by chunk, keep only ``r``.
2. **Loss pass**: compute the loss on the detached ``r`` (the whole batch; under DDP it is
   gathered across ranks inside the loss) and ``g = ∂L/∂r`` — the *cached gradient*,
   ``(B, d)`` per representation.
3. **Re-run pass** (with grad): re-embed each chunk and back-propagate the surrogate
   ``⟨r_chunk, g_chunk⟩``, whose gradient w.r.t. θ is exactly chunk's share of ``dL/dθ``.

Exactness needs the re-run to reproduce pass 1 bit for bit, dropout included: the RNG
state (torch CPU + the CUDA device's) is captured before each chunk's first pass and
restored before its re-run; after the step the RNG is left where pass 1 left it, so the
run's later random draws do not depend on whether GradCache is on.

**Per-chunk auxiliary losses (VEIN).** The VEIN loss needs token states, which are not
cached; but it is a mean of *per-token* terms (SPEC §3: over the masked image tokens of the
eligible samples), so it can be computed inside the re-run of each chunk. A module returns
per chunk ``aux`` = the **sum** of its terms (for VEIN: ``Σ_{masked tokens j}
mean_layers(1 − cos_j)``) and their count ``aux_n``; the total loss adds
``aux_scale · Σ_chunks aux``, with ``aux_scale = λ / N`` and ``N`` the number of terms of
the whole (local) batch, known after pass 1. That is exactly ``λ · L_rec``, the full-batch
value. VEIN's random masks are drawn from the global
RNG, so they are replayed like dropout.

Memory: pass 1 holds one chunk's activations without graph, pass 3 one chunk's graph;
the full batch only ever exists as ``(B, d)`` representations (plus the inputs).

The module protocol (:class:`GradCacheMixin`): ``forward(batch, step, mode="reps")``
returns ``{"reps": {name: (b, d)}, "aux": scalar or None, "aux_n": int}`` for one chunk
(optionally ``"aux_diag": {name: detached sum}``, summed over chunks and handed with the aux
sum and count to the module's ``gc_aux_terms`` for logging);
``gc_split(batch, size)`` cuts a batch into chunks; ``gc_loss(reps_per_chunk, chunks,
aux_n)`` returns the named loss terms and ``aux_scale``. ``forward(batch, step)`` (mode
``"loss"``) must equal ``gc_loss`` on a single chunk plus the scaled aux, so the plain and
the cached paths share one loss definition.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Sequence

import torch
from torch import nn

from fam.backbones.base import EncodedBatch

log = logging.getLogger(__name__)

__all__ = ["GradCacheMixin", "gradcache_step", "split_encoded", "chunk_bounds", "RngState"]

#: Keys of ``EncodedBatch.inputs`` indexed by *image*, not by row (image i = the i-th row
#: with ``has_image``). ``pixel_values`` is per image too, except when ``image_grid_thw``
#: is present (Qwen2-VL family): then it is the flat ``(Σ patches, C)`` patch list and
#: image i owns ``prod(image_grid_thw[i])`` consecutive rows of it.
_PER_IMAGE_KEYS = ("pixel_values", "image_grid_thw", "image_sizes")


def chunk_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering ``range(n)`` in chunks of at most ``size``."""
    if size <= 0:
        return [(0, n)]
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def split_encoded(batch: EncodedBatch, start: int, end: int) -> EncodedBatch:
    """Rows ``start:end`` of an encoded batch, with their images' pixel inputs.

    Sequences keep the batch's padded length L, so every row sees exactly the shapes of the
    full-batch forward (bit-level parity; trimming would save a little memory).

    Args:
        batch: B rows; ``inputs`` hold per-row ``(B, ...)`` tensors and per-image tensors
            (see ``_PER_IMAGE_KEYS``).
        start, end: row range.

    Returns:
        An :class:`EncodedBatch` of ``end - start`` rows.
    """
    has = batch.has_image.bool().cpu()
    img_before = int(has[:start].sum())
    img_in = int(has[start:end].sum())
    i0, i1 = img_before, img_before + img_in  # image index range of these rows
    inputs: dict[str, torch.Tensor] = {}
    grid = batch.inputs.get("image_grid_thw")
    for k, v in batch.inputs.items():
        if k == "pixel_values" and grid is not None:
            per_img = grid.prod(-1).tolist()  # patches per image
            p0 = sum(per_img[:i0])
            p1 = p0 + sum(per_img[i0:i1])
            inputs[k] = v[p0:p1]
        elif k in _PER_IMAGE_KEYS:
            inputs[k] = v[i0:i1]
        else:
            inputs[k] = v[start:end]
    if img_in == 0:
        # A chunk of text-only rows: the model must not receive empty pixel tensors.
        for k in _PER_IMAGE_KEYS:
            inputs.pop(k, None)
    return EncodedBatch(inputs, batch.image_mask[start:end], batch.text_mask[start:end],
                        batch.eos_index[start:end], batch.has_image[start:end])


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


def _device_of(module: nn.Module) -> torch.device:
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def gradcache_step(module: nn.Module, batch: Any, step: int, chunk_size: int,
                   ddp_module: nn.Module | None = None, loss_scale: float = 1.0,
                   sync: bool = True) -> dict[str, torch.Tensor]:
    """One GradCache forward/backward; leaves the gradients in ``.grad`` (accumulated).

    Args:
        module: a :class:`GradCacheMixin` module (the unwrapped one).
        batch: the local batch (what the collator returned, on the device).
        step: the optimizer step (passed to ``forward``).
        chunk_size: rows per chunk.
        ddp_module: the DDP wrapper of ``module`` (or None): the re-runs go through it, all
            but the last inside ``no_sync()`` so gradients are all-reduced once.
        loss_scale: multiplies the gradient (``1/grad_accum`` for micro-batches).
        sync: let the last re-run all-reduce (False for all but the last micro-batch).

    Returns:
        The named loss terms (detached). When the loss is not finite the backward is
        skipped and the terms are returned for the caller to report.
    """
    fwd = ddp_module if ddp_module is not None else module
    chunks = module.gc_split(batch, chunk_size)
    device = _device_of(module)
    # Pass 1: representations without graph. The unwrapped module is enough (no grad
    # means nothing for DDP to reduce) and avoids DDP's per-forward buffer broadcast.
    states, reps, aux_vals, aux_n = [], [], [], 0
    diag: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for c in chunks:
            states.append(RngState(device))
            out = module(c, step, mode="reps")
            reps.append({k: v.detach() for k, v in out["reps"].items()})
            if out.get("aux") is not None:
                aux_vals.append(out["aux"].detach())
            aux_n += int(out.get("aux_n", 0))
            for k, v in out.get("aux_diag", {}).items():  # detached diagnostic sums
                diag[k] = diag[k] + v if k in diag else v
    after = RngState(device)

    # Pass 2: the loss on detached leaves, and its gradient w.r.t. every representation.
    leaves = [{k: v.requires_grad_(True) for k, v in r.items()} for r in reps]
    terms = module.gc_loss(leaves, chunks, aux_n)
    aux_scale = float(terms.pop("aux_scale", 0.0))
    flat = [v for r in leaves for v in r.values()]
    grads = torch.autograd.grad(terms["loss"], flat, allow_unused=True)
    cached, i = [], 0
    for r in leaves:
        g = {}
        for k, v in r.items():
            gk = grads[i]
            g[k] = (gk if gk is not None else torch.zeros_like(v)) * loss_scale
            i += 1
        cached.append(g)
    out_terms = {k: v.detach() for k, v in terms.items()}
    if aux_vals:
        aux_sum = torch.stack(aux_vals).sum()
        out_terms["loss"] = out_terms["loss"] + (aux_sum * aux_scale).to(out_terms["loss"].dtype)
        if hasattr(module, "gc_aux_terms"):  # e.g. global means over ranks
            out_terms.update(module.gc_aux_terms(aux_sum, aux_n, diag))
        else:
            out_terms[getattr(module, "gc_aux_name", "aux_loss")] = aux_sum / max(aux_n, 1)
    if not torch.isfinite(out_terms["loss"]):
        after.restore()
        return out_terms

    # Pass 3: re-run each chunk with grad, replaying its RNG, and back-propagate ⟨r, g⟩.
    for ci, c in enumerate(chunks):
        last = ci == len(chunks) - 1
        ctx = ddp_module.no_sync() if (ddp_module is not None and hasattr(ddp_module, "no_sync")
                                       and not (sync and last)) else contextlib.nullcontext()
        with ctx:
            states[ci].restore()
            out = fwd(c, step, mode="reps")
            surrogate = sum((v * cached[ci][k].to(v.dtype)).sum() for k, v in out["reps"].items()
                            if v.numel())
            if out.get("aux") is not None:
                surrogate = surrogate + out["aux"] * (aux_scale * loss_scale)
            surrogate.backward()
    after.restore()
    return out_terms


class GradCacheMixin:
    """Adds :meth:`train_step` (GradCache when ``gradcache_chunk > 0``) to a loss module.

    Subclasses implement ``forward(batch, step, mode)`` (``mode="reps"`` as described in
    the module docstring), :meth:`gc_split` and :meth:`gc_loss`.
    """

    gradcache_chunk: int = 0
    #: name of the logged mean of the aux loss (e.g. ``"rec_loss"`` for VEIN)
    gc_aux_name: str = "aux_loss"

    def gc_split(self, batch: Any, size: int) -> list[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def gc_loss(self, reps: Sequence[dict[str, torch.Tensor]], chunks: Sequence[Any],
                aux_n: int) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def train_step(self, batch: Any, step: int, ddp_module: nn.Module | None = None,
                   loss_scale: float = 1.0, sync: bool = True) -> dict[str, torch.Tensor]:
        """Forward + backward of one (micro-)batch; the Trainer calls this when defined.

        Without GradCache this is the plain ``(loss · loss_scale).backward()`` through
        ``ddp_module``; the caller handles ``no_sync`` for ``sync=False`` then.
        """
        if self.gradcache_chunk > 0:
            return gradcache_step(self, batch, step, self.gradcache_chunk, ddp_module,
                                  loss_scale, sync)
        fwd = ddp_module if ddp_module is not None else self
        terms = fwd(batch, step)
        if torch.isfinite(terms["loss"]):
            (terms["loss"] * loss_scale).backward()
        return {k: v.detach() if torch.is_tensor(v) else v for k, v in terms.items()}
