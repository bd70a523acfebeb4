"""Benchmark: FAISS flat and HNSW search against exact search on the Scenes eval images.

Run ``fam bench search [--model DIR] [--scenes DIR] [--work DIR] [-k 10]``.

One run, side by side: the Scenes eval images (``images/eval``, every variant) are indexed
with the model through ``fam.index.build_index`` (the same code as ``fam index build``); the
eval captions are the queries, embedded once with the T2I instruction. The reference is a
float64 brute force over all items (ties: lower index first). The same query vectors are then
searched three ways:

* **flat**: FAISS ``IndexFlatIP`` (what ``fam index build`` writes by default) with the
  certified float64 re-ranking of :func:`fam.index.exact_search`: its top-k lists must be
  *identical* to the reference's;
* **exact**: the same with torch's float32 brute force proposing the candidates (the no-FAISS
  fallback): identical too;
* **hnsw**: FAISS ``IndexHNSWFlat``: recall@k against the reference (share of its top-k found).

For scale, the raw float32 FAISS flat search (no re-ranking) is also timed and compared: on an
anisotropic embedding space its order differs from the reference where scores differ by less
than float32 rounding.

Queries/s are timed for a batch of all queries and for one query at a time (how a server
searches), median of ``--repeats`` passes after a warm-up.

Why these references: the float64 brute force is the answer itself (no approximate index
can be more right), and the raw float32 FAISS flat search is what a user runs without fam's
re-ranking — the fastest exact-in-intent search there is, so the re-ranking's cost shows
against it. ``fam bench search`` exits 1 unless flat and exact return the reference's top-k
for every query and HNSW's recall@k is at least 0.95.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["run_bench", "format_report"]

DOC_PROMPT = "<|image_1|>\nRepresent the given image."
QUERY_PROMPT = "Find me an everyday image that matches the given caption: "


def _qps(fn, n_queries: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n_queries / statistics.median(times)


def prepare(work: Path, scenes: Path | None, model: Path | None, n_eval_images: int,
            progress: bool) -> tuple[Path, Path, Path]:
    """Scenes folder, model folder and items JSONL (all eval images), made if not given."""
    if scenes is None:
        scenes = work / "scenes"
        if not (scenes / "captions_eval.json").is_file():
            from fam.config import ScenesConfig
            from fam.data.scenes import generate_scenes
            # Training scenes are not used; a few keep the generator's proportions valid, and
            # a small set cannot fill 16 distinct candidates per eval row (unused here).
            generate_scenes(ScenesConfig(n_train_images=max(1, n_eval_images // 6),
                                         n_eval_images=n_eval_images,
                                         n_ood_images=max(8, n_eval_images // 15),
                                         n_candidates=16 if n_eval_images >= 100 else 4),
                            scenes)
    if model is None:
        model = work / "model"
        if not (model / "config.json").is_file():
            from fam.backbones import build_tiny
            caps = json.loads((scenes / "captions_eval.json").read_text())
            build_tiny("qwen2_vl", model, size="s", corpus=[c["caption"] for c in caps], seed=0)
            log.info("no --model: a tiny random-initialised Qwen2-VL (size s) was built")
    images = sorted((scenes / "images" / "eval").glob("*.png"))
    if not images:
        raise SystemExit(f"{scenes}/images/eval has no images: is it a Scenes folder?")
    items = work / "items.jsonl"
    with items.open("w") as f:
        for p in images:
            f.write(json.dumps({"id": p.stem, "text": DOC_PROMPT,
                                "image": str(p.relative_to(scenes))}) + "\n")
    return scenes, model, items


def run_bench(work: Path, scenes: Path | None = None, model: Path | None = None, k: int = 10,
              n_eval_images: int = 300, repeats: int = 3, progress: bool = True) -> dict:
    """Build the index, search it three ways, return the figures (see the module docstring)."""
    from fam.backbones import load_backbone
    from fam.index import Index, build_index, embed
    from fam.index.store import faiss_or_none
    from fam.model import EmbeddingModel

    if faiss_or_none() is None:
        raise SystemExit("fam bench search compares FAISS with exact search: pip install "
                         "'fam[deploy]'")
    work.mkdir(parents=True, exist_ok=True)
    scenes, model, items = prepare(work, scenes, model, n_eval_images, progress)
    emb_model = EmbeddingModel(load_backbone(model))
    t0 = time.perf_counter()
    idx_dir = build_index(work / "index", items, model=model, image_root=scenes,
                          query_prompt=QUERY_PROMPT, progress=progress,
                          embedding_model=emb_model)
    build_s = time.perf_counter() - t0
    flat = Index.load(idx_dir)
    exact = Index.load(idx_dir, kind="exact")
    t0 = time.perf_counter()
    hnsw = Index.load(idx_dir, kind="hnsw")
    hnsw_build_s = time.perf_counter() - t0
    caps = json.loads((scenes / "captions_eval.json").read_text())
    queries = [flat.query_item(c["caption"]) for c in caps]
    q = embed(emb_model, queries)
    n = len(flat)

    x = flat.vectors.embeddings
    ref64 = q.double() @ x.double().T
    ref_i = torch.argsort(ref64, dim=1, descending=True, stable=True)[:, :k]
    _, flat_i = flat.vectors.search(q, k)
    _, exact_i = exact.vectors.search(q, k)
    _, hnsw_i = hnsw.vectors.search(q, k)
    _, raw_i = flat.vectors._faiss_search(q, k)
    recall = sum(len(set(hnsw_i[r].tolist()) & set(ref_i[r].tolist()))
                 for r in range(len(q))) / (len(q) * k)

    res = {"items": n, "dim": flat.manifest.dim, "queries": len(q), "k": k,
           "threads": torch.get_num_threads(), "model": str(model),
           "index_build_s": round(build_s, 2), "hnsw_build_s": round(hnsw_build_s, 3),
           "flat_identical_topk": int((flat_i == ref_i).all(1).sum()),
           "exact_identical_topk": int((exact_i == ref_i).all(1).sum()),
           "raw_faiss_identical_topk": int((raw_i == ref_i).all(1).sum()),
           "hnsw_recall_at_k": recall, "hnsw_params": flat.manifest.hnsw, "qps": {}}
    searches = {"exact": exact.vectors.search, "flat": flat.vectors.search,
                "hnsw": hnsw.vectors.search, "raw faiss": flat.vectors._faiss_search}
    for name, fn in searches.items():
        batch = _qps(lambda fn=fn: fn(q, k), len(q), repeats)
        one = _qps(lambda fn=fn: [fn(q[r:r + 1], k) for r in range(len(q))], len(q), repeats)
        res["qps"][name] = {"batch": batch, "single": one}
    return res


def format_report(r: dict) -> str:
    lines = [f"search over {r['items']} Scenes eval images (dim {r['dim']}), {r['queries']} "
             f"caption queries, k={r['k']}, torch threads={r['threads']}, model {r['model']}",
             f"index build (encode + FAISS flat): {r['index_build_s']} s; HNSW graph "
             f"(M={r['hnsw_params']['m']}, efConstruction={r['hnsw_params']['ef_construction']},"
             f" efSearch={r['hnsw_params']['ef_search']}): {r['hnsw_build_s']} s",
             f"{'':<8} {'queries/s (batch)':>18} {'queries/s (one at a time)':>26}"]
    names = {"exact": "exact (torch, certified f64 re-rank)",
             "flat": "flat (FAISS IndexFlatIP, certified f64 re-rank)",
             "hnsw": "hnsw (FAISS IndexHNSWFlat)", "raw faiss": "raw FAISS flat (float32 only)"}
    lines[-1] = f"{'':<48} {'queries/s (batch)':>18} {'queries/s (one at a time)':>26}"
    for name, label in names.items():
        v = r["qps"][name]
        lines.append(f"{label:<48} {v['batch']:>18.0f} {v['single']:>26.0f}")
    e = r["qps"]["exact"]
    lines.append(f"vs exact: flat {r['qps']['flat']['batch'] / e['batch']:.2f}x (batch), "
                 f"{r['qps']['flat']['single'] / e['single']:.2f}x (single); hnsw "
                 f"{r['qps']['hnsw']['batch'] / e['batch']:.2f}x (batch), "
                 f"{r['qps']['hnsw']['single'] / e['single']:.2f}x (single)")
    n = r["queries"]
    lines.append(f"top-{r['k']} identical to the float64 reference: flat {r['flat_identical_topk']}"
                 f"/{n}, exact {r['exact_identical_topk']}/{n} queries (raw float32 FAISS: "
                 f"{r['raw_faiss_identical_topk']}/{n})")
    lines.append(f"HNSW recall@{r['k']} vs the reference: {r['hnsw_recall_at_k']:.4f}")
    return "\n".join(lines)
