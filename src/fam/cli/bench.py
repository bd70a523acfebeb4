"""``fam bench mac|gradcache`` (ratios against a reference in the same run) and ``fam plan``."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

__all__ = ["add_bench_subcommands"]


def cmd_bench_mac(args: argparse.Namespace) -> int:
    from fam.bench.mac import format_report, run_bench
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes]
    print(format_report(run_bench(shapes, device=args.device, repeats=args.repeats),
                        args.device))
    return 0


def cmd_bench_gradcache(args: argparse.Namespace) -> int:
    from fam.bench.gradcache import format_report, run_bench
    res = run_bench(args.batch, args.chunk, args.size, args.image_size, args.text_words,
                    args.device, args.threads, with_full=not args.no_full)
    print(format_report(res, args.size, args.batch, args.chunk, args.device))
    return 0


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
    """``fam bench mac``, ``fam bench gradcache`` and ``fam plan``."""
    from fam.bench.mac import DEFAULT_SHAPES
    from fam.bench.plan import KNOWN_SHAPES
    from fam.config import PlanConfig

    bench = sub.add_parser("bench", help="benchmarks (exact vs reference, printed ratios)")
    which = bench.add_subparsers(dest="which", required=True)
    mac = which.add_parser("mac", help="exact MAC vs the naive (B·N)×(B·T) form: time and "
                                       "peak memory, each variant in a fresh process")
    mac.add_argument("--shapes", nargs="+",
                     default=[",".join(map(str, s)) for s in DEFAULT_SHAPES],
                     help="B,N,T,d tuples (default: %(default)s)")
    mac.add_argument("--device", default="cpu")
    mac.add_argument("--repeats", type=int, default=3)
    mac.set_defaults(func=cmd_bench_mac)

    gc = which.add_parser("gradcache", help="peak memory of GradCache (batch 256, chunk 16) "
                                            "vs a plain batch of 16")
    gc.add_argument("--batch", type=int, default=256, help="large batch (default: 256)")
    gc.add_argument("--chunk", type=int, default=16, help="GradCache chunk (default: 16)")
    gc.add_argument("--size", default="s", choices=["xs", "s", "m"], help="tiny Qwen2-VL size")
    gc.add_argument("--image-size", type=int, default=112, help="pixels (112: 16 image tokens)")
    gc.add_argument("--text-words", type=int, default=12, help="caption length in words")
    gc.add_argument("--device", default="cpu")
    gc.add_argument("--threads", type=int, default=2)
    gc.add_argument("--no-full", action="store_true", help="skip the batch without GradCache")
    gc.set_defaults(func=cmd_bench_gradcache)

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
