"""Vector search back-ends: FAISS exact inner product, FAISS HNSW, and an exact torch fallback.

``flat`` is exact maximum-inner-product search (FAISS ``IndexFlatIP`` when FAISS is installed,
the same brute force in torch when it is not); ``hnsw`` is FAISS's approximate
``IndexHNSWFlat`` graph (inner-product metric); ``exact`` forces the torch brute force. On
L2-normalised embeddings inner product is cosine similarity.

"Exact" means the float64 ranking of the stored float32 vectors with ties broken by the lower
index: the float32 search only proposes candidates, which are re-scored in float64 with a
certified pool size (:func:`exact_search`), so FAISS and torch return identical lists.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fam.config import HnswConfig
from fam.errors import ConfigError

log = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "exact")


def faiss_or_none() -> Any:
    """The ``faiss`` module, or None when it is not installed."""
    # FAISS logs at INFO which CPU build it tried to load; that is noise for users.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def topk_float32(embeddings: torch.Tensor, queries: torch.Tensor, k: int,
                 chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force float32 top-k by inner product (candidates for :func:`exact_search`).

    Args:
        embeddings: (n, d) float32 collection.
        queries: (q, d) float32 queries.
        k: results per query (at most n).
        chunk: collection rows scored at once (bounds the (q, chunk) score block).

    Returns:
        scores (q, k) float32 and indices (q, k) int64, best first.
    """
    n = embeddings.shape[0]
    k = min(k, n)
    best_s = torch.full((queries.shape[0], 0), float("-inf"))
    best_i = torch.zeros((queries.shape[0], 0), dtype=torch.long)
    for start in range(0, n, chunk):
        s = queries @ embeddings[start:start + chunk].T
        cand_s = torch.cat([best_s, s], 1)
        cand_i = torch.cat([best_i, torch.arange(start, start + s.shape[1]).expand_as(s)], 1)
        top = torch.topk(cand_s, min(k, cand_s.shape[1]), dim=1)
        best_s, best_i = top.values, cand_i.gather(1, top.indices)
    return best_s, best_i


