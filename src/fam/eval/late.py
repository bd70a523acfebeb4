"""Late-interaction scoring for the MMEB protocol (``fam eval --scoring maxsim|hybrid``).

``single`` is :mod:`fam.eval.mmeb`'s cosine of pooled vectors. The other two read each item
twice from the same forward (pooled vector and token vectors, :mod:`fam.model.multivector`):

- ``maxsim``: every candidate of a row scored by MaxSim of the query's token vectors against
  the candidate's (:func:`fam.losses.maxsim.maxsim`, the encoder's similarity);
- ``hybrid``: the pooled cosine picks each row's top ``rerank_k`` candidates, MaxSim reorders
  them; the others rank below (score -inf). With ``rerank_k`` ≥ the candidate count this is
  ``maxsim``.

The encoder needs ``encode_multi_all(items, batch_size=, progress=, desc=) -> (pooled (n, d),
[tokens (n_i, D), ...])`` (:class:`fam.model.multivector.TwoReadings`).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from fam.data.types import MMItem
from fam.errors import ConfigError, DataError
from fam.losses.maxsim import maxsim

__all__ = ["SCORINGS", "encode_both", "row_scores", "DEFAULT_RERANK_K"]

SCORINGS = ("single", "maxsim", "hybrid")
DEFAULT_RERANK_K = 10
#: Rows scored together (their distinct candidates' tokens are padded once per block).
_ROW_BLOCK = 64


def check_scoring(scoring: str, encoder: Any, rerank_k: int) -> None:
    """Refuse an unknown scoring, a late scoring without token vectors, or ``rerank_k < 1``."""
    if scoring not in SCORINGS:
        raise ConfigError(f"scoring={scoring!r}: choose one of {SCORINGS}", key="scoring")
    if scoring != "single" and not callable(getattr(encoder, "encode_multi_all", None)):
        raise ConfigError(f"scoring={scoring!r} needs token vectors: pass an encoder with "
                          "encode_multi_all (fam.model.multivector.TwoReadings)", key="scoring")
    if rerank_k < 1:
        raise ConfigError(f"rerank_k={rerank_k}: must be >= 1", key="rerank_k")


def encode_both(encoder: Any, items: Sequence[MMItem], batch_size: int, progress: bool,
                desc: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Unit pooled vectors (U, d) and token vectors of ``items``, float32 on the CPU."""
    pooled, tokens = encoder.encode_multi_all(list(items), batch_size=batch_size,
                                              progress=progress, desc=desc)
    pooled = pooled.detach().float().cpu()
    tokens = [t.detach().float().cpu() for t in tokens]
    bad = [i for i, t in enumerate(tokens) if not torch.isfinite(t).all()]
    if bad or not torch.isfinite(pooled).all():
        it = items[bad[0]] if bad else items[0]
        raise DataError(f"the model produced non-finite vectors (first: {it.source}, line "
                        f"{it.line}); its weights or inputs are broken")
    return F.normalize(pooled, dim=-1), tokens


def _padded(tokens: list[torch.Tensor], idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max([len(tokens[i]) for i in idx] + [1])
    d = tokens[idx[0]].shape[-1]
    x = torch.zeros(len(idx), n, d)
    m = torch.zeros(len(idx), n, dtype=torch.bool)
    for r, i in enumerate(idx):
        x[r, :len(tokens[i])] = tokens[i]
        m[r, :len(tokens[i])] = True
    return x, m


def row_scores(pooled: torch.Tensor, tokens: list[torch.Tensor], q_idx: torch.Tensor,
               c_idx: torch.Tensor, scoring: str, rerank_k: int = DEFAULT_RERANK_K,
               similarity: str = "maxsim") -> torch.Tensor:
    """``(R, C)`` scores of each row's candidates (``c_idx`` indexes ``pooled``/``tokens``).

    MaxSim is computed only where it is used: every candidate (``maxsim``) or each row's
    pooled top ``rerank_k`` (``hybrid``).
    """
    cos = torch.einsum("rd,rcd->rc", pooled[q_idx], pooled[c_idx])
    if scoring == "single":
        return cos
    r, c = c_idx.shape
    if scoring == "hybrid":
        top = cos.topk(min(rerank_k, c), dim=1).indices  # (R, k)
    else:
        top = torch.arange(c).expand(r, c)
    out = torch.full((r, c), float("-inf"))
    for s in range(0, r, _ROW_BLOCK):
        rows = range(s, min(s + _ROW_BLOCK, r))
        wanted = c_idx[s:s + _ROW_BLOCK].gather(1, top[s:s + _ROW_BLOCK])  # (b, k) item ids
        uniq, inv = torch.unique(wanted, return_inverse=True)
        q, qm = _padded(tokens, [int(q_idx[i]) for i in rows])
        d, dm = _padded(tokens, uniq.tolist())
        sc = maxsim(q, qm, d, dm, similarity=similarity)  # (b, u)
        out[s:s + _ROW_BLOCK].scatter_(1, top[s:s + _ROW_BLOCK], sc.gather(1, inv))
    return out
