"""``fam serve``: the command-line front of :mod:`fam.serve` (uvicorn runs the app).

    fam serve --model DIR [--index IDX] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Registered on the main parser by :func:`add_serve_subcommand`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from fam.errors import ConfigError

__all__ = ["add_serve_subcommand", "cmd_serve", "build_service"]

log = logging.getLogger(__name__)


def add_serve_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register ``serve`` on the ``fam`` CLI's sub-parsers."""
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
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("FAM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $FAM_API_KEY; unset = "
                        "no auth)")
    s.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: the model folder's name)")
    s.add_argument("--max-batch", type=int, default=32,
                   help="most inputs per forward (1 = no dynamic batching)")
    s.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="wait for a batch to fill (default 2 ms)")
    s.add_argument("--max-request-mb", type=float, default=32.0, help="largest request body")
    s.add_argument("--max-image-mb", type=float, default=10.0, help="largest encoded image")
    s.add_argument("--max-image-pixels", type=int, default=25_000_000,
                   help="largest image width×height (decompression-bomb guard)")
    s.add_argument("--allow-image-urls", action="store_true",
                   help="fetch http(s) image URLs given in requests (off by default: a server "
                        "that fetches URLs can be made to reach internal hosts)")
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    s.add_argument("--access-log", action="store_true", help="log one line per request")
    s.add_argument("--switch-interval-ms", type=float, default=0.1, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)


def build_service(args: argparse.Namespace):
    """Load the model (and index, checked to be built by it) into a :class:`Service`."""
    from fam.backbones import load_backbone
    from fam.index.identity import model_identity
    from fam.index.index import Index
    from fam.model import EmbeddingModel
    from fam.serve.app import Service
    from fam.serve.config import ServeConfig

    mb = 1024 * 1024
    cfg = ServeConfig(host=args.host, port=args.port, max_batch=args.max_batch,
                      max_wait_ms=args.max_wait_ms,
                      max_request_bytes=int(args.max_request_mb * mb),
                      max_image_bytes=int(args.max_image_mb * mb),
                      max_image_pixels=args.max_image_pixels, api_key=args.api_key,
                      allow_image_urls=args.allow_image_urls,
                      served_model_name=args.served_model_name)
    index = None
    if args.index:
        index = Index.load(args.index, image_root=args.image_root)
        index.check_model(model_identity(args.model), str(args.model))
    model = EmbeddingModel(load_backbone(args.model))
    return Service(model, cfg, index, model_path=str(args.model))


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("fam serve needs the deploy extra: pip install 'fam[deploy]'") from None
    from fam.serve.app import create_app

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    service = build_service(args)
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
