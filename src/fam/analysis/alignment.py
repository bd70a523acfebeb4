"""Patch-level alignment of projected vision tokens with label words: Align(V, W) (method.md §5).

For each annotated region ``k`` of an image (label embedding ``t_k``, ground-truth patch
set ``S_k`` from :func:`fam.projector.geometry.select_patches`):

    s_k[i] = cos(P(X)_i, t_k)                              similarity map over the image
    ŝ_k = (s_k − min_i s_k) / (max_i s_k − min_i s_k)      min-max over *this image's* patches
    Ŝ_k = {i : ŝ_k[i] ≥ threshold}                         predicted set (threshold 0.5)
    IoU_k = |Ŝ_k ∩ S_k| / |Ŝ_k ∪ S_k|;   mIoU = mean_k IoU_k

"Min-max normalised per image" is read as: each region's map is normalised over the
patches of the image it belongs to (one map = one region × one image), so the threshold
is relative to that map's own range. **[choice]** A constant map (max = min) carries no
localisation; it is normalised to all zeros, i.e. an empty prediction and IoU 0, so a
degenerate projector gets no credit. Regions with an empty ``S_k`` are skipped.

Also reported: the mean cosine inside ``S_k`` and the in-minus-out contrast (the latter
over regions that do not cover the whole image).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


def similarity_map(vision_tokens: torch.Tensor, label_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each token with a label embedding (method.md §5 ``s_k``).

    Args:
        vision_tokens: ``(N, d)`` projector outputs of one image.
        label_emb: ``(d,)`` one label, or ``(K, d)`` several.

    Returns:
        ``(N,)`` or ``(K, N)`` float32 cosines.
    """
    x = F.normalize(vision_tokens.detach().float(), dim=-1)  # (N, d)
    t = F.normalize(label_emb.detach().float().to(x.device), dim=-1)
    return t @ x.T  # (N,) or (K, N)


