"""Patch-aligned projector training (method.md §4; arXiv 2505.17316, "patch-aligned training").

The projector ``P`` maps frozen vision-encoder patches into the LLM's input-embedding
space. Caption loss alone aligns them only coarsely; the patch-alignment loss pulls the
projected tokens of each annotated region towards the mean input embedding of the
region's label words:

    z_k = pool_{i ∈ S_k} P(X)_i                    (region embedding, method.md §4)
    t_k = mean_j E[y_k,j]                          (label embedding, frozen)
    L_patch = mean_images mean_{k ∈ image} (1 − cos(z_k, t_k))
    L = L_caption + β(t) · L_patch,  β: 0 → β_max = 5 linearly

Everything here is a pure function of tensors: the selection masks ``S_k`` come from
:mod:`fam.projector.geometry`, label token ids from the backbone adapter's tokenizer.

Example:
    >>> import torch
    >>> x = torch.randn(2, 9, 16, requires_grad=True)           # (B, N, d) projector output
    >>> sets = torch.zeros(3, 9, dtype=torch.bool); sets[:, :3] = True   # (K, N) S_k
    >>> t = torch.randn(3, 16)                                   # (K, d) label embeddings
    >>> out = patch_alignment_loss(x, sets, t, torch.tensor([0, 0, 1]))
    >>> caption_loss = x.square().mean()                         # stand-in for the LM loss
    >>> beta = beta_schedule(step=10, total_steps=100)           # 0.5
    >>> projector_loss(caption_loss, out["loss"], beta).backward()
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

Pooling = Literal["mean", "coverage", "token"]
POOLINGS = ("mean", "coverage", "token")


def _check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r}: expected one of {POOLINGS} (method.md §4)")


def _region_weights(patch_sets: torch.Tensor, coverage: torch.Tensor | None,
                    pooling: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-region pooling weights over patches, rows summing to 1 (0 for empty sets).

    Args:
        patch_sets: ``(K, N)`` bool, ``S_k``.
        coverage: ``(K, N)`` float coverage ``c_k``; required for ``pooling="coverage"``.
        pooling: "mean"/"token" → uniform over ``S_k``; "coverage" → ∝ ``c_k[i]`` on ``S_k``.

    Returns:
        ``(K, N)`` weights in ``dtype``.
    """
    w = patch_sets.to(dtype)
    if pooling == "coverage":
        if coverage is None:
            raise ValueError("pooling='coverage' needs `coverage` (K, N), the patch coverage "
                             "from fam.projector.geometry.mask_to_patch_coverage")
        if coverage.shape != patch_sets.shape:
            raise ValueError(f"coverage shape {tuple(coverage.shape)} != patch_sets shape "
                             f"{tuple(patch_sets.shape)}")
        # weights restricted to S_k: an arg-max-fallback patch with coverage 0.1 still counts
        w = w * coverage.to(w)
    denom = w.sum(dim=1, keepdim=True)
    return w / denom.clamp_min(torch.finfo(w.dtype).tiny)


