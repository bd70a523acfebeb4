"""Vector search back-ends: FAISS exact inner product, FAISS HNSW, and an exact torch fallback.

``flat`` is exact maximum-inner-product search (FAISS ``IndexFlatIP`` when FAISS is installed,
the same brute force in torch when it is not); ``hnsw`` is FAISS's approximate
``IndexHNSWFlat`` graph (inner-product metric); ``exact`` forces the torch brute force (the
reference the others are checked against). On L2-normalised embeddings inner product is cosine
similarity.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


@dataclass
class HnswParams:
    """HNSW graph parameters (FAISS names).

    Attributes:
        m: neighbours per node (graph degree); more = better recall, more memory.
        ef_construction: candidate list size while building.
        ef_search: candidate list size while searching (recall/speed knob, set at load).
    """

    m: int = 32
    ef_construction: int = 200
    ef_search: int = 128

    def validate(self) -> None:
        for name in ("m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ConfigError(f"hnsw.{name}={getattr(self, name)}: must be >= 1")


def exact_search(embeddings: torch.Tensor, queries: torch.Tensor, k: int,
                 chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force top-k by inner product, ties broken by the lower item index.

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
        # Sort by index first, then stably by score: equal scores keep the lower index first.
        order = torch.argsort(cand_i, dim=1, stable=True)
        cand_s, cand_i = cand_s.gather(1, order), cand_i.gather(1, order)
        top = torch.argsort(cand_s, dim=1, descending=True, stable=True)[:, :k]
        best_s, best_i = cand_s.gather(1, top), cand_i.gather(1, top)
    return best_s, best_i


class VectorIndex:
    """A searchable set of vectors.

    Args:
        embeddings: (n, d) float32 vectors (kept: exact search and rebuilding use them).
        kind: ``flat``, ``hnsw`` or ``exact`` (see the module docstring).
        hnsw: HNSW parameters (``kind="hnsw"`` only).
        faiss_index: an already built/loaded FAISS index to use instead of building one.
    """

    def __init__(self, embeddings: torch.Tensor, kind: str = "flat",
                 hnsw: HnswParams | None = None, faiss_index: Any = None):
        if kind not in KINDS:
            raise ConfigError(f"index kind {kind!r}: choose one of {', '.join(KINDS)}")
        self.embeddings = embeddings.float().contiguous()
        self.kind = kind
        self.hnsw = hnsw or HnswParams()
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
            self.hnsw.validate()
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
        scores, idx = self._faiss.search(np.ascontiguousarray(q.numpy()), k)
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
             hnsw: HnswParams | None = None) -> "VectorIndex":
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
