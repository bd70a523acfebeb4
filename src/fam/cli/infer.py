"""``fam eval`` (MMEB protocol) and ``fam encode`` (embeddings of a JSONL of items)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fam.cli.args import positive_int

__all__ = ["add_infer_subcommands"]


def cmd_eval(args: argparse.Namespace) -> int:
    from fam.backbones import load_backbone
    from fam.eval.metrics import format_table
    from fam.eval.mmeb import evaluate, save_results
    from fam.model import EmbeddingModel
    from fam.backbones.checks import resolve_model
    from fam.utils.io import output_file
    src = resolve_model(args.model)  # a missing model fails before anything is created
    default = src / "eval_results.json" if isinstance(src, Path) else \
        Path(f"eval_results-{src.replace('/', '--')}.json")  # a hub id: in this folder
    out = output_file(args.out or default, "--out")
    adapter = load_backbone(args.model)
    res = evaluate(EmbeddingModel(adapter), args.data, args.image_root,
                   datasets=args.datasets or None, batch_size=args.batch_size,
                   max_rows=args.max_rows, progress=not args.no_progress)
    save_results(res, out)
    print(format_table([(Path(args.model).name, res)], per_dataset=True))
    print(f"results written to {out}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from fam.backbones import load_backbone
    from fam.data.images import ImageRef, check_images
    from fam.data.mmeb import read_items
    from fam.errors import DataError
    from fam.model import EmbeddingModel
    from fam.utils.io import atomic_path, output_file
    out = output_file(args.out, "--out")
    items = read_items(args.input, args.image_root or Path(args.input).parent)
    check_images(ImageRef(it.image, it.source, it.line, it.field) for it in items
                 if it.image is not None)
    model = EmbeddingModel(load_backbone(args.model))
    emb = model.encode(items, batch_size=args.batch_size)
    bad = (~torch.isfinite(emb).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise DataError(f"the model produced non-finite embeddings for {len(bad)} of "
                        f"{len(items)} items (first: line {items[bad[0]].line}); nothing was "
                        f"written. Check the model's weights ({args.model})", args.input,
                        items[bad[0]].line)
    with atomic_path(out) as tmp:
        save_file({"embeddings": emb.contiguous()}, str(tmp))
    print(f"{emb.shape[0]} embeddings of dim {emb.shape[1]} written to {out}")
    return 0


def add_infer_subcommands(sub: Any) -> None:
    """``fam eval`` and ``fam encode``."""
    ev = sub.add_parser("eval", help="MMEB-protocol evaluation of an embedding model")
    ev.add_argument("--model", required=True, help="checkpoint directory or hub id")
    ev.add_argument("--data", required=True, help="MMEB-format eval folder or file")
    ev.add_argument("--image-root", default=None, help="image root (default: beside the data)")
    ev.add_argument("--datasets", nargs="*", default=None)
    ev.add_argument("--max-rows", type=positive_int, default=None)
    ev.add_argument("--batch-size", type=positive_int, default=32)
    ev.add_argument("--out", default=None,
                    help="results JSON (default: <model>/eval_results.json; for a hub id "
                         "eval_results-<org>--<name>.json here)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=cmd_eval)

    en = sub.add_parser("encode", help="embed a JSONL of {text, image} items")
    en.add_argument("--model", required=True)
    en.add_argument("--input", required=True, help="JSONL rows {text, image (relative path)}")
    en.add_argument("--image-root", default=None)
    en.add_argument("--out", required=True, help="safetensors file with 'embeddings' (n, d)")
    en.add_argument("--batch-size", type=positive_int, default=32)
    en.set_defaults(func=cmd_encode)
