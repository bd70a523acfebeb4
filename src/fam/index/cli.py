"""``fam index build`` and ``fam search``: command-line fronts of :mod:`fam.index`.

    fam index build --model DIR --items items.jsonl [--image-root R] --out IDX [--kind hnsw]
    fam index build --embeddings emb.safetensors --items items.jsonl --out IDX
    fam search --index IDX [--model DIR] [--text T] [--image P] [-k 10] [--json]

Registered on the main parser by :func:`add_index_subcommands`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fam.errors import ConfigError

__all__ = ["add_index_subcommands", "cmd_index_build", "cmd_search", "format_hits"]


def add_index_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``index build`` and ``search`` on the ``fam`` CLI's sub-parsers."""
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
    b.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node (32)")
    b.add_argument("--ef-construction", type=int, default=200, help="HNSW build list (200)")
    b.add_argument("--ef-search", type=int, default=128, help="HNSW search list (128)")
    b.add_argument("--query-prompt", default="",
                   help="prompt for query texts, stored in the manifest: '{text}' is replaced, "
                        "otherwise it is a prefix")
    b.add_argument("--document-prompt", default="", help="prompt applied to the items' texts")
    b.add_argument("--shard-size", type=int, default=1024, help="items per resumable shard")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_index_build)

    s = subparsers.add_parser("search", help="search an index with a text and/or image query")
    s.add_argument("--index", required=True, help="index folder from fam index build")
    s.add_argument("--model", default=None,
                   help="embedding model (default: the one recorded in the index; must be the "
                        "model that built it)")
    s.add_argument("--text", default=None, help="query text")
    s.add_argument("--image", default=None, help="query image file")
    s.add_argument("-k", type=int, default=10, help="results (default 10)")
    s.add_argument("--json", action="store_true", help="JSONL, one hit per line")
    s.add_argument("--image-root", default=None,
                   help="where the index's images are now (default: where they were at build)")
    s.add_argument("--query-prompt", default=None,
                   help="override the index's query prompt for this search")
    s.set_defaults(func=cmd_search)


def cmd_index_build(args: argparse.Namespace) -> int:
    from fam.index.build import build_index
    from fam.index.store import HnswParams
    out = build_index(args.out, args.items, model=args.model, embeddings=args.embeddings,
                      image_root=args.image_root, kind=args.kind,
                      hnsw=HnswParams(args.hnsw_m, args.ef_construction, args.ef_search),
                      query_prompt=args.query_prompt, document_prompt=args.document_prompt,
                      shard_size=args.shard_size, batch_size=args.batch_size,
                      progress=not args.no_progress)
    print(f"index written to {out}")
    return 0


def load_query_model(index, model: str | None):
    """The embedding model for queries to ``index``, checked to be the one that built it.

    Raises:
        ModelMismatchError / ConfigError: another model, or no model given or recorded.
    """
    from fam.backbones import load_backbone
    from fam.index.identity import model_identity
    from fam.model import EmbeddingModel
    path = model or index.manifest.model_path
    if path is None or (model is None and not Path(path).exists()):
        raise ConfigError(f"the model recorded in {index.path} ({path}) is not on this machine; "
                          "pass --model with the model that built the index")
    index.check_model(model_identity(path), str(path))
    return EmbeddingModel(load_backbone(path))


def format_hits(hits) -> str:
    """A readable table of hits (rank, score, id, image, text)."""
    lines = [f"{'rank':>4}  {'score':>8}  {'id':<16} {'image':<28} text"]
    for h in hits:
        text = h.text.replace("\n", " ")
        lines.append(f"{h.rank:>4}  {h.score:>8.4f}  {h.id[:16]:<16} {(h.image or '-')[:28]:<28} "
                     f"{text[:70]}")
    return "\n".join(lines)


def cmd_search(args: argparse.Namespace) -> int:
    from fam.index.embed import embed
    from fam.index.index import Index
    if not args.text and not args.image:
        raise ConfigError("give a query: --text T and/or --image PATH")
    if args.k < 1:
        raise ConfigError("-k must be >= 1")
    image = None
    if args.image:
        image = Path(args.image).resolve()
        if not image.is_file():
            raise ConfigError(f"--image {args.image}: file not found")
    index = Index.load(args.index, image_root=args.image_root)
    model = load_query_model(index, args.model)
    q = embed(model, [index.query_item(args.text or "", image, args.query_prompt)])
    hits = index.search(q, args.k)[0]
    if args.json:
        for h in hits:
            print(json.dumps(h.to_json(), ensure_ascii=False))
    else:
        print(format_hits(hits))
    return 0
