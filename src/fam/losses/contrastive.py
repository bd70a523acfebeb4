"""Row-wise InfoNCE with in-batch and explicit hard negatives (method.md §1).

VLM2Vec trains its embedding model with ``CE(q·tᵀ/τ, arange(B))`` on L2-normalised EOS
embeddings, τ = 0.02. VLM2Vec loads ``neg_*`` fields but never uses them; here each
query's explicit hard negative becomes an extra column of the score matrix for **all**
queries (so the negatives of other rows act as extra in-batch negatives too).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from fam.distributed import gather_no_grad, gather_with_grad

logger = logging.getLogger(__name__)

__all__ = ["info_nce", "nce_from_scores", "normalize_for_scores", "embedding_geometry"]


def normalize_for_scores(x: Tensor) -> Tensor:
    """L2-normalise the last dim, upcasting half precision to float32.

    Scores are divided by τ = 0.02 (up to ±50) and fed to a softmax; bf16's 8-bit mantissa
    would quantise them to steps of ~0.25, so the (small, ``(B, d)``) score inputs are
    computed in float32.

    Args:
        x: ``(..., d)`` tensor.

    Returns:
        ``(..., d)`` unit vectors, float32 if ``x`` was float16/bfloat16.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return F.normalize(x, dim=-1)


def info_nce(
    query: Tensor,
    target: Tensor,
    temperature: float = 0.02,
    hard_negatives: Tensor | None = None,
    hard_negative_mask: Tensor | None = None,
    gather: bool = True,
    target_ids: Tensor | None = None,
    negative_ids: Tensor | None = None,
) -> dict[str, Tensor]:
    """Row-wise InfoNCE of queries against in-batch targets and hard negatives.

    ``scores = q̂ · [t̂ ; n̂]ᵀ / τ`` of shape ``(B, B + B·K)`` and
    ``loss = CE(scores, arange(B))``: the positive of query ``i`` is target ``i``
    (method.md §1). Inputs are L2-normalised **inside** (normalising unit vectors again is a
    no-op, so callers may pass either).

    Hard negatives: row ``i``'s explicit negatives are appended as columns for every
    query. Negatives of rows where ``hard_negative_mask`` is False are filled with -inf
    (not dropped) so shapes stay static under DDP/compilation; their content is ignored
    (zeros are fine) and receives no gradient.

    Under DDP (``gather=True`` and a process group initialised) queries, targets and
    negatives are gathered with :func:`fam.distributed.gather_with_grad`, every rank
    computes the loss over the *global* batch, and after DDP's gradient average the
    gradient equals the single-process gradient on the concatenated batch (see
    :mod:`fam.distributed`). All ranks must pass hard negatives, or none.

    Args:
        query: ``(B, d)`` query embeddings.
        target: ``(B, d)`` positive target embeddings (row-aligned with ``query``).
        temperature: τ; 0.02 is the VLM2Vec/FAM default.
        hard_negatives: ``(B, d)`` one negative per query, or ``(B, K, d)`` K per query.
        hard_negative_mask: ``(B,)`` or ``(B, K)`` bool, True where the negative exists.
            None means all exist.
        gather: gather across ranks when distributed (no effect otherwise).
        target_ids: ``(B,)`` int64 content identifiers of the targets (equal id = identical
            item, e.g. a hash of text and image path). When given, a column holding an item
            identical to row ``i``'s positive (another row's target, or a hard negative) is
            not a negative for row ``i`` and is masked out: with small label spaces (class
            names, counts, colours) a batch holds many duplicates, and treating them as
            negatives makes the loss fight itself (VLM2Vec does). ``None``: no masking.
        negative_ids: ``(B,)`` or ``(B, K)`` ids of the hard negatives (same scheme).

    Returns:
        dict with ``loss`` (scalar, mean over global rows) and ``accuracy`` (scalar,
        detached: fraction of rows whose positive has the strictly highest score; ties
        count as wrong).

    Example:
        >>> q, t = torch.randn(4, 8), torch.randn(4, 8)
        >>> out = info_nce(q, t)
        >>> out["loss"].shape
        torch.Size([])
    """
    if query.dim() != 2 or target.shape != query.shape:
        raise ValueError(f"info_nce: query and target must both be (B, d); got "
                         f"{tuple(query.shape)} and {tuple(target.shape)}.")
    if temperature <= 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}.")
    if hard_negatives is None and hard_negative_mask is not None:
        raise ValueError("info_nce: hard_negative_mask given without hard_negatives.")

    b, d = query.shape
    q = normalize_for_scores(query)
    t = normalize_for_scores(target)
    neg = None
    neg_mask = None
    if hard_negatives is not None:
        if hard_negatives.dim() == 2:
            hard_negatives = hard_negatives.unsqueeze(1)  # (B, 1, d)
        if hard_negatives.dim() != 3 or hard_negatives.shape[0] != b or hard_negatives.shape[2] != d:
            raise ValueError(f"info_nce: hard_negatives must be (B, d) or (B, K, d) with "
                             f"B={b}, d={d}; got {tuple(hard_negatives.shape)}.")
        k = hard_negatives.shape[1]
        if hard_negative_mask is None:
            neg_mask = torch.ones(b, k, dtype=torch.bool, device=query.device)
        else:
            neg_mask = hard_negative_mask.to(device=query.device, dtype=torch.bool).reshape(b, -1)
            if neg_mask.shape[1] != k:
                raise ValueError(f"info_nce: hard_negative_mask must be (B,) or (B, K) "
                                 f"matching hard_negatives; got {tuple(hard_negative_mask.shape)}"
                                 f" for negatives {tuple(hard_negatives.shape)}.")
        neg = normalize_for_scores(hard_negatives).reshape(b * k, d)  # (B·K, d), row-major
        neg_mask = neg_mask.reshape(b * k)

    col_ids = None
    if target_ids is not None:
        target_ids = target_ids.to(device=query.device, dtype=torch.long).reshape(b)
        col_ids = target_ids
        if neg is not None:
            if negative_ids is None:
                raise ValueError("info_nce: target_ids given with hard negatives but no "
                                 "negative_ids; pass both or neither.")
            col_ids = torch.cat([target_ids, negative_ids.to(device=query.device,
                                                              dtype=torch.long).reshape(-1)])

    if gather:
        q, t = gather_with_grad(q), gather_with_grad(t)
        if neg is not None:
            neg, neg_mask = gather_with_grad(neg), gather_no_grad(neg_mask)
        if col_ids is not None:
            tid = gather_no_grad(col_ids[:b])
            col_ids = tid if neg is None else torch.cat([tid, gather_no_grad(col_ids[b:])])

    cols = t if neg is None else torch.cat([t, neg], dim=0)  # (Bg [+ Bg·K], d)
    return nce_from_scores(q @ cols.T / temperature, neg_mask, col_ids)


