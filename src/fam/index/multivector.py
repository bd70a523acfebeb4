"""The multi-vector kind of index: token vectors, FAISS candidates, exact MaxSim rerank.

A multi-vector index folder is an ordinary index folder (pooled vectors, items, manifest; see
:mod:`fam.index.index`) plus ``tokens.safetensors``:

    tokens   (T, D) float32  every item's token vectors, item after item
    offsets  (n + 1,) int64  item i owns tokens[offsets[i]:offsets[i + 1]]

and a ``multivector`` section in the manifest (the head's token set, dim and similarity, the
per-item cap, the candidate depth). Search (ColBERT-style, PLAID without the centroids):

1. **candidates**: each query token's ``candidate_tokens`` nearest document tokens in a FAISS
   index over all token vectors (:class:`fam.index.store.VectorIndex`, flat or HNSW); their
   items are the candidates;
2. **rerank**: exact MaxSim (:func:`fam.losses.maxsim.maxsim`) of the query against every
   candidate's stored tokens; the top ``k`` are returned.

:meth:`MultiVectorSearch.exact` scores every item (the reference ``fam bench search
--multivector`` measures recall against). Items with more than ``max_tokens`` vectors are
reduced to ``max_tokens`` unit vectors, which
bounds the index size per item (0: no cap): ``pooling="cluster"`` (default) merges the most
similar tokens first (greedy centroid-linkage clustering, as ColBERT's token pooling groups
similar tokens), ``"runs"`` means contiguous runs of tokens.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fam.config import HnswConfig
from fam.errors import ConfigError
from fam.index.store import VectorIndex
from fam.losses.maxsim import maxsim

__all__ = ["TOKENS_FILE", "TOKEN_POOLINGS", "reduce_tokens", "TokenStore", "MultiVectorSearch", "query_encoder"]

TOKENS_FILE = "tokens.safetensors"
#: Items whose padded tokens are scored at once by the exact reference.
_EXACT_BLOCK = 256


#: How ``max_tokens`` reduces an item's vectors.
TOKEN_POOLINGS = ("cluster", "runs")


def _cluster(tokens: torch.Tensor, m: int) -> torch.Tensor:
    """Greedy agglomerative clustering to ``m`` clusters: merge the two clusters whose mean
    directions are the most similar (centroid linkage), one merge at a time; the clusters'
    unit means, in the order of their first token."""
    n = len(tokens)
    sums = tokens.double().clone()
    counts = torch.ones(n, dtype=torch.float64)
    alive = torch.ones(n, dtype=torch.bool)
    cent = F.normalize(sums, dim=-1)
    sim = cent @ cent.T
    sim.fill_diagonal_(float("-inf"))
    for _ in range(n - m):
        flat = int(torch.argmax(sim))
        i, j = sorted(divmod(flat, n))
        sums[i] += sums[j]
        counts[i] += counts[j]
        alive[j] = False
        cent[i] = F.normalize(sums[i], dim=0)
        row = cent @ cent[i]
        row[~alive] = float("-inf")
        row[i] = float("-inf")
        sim[i], sim[:, i] = row, row
        sim[j], sim[:, j] = float("-inf"), float("-inf")
    return F.normalize(sums[alive], dim=-1).to(tokens.dtype)


def reduce_tokens(tokens: torch.Tensor, max_tokens: int, pooling: str = "cluster"
                  ) -> torch.Tensor:
    """At most ``max_tokens`` unit vectors (0: all): ``cluster`` merges the most similar
    tokens (ColBERT-style token pooling), ``runs`` means contiguous runs; re-normalised."""
    if not max_tokens or len(tokens) <= max_tokens:
        return tokens
    if pooling == "cluster":
        return _cluster(tokens, max_tokens)
    if pooling != "runs":
        raise ConfigError(f"token pooling {pooling!r}: choose one of {TOKEN_POOLINGS}")
    runs = torch.tensor_split(tokens, max_tokens)
    return F.normalize(torch.stack([r.mean(0) for r in runs]), dim=-1)


class TokenStore:
    """All items' token vectors, concatenated, with each item's range."""

    def __init__(self, tokens: torch.Tensor, offsets: torch.Tensor):
        if offsets.ndim != 1 or int(offsets[-1]) != len(tokens) or int(offsets[0]) != 0:
            raise ConfigError(f"token offsets do not cover the {len(tokens)} token vectors; "
                              "rebuild the index")
        self.tokens = tokens.float().contiguous()
        self.offsets = offsets.long()
        self.owner = torch.repeat_interleave(torch.arange(len(offsets) - 1),
                                             self.offsets.diff())

    @classmethod
    def from_list(cls, per_item: list[torch.Tensor], dim: int) -> "TokenStore":
        counts = torch.tensor([len(t) for t in per_item], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        tokens = torch.cat(per_item) if per_item else torch.zeros(0, dim)
        return cls(tokens, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def dim(self) -> int:
        return int(self.tokens.shape[1])

    def padded(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(len(idx), N, D)`` tokens of the items ``idx`` and their mask."""
        counts = [int(self.offsets[i + 1] - self.offsets[i]) for i in idx]
        x = torch.zeros(len(idx), max(counts + [1]), self.dim)
        m = torch.zeros(x.shape[:2], dtype=torch.bool)
        for r, (i, c) in enumerate(zip(idx, counts)):
            x[r, :c] = self.tokens[int(self.offsets[i]):int(self.offsets[i]) + c]
            m[r, :c] = True
        return x, m

    def nbytes_per_item(self) -> float:
        """Stored bytes of token vectors and offsets, per item."""
        total = self.tokens.numel() * 4 + self.offsets.numel() * 8
        return total / max(len(self), 1)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file
        save_file({"tokens": self.tokens, "offsets": self.offsets}, str(path))

    @classmethod
    def load(cls, path: Path) -> "TokenStore":
        from safetensors.torch import load_file
        if not path.is_file():
            raise ConfigError(f"{path} is missing: the multi-vector index is incomplete; "
                              "rebuild it with fam index build --multivector")
        t = load_file(str(path))
        return cls(t["tokens"], t["offsets"])