def rescore(embeddings: torch.Tensor, queries: torch.Tensor, cand: torch.Tensor,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-rank candidates by their float64 inner product; equal scores: lower index first.

    Args:
        embeddings: (n, d) float32 collection.
        queries: (q, d) queries.
        cand: (q, m) candidate indices (-1 = none).

    Returns:
        float64 scores (q, m) and indices (q, m), best first (missing: -inf and -1).
    """
    valid = cand >= 0
    c = cand.clamp(min=0)
    out_s, out_i = [], []
    for r0 in range(0, cand.shape[0], 256):  # bounds the (rows, m, d) float64 gather
        cc, vv = c[r0:r0 + 256], valid[r0:r0 + 256]
        s = torch.einsum("qd,qmd->qm", queries[r0:r0 + 256].double(),
                         embeddings[cc].double()).masked_fill(~vv, float("-inf"))
        # Sort by index, then stably by score: ties keep the lower index first.
        order = torch.argsort(cc.masked_fill(~vv, embeddings.shape[0]), dim=1, stable=True)
        s, cc = s.gather(1, order), cc.gather(1, order)
        top = torch.argsort(s, dim=1, descending=True, stable=True)
        s, cc = s.gather(1, top), cc.gather(1, top)
        out_s.append(s)
        out_i.append(cc.masked_fill(s == float("-inf"), -1))
    return torch.cat(out_s), torch.cat(out_i)


def exact_search(embeddings: torch.Tensor, queries: torch.Tensor, k: int, candidates=None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-k: the float64 inner-product ranking of the stored float32 vectors.

    A float32 search (FAISS or torch) finds ``m`` candidates, which are re-scored in float64.
    Float32 rounding can swap items whose scores differ by less than its error (an
    anisotropic embedding space has many such near-ties), so the pool is certified: every item
    outside it scored at most the pool's lowest float32 score ``t``, hence truly at most
    ``t + err`` with ``err = γ_d·|q|·max|x|`` (γ_d = d·u/(1−d·u), u = 2⁻²⁴, the bound of a
    d-term float32 dot product); if that is not below the float64 k-th score, the pool is
    doubled for that query. The result therefore equals a float64 brute force exactly (ties
    broken by the lower index), whatever did the float32 search.

    Args:
        embeddings: (n, d) float32 collection.
        queries: (q, d) float32 queries.
        k: results per query (capped at n).
        candidates: ``f(queries, m) -> (float32 scores, indices)`` of a float32 top-m search
            (default: :func:`topk_float32`).

    Returns:
        scores (q, k) float32 (rounded from float64) and indices (q, k) int64.
    """
    n, d = embeddings.shape
    k = min(k, n)
    cand_fn = candidates or (lambda qq, m: topk_float32(embeddings, qq, m))
    u = 2.0 ** -24
    gamma = d * u / (1 - d * u)
    err = gamma * queries.double().norm(dim=1) * embeddings.double().norm(dim=1).max()
    out_s = torch.empty(queries.shape[0], k, dtype=torch.float64)
    out_i = torch.empty(queries.shape[0], k, dtype=torch.long)
    rows = torch.arange(queries.shape[0])
    m = min(n, 2 * k + 16)
    while rows.numel():
        s32, cand = cand_fn(queries[rows], m)
        s64, i64 = rescore(embeddings, queries[rows], cand)
        if m >= n:
            done = torch.ones(rows.numel(), dtype=torch.bool)
        else:
            floor = s32[:, -1].double()
            done = floor + err[rows] < s64[:, k - 1]
        out_s[rows[done]], out_i[rows[done]] = s64[done, :k], i64[done, :k]
        rows = rows[~done]
        m = min(n, 2 * m)
    return out_s.float(), out_i


class VectorIndex:
    """A searchable set of vectors.

    Args:
        embeddings: (n, d) float32 vectors (kept: exact search and rebuilding use them).
        kind: ``flat``, ``hnsw`` or ``exact`` (see the module docstring).
        hnsw: HNSW parameters (``kind="hnsw"`` only).
        faiss_index: an already built/loaded FAISS index to use instead of building one.
    """

    def __init__(self, embeddings: torch.Tensor, kind: str = "flat",
                 hnsw: HnswConfig | None = None, faiss_index: Any = None):
        if kind not in KINDS:
            raise ConfigError(f"index kind {kind!r}: choose one of {', '.join(KINDS)}")
        self.embeddings = embeddings.float().contiguous()
        self.kind = kind
        self.hnsw = hnsw or HnswConfig()
        self._faiss = None
        faiss = faiss_or_none()
        if kind == "hnsw" and faiss is None:
            raise ConfigError("an HNSW index needs FAISS, which is not installed: "
                              "pip install 'fam[deploy]' (or faiss-cpu)")
        if kind == "exact" or faiss is None:
            if kind == "flat":
                log.info("FAISS is not installed: exact search in torch (same results)")
            return
        if faiss_index is not None:
            self._faiss = faiss_index
        elif kind == "flat":
            self._faiss = faiss.IndexFlatIP(self.dim)
            self._faiss.add(self._np())
        else:
            self.hnsw.validate("hnsw.")
            idx = faiss.IndexHNSWFlat(self.dim, self.hnsw.m, faiss.METRIC_INNER_PRODUCT)
            idx.hnsw.efConstruction = self.hnsw.ef_construction
            idx.add(self._np())
            self._faiss = idx
        if kind == "hnsw":
            self._faiss.hnsw.efSearch = self.hnsw.ef_search

    def _np(self) -> np.ndarray:
        return np.ascontiguousarray(self.embeddings.numpy(), dtype=np.float32)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def backend(self) -> str:
        """``faiss`` or ``torch`` (what actually answers the searches)."""
        return "faiss" if self._faiss is not None else "torch"

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores (q, k) float32, indices (q, k) int64), best first.

        ``k`` is capped at the collection size. An approximate index may return fewer than
        ``k`` hits for a query; missing places have index -1 and score -inf.
        """
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ConfigError(f"queries of shape {tuple(queries.shape)} do not match the "
                              f"index dimension {self.dim}")
        k = min(int(k), len(self))
        if k < 1:
            raise ConfigError("k must be >= 1")
        q = queries.float().contiguous()
        if self._faiss is None:
            return exact_search(self.embeddings, q, k)
        if self.kind == "flat":
            return exact_search(self.embeddings, q, k, candidates=self._faiss_search)
        # HNSW is approximate: its hits are only re-scored (float64, like the exact kinds).
        _, idx = self._faiss_search(q, k)
        s, i = rescore(self.embeddings, q, idx)
        return s.float(), i

    def candidates(self, queries: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 top-``m`` only (FAISS, or torch without it; HNSW: its graph search),
        without the certified float64 re-ranking: for candidate generation, where an exact
        rescoring decides (the multi-vector index)."""
        m = min(int(m), len(self))
        q = queries.float().contiguous()
        if self._faiss is None:
            return topk_float32(self.embeddings, q, m)
        return self._faiss_search(q, m)

    def _faiss_search(self, q: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores, idx = self._faiss.search(np.ascontiguousarray(q.numpy()), m)
        s, i = torch.from_numpy(scores), torch.from_numpy(idx).long()
        return s.masked_fill(i < 0, float("-inf")), i

    def save_extra(self, out_dir: Path) -> list[str]:
        """Write what cannot be rebuilt instantly from the embeddings (the HNSW graph)."""
        if self.kind == "hnsw":
            faiss = faiss_or_none()
            faiss.write_index(self._faiss, str(out_dir / "index.faiss"))
            return ["index.faiss"]
        return []

    @classmethod
    def load(cls, index_dir: Path, embeddings: torch.Tensor, kind: str,
             hnsw: HnswConfig | None = None) -> "VectorIndex":
        """Rebuild/read the search structure saved by :meth:`save_extra`."""
        if kind == "hnsw":
            faiss = faiss_or_none()
            if faiss is None:
                raise ConfigError(f"{index_dir} is an HNSW index, which needs FAISS: pip install "
                                  "'fam[deploy]' (or faiss-cpu); or rebuild with --kind flat")
            path = index_dir / "index.faiss"
            if not path.is_file():
                raise ConfigError(f"{path} is missing: the index folder is incomplete; rebuild "
                                  "it with fam index build")
            return cls(embeddings, kind, hnsw, faiss_index=faiss.read_index(str(path)))
        return cls(embeddings, kind, hnsw)
