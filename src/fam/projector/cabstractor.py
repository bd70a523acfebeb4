"""A C-Abstractor-style projector: a convolutional abstractor that pools the patch grid.

Honeybee (Cha et al., CVPR 2024) replaces LLaVA's per-token MLP by a *locality-enhanced*
projector that also reduces the number of visual tokens:

    x (B, N, d_v) + pos_emb → grid (B, d_v, G_h, G_w)
      → depth residual conv blocks (d_v → h)        locality: 3×3 convolutions
      → adaptive average pooling to (g_h, g_w)      abstraction: N → n = g_h·g_w tokens
      → depth residual conv blocks (h → h)
      → flatten (raster order) → readout MLP (h → d, ``mlp_depth`` layers, SiLU)

Honeybee builds its blocks from timm's RegNet stage (bottleneck blocks with LayerNorm2d
and SiLU); this module writes the same bottleneck block in plain PyTorch (no timm here):
1×1 conv → LN → SiLU → 3×3 conv → LN → SiLU → 1×1 conv → LN, plus a (projected) skip,
then SiLU. Honeybee's squeeze-excitation inside each block is left out: at these widths
it adds parameters without changing what is measured (locality and pooling).

**Regions on the pooled grid.** The pooled token ``j`` is the mean of the ``k_h×k_w`` grid
cells that adaptive average pooling assigns to it, so a region's coverage is pooled the
same way (:func:`pool_coverage`: the identical ``adaptive_avg_pool2d`` on the coverage
map) and ``S_k`` is then thresholded on the pooled grid (θ, arg-max fallback, method.md §4).
When ``G`` is a multiple of ``g`` each pooled cell is exactly a ``G/g × G/g`` block.

Example:
    >>> proj = CAbstractor(in_dim=32, out_dim=64, grid=(16, 16), pooled=(8, 8))
    >>> proj(torch.randn(2, 256, 32)).shape
    torch.Size([2, 64, 64])
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CAbstractor", "LayerNorm2d", "ResBlock2d", "pool_coverage"]


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``(B, C, H, W)`` map, at every position."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResBlock2d(nn.Module):
    """Bottleneck residual block (RegNet-style, stride 1): 1×1 → 3×3 → 1×1 convolutions,
    each followed by LayerNorm2d (SiLU after the first two), a 1×1-projected skip when the
    width changes, SiLU after the sum.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        bottleneck: width of the 3×3 convolution (default ``out_ch``: RegNet's ratio 1).
    """

    def __init__(self, in_ch: int, out_ch: int, bottleneck: int | None = None):
        super().__init__()
        mid = bottleneck or out_ch
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, mid, 1, bias=False), LayerNorm2d(mid), nn.SiLU(),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), LayerNorm2d(mid), nn.SiLU(),
            nn.Conv2d(mid, out_ch, 1, bias=False), LayerNorm2d(out_ch))
        self.skip = (nn.Identity() if in_ch == out_ch else
                     nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), LayerNorm2d(out_ch)))
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class CAbstractor(nn.Module):
    """Convolutional abstractor projector (module docstring).

    Args:
        in_dim: vision feature width ``d_v``.
        out_dim: LLM embedding width ``d``.
        grid: ``(G_h, G_w)`` of the incoming patch tokens (raster order).
        pooled: ``(g_h, g_w)`` of the output tokens; ``g ≤ G`` on both axes.
        hidden: width of the conv stages (default ``out_dim``, as Honeybee).
        depth: residual blocks before and after the pooling (Honeybee: 3).
        mlp_depth: readout MLP layers (Honeybee: 2).
    """

    def __init__(self, in_dim: int, out_dim: int, grid: Sequence[int], pooled: Sequence[int],
                 hidden: int | None = None, depth: int = 2, mlp_depth: int = 2):
        super().__init__()
        gh, gw = (int(v) for v in grid)
        ph, pw = (int(v) for v in pooled)
        if min(gh, gw, ph, pw) < 1 or ph > gh or pw > gw:
            raise ValueError(f"pooled grid {(ph, pw)} must be 1..{(gh, gw)} (the input grid)")
        if depth < 0 or mlp_depth < 1:
            raise ValueError(f"depth={depth} must be >= 0 and mlp_depth={mlp_depth} >= 1")
        hidden = hidden or out_dim
        self.grid = (gh, gw)
        self.pooled = (ph, pw)
        self.pos_emb = nn.Parameter(torch.zeros(1, gh * gw, in_dim))
        nn.init.trunc_normal_(self.pos_emb, std=0.02)
        blocks1 = [ResBlock2d(in_dim if i == 0 else hidden, hidden) for i in range(depth)]
        blocks2 = [ResBlock2d(hidden, hidden) for _ in range(depth)]
        self.stage1 = nn.Sequential(*blocks1)
        self.pool = nn.AdaptiveAvgPool2d((ph, pw))
        self.stage2 = nn.Sequential(*blocks2)
        width = hidden if depth else in_dim
        layers: list[nn.Module] = [nn.Linear(width, out_dim)]
        for _ in range(1, mlp_depth):
            layers += [nn.SiLU(), nn.Linear(out_dim, out_dim)]
        self.readout = nn.Sequential(*layers)

    @property
    def num_tokens(self) -> int:
        """Output tokens per image, ``g_h · g_w``."""
        return self.pooled[0] * self.pooled[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, d_v)`` patch features (raster order, ``N = G_h·G_w``) → ``(B, n, d)``."""
        b, n, d = x.shape
        gh, gw = self.grid
        if n != gh * gw:
            raise ValueError(f"CAbstractor expects {gh}x{gw} = {gh * gw} patch tokens, got {n}")
        x = x + self.pos_emb.to(x.dtype)
        x = x.transpose(1, 2).reshape(b, d, gh, gw)
        x = self.stage2(self.pool(self.stage1(x)))
        x = x.flatten(2).transpose(1, 2)                              # (B, n, h), raster
        return self.readout(x)


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