def nce_from_scores(scores: Tensor, negative_valid: Tensor | None = None,
                    col_ids: Tensor | None = None) -> dict[str, Tensor]:
    """Row-wise cross-entropy of a score matrix whose positive of row ``i`` is column ``i``.

    The one place the InfoNCE bookkeeping lives, whatever made the scores (dot products in
    :func:`info_nce`, MaxSim in :func:`fam.losses.maxsim.late_interaction_nce`).

    Args:
        scores: ``(B, B + M)`` logits (already divided by τ): targets, then ``M`` negatives.
        negative_valid: ``(M,)`` bool, the negative columns that exist (others: -inf).
        col_ids: ``(B + M,)`` content ids of the columns: a column identical to row ``i``'s
            positive, other than the positive, is not a negative (-inf).

    Returns:
        ``{"loss": mean CE, "accuracy": fraction of rows whose positive strictly wins}``.
    """
    b = scores.shape[0]
    if negative_valid is not None:
        col_valid = torch.cat([torch.ones(b, dtype=torch.bool, device=scores.device),
                               negative_valid.to(scores.device).bool()])
        scores = scores.masked_fill(~col_valid, float("-inf"))
    labels = torch.arange(b, device=scores.device)
    if col_ids is not None:
        # False negatives: columns identical to the row's positive, other than the positive.
        dup = col_ids[None, :] == col_ids[:b, None]  # (B, C)
        dup[labels, labels] = False
        scores = scores.masked_fill(dup, float("-inf"))
    loss = F.cross_entropy(scores, labels)
    with torch.no_grad():
        pos = scores.gather(1, labels[:, None])
        others = scores.scatter(1, labels[:, None], float("-inf"))
        accuracy = (pos.squeeze(1) > others.max(dim=1).values).float().mean()
    return {"loss": loss, "accuracy": accuracy}


def _mean_off_diagonal(sim: Tensor) -> Tensor:
    n = sim.shape[0]
    return (sim.sum() - sim.diagonal().sum()) / max(n * (n - 1), 1)


def effective_rank(x: Tensor) -> Tensor:
    """``exp(entropy)`` of the normalised squared singular values of the centred rows:
    1 when every row lies on one line, ``min(n, d)`` when the batch fills its span evenly
    (Roy & Vetterli 2007). A dimensional-collapse gauge for a ``(n, d)`` batch."""
    x = x.float() - x.float().mean(0, keepdim=True)
    s2 = torch.linalg.svdvals(x) ** 2
    p = s2 / s2.sum().clamp_min(1e-12)
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum())


@torch.no_grad()
def embedding_geometry(query: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Cheap, detached gauges of a batch's embedding geometry (training curves).

    On L2-normalised rows: ``pos_cos`` (mean cosine of each query and its target),
    ``neg_cos`` (mean cosine of a query and the other rows' targets), ``q_anisotropy`` /
    ``t_anisotropy`` (mean cosine between distinct queries / targets: near 1 when the
    embeddings crowd into a narrow cone) and ``q_eff_rank`` (:func:`effective_rank` of the
    queries). Local to the caller's rows (no gathering under DDP).

    Example:
        >>> g = embedding_geometry(torch.eye(3), torch.eye(3))
        >>> float(g["pos_cos"]), float(g["neg_cos"]), float(g["q_anisotropy"])
        (1.0, 0.0, 0.0)
    """
    q, t = normalize_for_scores(query.detach()), normalize_for_scores(target.detach())
    qt = q @ t.T
    return {"pos_cos": qt.diagonal().mean(), "neg_cos": _mean_off_diagonal(qt),
            "q_anisotropy": _mean_off_diagonal(q @ q.T),
            "t_anisotropy": _mean_off_diagonal(t @ t.T), "q_eff_rank": effective_rank(q)}
