"""Search back-ends: FAISS flat equals exact search, HNSW recall, the no-FAISS fallback."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fam.errors import ConfigError
from fam.index import store
from fam.config import HnswConfig
from fam.index.store import VectorIndex, exact_search, topk_float32

faiss = pytest.importorskip("faiss")


def _data(n=2000, d=32, q=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Clustered data (centres + noise) is harder for a graph index than uniform noise.
    centres = torch.randn(20, d, generator=g)
    x = centres[torch.randint(0, 20, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    queries = centres[torch.randint(0, 20, (q,), generator=g)] + 0.5 * torch.randn(q, d, generator=g)
    return F.normalize(x, dim=1), F.normalize(queries, dim=1)


def _reference(x, q, k):
    """Float64 brute force, ties to the lower index: what "exact" means."""
    return torch.argsort(q.double() @ x.double().T, dim=1, descending=True, stable=True)[:, :k]


def _near_ties(n=400, d=64, q=30, seed=1):
    """An anisotropic space: all vectors within ~1e-4 of one direction, so many scores differ
    by less than float32 rounding (as a briefly trained embedding model gives)."""
    g = torch.Generator().manual_seed(seed)
    base = F.normalize(torch.randn(d, generator=g), dim=0)
    x = F.normalize(base + 1e-4 * torch.randn(n, d, generator=g), dim=1)
    qs = F.normalize(base + 1e-4 * torch.randn(q, d, generator=g), dim=1)
    x[11] = x[5]  # exact duplicates: the lower index first
    return x, qs


def test_exact_search_equals_float64_brute_force_on_near_ties():
    x, q = _near_ties()
    raw_s, raw_i = topk_float32(x, q, 10, chunk=64)  # chunked merge exercised
    ref = _reference(x, q, 10)
    assert not torch.equal(raw_i, ref)  # float32 alone gets some orders wrong here
    s, i = exact_search(x, q, 10)
    assert torch.equal(i, ref)
    assert torch.equal(s, (q.double() @ x.double().T).gather(1, ref).float())
    q2 = x[5:6].clone()
    _, i2 = exact_search(x, q2, 3)
    assert i2[0, :2].tolist() == [5, 11]


@pytest.mark.parametrize("data", [_data, _near_ties])
def test_faiss_flat_returns_the_exact_top_k(data):
    x, q = data()
    flat = VectorIndex(x, "flat")
    assert flat.backend == "faiss"
    s, i = flat.search(q, 10)
    es, ei = exact_search(x, q, 10)
    assert torch.equal(i, _reference(x, q, 10))
    assert torch.equal(i, ei) and torch.equal(s, es)


def test_hnsw_recall_at_10_against_exact():
    x, q = _data()
    hnsw = VectorIndex(x, "hnsw", HnswConfig(m=16, ef_construction=100, ef_search=64))
    _, i = hnsw.search(q, 10)
    ei = _reference(x, q, 10)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(i, ei)) / ei.numel()
    assert recall >= 0.95


def test_without_faiss_flat_falls_back_to_exact_torch_and_hnsw_is_refused(monkeypatch):
    x, q = _data(500, 16, 10)
    monkeypatch.setattr(store, "faiss_or_none", lambda: None)
    flat = VectorIndex(x, "flat")
    assert flat.backend == "torch"
    s, i = flat.search(q, 5)
    es, ei = exact_search(x, q, 5)
    assert torch.equal(i, ei) and torch.equal(s, es)
    with pytest.raises(ConfigError, match="needs FAISS"):
        VectorIndex(x, "hnsw")


def test_k_is_capped_and_bad_queries_are_refused():
    x, q = _data(5, 8, 2)
    s, i = VectorIndex(x, "flat").search(q, 50)
    assert i.shape == (2, 5)
    with pytest.raises(ConfigError, match="dimension"):
        VectorIndex(x, "flat").search(torch.zeros(1, 3), 2)
    with pytest.raises(ConfigError, match="kind"):
        VectorIndex(x, "ivf")
