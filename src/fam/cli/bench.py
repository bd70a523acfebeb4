"""``fam bench mac|gradcache|encode|peer|search|serve|gpu|startup`` (measured against a
reference in the same run) and ``fam plan``."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fam.cli.args import nonneg_int, positive_int

__all__ = ["add_bench_subcommands"]


def _load_avg() -> list[float] | None:
    """The machine's 1/5/15-minute load averages (recorded beside timings), None off Unix."""
    import os
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _verdict(problems: list[str]) -> int:
    """Print what failed (a missed target, outputs that differ); 1 if anything did."""
    for p in problems:
        print(f"FAILED: {p}")
    return 1 if problems else 0


def cmd_bench_mac(args: argparse.Namespace) -> int:
    from fam.errors import ConfigError
    shapes = []  # checked before torch is imported: a bad argument answers at once
    for s in args.shapes:
        try:
            shape = tuple(int(x) for x in s.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 4 or min(shape) < 1:
            raise ConfigError(f"fam bench mac --shapes: {s!r} is not B,N,T,d (four positive "
                              "integers, e.g. 64,256,32,256)")
        shapes.append(shape)
    from fam.bench.mac import check, format_report, run_bench
    load_before = _load_avg()
    rows = run_bench(shapes, device=args.device, repeats=args.repeats, dtype=args.dtype)
    print(format_report(rows, args.device))
    if args.json:
        from fam.utils.io import atomic_write_json
        atomic_write_json(args.json, {"command": "fam bench mac", "device": args.device,
                                      "load_avg_before": load_before,
                                      "load_avg_after": _load_avg(), "rows": rows})
    return _verdict(check(rows, args.min_memory_ratio, args.min_speed_ratio))


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    from fam.bench.gpu import device_for, format_markdown, run_gpu_bench
    from fam.config import GpuBenchConfig
    cfg = GpuBenchConfig.tiny() if args.tiny else GpuBenchConfig()
    res = run_gpu_bench(cfg, args.out, device_for(args.tiny), args.tiny)
    print(format_markdown(res))
    print(f"written: {args.out}/gpu_bench.json, {args.out}/gpu_bench.md")
    ok = all(v["status"] == "ok" for v in res["sections"].values()) and res["checks_passed"]
    return 0 if ok else 1


def cmd_bench_gradcache(args: argparse.Namespace) -> int:
    from fam.bench.gradcache import check, format_report, run_bench
    load_before = _load_avg()
    res = run_bench(args.batch, args.chunk, args.size, args.image_size, args.text_words,
                    args.device, args.threads, with_full=not args.no_full,
                    dropout=args.lora_dropout)
    print(format_report(res, args.size, args.batch, args.chunk, args.device, args.max_ratio))
    if args.json:
        from fam.utils.io import atomic_write_json
        atomic_write_json(args.json, {**res, "load_avg_before": load_before,
                                      "load_avg_after": _load_avg()})
    return _verdict(check(res, args.max_ratio))


def cmd_bench_encode(args: argparse.Namespace) -> int:
    from fam.bench.encode import format_report, run_default_or_given
    from fam.errors import ConfigError
    if (args.model is None) != (args.items is None):
        raise ConfigError("fam bench encode: give both --model and --items, or neither (a tiny "
                          "model and Scenes items)")
    load_before = _load_avg()
    res, label = run_default_or_given(args.model, args.items, args.image_root, args.n,
                                      args.size, args.layers, args.batch_size, args.threads,
                                      args.repeats, args.prefetch, args.workers)
    res.update(label=label, load_avg_before=load_before, load_avg_after=_load_avg())
    print(format_report(res, label))
    if args.json:
        from fam.utils.io import atomic_write_json
        atomic_write_json(args.json, res)
    from fam.bench.encode import check
    return _verdict(check(res, args.min_speedup, args.max_memory_ratio))


def cmd_bench_peer(args: argparse.Namespace) -> int:
    from fam.bench.peer import MODALITIES, format_report, run_default_or_given
    from fam.errors import ConfigError
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        raise ConfigError("fam bench peer compares with sentence-transformers, which is not "
                          "installed: pip install 'fam[deploy]'") from None
    tasks = tuple(args.tasks or (*MODALITIES, "train"))
    res, label = run_default_or_given(args.model, args.work, args.size, args.layers, n=args.n,
                                      batch_size=args.batch_size, pairs=args.pairs,
                                      chunk=args.chunk, steps=args.steps, repeats=args.repeats,
                                      threads=args.threads, device=args.device, tasks=tasks)
    print(format_report(res, label))
    if args.json:
        from fam.utils.io import atomic_write_json
        atomic_write_json(args.json, res)
    return 0 if res["met"] else 1


def cmd_bench_search(args: argparse.Namespace) -> int:
    if args.multivector:
        from fam.bench.search_multivector import (format_multivector_report,
                                                  run_multivector_bench)
        r = run_multivector_bench(args.work, args.scenes, args.model, args.k,
                                  args.n_eval_images, args.repeats, tuple(args.max_tokens),
                                  tuple(args.candidate_tokens), progress=not args.no_progress)
        print(format_multivector_report(r))
        if args.json:
            args.json.write_text(json.dumps(r, indent=2) + "\n")
        return 0
    from fam.bench.search import format_report, run_bench
    r = run_bench(args.work, args.scenes, args.model, args.k, args.n_eval_images, args.repeats,
                  not args.no_progress)
    print(format_report(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    ok = (r["flat_identical_topk"] == r["exact_identical_topk"] == r["queries"]
          and r["hnsw_recall_at_k"] >= 0.95)
    return 0 if ok else 1


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from fam.bench.serve import check, format_report, run_bench
    load_before = _load_avg()
    r = run_bench(args.model, args.work, args.clients, args.requests, args.inputs,
                  args.max_batch, args.timeout, args.threads, args.repeats)
    r.update(load_avg_before=load_before, load_avg_after=_load_avg())
    print(format_report(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return _verdict(check(r, args.min_speedup))


def cmd_bench_startup(args: argparse.Namespace) -> int:
    from fam.bench.startup import format_report, run_bench
    r = run_bench(args.work, args.repeats, args.index)
    print(format_report(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0 if r["all_ok"] else 1


def cmd_plan(args: argparse.Namespace) -> int:
    from fam.bench.plan import estimate, format_plan, resolve_shape
    from fam.config import PlanConfig
    cfg = PlanConfig(**{f: getattr(args, f) for f in asdict(PlanConfig())})
    cfg.validate()
    shape = resolve_shape(args.model)
    est = estimate(shape, cfg)
    if args.json:
        print(json.dumps({"shape": asdict(shape), "config": asdict(cfg), "estimate": est},
                         indent=2))
    else:
        print(format_plan(shape, cfg, est, args.budget_gib))
    return 0


def add_bench_subcommands(sub: Any) -> None:
    """``fam bench mac|gradcache|encode|peer|search|serve|gpu|startup`` and ``fam plan``."""
    from fam.config.tools import MAC_BENCH_SHAPES as DEFAULT_SHAPES
    from fam.bench.plan import KNOWN_SHAPES
    from fam.config import PlanConfig

    bench = sub.add_parser("bench", help="benchmarks (exact vs reference, printed ratios)")
    which = bench.add_subparsers(dest="which", required=True)
    mac = which.add_parser("mac", help="exact MAC vs the official FAM code's (B·N)×(B·T) form "
                                       "and the fully masked one: time, peak memory, same loss; "
                                       "each variant in a fresh process; exit 1 on a missed "
                                       "target or differing losses")
    mac.add_argument("--shapes", nargs="+",
                     default=[",".join(map(str, s)) for s in DEFAULT_SHAPES],
                     help="B,N,T,d tuples (default: %(default)s)")
    mac.add_argument("--device", default="cpu")
    mac.add_argument("--repeats", type=positive_int, default=3)
    mac.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    mac.add_argument("--min-memory-ratio", type=float, default=1.0,
                     help="target: official-form / exact peak memory (default %(default)s)")
    mac.add_argument("--min-speed-ratio", type=float, default=1.0,
                     help="target: official-form / exact time (default %(default)s)")
    mac.add_argument("--json", default=None, help="also write the rows to this JSON file")
    mac.set_defaults(func=cmd_bench_mac)

    gpu = which.add_parser("gpu", help="the GPU check: Qwen2-VL-2B-shaped adaptation and MAC "
                                       "steps (time, tokens/s, memory, MFU), MAC at paper "
                                       "scale, encode throughput, correctness; < 8 min on "
                                       "one H200 (docs/gpu.md)")
    gpu.add_argument("--tiny", action="store_true",
                     help="the same code at tiny size (CPU when no CUDA device; CI)")
    gpu.add_argument("--out", default="bench_gpu",
                     help="folder for gpu_bench.json, gpu_bench.md, worker.log "
                          "(default: %(default)s)")
    gpu.set_defaults(func=cmd_bench_gpu)

    gc = which.add_parser("gradcache", help="peak memory of GradCache (batch 256, chunk 16) "
                                            "vs a plain batch of 16 (the reference); exit 1 "
                                            "on a missed target or differing losses")
    gc.add_argument("--batch", type=positive_int, default=256, help="large batch (default: 256)")
    gc.add_argument("--chunk", type=positive_int, default=16, help="GradCache chunk (default: 16)")
    gc.add_argument("--size", default="s", choices=["xs", "s", "m"], help="tiny Qwen2-VL size")
    gc.add_argument("--image-size", type=positive_int, default=112,
                    help="pixels (112: 16 image tokens)")
    gc.add_argument("--text-words", type=positive_int, default=12, help="caption length in words")
    gc.add_argument("--device", default="cpu")
    gc.add_argument("--threads", type=nonneg_int, default=2)
    gc.add_argument("--no-full", action="store_true", help="skip the batch without GradCache")
    gc.add_argument("--lora-dropout", type=float, default=0.05,
                    help="LoRA dropout (default %(default)s, as training; 0 also checks that "
                         "GradCache's loss equals the full batch's)")
    gc.add_argument("--max-ratio", type=float, default=1.5,
                    help="target: GradCache peak / peak at B=chunk (default %(default)s)")
    gc.add_argument("--json", default=None, help="also write the figures to this JSON file")
    gc.set_defaults(func=cmd_bench_gradcache)

    en = which.add_parser("encode", help="the encode pipeline vs the sequential loop and a "
                                         "plain length-sorted last-layer loop: items/s, CPU "
                                         "time, peak memory, equal results; exit 1 on a "
                                         "missed target or differing results")
    en.add_argument("--model", default=None, help="checkpoint (default: a tiny random Qwen2-VL)")
    en.add_argument("--items", default=None,
                    help="JSONL of {text, image} as `fam encode` reads (default: Scenes items)")
    en.add_argument("--image-root", default=None, help="image root (default: beside --items)")
    en.add_argument("--n", type=positive_int, default=512,
                    help="default items: how many (default 512)")
    en.add_argument("--size", default="m", choices=["xs", "s", "m"],
                    help="default model: tiny Qwen2-VL size (default m)")
    en.add_argument("--layers", type=positive_int, default=16,
                    help="default model: language-model layers (default 16; 0 = the preset's)")
    en.add_argument("--batch-size", type=positive_int, default=32)
    en.add_argument("--threads", type=nonneg_int, default=1, help="torch threads (default 1)")
    en.add_argument("--repeats", type=positive_int, default=3,
                    help="alternating rounds (default 3)")
    en.add_argument("--prefetch", type=nonneg_int, default=2, help="batches prepared ahead")
    en.add_argument("--workers", type=positive_int, default=1, help="image-decoding threads")
    en.add_argument("--min-speedup", type=float, default=1.0,
                    help="target: pipeline / sequential items/s (default %(default)s)")
    en.add_argument("--max-memory-ratio", type=float, default=1.0,
                    help="target: pipeline / sequential peak memory (default %(default)s)")
    en.add_argument("--json", default=None, help="also write the figures to this JSON file")
    en.set_defaults(func=cmd_bench_encode)

    pe = which.add_parser("peer", help="fam vs sentence-transformers on the same checkpoint "
                                       "and items: encode items/s, LoRA GradCache step time "
                                       "and memory; exit 1 when a target is missed")
    pe.add_argument("--model", default=None,
                    help="a fam model or `fam export` folder (default: a tiny random Qwen2-VL)")
    pe.add_argument("--work", default=None,
                    help="folder for the default model and items (default: a temporary one)")
    pe.add_argument("--size", default="m", choices=["xs", "s", "m"],
                    help="default model: tiny Qwen2-VL size (default m)")
    pe.add_argument("--layers", type=positive_int, default=16,
                    help="default model: language-model layers (default 16)")
    pe.add_argument("--n", type=positive_int, default=256, help="items per encode (default 256)")
    pe.add_argument("--batch-size", type=positive_int, default=32, help="encode batch (32)")
    pe.add_argument("--pairs", type=positive_int, default=64, help="training batch (64)")
    pe.add_argument("--chunk", type=positive_int, default=16, help="GradCache chunk (16)")
    pe.add_argument("--steps", type=positive_int, default=2,
                    help="training steps per process; the time is that of the steps after "
                         "the first (default 2)")
    pe.add_argument("--repeats", type=positive_int, default=3,
                    help="alternating rounds (default 3)")
    pe.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    pe.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    pe.add_argument("--tasks", nargs="+", choices=["text", "image", "mixed", "train"],
                    default=None, help="what to measure (default all)")
    pe.add_argument("--json", default=None, help="also write the figures to this JSON file")
    pe.set_defaults(func=cmd_bench_peer)

    se = which.add_parser("search", help="FAISS flat and HNSW vs a float64 exact search on the "
                                         "Scenes eval images: identical top-k, recall, queries/s")
    se.add_argument("--model", type=Path, default=None,
                    help="embedding model (default: a tiny random Qwen2-VL built in --work)")
    se.add_argument("--scenes", type=Path, default=None,
                    help="a Scenes folder (default: generated in --work)")
    se.add_argument("--work", type=Path, default=Path("runs/bench_search"))
    se.add_argument("--n-eval-images", type=positive_int, default=300,
                    help="Scenes eval scenes when generating (each gives 1-3 images)")
    se.add_argument("-k", type=positive_int, default=10)
    se.add_argument("--repeats", type=positive_int, default=3)
    se.add_argument("--json", type=Path, default=None, help="also write the figures here")
    se.add_argument("--no-progress", action="store_true")
    se.add_argument("--multivector", action="store_true",
                    help="the multi-vector index instead: bytes/item, build time, latency and "
                         "recall@k against exact MaxSim over all items")
    se.add_argument("--max-tokens", type=nonneg_int, nargs="+", default=[0, 32, 8],
                    help="--multivector: per-item token caps to compare (0 = all)")
    se.add_argument("--candidate-tokens", type=positive_int, nargs="+", default=[4, 16, 64],
                    help="--multivector: nearest document tokens per query token to compare")
    se.set_defaults(func=cmd_bench_search)

    sv = which.add_parser("serve", help="bounded load test of fam serve on 127.0.0.1: dynamic "
                                        "batching vs one request at a time, same model, "
                                        "alternated over rounds; exit 1 on errors or a "
                                        "missed target")
    sv.add_argument("--model", type=Path, default=None,
                    help="embedding model (default: a tiny random Qwen2-VL built in --work)")
    sv.add_argument("--work", type=Path, default=Path("runs/bench_serve"))
    sv.add_argument("--clients", type=positive_int, default=32)
    sv.add_argument("--requests", type=positive_int, default=384, help="requests per mode")
    sv.add_argument("--inputs", choices=("text", "image", "mixed"), default="mixed")
    sv.add_argument("--max-batch", type=positive_int, default=32)
    sv.add_argument("--timeout", type=float, default=300.0, help="seconds per mode, at most")
    sv.add_argument("--threads", type=nonneg_int, default=None, help="the server's torch threads")
    sv.add_argument("--repeats", type=positive_int, default=2,
                    help="rounds; the modes alternate ABBA (default %(default)s)")
    sv.add_argument("--min-speedup", type=float, default=1.0,
                    help="target: batching / one-at-a-time throughput, median over rounds "
                         "(default %(default)s)")
    sv.add_argument("--json", type=Path, default=None, help="also write the figures here")
    sv.set_defaults(func=cmd_bench_serve)

    st = which.add_parser("startup", help="fam --help, a bad argument and fam search on a "
                                          "built index (warm: through the query worker; cold: "
                                          "--no-worker), each in fresh processes: median wall "
                                          "seconds against the targets (exit 1 if missed)")
    st.add_argument("--repeats", type=positive_int, default=5, help="rounds (default 5)")
    st.add_argument("--work", type=Path, default=None,
                    help="folder for the tiny model and index (default: a temporary one)")
    st.add_argument("--index", type=Path, default=None,
                    help="time searches of this built index instead (its recorded model; "
                         "the image query is its first image item)")
    st.add_argument("--json", type=Path, default=None, help="also write the figures here")
    st.set_defaults(func=cmd_bench_startup)

    p = sub.add_parser("plan", help="estimate the peak memory of a training configuration")
    p.add_argument("--model", required=True,
                   help=f"checkpoint directory or one of {sorted(KNOWN_SHAPES)}")
    for f, default in asdict(PlanConfig()).items():
        flag = "--" + f.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", default=default)
        else:
            p.add_argument(flag, type=type(default), default=default)
    p.add_argument("--budget-gib", type=float, default=None,
                   help="memory budget: also print the largest chunk that fits")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(func=cmd_plan)