def minmax_normalize(sim_maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each map (row) to ``[0, 1]``; constant rows become 0.

    Args:
        sim_maps: ``(K, N)``.
    """
    lo = sim_maps.min(dim=-1, keepdim=True).values
    hi = sim_maps.max(dim=-1, keepdim=True).values
    rng = hi - lo
    flat = rng <= 0
    return torch.where(flat, torch.zeros_like(sim_maps),
                       (sim_maps - lo) / torch.where(flat, torch.ones_like(rng), rng))


def patch_ious(sim_maps: torch.Tensor, gt_patch_sets: torch.Tensor,
               threshold: float = 0.5) -> torch.Tensor:
    """Per-region IoU of the thresholded normalised map with the ground-truth set.

    Args:
        sim_maps: ``(K, N)`` similarity maps, each over its own image's N patches.
        gt_patch_sets: ``(K, N)`` bool ground truth ``S_k``.
        threshold: on the min-max-normalised map (0.5, method.md §5).

    Returns:
        ``(K,)`` float IoU; NaN for regions with an empty ground-truth set.
    """
    if sim_maps.shape != gt_patch_sets.shape:
        raise ValueError(f"sim_maps {tuple(sim_maps.shape)} and gt_patch_sets "
                         f"{tuple(gt_patch_sets.shape)} must both be (K, N)")
    pred = minmax_normalize(sim_maps.float()) >= threshold
    gt = gt_patch_sets.to(pred.device).bool()
    inter = (pred & gt).sum(-1).float()
    union = (pred | gt).sum(-1).float()
    iou = inter / union.clamp_min(1)
    return torch.where(gt.any(-1), iou, torch.full_like(iou, float("nan")))


def patch_miou(sim_maps: torch.Tensor, gt_patch_sets: torch.Tensor,
               threshold: float = 0.5) -> float:
    """Patch-level mIoU, Align(V, W) (method.md §5): mean of :func:`patch_ious` over regions
    with a non-empty ground truth (NaN if there is none)."""
    ious = patch_ious(sim_maps, gt_patch_sets, threshold)
    ok = ~ious.isnan()
    return float(ious[ok].mean()) if bool(ok.any()) else float("nan")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # (K, N), (K, N) → (K,) mean over mask; NaN where the mask is empty
    cnt = mask.sum(-1)
    s = torch.where(mask, values, torch.zeros_like(values)).sum(-1)
    return torch.where(cnt > 0, s / cnt.clamp_min(1), torch.full_like(s, float("nan")))


def in_mask_cosine(sim_maps: torch.Tensor, gt_patch_sets: torch.Tensor) -> float:
    """Mean over regions of the mean raw cosine inside ``S_k`` (regions with ``S_k ≠ ∅``)."""
    v = _masked_mean(sim_maps.float(), gt_patch_sets.to(sim_maps.device).bool())
    v = v[~v.isnan()]
    return float(v.mean()) if v.numel() else float("nan")


def contrast(sim_maps: torch.Tensor, gt_patch_sets: torch.Tensor) -> float:
    """Mean over regions of (mean cos inside ``S_k``) − (mean cos outside ``S_k``), over
    regions with both an inside and an outside."""
    gt = gt_patch_sets.to(sim_maps.device).bool()
    d = _masked_mean(sim_maps.float(), gt) - _masked_mean(sim_maps.float(), ~gt)
    d = d[~d.isnan()]
    return float(d.mean()) if d.numel() else float("nan")


def alignment_report(vision_tokens: torch.Tensor, label_embs: torch.Tensor,
                     gt_patch_sets: torch.Tensor, region_image_index: torch.Tensor | None = None,
                     threshold: float = 0.5,
                     token_mask: torch.Tensor | None = None) -> dict[str, float]:
    """Align(V, W) over a set of images (method.md §5). Primary metric: ``"miou"``.

    Args:
        vision_tokens: ``(B, N, d)`` projector outputs (or ``(N, d)``, one image).
        label_embs: ``(K, d)`` label embeddings ``t_k``.
        gt_patch_sets: ``(K, N)`` bool ``S_k``.
        region_image_index: ``(K,)`` image of each region (optional for one image).
        threshold: on the min-max-normalised maps.
        token_mask: ``(B, N)`` bool valid tokens, for batches of images padded to a common
            N (Qwen2-VL grids vary); padding is excluded from min/max and from "outside".

    Returns:
        ``{"miou", "in_mask_cos", "out_mask_cos", "contrast", "n_regions"}``.
    """
    x = vision_tokens if vision_tokens.dim() == 3 else vision_tokens.unsqueeze(0)
    k = label_embs.shape[0]
    if region_image_index is None:
        if x.shape[0] != 1:
            raise ValueError("region_image_index (K,) is required for a batch of images")
        region_image_index = torch.zeros(k, dtype=torch.long)
    idx = torch.as_tensor(region_image_index, device=x.device).long()
    x_hat = F.normalize(x.detach().float(), dim=-1)                 # (B, N, d)
    t_hat = F.normalize(label_embs.detach().float().to(x.device), dim=-1)  # (K, d)
    b, n, d = x_hat.shape
    # (B·N, K) products then each region keeps its own image's row: no (K, N, d) gather
    sims = (x_hat.reshape(b * n, d) @ t_hat.T).view(b, n, k)[idx, :, torch.arange(k)]  # (K, N)
    gt = gt_patch_sets.to(x.device).bool()
    if token_mask is not None:
        valid = token_mask.to(x.device).bool()[idx]                 # (K, N)
        # padding takes the map's minimum: it can never be predicted, nor shift the range
        lo = torch.where(valid, sims, torch.full_like(sims, float("inf"))).min(-1, True).values
        sims = torch.where(valid, sims, lo)
        out_mask = ~gt & valid
    else:
        out_mask = ~gt
    ious = patch_ious(sims, gt, threshold)
    ok = ~ious.isnan()
    inside = _masked_mean(sims, gt)
    outside = _masked_mean(sims, out_mask)
    diff = inside - outside

    def _nanmean(v: torch.Tensor) -> float:
        v = v[~v.isnan()]
        return float(v.mean()) if v.numel() else float("nan")

    return {"miou": _nanmean(ious), "in_mask_cos": _nanmean(inside),
            "out_mask_cos": _nanmean(outside), "contrast": _nanmean(diff),
            "n_regions": float(ok.sum())}


# --------------------------------------------------------------------------- MaxSim maps

def grid_coverage(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of each cell of a ``(G_h, G_w)`` grid that each mask covers, cells splitting
    the image evenly (what an encoder that resizes the whole image, without cropping, reads:
    Qwen2-VL's merged tokens on a Scenes image).

    Args:
        masks: ``(K, H, W)`` bool masks at image resolution.
        grid: ``(G_h, G_w)`` token grid (raster order).

    Returns:
        ``(K, G_h·G_w)`` float32 coverage in ``[0, 1]``.
    """
    k, h, w = masks.shape
    gh, gw = grid
    rows = [round(i * h / gh) for i in range(gh + 1)]
    cols = [round(j * w / gw) for j in range(gw + 1)]
    m = masks.float()
    out = torch.zeros(k, gh, gw)
    for i in range(gh):
        for j in range(gw):
            cell = m[:, rows[i]:rows[i + 1], cols[j]:cols[j + 1]]
            out[:, i, j] = cell.mean(dim=(1, 2)) if cell.numel() else 0.0
    return out.reshape(k, gh * gw)


def token_maps(query_tokens: torch.Tensor, doc_tokens: torch.Tensor) -> torch.Tensor:
    """MaxSim's similarity maps: ``(n_q, N)``, query token ``j``'s similarity with each of the
    document's ``N`` tokens (MaxSim takes each row's max). Inputs are unit vectors, so this
    is their cosine."""
    return query_tokens.detach().float() @ doc_tokens.detach().float().T


def pointing_accuracy(sim_maps: torch.Tensor, gt_patch_sets: torch.Tensor) -> float:
    """Fraction of regions (with a non-empty ``S_k``) whose map peaks inside ``S_k``."""
    gt = gt_patch_sets.to(sim_maps.device).bool()
    ok = gt.any(-1)
    if not bool(ok.any()):
        return float("nan")
    hit = gt.gather(1, sim_maps.float().argmax(-1, keepdim=True)).squeeze(1)
    return float(hit[ok].float().mean())


def shuffled_miou(sim_maps: torch.Tensor, gt_patch_sets: torch.Tensor, threshold: float = 0.5,
                  repeats: int = 20, seed: int = 0) -> float:
    """Chance level of :func:`patch_miou`: the same maps with their cells permuted at random
    (each map its own permutation, ``repeats`` draws averaged), so a map's value spread is
    kept and only its placement on the image is lost."""
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(repeats):
        perm = torch.rand(sim_maps.shape, generator=g).argsort(dim=-1)
        vals.append(patch_miou(sim_maps.float().gather(1, perm), gt_patch_sets, threshold))
    return float(sum(vals) / len(vals))