def _as_batched(vision_tokens: torch.Tensor, region_image_index: torch.Tensor | None,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, d) or (B, N, d) tokens → (B, N, d) and a (K,) long image index."""
    if vision_tokens.dim() == 2:
        vision_tokens = vision_tokens.unsqueeze(0)
        if region_image_index is None:
            region_image_index = torch.zeros(k, dtype=torch.long, device=vision_tokens.device)
    elif vision_tokens.dim() != 3:
        raise ValueError(f"vision_tokens must be (N, d) or (B, N, d), got "
                         f"{tuple(vision_tokens.shape)}")
    if region_image_index is None:
        raise ValueError("region_image_index (K,) is required when vision_tokens is (B, N, d): "
                         "it says which image each region belongs to")
    region_image_index = torch.as_tensor(region_image_index, device=vision_tokens.device).long()
    if region_image_index.shape != (k,):
        raise ValueError(f"region_image_index shape {tuple(region_image_index.shape)} != ({k},)")
    if k and (region_image_index.min() < 0 or region_image_index.max() >= vision_tokens.shape[0]):
        raise ValueError(f"region_image_index out of range [0, {vision_tokens.shape[0]})")
    return vision_tokens, region_image_index


def region_embeddings(vision_tokens: torch.Tensor, patch_sets: torch.Tensor,
                      coverage: torch.Tensor | None = None, pooling: Pooling = "mean",
                      region_image_index: torch.Tensor | None = None) -> torch.Tensor:
    """Region vision embeddings ``z_k`` pooled over the selected patches (method.md §4).

    ``z_k = mean_{i∈S_k} P(X)_i`` ("mean", the paper) or ``Σ_{i∈S_k} c_k[i] P(X)_i /
    Σ_{i∈S_k} c_k[i]`` ("coverage"). Tokens are pooled as they are (not normalised first),
    as in the method.md §4 formula.

    Args:
        vision_tokens: ``(N, d)`` tokens of one image, or ``(B, N, d)`` for a batch.
        patch_sets: ``(K, N)`` bool, the patches ``S_k`` of each region.
        coverage: ``(K, N)`` float coverage, for ``pooling="coverage"``.
        pooling: "mean" | "coverage". ("token" has no single region embedding: use
            :func:`patch_alignment_loss`.)
        region_image_index: ``(K,)`` long, image of each region; needed for ``(B, N, d)``.

    Returns:
        ``(K, d)`` in the tokens' dtype. A region with an empty set gets a zero vector.
    """
    _check_pooling(pooling)
    if pooling == "token":
        raise ValueError("pooling='token' compares each selected patch with the label and has "
                         "no single region embedding; use patch_alignment_loss(pooling='token')")
    k = patch_sets.shape[0]
    x, idx = _as_batched(vision_tokens, region_image_index, k)
    b, n, d = x.shape
    if patch_sets.shape != (k, n):
        raise ValueError(f"patch_sets shape {tuple(patch_sets.shape)} != (K, N) = ({k}, {n})")
    wdt = torch.promote_types(x.dtype, torch.float32)
    w = _region_weights(patch_sets.to(x.device), None if coverage is None
                        else coverage.to(x.device), pooling, wdt)  # (K, N)
    # Scatter each region's weights into its image's slot of a (K, B·N) matrix and do one
    # matmul: avoids materialising x[idx] as (K, N, d), which at LLaVA scale (K≈100,
    # N=576, d=4096) would be ~1 GB per step.
    w_full = w.new_zeros(k, b, n)
    w_full[torch.arange(k, device=x.device), idx] = w
    return (w_full.view(k, b * n).to(x.dtype) @ x.reshape(b * n, d))  # (K, d)


@torch.no_grad()
def label_embedding(token_ids: Sequence[Sequence[int]],
                    embedding_matrix: torch.Tensor) -> torch.Tensor:
    """Label embeddings ``t_k``: mean of the label tokens' input-embedding rows (method.md §4).

    Frozen target: computed without gradient and detached.

    Args:
        token_ids: K lists of token ids (the label's tokens, no special tokens).
        embedding_matrix: ``(V, d)`` the LLM's input-embedding matrix.

    Returns:
        ``(K, d)`` in ``embedding_matrix``'s dtype (the mean is taken in float32).
    """
    flat: list[int] = []
    offsets: list[int] = []
    v = embedding_matrix.shape[0]
    for k, ids in enumerate(token_ids):
        ids = list(ids)
        if not ids:
            raise ValueError(f"label {k} has no tokens; drop empty labels before the loss")
        bad = [i for i in ids if not 0 <= int(i) < v]
        if bad:
            raise ValueError(f"label {k}: token ids {bad} outside the embedding matrix [0, {v})")
        offsets.append(len(flat))
        flat.extend(int(i) for i in ids)
    dev = embedding_matrix.device
    if not offsets:
        return embedding_matrix.new_zeros(0, embedding_matrix.shape[1])
    # gather only the ΣL needed rows (never a float32 copy of the (V, d) matrix)
    rows = embedding_matrix.detach()[torch.tensor(flat, device=dev)].float()  # (ΣL, d)
    lengths = torch.tensor([len(t) for t in token_ids], device=dev)
    seg = torch.repeat_interleave(torch.arange(len(offsets), device=dev), lengths)  # (ΣL,)
    out = rows.new_zeros(len(offsets), rows.shape[1]).index_add_(0, seg, rows)
    out = out / lengths.unsqueeze(1).float()
    return out.to(embedding_matrix.dtype)


def patch_alignment_loss(vision_tokens: torch.Tensor, region_patch_masks: torch.Tensor,
                         label_embs: torch.Tensor, region_image_index: torch.Tensor | None = None,
                         pooling: Pooling = "mean", coverage: torch.Tensor | None = None,
                         ) -> dict[str, torch.Tensor]:
    """Patch-alignment loss ``L_patch`` (method.md §4).

    Per region: ``ℓ_k = 1 − cos(z_k, t_k)`` ("mean"/"coverage" pooling), or
    ``ℓ_k = mean_{i∈S_k} (1 − cos(P(X)_i, t_k))`` ("token"). Per image: mean of ``ℓ_k``
    over its regions. ``L_patch``: mean over the images that have ≥ 1 region, so an image
    with many regions weighs as much as one with a single region (method.md §4: "per image,
    averaged over the images that have regions"). Regions with an empty patch set (cropped
    away) are dropped. Cosines are computed in float32.

    Args:
        vision_tokens: ``(B, N, d)`` projector outputs ``P(X)`` (or ``(N, d)``, one image).
        region_patch_masks: ``(K, N)`` bool ``S_k`` (flattened raster grid).
        label_embs: ``(K, d)`` label embeddings ``t_k`` (see :func:`label_embedding`).
        region_image_index: ``(K,)`` long, the image of each region; optional for ``(N, d)``.
        pooling: "mean" (paper) | "coverage" | "token"  **[choice, method.md §4]**.
        coverage: ``(K, N)`` coverage, for ``pooling="coverage"``.

    Returns:
        dict with ``loss`` (0-d, differentiable; an exact 0 that keeps the graph when no
        image has a region, so DDP sees every parameter used), ``n_regions`` (0-d long,
        regions counted), ``n_images`` (0-d long, images with regions), ``mean_cos`` (0-d
        float, detached, mean over counted regions of ``cos`` or of the per-patch mean
        cos for "token"; 0 when there is none). Counts and metrics stay tensors so the
        training loop does not synchronise with the GPU each step.
    """
    _check_pooling(pooling)
    k = region_patch_masks.shape[0]
    x, idx = _as_batched(vision_tokens, region_image_index, k)
    b, n, d = x.shape
    if region_patch_masks.shape != (k, n):
        raise ValueError(f"region_patch_masks shape {tuple(region_patch_masks.shape)} != "
                         f"(K, N) = ({k}, {n})")
    if label_embs.shape != (k, d):
        raise ValueError(f"label_embs shape {tuple(label_embs.shape)} != (K, d) = ({k}, {d})")
    sets = region_patch_masks.to(device=x.device, dtype=torch.bool)
    valid = sets.any(dim=1)  # (K,)
    # cosines in at least float32 (bf16 cos of 4096-d vectors is too coarse for a loss)
    cdt = torch.promote_types(x.dtype, torch.float32)
    t_hat = F.normalize(label_embs.detach().to(x.device, cdt), dim=-1)  # (K, d)

    if pooling == "token":
        # cos of every token of the batch with every label: (B·N, K) costs B·N·K·d and
        # O(B·N·K) memory, then each region keeps the row of its own image.
        x_hat = F.normalize(x.to(cdt), dim=-1).reshape(b * n, d)
        cos_all = (x_hat @ t_hat.T).view(b, n, k)                    # (B, N, K)
        cos_tok = cos_all[idx, :, torch.arange(k, device=x.device)]  # (K, N)
        w = _region_weights(sets, None, "mean", cdt)                 # uniform over S_k
        cos_k = (w * cos_tok).sum(dim=1)                             # (K,) mean over S_k
    else:
        z = region_embeddings(x, sets, coverage, pooling, idx).to(cdt)  # (K, d)
        cos_k = F.cosine_similarity(z, t_hat, dim=-1, eps=1e-8)         # (K,)
    per_region = 1.0 - cos_k

    regions_per_image = torch.zeros(b, device=x.device, dtype=cdt).index_add_(
        0, idx, valid.to(cdt))                                                         # (B,)
    loss_per_image = torch.zeros(b, device=x.device, dtype=cdt).index_add_(
        0, idx, torch.where(valid, per_region, torch.zeros_like(per_region)))
    has = regions_per_image > 0
    n_images = has.sum()
    # no boolean indexing (a host sync); images without regions contribute 0 / 1 = 0, and
    # the loss stays connected to `x` even with no region at all (an exact 0 then).
    per_image = loss_per_image / regions_per_image.clamp_min(1)
    loss = per_image.sum() / n_images.clamp_min(1)
    n_regions = valid.sum()
    mean_cos = (torch.where(valid, cos_k, torch.zeros_like(cos_k)).sum()
                / n_regions.clamp_min(1)).detach()
    return {"loss": loss, "n_regions": n_regions, "n_images": n_images, "mean_cos": mean_cos}


def beta_schedule(step: int, total_steps: int, beta_max: float = 5.0,
                  ramp_steps: int | None = None) -> float:
    """Patch-loss weight β(t): linear ramp 0 → ``beta_max``, then constant (method.md §4).

    ``β(step) = beta_max · min(step / ramp_steps, 1)``: 0 at step 0, ``beta_max`` from
    step ``ramp_steps`` on. The ramp length is a **[choice]**; default the whole stage
    (``ramp_steps = total_steps``), so β reaches ``beta_max`` exactly at the end.

    Args:
        step: 0-based optimizer step.
        total_steps: steps in the stage (used when ``ramp_steps`` is None).
        beta_max: final weight (5 in the paper).
        ramp_steps: ramp length in steps; 0 means no ramp (``beta_max`` from step 0).
    """
    if step < 0:
        raise ValueError(f"beta_schedule: step={step} must be ≥ 0")
    ramp = total_steps if ramp_steps is None else ramp_steps
    if ramp < 0 or (ramp_steps is None and total_steps <= 0):
        raise ValueError(f"beta_schedule: need total_steps > 0 or ramp_steps ≥ 0, got "
                         f"total_steps={total_steps}, ramp_steps={ramp_steps}")
    if ramp == 0:
        return float(beta_max)
    return float(beta_max) * min(step / ramp, 1.0)


def projector_loss(caption_loss: torch.Tensor, patch_loss: torch.Tensor | None,
                   beta: float) -> torch.Tensor:
    """Total projector pre-training loss ``L = L_caption + β · L_patch`` (method.md §4).

    With ``beta == 0`` (or ``patch_loss`` None) the caption loss is returned unchanged, so
    the gradients are exactly the caption-only ones (``0 · L_patch`` would still spread a
    NaN from a degenerate patch term).
    """
    if beta == 0 or patch_loss is None:
        return caption_loss
    return caption_loss + beta * patch_loss
