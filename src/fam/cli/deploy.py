"""``fam index build``, ``fam search`` and ``fam serve``: using a trained model.

    fam index build --model DIR --items items.jsonl [--image-root R] --out IDX [--kind hnsw]
    fam index build --embeddings emb.safetensors --items items.jsonl --out IDX
    fam search --index IDX [--model DIR] [--text T] [--image P] [-k 10] [--json]
    fam serve --model DIR [--index IDX] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

The work is done by :mod:`fam.index` and :mod:`fam.serve`; this module parses arguments.
"""
from __future__ import annotations

import argparse
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
    from fam.config import SearchWorkerConfig
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
    s.add_argument("--worker", action=argparse.BooleanOptionalAction, default=None,
                   help="answer through a background query worker that keeps the index and "
                        "its model loaded, started on first use (default: yes, unless "
                        "FAM_SEARCH_WORKER=0); --no-worker searches in this process")
    s.add_argument("--worker-idle", type=float, default=None, metavar="SECONDS",
                   help="a worker started by this search exits after this long without a "
                        f"query (default {SearchWorkerConfig().idle_s:g})")
    s.add_argument("--stop-worker", action="store_true",
                   help="stop the query workers of --index and exit")
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


def _use_worker(args: argparse.Namespace) -> bool:
    """The query worker, unless refused or ``--debug``; in a process that has torch loaded
    already (a library caller, a test) there is no import to save: the search stays here."""
    if getattr(args, "debug", False):
        return False  # a traceback is only to be had from this process
    if args.worker is not None:
        return bool(args.worker)
    if os.environ.get("FAM_SEARCH_WORKER", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return "torch" not in sys.modules


def cmd_search(args: argparse.Namespace) -> int:
    from fam.config import SearchWorkerConfig
    if args.stop_worker:
        from fam.serve.search_client import WorkerUnavailable, stop_workers
        try:
            pids = stop_workers(args.index)
        except WorkerUnavailable:
            pids = []  # no usable worker folder: no worker
        print(f"stopped the query worker(s) of {args.index}: pid {', '.join(map(str, pids))}"
              if pids else f"no query worker of {args.index} is running")
        return 0
    if not args.text and not args.image:
        raise ConfigError("give a query: --text T and/or --image PATH")
    if args.k < 1:
        raise ConfigError("-k must be >= 1")
    image = None
    if args.image:
        image = Path(args.image).resolve()
        if not image.is_file():
            raise ConfigError(f"--image {args.image}: file not found")
    cfg = SearchWorkerConfig()
    if args.worker_idle is not None:
        if not args.worker_idle > 0:  # also refuses nan
            raise ConfigError(f"--worker-idle {args.worker_idle:g}: give a number of seconds > 0")
        cfg = SearchWorkerConfig(idle_s=args.worker_idle)
    query = {"text": args.text or "", "image": str(image) if image else None, "k": args.k,
             "prompt": args.query_prompt, "as_json": bool(args.json),
             "maps": os.path.abspath(args.maps) if args.maps else None}
    if _use_worker(args):
        from fam.serve.search_client import WorkerSpec, WorkerUnavailable, search
        try:
            reply = search(WorkerSpec.from_args(args.index, args.model, args.image_root),
                           query, cfg)
        except WorkerUnavailable as e:
            log.warning("the query worker is unavailable (%s): searching in this process "
                        "(--no-worker skips the worker)", e)
        else:
            if reply["started"]:
                log.info("started a query worker (pid %s) that keeps this index and its model "
                         "loaded for the next searches; it exits after %g s without one "
                         "(--stop-worker stops it, --no-worker searches without it)",
                         reply["pid"], cfg.idle_s)
            print(reply["stderr"], file=sys.stderr)
            sys.stdout.write(reply["stdout"])
            return 0
    # In this process (torch: after the checks), with the worker's own code.
    from fam.index import Index, SearchQuery, check_maps, load_query_model, run_query
    index = Index.load(args.index, image_root=args.image_root)
    check_maps(index, query["maps"])  # before the model loads
    model = load_query_model(index, args.model)
    note, out = run_query(index, model, SearchQuery(**query), args.model)
    print(note, file=sys.stderr)
    sys.stdout.write(out)
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
    s.add_argument("--max-video-frames", type=positive_int, default=256,
                   help="most frames of one input's video (8 of them are sampled)")
    s.add_argument("--max-request-pixels", type=positive_int, default=256_000_000,
                   help="total width×height of all images and video frames in one request")
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
                      max_image_pixels=args.max_image_pixels,
                      max_video_frames=args.max_video_frames,
                      max_request_pixels=args.max_request_pixels, api_key=args.api_key,
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
