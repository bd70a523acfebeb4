"""``fam eval`` (MMEB protocol) and ``fam encode`` (embeddings of a JSONL of items)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_infer_subcommands"]


def cmd_eval(args: argparse.Namespace) -> int:
    from fam.backbones import load_backbone
    from fam.eval.metrics import format_table
    from fam.eval.mmeb import evaluate, save_results
    from fam.model import EmbeddingModel
    adapter = load_backbone(args.model)
    res = evaluate(EmbeddingModel(adapter), args.data, args.image_root,
                   datasets=args.datasets or None, batch_size=args.batch_size,
                   max_rows=args.max_rows, progress=not args.no_progress)
    out = Path(args.out) if args.out else Path(args.model) / "eval_results.json"
    save_results(res, out)
    print(format_table([(Path(args.model).name, res)], per_dataset=True))
    print(f"results written to {out}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from fam.backbones import load_backbone
    from fam.data.types import MMItem
    from fam.model import EmbeddingModel
    from fam.utils.io import read_jsonl, resolve_under
    root = Path(args.image_root or Path(args.input).parent)
    items = []
    for line, row in read_jsonl(args.input):
        img = row.get("image") or None
        items.append(MMItem(row.get("text", ""),
                            resolve_under(root, img, source=args.input, line=line, field="image")
                            if img else None, source=str(args.input), line=line, field="image"))
    model = EmbeddingModel(load_backbone(args.model))
    emb = model.encode(items, batch_size=args.batch_size)
    save_file({"embeddings": emb.contiguous()}, args.out)
    print(f"{emb.shape[0]} embeddings of dim {emb.shape[1]} written to {args.out}")
    return 0


def add_infer_subcommands(sub: Any) -> None:
    """``fam eval`` and ``fam encode``."""
    ev = sub.add_parser("eval", help="MMEB-protocol evaluation of an embedding model")
    ev.add_argument("--model", required=True, help="checkpoint directory or hub id")
    ev.add_argument("--data", required=True, help="MMEB-format eval folder or file")
    ev.add_argument("--image-root", default=None, help="image root (default: beside the data)")
    ev.add_argument("--datasets", nargs="*", default=None)
    ev.add_argument("--max-rows", type=int, default=None)
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--out", default=None, help="results JSON (default: <model>/eval_results.json)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=cmd_eval)

    en = sub.add_parser("encode", help="embed a JSONL of {text, image} items")
    en.add_argument("--model", required=True)
    en.add_argument("--input", required=True, help="JSONL rows {text, image (relative path)}")
    en.add_argument("--image-root", default=None)
    en.add_argument("--out", required=True, help="safetensors file with 'embeddings' (n, d)")
    en.add_argument("--batch-size", type=int, default=32)
    en.set_defaults(func=cmd_encode)
