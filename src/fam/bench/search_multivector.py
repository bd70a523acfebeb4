"""Benchmark: the multi-vector index against exact MaxSim over all items (``fam bench search
--multivector``).

One run on the Scenes eval images (the items and caption queries of ``fam bench search``):
the index is built once with ``fam index build --multivector`` (all token vectors, timed:
encoding + storing + the FAISS token index); the reference ranks every item by exact MaxSim
with those uncapped vectors. Then, for each per-item cap (``--max-tokens``, applied to the
same vectors, by clustering and by contiguous runs) and each candidate depth (``--candidate-tokens``), the index's search (FAISS
token candidates, exact MaxSim rerank) is measured:

* **bytes per item**: stored token vectors and offsets (float32), and the pooled vector
  beside them;
* **recall@k**: share of the reference's top-k the search returns;
* **latency**: median milliseconds per query, one query at a time (how a server searches),
  beside the exact scan's.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

__all__ = ["run_multivector_bench", "format_multivector_report"]


def _ms_per_query(fn, queries: list, repeats: int) -> float:
    fn(queries[:1])  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for q in queries:
            fn([q])
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / max(len(queries), 1)


def run_multivector_bench(work: Path, scenes: Path | None = None, model: Path | None = None,
                          k: int = 10, n_eval_images: int = 300, repeats: int = 3,
                          caps: tuple[int, ...] = (0, 32, 8),
                          candidate_tokens: tuple[int, ...] = (4, 16, 64),
                          max_queries: int = 200, progress: bool = True) -> dict:
    """Build, search, compare (module docstring); returns the figures."""
    from fam.bench.search import QUERY_PROMPT, prepare
    from fam.config import MultiVectorIndexConfig
    from fam.index import Index, build_index
    from fam.index.multivector import (MultiVectorSearch, TokenStore, query_encoder,
                                       reduce_tokens)
    from fam.index.store import faiss_or_none
    from fam.model.encode import load_embedding_model

    if faiss_or_none() is None:
        raise SystemExit("fam bench search --multivector uses FAISS: pip install 'fam[deploy]'")
    work.mkdir(parents=True, exist_ok=True)
    scenes, model, items = prepare(work, scenes, model, n_eval_images, progress)
    emb = load_embedding_model(model)
    out = work / "index_multivector"
    t0 = time.perf_counter()
    build_index(out, items, model=model, image_root=scenes, query_prompt=QUERY_PROMPT,
                progress=progress, embedding_model=emb,
                multivector=MultiVectorIndexConfig(max_tokens=0))
    build_s = time.perf_counter() - t0
    index = Index.load(out)
    store = index.late.store
    caps_json = json.loads((scenes / "captions_eval.json").read_text())[:max_queries]
    enc = query_encoder(index, emb, model)
    _, queries = enc.encode_multi_all([index.query_item(c["caption"]) for c in caps_json])
    ref_search = MultiVectorSearch(store, index.late.similarity, 1, "exact")
    _, ref_i = ref_search.exact(queries, k)
    pooled_bytes = index.manifest.dim * 4
    res = {"items": len(index), "queries": len(queries), "k": k, "model": str(model),
           "token_dim": store.dim, "similarity": index.late.similarity,
           "tokens_per_item": store.offsets.diff().float().mean().item(),
           "build_s": round(build_s, 2), "pooled_bytes_per_item": pooled_bytes,
           "threads": torch.get_num_threads(),
           "exact_ms_per_query": _ms_per_query(lambda q: ref_search.exact(q, k), queries,
                                               repeats),
           "rows": []}
    per_item = [store.tokens[int(a):int(b)] for a, b in zip(store.offsets[:-1], store.offsets[1:])]
    for cap, pooling in [(c, p) for c in caps for p in (("cluster", "runs") if c else ("-",))]:
        capped = TokenStore.from_list([reduce_tokens(t, cap, pooling) for t in per_item]
                                      if cap else per_item, store.dim)
        for depth in candidate_tokens:
            t0 = time.perf_counter()
            search = MultiVectorSearch(capped, index.late.similarity, depth, "flat")
            faiss_s = time.perf_counter() - t0
            _, got = search.search(queries, k)
            recall = sum(len(set(got[r].tolist()) & set(ref_i[r].tolist()))
                         for r in range(len(queries))) / (len(queries) * k)
            res["rows"].append({
                "max_tokens": cap, "pooling": pooling, "candidate_tokens": depth,
                "tokens_per_item": capped.offsets.diff().float().mean().item(),
                "token_bytes_per_item": capped.nbytes_per_item(),
                "faiss_build_s": round(faiss_s, 3), "recall_at_k": recall,
                "ms_per_query": _ms_per_query(lambda q, s=search: s.search(q, k), queries,
                                              repeats)})
    return res


def format_multivector_report(r: dict) -> str:
    lines = [f"multi-vector search over {r['items']} Scenes eval images, {r['queries']} caption "
             f"queries, k={r['k']}, {r['similarity']}, token dim {r['token_dim']}, "
             f"{r['tokens_per_item']:.1f} tokens/item, torch threads={r['threads']}, "
             f"model {r['model']}",
             f"index build (encode pooled + token vectors, store, FAISS token index): "
             f"{r['build_s']} s; pooled vector {r['pooled_bytes_per_item']} B/item; exact MaxSim "
             f"over all items {r['exact_ms_per_query']:.2f} ms/query",
             f"{'max tokens':>10} {'pooling':>8} {'cand. tokens':>12} {'tokens/item':>11} {'bytes/item':>11} "
             f"{'FAISS build s':>13} {'recall@' + str(r['k']):>10} {'ms/query':>9}"]
    for row in r["rows"]:
        lines.append(f"{row['max_tokens'] or 'all':>10} {row['pooling']:>8} "
                     f"{row['candidate_tokens']:>12} "
                     f"{row['tokens_per_item']:>11.1f} {row['token_bytes_per_item']:>11.0f} "
                     f"{row['faiss_build_s']:>13.3f} {row['recall_at_k']:>10.4f} "
                     f"{row['ms_per_query']:>9.2f}")
    lines.append("recall against exact MaxSim with every token of every item; bytes/item: "
                 "float32 token vectors + offsets (the pooled vector is stored too)")
    return "\n".join(lines)