class MultiVectorSearch:
    """Candidate generation over token vectors, then exact MaxSim.

    Args:
        store: the items' token vectors.
        similarity: ``maxsim`` or ``meanmaxsim``.
        candidate_tokens: nearest document tokens fetched per query token.
        kind: ``flat`` / ``exact`` / ``hnsw`` (the token-vector index, as single vectors').
        hnsw: HNSW parameters.
    """

    def __init__(self, store: TokenStore, similarity: str = "maxsim", candidate_tokens: int = 32,
                 kind: str = "flat", hnsw: HnswConfig | None = None):
        if candidate_tokens < 1:
            raise ConfigError("candidate_tokens must be >= 1")
        self.store, self.similarity, self.candidate_tokens = store, similarity, candidate_tokens
        self.vectors = VectorIndex(store.tokens, kind, hnsw)
        self._blocks: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _rerank(self, q: torch.Tensor, cand: list[int], k: int) -> tuple[list[float], list[int]]:
        if not cand:
            return [], []
        d, dm = self.store.padded(cand)
        s = maxsim(q[None], torch.ones(1, len(q), dtype=torch.bool), d, dm,
                   similarity=self.similarity)[0]
        # Best first, ties by the lower item index (candidates are sorted ascending).
        order = torch.argsort(s, descending=True, stable=True)[:k]
        return s[order].tolist(), [cand[int(o)] for o in order]

    def candidates(self, q: torch.Tensor) -> list[int]:
        """Items owning one of the query tokens' nearest document tokens, ascending."""
        if len(q) == 0 or len(self.store.tokens) == 0:
            return []
        _, idx = self.vectors.candidates(q.float(), self.candidate_tokens)
        idx = idx[idx >= 0]
        return torch.unique(self.store.owner[idx]).tolist()

    def search(self, queries: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k ``(scores (Q, k), items (Q, k))`` per query's token vectors (missing: -1)."""
        return self._pack([self._rerank(q.float(), self.candidates(q), k) for q in queries], k)

    def exact(self, queries: list[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference: MaxSim of every query against every item, top-k."""
        n = len(self.store)
        if self._blocks is None:  # padded once, kept for later calls (the store never changes)
            self._blocks = [self.store.padded(list(range(s, min(s + _EXACT_BLOCK, n))))
                            for s in range(0, n, _EXACT_BLOCK)]
        blocks = self._blocks
        out = []
        for q in queries:
            q = q.float()
            ones = torch.ones(1, len(q), dtype=torch.bool)
            parts = [maxsim(q[None], ones, d, dm, similarity=self.similarity)[0]
                     for d, dm in blocks]
            scores = torch.cat(parts) if parts else torch.zeros(0)
            order = torch.argsort(scores, descending=True, stable=True)[:k]
            out.append((scores[order].tolist(), order.tolist()))
        return self._pack(out, k)

    @staticmethod
    def _pack(results: list[tuple[list[float], list[int]]], k: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.full((len(results), k), float("-inf"))
        idx = torch.full((len(results), k), -1, dtype=torch.long)
        for r, (s, i) in enumerate(results):
            scores[r, :len(s)] = torch.tensor(s, dtype=torch.float32)
            idx[r, :len(i)] = torch.tensor(i, dtype=torch.long)
        return scores, idx


def query_encoder(index, model, model_path: str | Path | None = None):
    """The two-readings encoder for queries to a multi-vector ``index``: ``model`` (from
    :func:`fam.index.load_query_model`) with the head the index was built with."""
    from fam.model.multivector import TwoReadings, load_multivector
    mv = index.manifest.multivector
    path = Path(model_path or index.manifest.model_path or "")
    head = load_multivector(path if path.is_dir() else None, model.adapter.hidden_size,
                            tokens=mv["tokens"], similarity=mv["similarity"])
    if head.settings()["dim"] != mv["dim"]:
        raise ConfigError(f"{index.path} was built with {mv['dim']}-dim token vectors, the "
                          f"model's head gives {head.settings()['dim']}; rebuild the index")
    return TwoReadings(model, head.to(model.adapter.device))
