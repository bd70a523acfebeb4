"""Index a collection with a trained model and search it (``fam index build``, ``fam search``).

    from fam.index import build_index, Index
    build_index("idx", "items.jsonl", model="runs/demo/fam/model")      # FAISS flat by default
    index = Index.load("idx")
    hits = index.search(query_embeddings, k=10)                          # [[Hit, ...], ...]

An index folder records the identity of the model that built it; queries from another model
are refused (:class:`ModelMismatchError`).
"""
from __future__ import annotations

from fam.index.build import build_index, embeddings_metadata
from fam.index.embed import embed
from fam.index.identity import model_identity
from fam.index.index import (Hit, Index, Manifest, ModelMismatchError, format_hits,
                            load_query_model)
from fam.index.items import ItemRecord, apply_prompt, read_items
from fam.index.query import SearchQuery, check_maps, run_query
from fam.index.store import KINDS, VectorIndex, exact_search, rescore, topk_float32

__all__ = ["build_index", "embeddings_metadata", "embed", "model_identity", "Hit", "Index", "format_hits", "load_query_model",
           "Manifest", "ModelMismatchError", "ItemRecord", "apply_prompt", "read_items", "KINDS",
           "VectorIndex", "exact_search", "rescore", "topk_float32", "SearchQuery", "run_query", "check_maps"]
