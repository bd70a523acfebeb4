"""Search back-ends: FAISS flat equals exact search, HNSW recall, the no-FAISS fallback."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fam.errors import ConfigError
from fam.index import store
from fam.index.store import HnswParams, VectorIndex, exact_search

faiss = pytest.importorskip("faiss")


def _data(n=2000, d=32, q=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Clustered data (centres + noise) is harder for a graph index than uniform noise.
    centres = torch.randn(20, d, generator=g)
    x = centres[torch.randint(0, 20, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    queries = centres[torch.randint(0, 20, (q,), generator=g)] + 0.5 * torch.randn(q, d, generator=g)
    return F.normalize(x, dim=1), F.normalize(queries, dim=1)


def test_exact_search_matches_float64_reference_and_breaks_ties_by_index():
    x, q = _data(300, 16, 20)
    x[7] = x[3]  # an exact tie: the lower index must come first
    q[0] = x[3]
    s, i = exact_search(x, q, 10, chunk=64)  # chunked: the merge across chunks is exercised
    ref = (q.double() @ x.double().T)
    ref_s, _ = ref.topk(10, dim=1)
    assert torch.allclose(s.double(), ref_s, atol=1e-6)
    # float32 scores are within 1e-6 of float64; each returned index has its reference score.
    assert torch.allclose(ref.gather(1, i), ref_s, atol=1e-6)
    assert i[0, 0].item() == 3 and i[0, 1].item() == 7


def test_faiss_flat_returns_the_exact_top_k():
    x, q = _data()
    flat = VectorIndex(x, "flat")
    assert flat.backend == "faiss"
    s, i = flat.search(q, 10)
    es, ei = exact_search(x, q, 10)
    assert torch.equal(i, ei)
    assert torch.allclose(s, es, atol=1e-5)


def test_hnsw_recall_at_10_against_exact():
    x, q = _data()
    hnsw = VectorIndex(x, "hnsw", HnswParams(m=16, ef_construction=100, ef_search=64))
    _, i = hnsw.search(q, 10)
    _, ei = exact_search(x, q, 10)
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
