"""The C-Abstractor projector type of the projector stage: regions on its pooled grid.

The module itself (:class:`fam.backbones.cabstractor.CAbstractor`) lives with the
backbones, which rebuild it when a checkpoint that carries it is loaded. What the
projector unit adds is how an annotated region maps onto the abstractor's output tokens:
its patch coverage is pooled with the same adaptive average pooling as the features
(:func:`pool_coverage`), then thresholded on the pooled grid.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fam.backbones.cabstractor import CAbstractor, LayerNorm2d, ResBlock2d

__all__ = ["CAbstractor", "LayerNorm2d", "ResBlock2d", "pool_coverage", "pool_tokens"]


def pool_coverage(coverage: np.ndarray | torch.Tensor, grid: Sequence[int],
                  pooled: Sequence[int]) -> np.ndarray:
    """Pool region coverage maps onto the abstractor's output grid, exactly as the features.

    Args:
        coverage: ``(K, G_h·G_w)`` (raster) or ``(K, G_h, G_w)`` coverage ``c_k ∈ [0, 1]``.
        grid: ``(G_h, G_w)``.
        pooled: ``(g_h, g_w)``.

    Returns:
        ``(K, g_h·g_w)`` float32 pooled coverage (raster); threshold it with
        :func:`fam.projector.geometry.select_patches` to get ``S_k`` on the pooled grid.
    """
    c = torch.as_tensor(np.asarray(coverage, dtype=np.float32))
    gh, gw = (int(v) for v in grid)
    k = c.shape[0]
    if c.numel() != k * gh * gw:
        raise ValueError(f"coverage shape {tuple(c.shape)} does not hold {k} maps of {gh}x{gw}")
    out = F.adaptive_avg_pool2d(c.reshape(k, 1, gh, gw), tuple(int(v) for v in pooled))
    return out.reshape(k, -1).numpy()


def pool_tokens(tokens: torch.Tensor, grid: Sequence[int], pooled: Sequence[int]) -> torch.Tensor:
    """``(B, G_h·G_w, d)`` raster tokens average-pooled to ``(B, g_h·g_w, d)`` with the
    abstractor's pooling operator (the "before" features on the projector's output grid)."""
    b, n, d = tokens.shape
    gh, gw = (int(v) for v in grid)
    if n != gh * gw:
        raise ValueError(f"{n} tokens are not a {gh}x{gw} grid")
    x = tokens.transpose(1, 2).reshape(b, d, gh, gw)
    return F.adaptive_avg_pool2d(x, tuple(int(v) for v in pooled)).flatten(2).transpose(1, 2)
