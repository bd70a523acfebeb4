"""The ``fam`` command line.

    fam demo [--quick] [--out DIR]              the main job on the embedded default
    fam data scenes --out DIR [...]             generate the built-in Scenes benchmark
    fam model tiny --out DIR [--family ...]     save a tiny random-initialised backbone
    fam train stage0|align|adapt|projector [CONFIG] [k=v ...]   a training stage
    fam analyze alignment|probes ...             alignment analysis, FAM probes
    fam ablate --out DIR --seeds 0 1             FAM ablations on Scenes (mean ± std)
    fam projector-compare [--quick]              caption-only vs patch-aligned projectors
    fam eval --model DIR --data DIR             MMEB-protocol evaluation
    fam encode --model DIR --input F --out F    embed items (inference)
    fam bench mac|gradcache|encode              benchmarks with ratios against a reference
    fam export --model DIR --out DIR2           a sentence-transformers / vLLM folder
    fam plan ...                                estimate peak memory, suggest a chunk size
    fam pad build --images DIR --out pad.jsonl  build a patch-aligned dataset (PAD)

Training subcommands take an optional YAML config and ``key=value`` overrides, e.g.
``fam train adapt configs/adapt.yaml optim.lr=1e-4 lora.r=16``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from fam.errors import FamError

log = logging.getLogger("fam")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # Offline by default: nothing in the embedded pipeline may reach a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def cmd_demo(args: argparse.Namespace) -> int:
    from fam.demo import format_report, run_demo
    res = run_demo(args.out, quick=args.quick, seed=args.seed, progress=not args.no_progress,
                   threads=args.threads)
    print(format_report(res))
    print(f"artefacts in {Path(args.out).resolve()} (results.json, results.md, */model)")
    return 0


def cmd_data_scenes(args: argparse.Namespace) -> int:
    from fam.config import load_config
    from fam.data.scenes import ScenesConfig, generate_scenes
    cfg = load_config(ScenesConfig, args.config, args.overrides)
    summary = generate_scenes(cfg, args.out)
    print(json.dumps(summary.get("datasets", summary), indent=2))
    return 0


def cmd_model_tiny(args: argparse.Namespace) -> int:
    from fam.backbones import build_tiny
    corpus: list[str] = []
    if args.corpus:
        recs = json.loads(Path(args.corpus).read_text())
        corpus = [r.get("caption") or r.get("blip_caption") or "" for r in recs]
    build_tiny(args.family, args.out, size=args.size, image_size=args.image_size, corpus=corpus,
               seed=args.seed)
    print(f"saved a tiny {args.family} ({args.size}) to {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from fam.config import AdaptConfig, Stage0Config, load_config
    if args.stage == "stage0":
        from fam.train.stage0 import run_stage0
        path = run_stage0(load_config(Stage0Config, args.config, args.overrides))
    elif args.stage == "align":
        from fam.train.align import AlignConfig, run_align
        path = run_align(load_config(AlignConfig, args.config, args.overrides))
    elif args.stage == "adapt":
        from fam.train.adapt import run_adapt
        overrides = list(args.overrides) + (["vein.enabled=true"] if args.vein else [])
        path = run_adapt(load_config(AdaptConfig, args.config, overrides))
    else:  # pragma: no cover - argparse restricts choices
        raise FamError(f"unknown stage {args.stage}")
    print(f"model saved to {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fam.eval.metrics import format_table
    from fam.eval.mmeb import evaluate, save_results
    from fam.inference import load_embedding_model
    res = evaluate(load_embedding_model(args.model), args.data, args.image_root,
                   datasets=args.datasets or None, batch_size=args.batch_size,
                   max_rows=args.max_rows, progress=not args.no_progress)
    out = Path(args.out) if args.out else Path(args.model) / "eval_results.json"
    save_results(res, out)
    print(format_table([(Path(args.model).name, res)], per_dataset=True))
    print(f"results written to {out}")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from fam.inference import EncodePipeline, load_embedding_model, read_items
    items = read_items(args.input, args.image_root)
    model = load_embedding_model(args.model)
    emb = EncodePipeline(model, batch_size=args.batch_size, progress=True).encode(items)
    save_file({"embeddings": emb.contiguous()}, args.out)
    print(f"{emb.shape[0]} embeddings of dim {emb.shape[1]} written to {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import importlib
    mod = importlib.import_module(f"fam.bench.{args.which}")
    return int(mod.main(list(args.rest)) or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fam", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the main job (Scenes → stage 0 → adaptation → eval)")
    d.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    d.add_argument("--quick", action="store_true", help="tiny sizes (about a minute)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("--threads", type=int, default=None,
                   help="torch threads (default 1: fastest for the tiny models; 0 = torch's own)")
    d.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_cmd", required=True)
    sc = data.add_parser("scenes", help="generate the built-in Scenes benchmark")
    sc.add_argument("--out", required=True)
    sc.add_argument("--config", default=None, help="YAML with ScenesConfig fields")
    sc.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=1")
    sc.set_defaults(func=cmd_data_scenes)

    model = sub.add_parser("model", help="models").add_subparsers(dest="model_cmd", required=True)
    ti = model.add_parser("tiny", help="save a tiny random-initialised backbone")
    ti.add_argument("--out", required=True)
    ti.add_argument("--family", default="qwen2_vl")
    ti.add_argument("--size", default="s", choices=["xs", "s", "m"])
    ti.add_argument("--image-size", type=int, default=112)
    ti.add_argument("--corpus", default=None, help="caption JSON to train the tokenizer on")
    ti.add_argument("--seed", type=int, default=0)
    ti.set_defaults(func=cmd_model_tiny)

    train = sub.add_parser("train", help="run a training stage").add_subparsers(
        dest="stage", required=True)
    for stage, help_ in (("stage0", "generative pre-training of a tiny LVLM"),
                         ("align", "FAM stage 1: MAC on image-caption pairs"),
                         ("adapt", "VLM2Vec adaptation (--vein: FAM stage 2)")):
        tr = train.add_parser(stage, help=help_)
        tr.add_argument("config", nargs="?", default=None,
                        help="YAML config (optional; keys mirror the stage's config dataclass)")
        tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4")
        if stage == "adapt":
            tr.add_argument("--vein", action="store_true", help="add the VEIN loss")
        tr.set_defaults(func=cmd_train)
    analyze = sub.add_parser("analyze", help="analysis of trained models").add_subparsers(
        dest="analyze_cmd", required=True)

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

    be = sub.add_parser("bench", help="benchmarks (exact vs reference, printed ratios)")
    be.add_argument("which", choices=["mac", "gradcache", "encode"],
                    help="mac: exact MAC vs the naive (B·N)×(B·T) form; gradcache: peak memory "
                         "of GradCache (batch 256, chunk 16) vs a plain batch of 16; encode: the "
                         "inference pipeline vs the sequential loop (items/s, peak memory)")
    be.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the benchmark")
    be.set_defaults(func=cmd_bench)

    from fam.pad.cli import add_pad_subcommand
    from fam.projector_cli import add_projector_subcommands
    add_pad_subcommand(sub)
    add_projector_subcommands(train, analyze, sub)
    from fam.ablate import add_ablate_subcommand
    from fam.analysis.probes import add_probes_subcommand
    add_ablate_subcommand(sub)
    add_probes_subcommand(analyze)
    from fam.plan import add_plan_subcommand
    add_plan_subcommand(sub)
    from fam.export import add_export_subcommand
    add_export_subcommand(sub)
    return p



def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may follow options (`fam train adapt --vein a=1`): argparse leaves
    # those as extras; they join the overrides of the commands that take them.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    # A YAML path given as the first positional that is really an override goes to overrides.
    if getattr(args, "config", None) and "=" in str(args.config):
        args.overrides = [args.config] + list(args.overrides)
        args.config = None
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except FamError as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
