"""``fam eval`` (MMEB protocol, ``--compare``) and ``fam encode`` (embeddings of a JSONL of items).

Both load the model through :func:`fam.backbones.load_backbone` with the same input options
(``--prompt-format``, ``--image-resolution``, ``--min-pixels``/``--max-pixels``,
``--max-text-tokens``; unset = what the model was saved with) and optionally a published
peft adapter (``--adapter``). See ``docs/vlm2vec.md`` for VLM2Vec-compatible settings.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from fam.cli.args import nonneg_int, positive_int

log = logging.getLogger("fam")

__all__ = ["add_infer_subcommands"]

#: ``--dtype`` choices (the model's weights; ``auto`` keeps what transformers loads).
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _add_backbone_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model inputs (default: what the model was saved with)")
    g.add_argument("--adapter", default=None,
                   help="peft adapter folder (LoRA/DoRA, adapter_model.safetensors or .bin) "
                        "trained on --model, merged into it (e.g. TIGER-Lab/VLM2Vec-Qwen2VL-2B)")
    g.add_argument("--prompt-format", choices=["fam", "vlm2vec"], default=None,
                   help="input layout: fam's, or VLM2Vec's (bare image tokens, no EOS, "
                        "sequential positions, no text cap)")
    g.add_argument("--image-resolution", default=None,
                   help="pre-resize images: none | high (1344²) | mid (672²) | low (128²) | cap "
                        "(only larger than 1344) | 336 | 448x336")
    g.add_argument("--min-pixels", type=positive_int, default=None,
                   help="Qwen2-VL processor min pixels")
    g.add_argument("--max-pixels", type=positive_int, default=None,
                   help="Qwen2-VL processor max pixels")
    g.add_argument("--max-text-tokens", default=None,
                   help="text tokens kept per item: N | none (no limit) | auto (fam 128, "
                        "vlm2vec none)")
    g.add_argument("--dtype", choices=DTYPES, default="auto", help="weights' dtype")
    g.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda:N")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow remote-code checkpoints (Phi-3.5-V, VLM2Vec-Full): runs their code")


def _load_model(args: argparse.Namespace) -> Any:
    """The embedding model the options describe, on the chosen device, in eval mode."""
    import torch

    from fam.errors import ConfigError
    from fam.model import EmbeddingModel
    opts: dict[str, Any] = {}
    if args.prompt_format is not None:
        opts["prompt_format"] = args.prompt_format
    if args.image_resolution is not None:
        opts["image_resolution"] = args.image_resolution
    for key in ("min_pixels", "max_pixels"):
        if getattr(args, key) is not None:
            opts[key] = getattr(args, key)
    if args.max_text_tokens is not None:
        raw = str(args.max_text_tokens).strip().lower()
        if raw in ("none", "auto"):
            opts["max_text_tokens"] = None if raw == "none" else "auto"
        elif raw.isdigit():
            opts["max_text_tokens"] = int(raw)
        else:
            raise ConfigError(f"--max-text-tokens {args.max_text_tokens!r}: give a positive "
                              "integer, none or auto")
    if args.dtype != "auto":
        opts["dtype"] = getattr(torch, args.dtype)
    from fam.model.encode import load_embedding_model
    # Inference: the LM head is not kept (not even loaded without --adapter).
    adapter = load_embedding_model(args.model, trust_remote_code=args.trust_remote_code,
                                   adapter=args.adapter, **opts).adapter
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        adapter.model.to(device)
    except (RuntimeError, AssertionError) as e:  # torch raises these for unknown devices
        raise ConfigError(f"--device {args.device}: {e}") from None
    return EmbeddingModel(adapter).eval()


def cmd_compare(args: argparse.Namespace) -> int:
    from fam.errors import ConfigError
    from fam.eval.compare import load_runs, run_labels
    from fam.eval.metrics import TIE_RULES, format_table
    runs: list[tuple[str, dict[str, Any]]] = []
    for label, path in zip(run_labels(args.compare), args.compare):
        held = load_runs(path)
        runs += [(f"{label}:{name}" if name else label, res) for name, res in held]
    if len(runs) < 2:
        raise ConfigError(f"--compare {args.compare[0]}: one run; give two or more results "
                          "paths (or a demo results.json, which holds several)")
    if all("groups" in r for _, r in runs):  # MMEB-V2 results (fam.eval.mmeb_v2)
        from fam.eval.mmeb_v2 import format_v2_table
        print(format_v2_table(runs, digits=args.digits))
        return 0
    print(format_table(runs, per_dataset=True, digits=args.digits))
    rules = {r.get("ties") for _, r in runs}
    if len(rules) == 1 and (rule := rules.pop()) in TIE_RULES:
        print(f"ties={rule}: {TIE_RULES[rule]}")
    for name, r in runs:
        bb = r.get("settings", {}).get("backbone")
        if bb:
            print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in bb.items()))
    if len(runs) > 2:
        print("no diff column: more than two runs (PATH:NAME picks one model of a demo "
              "results.json)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fam.errors import ConfigError
    if args.compare:
        return cmd_compare(args)
    if not args.model or not args.data:
        raise ConfigError("fam eval needs --model and --data (or --compare A B)")
    from fam.backbones.checks import resolve_model
    from fam.eval.metrics import TIE_RULES, format_table
    from fam.eval.mmeb import evaluate, save_results, save_score_files
    from fam.utils.io import output_file
    src = resolve_model(args.model)  # a missing model fails before anything is created
    default = src / "eval_results.json" if isinstance(src, Path) else \
        Path(f"eval_results-{src.replace('/', '--')}.json")  # a hub id: in this folder
    out = output_file(args.out or default, "--out")  # before the work, not after it
    if not args.overwrite:
        _refuse_overwrite(out, args)
    model = _load_model(args)
    from fam.eval.mmeb_v2 import is_v2_benchmark
    if is_v2_benchmark(args.data):
        if args.scoring != "single":
            raise ConfigError(f"--scoring {args.scoring}: an MMEB-V2 folder (videos, BEIR "
                              "pages) is scored with single vectors only so far; use "
                              "--scoring single")
        return _eval_v2(args, model, out)
    if args.scoring != "single":
        from fam.model.multivector import TwoReadings, load_multivector
        head = load_multivector(src if isinstance(src, Path) else None,
                                model.adapter.hidden_size, tokens=args.mv_tokens,
                                similarity=args.similarity).to(model.adapter.device)
        model = TwoReadings(model, head)
    res = evaluate(model, args.data, args.image_root, datasets=args.datasets or None,
                   batch_size=args.batch_size, max_rows=args.max_rows,
                   progress=not args.no_progress, ties=args.ties, split=args.split,
                   scoring=args.scoring, rerank_k=args.rerank_k)
    res["settings"].update(model=str(args.model), adapter=args.adapter)
    save_results(res, out)
    save_score_files(res, out.parent)
    print(format_table([(Path(args.model).name, res)], per_dataset=True))
    print(f"ties={args.ties}: {TIE_RULES[args.ties]}")
    print(f"results written to {out} (and {{Dataset}}_score.json beside it)")
    return 0


def _eval_v2(args: argparse.Namespace, model: Any, out: Path) -> int:
    """``fam eval`` on an MMEB-V2 folder (video rows, clip folders, BEIR visual documents)."""
    from fam.eval.mmeb import save_results
    from fam.eval.mmeb_v2 import evaluate_v2, format_v2_table, save_v2_score_files
    res = evaluate_v2(model, args.data, args.image_root, datasets=args.datasets or None,
                      batch_size=args.batch_size, max_rows=args.max_rows,
                      progress=not args.no_progress)
    res["settings"].update(model=str(args.model), adapter=args.adapter)
    save_results(res, out)
    save_v2_score_files(res, out.parent)
    print(format_v2_table(res))
    print(f"results written to {out} (and {{Dataset}}_score.json beside it, VLM2Vec's keys)")
    return 0


def _refuse_overwrite(out: Path, args: argparse.Namespace) -> None:
    """Refuse, before any work, to replace the results of an earlier eval without --overwrite.

    ``fam eval`` writes ``--out`` and a VLM2Vec ``{Dataset}_score.json`` per dataset beside
    it; a second eval into the same folder would silently replace the first one's.
    """
    from fam.data.mmeb import discover_datasets
    from fam.errors import ConfigError
    try:
        names = list(discover_datasets(args.data, "eval", args.split))
    except Exception:  # noqa: BLE001 - the evaluation itself reports a bad --data
        names = []
    if args.datasets:
        names = [n for n in names if n in args.datasets]
    taken = ([out] if out.exists() else []) + [
        p for p in (out.parent / f"{n}_score.json" for n in names) if p.exists()]
    if taken:
        more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
        raise ConfigError(f"--out {out}: {taken[0]}{more} already hold(s) the results of an "
                          "earlier eval; pass --overwrite to replace them, or give --out a "
                          "new folder", key="--out")


def cmd_encode(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    from fam.data.images import ImageRef, check_images
    from fam.data.items import check_items, read_items
    from fam.errors import DataError
    from fam.utils.io import atomic_path, output_file
    out = output_file(args.out, "--out")
    # The input contract: every row before the model loads, then what depends on the model.
    items = [r.item for r in read_items(args.input, args.image_root or Path(args.input).parent)]
    check_images((ImageRef(p, it.source, it.line, it.field) for it in items
                  for p in it.all_images + list(it.video)), "exists")
    model = _load_model(args)
    check_items(items, model.adapter.input_rules)
    emb = model.encode(items, batch_size=args.batch_size, progress=True)
    bad = (~torch.isfinite(emb).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise DataError(f"the model produced non-finite embeddings for {len(bad)} of "
                        f"{len(items)} items (first: line {items[bad[0]].line}); nothing was "
                        f"written. Check the model's weights ({args.model})", args.input,
                        items[bad[0]].line)
    # The model's identity travels with the vectors (fam index build --embeddings reads it).
    from fam.index.build import embeddings_metadata
    layout = {k: getattr(args, k) for k in ("prompt_format", "image_resolution", "min_pixels",
                                           "max_pixels", "max_text_tokens")
              if getattr(args, k, None) is not None}
    with atomic_path(out) as tmp:
        save_file({"embeddings": emb.contiguous()}, str(tmp),
                  metadata=embeddings_metadata(args.model, model.normalize, args.adapter, layout))
    print(f"{emb.shape[0]} embeddings of dim {emb.shape[1]} written to {out}")
    return 0


def add_infer_subcommands(sub: Any) -> None:
    """``fam eval`` and ``fam encode``."""
    ev = sub.add_parser("eval", help="MMEB-protocol evaluation of an embedding model, or "
                                     "--compare two runs")
    ev.add_argument("--model", default=None, help="checkpoint directory or hub id")
    ev.add_argument("--data", default=None, help="MMEB-format eval folder or file")
    ev.add_argument("--image-root", default=None,
                    help="image root (default: beside the data, or its eval_images/ or images/)")
    ev.add_argument("--datasets", nargs="*", default=None)
    ev.add_argument("--split", default=None, help="split of dataset folders (default: test)")
    ev.add_argument("--max-rows", type=positive_int, default=None)
    ev.add_argument("--batch-size", type=positive_int, default=32)
    ev.add_argument("--ties", choices=["expected", "optimistic", "pessimistic"],
                    default="expected",
                    help="expected: a k-way tie earns 1/k (default); optimistic: ties go to the "
                         "positive (argmax, as VLM2Vec and the MMEB leaderboard); pessimistic")
    ev.add_argument("--out", default=None,
                    help="results JSON (default: <model>/eval_results.json; for a hub id "
                         "eval_results-<org>--<name>.json here)")
    ev.add_argument("--overwrite", action="store_true",
                    help="replace the results (--out and the {Dataset}_score.json files beside "
                         "it) of an earlier eval; without it fam eval refuses to overwrite them")
    ev.add_argument("--scoring", choices=["single", "maxsim", "hybrid"], default="single",
                    help="single: pooled cosine; maxsim: late interaction over token vectors "
                         "(the model's trained head, else its plain token states); hybrid: "
                         "pooled top --rerank-k, reranked by MaxSim")
    ev.add_argument("--rerank-k", type=positive_int, default=10,
                    help="candidates --scoring hybrid reranks (default 10)")
    ev.add_argument("--mv-tokens", choices=["content", "image", "text", "all"], default=None,
                    help="token vectors read (default: the trained head's, else content)")
    ev.add_argument("--similarity", choices=["maxsim", "meanmaxsim"], default=None,
                    help="late-interaction similarity (default: the head's, else meanmaxsim)")
    ev.add_argument("--no-progress", action="store_true")
    ev.add_argument("--compare", nargs="+", metavar="RESULTS", default=None,
                    help="print runs side by side, named by their run folders, with the "
                         "difference of two: any results file fam writes (fam eval's "
                         "eval_results.json, the demo's results.json, with :NAME for one of "
                         "its models, an ablation run record), a folder holding one, or a "
                         "folder of VLM2Vec {Dataset}_score.json files")
    ev.add_argument("--digits", type=nonneg_int, default=1, help="decimals in --compare's table")
    _add_backbone_options(ev)
    ev.set_defaults(func=cmd_eval)

    en = sub.add_parser("encode", help="embed a JSONL of {text, image} items")
    en.add_argument("--model", required=True)
    en.add_argument("--input", required=True, help="JSONL rows {text, image (relative path)}")
    en.add_argument("--image-root", default=None)
    en.add_argument("--out", required=True, help="safetensors file with 'embeddings' (n, d)")
    en.add_argument("--batch-size", type=positive_int, default=32)
    _add_backbone_options(en)
    en.set_defaults(func=cmd_encode)
