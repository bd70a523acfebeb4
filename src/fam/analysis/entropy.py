"""Matrix entropy of token sequences: how much a projector compresses (method.md §5).

For one sequence ``Z ∈ R^{N×d}`` with L2-normalised rows ``ẑ_i``:

    K = Ẑ Ẑᵀ / N          (N×N, PSD, trace 1)
    H(Z) = −Σ_j λ_j ln λ_j over the eigenvalues λ_j of K (0 ln 0 = 0)

``H`` ranges from 0 (all rows parallel) to ``ln min(N, d)`` (rows orthonormal) and is the
von Neumann entropy of the token "density matrix". ``ΔH = H(before projector) −
H(after projector)``; positive ΔH = the projector compresses.

**[choice]** This definition is *reconstructed*: the paper (arXiv 2505.17316) reports
values (≈4.8 for CLIP patches, 2.0–3.6 for text, ΔH 2.80 for LLaVA vs 3.84 patch-aligned)
but the seed material does not spell out its formula. Natural log, row normalisation and
the 1/N trace normalisation are our choices; values are comparable across our runs, not
necessarily to the paper's numbers.

Computation: ``K`` and the d×d Gram ``ẐᵀẐ/N`` share their non-zero spectrum, so we
eigen-decompose the smaller of the two, in float64 (``eigvalsh``; tiny negative
eigenvalues from round-off are clipped to 0).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

ArrayLike = torch.Tensor | np.ndarray


def _to64(z: ArrayLike) -> torch.Tensor:
    if isinstance(z, np.ndarray):
        return torch.from_numpy(np.asarray(z, dtype=np.float64))
    return z.detach().to(torch.float64)


def matrix_entropy(z: ArrayLike, eps: float = 1e-12, center: bool = False) -> float:
    """Matrix (von Neumann) entropy of one token sequence (method.md §5, reconstructed).

    Args:
        z: ``(N, d)`` token embeddings (torch or numpy, any float dtype).
        eps: rows with norm ≤ eps are dropped (they have no direction), with a warning.
        center: subtract the mean token before normalising the rows, as the reference
            implementation of matrix entropy does (Diff-eRank, Wei et al. 2024; the
            patch-aligned paper's own formula is not in the seed material): a component
            shared by every token (a bias, the flat background of a synthetic image) then
            no longer makes the rows look parallel. ``False`` keeps the method.md §5
            reconstruction (no centring). Centring removes one dimension: ``H ≤ ln
            min(N − 1, d)``.

    Returns:
        ``H`` in nats, in ``[0, ln min(N, d)]``; invariant to per-row scaling.
    """
    z = _to64(z)
    if z.dim() != 2:
        raise ValueError(f"matrix_entropy expects (N, d), got shape {tuple(z.shape)}")
    if center:
        z = z - z.mean(dim=0, keepdim=True)
    norms = z.norm(dim=1)
    keep = norms > eps
    if not bool(keep.all()):
        logger.warning("matrix_entropy: dropping %d zero row(s) of %d", int((~keep).sum()),
                       z.shape[0])
        z, norms = z[keep], norms[keep]
    n, d = z.shape
    if n == 0:
        raise ValueError("matrix_entropy: no non-zero rows")
    zh = z / norms.unsqueeze(1)
    # same non-zero eigenvalues; decompose the smaller matrix (N = 576 > d is rare for
    # LLM widths, but N ≫ d happens for small test models and high-res Qwen2-VL images)
    k = (zh.T @ zh) / n if n > d else (zh @ zh.T) / n
    lam = torch.linalg.eigvalsh(k).clamp_min(0.0)
    lam = lam[lam > 0]
    return float(-(lam * lam.log()).sum())


def delta_entropy(before: ArrayLike, after: ArrayLike) -> float:
    """``ΔH = H(before) − H(after)`` for one image's tokens before/after the projector.

    Args:
        before: ``(N, d_v)`` vision-encoder tokens.
        after: ``(N, d)`` projector outputs (same tokens).
    """
    return matrix_entropy(before) - matrix_entropy(after)


def mean_matrix_entropy(seqs: ArrayLike | Sequence[ArrayLike],
                        mask: ArrayLike | None = None) -> float:
    """Average of :func:`matrix_entropy` over sequences (images or captions).

    Args:
        seqs: ``(B, N, d)`` batch, or a list of ``(N_i, d)`` sequences of varying length.
        mask: ``(B, N)`` bool, valid tokens (e.g. text without padding); only with a batch.

    Returns:
        Mean entropy in nats over the sequences with ≥ 1 valid token.
    """
    if isinstance(seqs, (torch.Tensor, np.ndarray)) and seqs.ndim == 2:
        seqs = [seqs]
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask),
                            dtype=torch.bool)
        if len(m) != len(seqs):
            raise ValueError(f"mask has {len(m)} rows for {len(seqs)} sequences")
        seqs = [_to64(s)[mm.to(_to64(s).device)] for s, mm in zip(seqs, m)]
    values = [matrix_entropy(s) for s in seqs if s.shape[0] > 0]
    if not values:
        raise ValueError("mean_matrix_entropy: no sequence with tokens")
    return float(np.mean(values))


def entropy_report(before: ArrayLike | Sequence[ArrayLike],
                   after: ArrayLike | Sequence[ArrayLike],
                   text: ArrayLike | Sequence[ArrayLike] | None = None,
                   text_mask: ArrayLike | None = None) -> dict[str, float]:
    """Compression summary over a set of images (method.md §5).

    Args:
        before: ``(B, N, d_v)`` or list of ``(N_i, d_v)``: tokens before the projector.
        after: the same images' projector outputs ``(B, N, d)`` or list.
        text: optional text token embeddings (e.g. the captions' input embeddings).
        text_mask: ``(B, T)`` valid text tokens.

    Returns:
        ``{"H_before", "H_after", "delta_H"[, "H_text"]}`` means in nats; ``delta_H`` is the
        mean of per-image differences (= difference of means).
    """
    out = {"H_before": mean_matrix_entropy(before), "H_after": mean_matrix_entropy(after)}
    out["delta_H"] = out["H_before"] - out["H_after"]
    if text is not None:
        out["H_text"] = mean_matrix_entropy(text, text_mask)
    return out
