"""Late-interaction (ColBERT/ColPali) scores and loss: pure functions of token vectors.

``MaxSim(q, d) = Σ_{a ∈ q} max_{b ∈ d} ⟨q_a, d_b⟩`` over the *real* tokens of each side
(masks drop padding, special and instruction tokens); ``meanmaxsim`` divides by the query's
real-token count, which puts scores of unit token vectors in ``[-1, 1]`` like a cosine
(sentence-transformers 6's ``"meanmaxsim"``). A document without any real token scores 0.

:func:`maxsim` scores every query against every candidate in chunks of candidates, so the
``(Bq, Nq, Bd, Nd)`` token-similarity tensor never exists for more than one chunk;
:func:`maxsim_reference` is the plain loop it is tested against (values and gradients).
:func:`late_interaction_nce` is InfoNCE (method.md §1) with MaxSim logits: in-batch targets
plus hard negatives, gathered across ranks like :func:`fam.losses.contrastive.info_nce`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fam.distributed import gather_no_grad, gather_tokens_with_grad
from fam.losses.contrastive import nce_from_scores

__all__ = ["maxsim", "maxsim_reference", "late_interaction_nce", "SIMILARITIES",
           "DEFAULT_CHUNK_ELEMENTS"]

#: The late-interaction similarities (sentence-transformers 6's names).
SIMILARITIES = ("maxsim", "meanmaxsim")
#: Elements of one chunk's ``(Bq, Nq, bd, Nd)`` similarity tensor (32M: 128 MB in float32).
DEFAULT_CHUNK_ELEMENTS = 1 << 25


def _check(q: Tensor, q_mask: Tensor, d: Tensor, d_mask: Tensor, similarity: str) -> None:
    if q.dim() != 3 or d.dim() != 3 or q.shape[-1] != d.shape[-1]:
        raise ValueError(f"maxsim: query and documents must be (B, N, D) with the same D; got "
                         f"{tuple(q.shape)} and {tuple(d.shape)}")
    if q_mask.shape != q.shape[:2] or d_mask.shape != d.shape[:2]:
        raise ValueError(f"maxsim: masks must be (B, N) like their tokens; got "
                         f"{tuple(q_mask.shape)} for {tuple(q.shape)} and "
                         f"{tuple(d_mask.shape)} for {tuple(d.shape)}")
    if similarity not in SIMILARITIES:
        raise ValueError(f"maxsim: similarity must be one of {SIMILARITIES}, got {similarity!r}")


def _score_chunk(q: Tensor, q_mask: Tensor, d: Tensor, d_mask: Tensor) -> Tensor:
    """``(Bq, bd)`` MaxSim of every query against one chunk of documents."""
    sim = torch.einsum("qad,kbd->qakb", q, d)  # (Bq, Nq, bd, Nd)
    sim = sim.masked_fill(~d_mask[None, None], float("-inf"))
    best = sim.max(dim=-1).values  # (Bq, Nq, bd)
    has_tokens = d_mask.any(-1)  # (bd,)
    # Padding query tokens add 0; a document without tokens scores 0 (not -inf).
    keep = q_mask[:, :, None] & has_tokens[None, None]
    best = torch.where(keep, best, torch.zeros((), dtype=best.dtype, device=best.device))
    return best.sum(1)


def maxsim(q: Tensor, q_mask: Tensor, d: Tensor, d_mask: Tensor, *,
           similarity: str = "maxsim", chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tensor:
    """MaxSim of every query against every document, chunked over documents.

    Args:
        q: ``(Bq, Nq, D)`` query token vectors.
        q_mask: ``(Bq, Nq)`` bool, the query's real tokens.
        d: ``(Bd, Nd, D)`` document token vectors.
        d_mask: ``(Bd, Nd)`` bool, the documents' real tokens.
        similarity: ``"maxsim"`` (sum over query tokens) or ``"meanmaxsim"`` (divided by the
            query's real-token count; a query without tokens scores 0).
        chunk_elements: bound on the elements of one chunk's similarity tensor (at least one
            document per chunk).

    Returns:
        ``(Bq, Bd)`` scores in the inputs' dtype (half precision is upcast to float32),
        differentiable with respect to ``q`` and ``d``.
    """
    _check(q, q_mask, d, d_mask, similarity)
    if q.dtype in (torch.float16, torch.bfloat16):
        q, d = q.float(), d.float()
    q_mask, d_mask = q_mask.bool(), d_mask.bool()
    per_doc = max(q.shape[0] * q.shape[1] * d.shape[1], 1)
    step = max(chunk_elements // per_doc, 1)
    parts = [_score_chunk(q, q_mask, d[s:s + step], d_mask[s:s + step])
             for s in range(0, d.shape[0], step)]
    scores = torch.cat(parts, dim=1) if parts else q.new_zeros((q.shape[0], 0))
    if similarity == "meanmaxsim":
        scores = scores / q_mask.sum(1, keepdim=True).clamp(min=1).to(scores.dtype)
    return scores


def maxsim_reference(q: Tensor, q_mask: Tensor, d: Tensor, d_mask: Tensor, *,
                     similarity: str = "maxsim") -> Tensor:
    """The plain loop :func:`maxsim` is tested against (one pair, one token at a time)."""
    _check(q, q_mask, d, d_mask, similarity)
    rows = []
    for i in range(q.shape[0]):
        row = []
        for j in range(d.shape[0]):
            doc = [d[j, b] for b in range(d.shape[1]) if bool(d_mask[j, b])]
            total = q.new_zeros(())
            count = 0
            for a in range(q.shape[1]):
                if not bool(q_mask[i, a]):
                    continue
                count += 1
                if doc:
                    total = total + torch.stack([torch.dot(q[i, a], t) for t in doc]).max()
            if similarity == "meanmaxsim":
                total = total / max(count, 1)
            row.append(total)
        rows.append(torch.stack(row) if row else q.new_zeros(0))
    return torch.stack(rows)


def late_interaction_nce(query: Tensor, query_mask: Tensor, target: Tensor, target_mask: Tensor,
                         temperature: float = 0.02, hard_negatives: Tensor | None = None,
                         negatives_mask: Tensor | None = None,
                         hard_negative_rows: Tensor | None = None, *, similarity: str = "meanmaxsim",
                         gather: bool = True, target_ids: Tensor | None = None,
                         negative_ids: Tensor | None = None) -> dict[str, Tensor]:
    """InfoNCE with MaxSim logits: ``CE(MaxSim(q, [t ; n]) / τ, arange(B))``.

    The columns are the batch's targets then one hard negative per row (row ``i``'s in slot
    ``i``), exactly as :func:`fam.losses.contrastive.info_nce` lays them out; a missing
    negative's column is ``-inf``; identical items (equal ids) are not negatives. Token vectors
    are used as given (the model L2-normalises each token). Under DDP the token tensors are
    padded to a common length and gathered with gradient, so the gradient after DDP's average
    equals one process on the global batch.

    Args:
        query, target: ``(B, Nq, D)``, ``(B, Nt, D)`` token vectors (row-aligned).
        query_mask, target_mask: their real tokens, ``(B, Nq)``, ``(B, Nt)`` bool.
        temperature: τ (scores of ``meanmaxsim`` lie in ``[-1, 1]`` like cosines).
        hard_negatives: ``(B, Nn, D)`` token vectors of one negative per row (rows without one:
            any content), with ``negatives_mask`` ``(B, Nn)`` its real tokens.
        hard_negative_rows: ``(B,)`` bool, the rows that have a negative (None: all).
        similarity: ``"maxsim"`` or ``"meanmaxsim"``.
        gather: gather across ranks when distributed.
        target_ids, negative_ids: ``(B,)`` content ids (see ``info_nce``).

    Returns:
        ``{"loss", "accuracy"}`` as :func:`fam.losses.contrastive.info_nce`.
    """
    if temperature <= 0:
        raise ValueError(f"late_interaction_nce: temperature must be > 0, got {temperature}")
    b = query.shape[0]
    if target.shape[0] != b:
        raise ValueError(f"late_interaction_nce: {b} queries but {target.shape[0]} targets")
    qm, tm = query_mask.bool(), target_mask.bool()
    neg = nm = row_ok = None
    if hard_negatives is not None:
        if negatives_mask is None or hard_negatives.shape[0] != b:
            raise ValueError("late_interaction_nce: hard_negatives must be (B, Nn, D) with "
                             "their negatives_mask (B, Nn)")
        neg, nm = hard_negatives, negatives_mask.bool()
        row_ok = (torch.ones(b, dtype=torch.bool, device=query.device)
                  if hard_negative_rows is None else hard_negative_rows.bool())
    col_ids = None
    if target_ids is not None:
        col_ids = target_ids.long()
        if neg is not None:
            if negative_ids is None:
                raise ValueError("late_interaction_nce: target_ids with hard negatives needs "
                                 "negative_ids")
            col_ids = torch.cat([col_ids, negative_ids.long().reshape(b)])
    if gather:
        query, qm = gather_tokens_with_grad(query, qm)
        target, tm = gather_tokens_with_grad(target, tm)
        if neg is not None:
            neg, nm = gather_tokens_with_grad(neg, nm)
            row_ok = gather_no_grad(row_ok)
        if col_ids is not None:
            tid = gather_no_grad(col_ids[:b])
            col_ids = tid if neg is None else torch.cat([tid, gather_no_grad(col_ids[b:])])
    scores = maxsim(query, qm, target, tm, similarity=similarity)
    if neg is not None:
        scores = torch.cat([scores, maxsim(query, qm, neg, nm, similarity=similarity)], dim=1)
    return nce_from_scores(scores / temperature, row_ok, col_ids)
