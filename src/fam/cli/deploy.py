"""``fam index build``, ``fam search`` and ``fam serve``: using a trained model.

    fam index build --model DIR --items items.jsonl [--image-root R] --out IDX [--kind hnsw]
    fam index build --embeddings emb.safetensors --items items.jsonl --out IDX
    fam search --index IDX [--model DIR] [--text T] [--image P] [-k 10] [--json]
    fam serve --model DIR [--index IDX] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

The work is done by :mod:`fam.index` and :mod:`fam.serve`; this module parses arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from fam.cli.args import nonneg_int, positive_int
from fam.errors import ConfigError

__all__ = ["add_deploy_subcommands"]

log = logging.getLogger(__name__)


def add_deploy_subcommands(sub: Any) -> None:
    """``fam index build``, ``fam search`` and ``fam serve``."""
    _add_index_subcommands(sub)
    _add_serve_subcommand(sub)


def _add_index_subcommands(subparsers: Any) -> None:
    index = subparsers.add_parser("index", help="index a collection for search").add_subparsers(
        dest="index_cmd", required=True)
    b = index.add_parser("build", help="embed items and write an index folder (resumable)",
                         description="Embed a JSONL of {text, image, id?, ...} items in resumable "
                                     "shards and write an index folder (FAISS exact inner "
                                     "product by default). Rerun the same command to resume.")
    b.add_argument("--model", help="embedding model folder (encodes the items; with "
                                   "--embeddings: the model that encoded them)")
    b.add_argument("--embeddings", help="safetensors from fam encode for the same items, "
                                        "instead of encoding")
    b.add_argument("--items", required=True, help="items JSONL, as fam encode reads it")
    b.add_argument("--image-root", default=None, help="image root (default: beside --items)")
    b.add_argument("--out", required=True, help="index folder to write")
    b.add_argument("--kind", choices=("flat", "hnsw", "exact"), default="flat",
                   help="flat: exact inner product (FAISS IndexFlatIP, torch without FAISS); "
                        "hnsw: FAISS HNSW graph; exact: torch brute force (default: flat)")
    b.add_argument("--hnsw-m", type=positive_int, default=32, help="HNSW neighbours per node (32)")
    b.add_argument("--ef-construction", type=positive_int, default=200,
                   help="HNSW build list (200)")
    b.add_argument("--ef-search", type=positive_int, default=128, help="HNSW search list (128)")
    b.add_argument("--query-prompt", default="",
                   help="prompt for query texts, stored in the manifest: '{text}' is replaced, "
                        "otherwise it is a prefix")
    b.add_argument("--document-prompt", default="", help="prompt applied to the items' texts")
    b.add_argument("--shard-size", type=positive_int, default=1024,
                   help="items per resumable shard")
    b.add_argument("--batch-size", type=positive_int, default=32)
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--multivector", action="store_true",
                   help="also store token vectors (late interaction: FAISS token candidates, "
                        "exact MaxSim rerank); fam search then uses them")
    b.add_argument("--max-tokens", type=nonneg_int, default=0,
                   help="--multivector: most token vectors per item (0 = all)")
    b.add_argument("--token-pooling", choices=["cluster", "runs"], default="cluster",
                   help="--multivector: how --max-tokens reduces an item: merge the most "
                        "similar tokens (cluster) or mean contiguous runs (runs)")
    b.add_argument("--candidate-tokens", type=positive_int, default=32,
                   help="--multivector: nearest document tokens per query token (32)")
    b.add_argument("--mv-tokens", choices=["content", "image", "text", "all"], default=None,
                   help="--multivector: token set (default: the model's head's, else content)")
    b.set_defaults(func=cmd_index_build)

    s = subparsers.add_parser("search", help="search an index with a text and/or image query")
    s.add_argument("--index", required=True, help="index folder from fam index build")
    s.add_argument("--model", default=None,
                   help="embedding model (default: the one recorded in the index; must be the "
                        "model that built it)")
    s.add_argument("--text", default=None, help="query text")
    s.add_argument("--image", default=None, help="query image file")
    s.add_argument("-k", type=positive_int, default=10, help="results (default 10)")
    s.add_argument("--json", action="store_true", help="JSONL, one hit per line")
    s.add_argument("--maps", default=None, metavar="DIR",
                   help="multi-vector index: write each hit's similarity map per query token "
                        "(NN-<id>.png: the image, then one overlay per token) and maps.json")
    s.add_argument("--image-root", default=None,
                   help="where the index's images are now (default: where they were at build)")
    s.add_argument("--query-prompt", default=None,
                   help="prompt for this query ('{text}' is replaced, otherwise a prefix; '' "
                        "for none). Default: the index's query prompt for a text query; an "
                        "image-only query is embedded as the index's images were")
    s.set_defaults(func=cmd_search)


def cmd_index_build(args: argparse.Namespace) -> int:
    from fam.config import HnswConfig
    from fam.index import build_index
    mv = None
    if args.multivector:
        from fam.config import MultiVectorIndexConfig
        mv = MultiVectorIndexConfig(args.max_tokens, args.token_pooling, args.candidate_tokens,
                                    args.mv_tokens)
    out = build_index(args.out, args.items, model=args.model, embeddings=args.embeddings,
                      image_root=args.image_root, kind=args.kind,
                      hnsw=HnswConfig(args.hnsw_m, args.ef_construction, args.ef_search),
                      query_prompt=args.query_prompt, document_prompt=args.document_prompt,
                      shard_size=args.shard_size, batch_size=args.batch_size,
                      progress=not args.no_progress, multivector=mv)
    print(f"index written to {out}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    if not args.text and not args.image:
        raise ConfigError("give a query: --text T and/or --image PATH")
    if args.k < 1:
        raise ConfigError("-k must be >= 1")
    image = None
    if args.image:
        image = Path(args.image).resolve()
        if not image.is_file():
            raise ConfigError(f"--image {args.image}: file not found")
    from fam.index import Index, embed, format_hits, load_query_model  # torch: after the checks
    index = Index.load(args.index, image_root=args.image_root)
    if args.maps and index.late is None:
        raise ConfigError(f"--maps: {args.index} is a single-vector index; similarity maps need "
                          "one built with fam index build --multivector")
    model = load_query_model(index, args.model)
    text = args.text or ""
    print(index.describe_query(text, image is not None, args.query_prompt), file=sys.stderr)
    item = index.query_item(text, image, args.query_prompt)
    if index.late is not None:  # multi-vector index: late interaction
        from fam.index.maps import LateMaps, write_maps
        from fam.index.multivector import query_encoder
        res = LateMaps(index, query_encoder(index, model, args.model)).search(
            item, None, args.k, maps=bool(args.maps))
        hits = res.hits
        if args.maps:
            pngs = write_maps(args.maps, index, res)
            print(f"query tokens {res.tokens}; wrote {len(pngs)} map image(s) and maps.json to "
                  f"{args.maps}", file=sys.stderr)
    else:
        hits = index.search(embed(model, [item]), args.k)[0]
    if args.json:
        for h in hits:
            print(json.dumps(h.to_json(), ensure_ascii=False))
    else:
        print(format_hits(hits))
    return 0


def _add_serve_subcommand(subparsers: Any) -> None:
    s = subparsers.add_parser(
        "serve", help="HTTP server: /v1/embeddings, /v1/search, a search page",
        description="Serve an embedding model over HTTP (OpenAI-style /v1/embeddings, "
                    "/v1/search over an index, GET /health, /v1/models, and a search page at / "
                    "when an index is loaded). Stop with Ctrl-C or SIGTERM (graceful).")
    s.add_argument("--model", required=True, help="embedding model folder")
    s.add_argument("--index", default=None, help="index folder built by this model")
    s.add_argument("--image-root", default=None, help="where the index's images are now")
    s.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=positive_int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("FAM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $FAM_API_KEY; unset = "
                        "no auth)")
    s.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: the model folder's name)")
    s.add_argument("--max-batch", type=positive_int, default=32,
                   help="most inputs per forward (1 = no dynamic batching)")
    s.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="wait for a batch to fill (default 2 ms)")
    s.add_argument("--max-request-mb", type=float, default=32.0, help="largest request body")
    s.add_argument("--max-image-mb", type=float, default=10.0, help="largest encoded image")
    s.add_argument("--max-image-pixels", type=positive_int, default=64_000_000,
                   help="largest image width×height (decompression-bomb guard)")
    s.add_argument("--allow-image-urls", action="store_true",
                   help="fetch http(s) image URLs given in requests (off by default: a server "
                        "that fetches URLs can be made to reach internal hosts)")
    s.add_argument("--threads", type=nonneg_int, default=None,
                   help="torch threads (default: torch's)")
    s.add_argument("--access-log", action="store_true", help="log one line per request")
    s.add_argument("--switch-interval-ms", type=float, default=0.1, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("fam serve needs the deploy extra: pip install 'fam[deploy]'") from None
    from fam.config import ServeConfig
    from fam.serve.app import create_app, load_service

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    mb = 1024 * 1024
    cfg = ServeConfig(host=args.host, port=args.port, max_batch=args.max_batch,
                      max_wait_ms=args.max_wait_ms,
                      max_request_bytes=int(args.max_request_mb * mb),
                      max_image_bytes=int(args.max_image_mb * mb),
                      max_image_pixels=args.max_image_pixels, api_key=args.api_key,
                      allow_image_urls=args.allow_image_urls,
                      served_model_name=args.served_model_name)
    service = load_service(args.model, cfg, args.index, args.image_root)
    # The model worker thread is CPU-bound and holds the GIL between torch ops; the event loop
    # thread waits up to the switch interval (5 ms by default) for it after every socket call,
    # which starves request handling (and so batching) under load. A short interval fixes it.
    sys.setswitchinterval(args.switch_interval_ms / 1000.0)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        log.warning("listening on %s without --api-key: anyone who reaches this address can "
                    "use the server", args.host)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info",
                timeout_graceful_shutdown=30, access_log=args.access_log)
    return 0
