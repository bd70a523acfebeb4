"""The multi-vector index (fam.index.multivector): build, search, rerank against exact MaxSim."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fam.cli import main
from fam.config import MultiVectorIndexConfig
from fam.errors import ConfigError
from fam.index import Index, build_index
from fam.index.multivector import MultiVectorSearch, TokenStore, reduce_tokens
from fam.losses.maxsim import maxsim_reference
from fam.model.encode import load_embedding_model
from fam.model.multivector import TwoReadings, load_multivector

pytest.importorskip("faiss")


def _store(n=20, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = [F.normalize(torch.randn(int(c), d, generator=g), dim=-1)
            for c in torch.randint(1, 9, (n,), generator=g)]
    return TokenStore.from_list(toks, d), toks


def _cluster_loop(t, m):
    """Plain reference: recompute every pair's centroid cosine before each merge."""
    groups = [[i] for i in range(len(t))]
    while len(groups) > m:
        cents = [F.normalize(t[g].double().sum(0), dim=0) for g in groups]
        best, pair = -2.0, None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                s = float(cents[a] @ cents[b])
                if s > best:
                    best, pair = s, (a, b)
        a, b = pair
        groups[a] = groups[a] + groups[b]
        del groups[b]
    return torch.stack([F.normalize(t[g].double().sum(0), dim=0) for g in groups]).float()


def test_cluster_pooling_merges_the_most_similar_tokens_first():
    g = torch.Generator().manual_seed(4)
    t = F.normalize(torch.randn(15, 6, generator=g), dim=-1)
    for m in (1, 4, 9, 14):
        # float32 output of a float64 sum: within 1e-6 of unit norm
        torch.testing.assert_close(reduce_tokens(t, m), _cluster_loop(t, m), rtol=0, atol=1e-6)
    base = torch.eye(3)
    pairs = F.normalize(torch.stack([base[0], base[0] + 0.05, base[1], base[2], base[2] + 0.1]),
                        dim=-1)
    r = reduce_tokens(pairs, 3)  # the near-duplicates merge; order of first tokens kept
    assert torch.allclose(r[1], base[1]) and r[0] @ base[0] > 0.99 and r[2] @ base[2] > 0.99
    with pytest.raises(ConfigError, match="pooling"):
        reduce_tokens(t, 3, "kmeans")


def test_reduce_tokens_caps_with_means_of_runs():
    t = F.normalize(torch.randn(10, 4, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert reduce_tokens(t, 0) is t and reduce_tokens(t, 12) is t
    r = reduce_tokens(t, 3, "runs")  # runs of 4, 3, 3 tokens
    assert r.shape == (3, 4)
    torch.testing.assert_close(r[1], F.normalize(t[4:7].mean(0), dim=0))
    torch.testing.assert_close(r.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("similarity", ["maxsim", "meanmaxsim"])
def test_exact_is_the_loop_and_deep_candidates_find_it(similarity):
    store, toks = _store()
    g = torch.Generator().manual_seed(3)
    queries = [F.normalize(torch.randn(n, 8, generator=g), dim=-1) for n in (3, 5)]
    search = MultiVectorSearch(store, similarity, candidate_tokens=len(store.tokens))
    s_ex, i_ex = search.exact(queries, 5)
    for r, q in enumerate(queries):
        want = torch.stack([maxsim_reference(q[None], torch.ones(1, len(q), dtype=torch.bool),
                                             t[None], torch.ones(1, len(t), dtype=torch.bool),
                                             similarity=similarity)[0, 0] for t in toks])
        order = torch.argsort(want, descending=True, stable=True)[:5]
        assert i_ex[r].tolist() == order.tolist()
        torch.testing.assert_close(s_ex[r], want[order], rtol=1e-5, atol=1e-6)  # float32
    # every token is a candidate: the FAISS path returns the exact top-k
    s, i = search.search(queries, 5)
    assert torch.equal(i, i_ex)
    # shallow candidates: still exact scores for whatever is found, best first
    s1, i1 = MultiVectorSearch(store, similarity, candidate_tokens=1).search(queries, 5)
    assert torch.all(s1[:, :-1] >= s1[:, 1:])


def test_build_search_and_cli(tmp_path, small_collection, tiny_dirs):
    items, root = small_collection
    model = tiny_dirs["qwen2_vl"]
    out = tmp_path / "idx"
    assert main(["index", "build", "--model", str(model), "--items", str(items), "--image-root",
                 str(root), "--out", str(out), "--multivector", "--max-tokens", "6", "--token-pooling", "runs",
                 "--candidate-tokens", "4", "--query-prompt", "Find: ", "--no-progress",
                 "--shard-size", "5"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["multivector"]["max_tokens"] == 6 and m["multivector"]["tokens"] == "content"
    assert m["multivector"]["pooling"] == "runs"
    idx = Index.load(out)
    counts = idx.late.store.offsets.diff()
    assert len(idx.late.store) == 13 and int(counts.max()) <= 6 and int(counts.min()) >= 1
    # the stored tokens are the model's (capped) token vectors of the items
    emb = load_embedding_model(model)
    enc = TwoReadings(emb, load_multivector(model, emb.adapter.hidden_size))
    from fam.index.items import read_items
    recs = read_items(items, root)
    _, toks = enc.encode_multi_all([r.item for r in recs])
    want = torch.cat([reduce_tokens(t, 6, "runs") for t in toks])
    assert (idx.late.store.tokens - want).abs().max() < 1e-5  # other batch shapes: fp32 sums
    # search: the CLI's hits are the index's late-interaction hits
    q = idx.query_item("a red circle")
    _, qt = enc.encode_multi_all([q])
    hits = idx.search_tokens(qt, 5)[0]
    assert len(hits) == 5 and hits[0].score >= hits[-1].score
    assert set(h.index for h in hits) <= set(range(13))
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["search", "--index", str(out), "--text", "a red circle", "-k", "5",
                     "--json"]) == 0
    got = [json.loads(line)["index"] for line in buf.getvalue().splitlines()]
    assert got == [h.index for h in hits]
    # the pooled vectors are still there: the same folder is a single-vector index too
    assert len(idx.search(enc.encode_all([q]), 3)[0]) == 3


def test_multivector_refuses_precomputed_embeddings(tmp_path, small_collection):
    items, root = small_collection
    with pytest.raises(ConfigError, match="--multivector"):
        build_index(tmp_path / "x", items, embeddings=tmp_path / "e.safetensors",
                    multivector=MultiVectorIndexConfig())
    with pytest.raises(ConfigError, match="candidate_tokens"):
        MultiVectorIndexConfig(candidate_tokens=0).validate("multivector.")
