"""``fam demo``, ``fam ablate`` and ``fam projector-compare`` (budgets: YAML presets)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from fam.cli.args import int_at_least, nonneg_int

__all__ = ["add_demo_subcommand", "add_ablate_subcommand", "add_compare_subcommand"]

log = logging.getLogger(__name__)


def cmd_demo(args: argparse.Namespace) -> int:
    from fam.config import DemoConfig
    from fam.experiments.demo import format_report, run_demo
    from fam.experiments.presets import load_preset
    plan = load_preset(DemoConfig, args.preset) if args.preset else None
    res = run_demo(args.out, quick=args.quick, seed=args.seed, progress=not args.no_progress,
                   plan=plan, threads=args.threads, workers=args.workers)
    print(format_report(res))
    print(f"artefacts in {Path(args.out).resolve()} (results.json, results.md, */model)")
    print(next_steps(res))
    return 0


def next_steps(res: dict[str, Any]) -> str:
    """Where the demo's items are and the commands that index and search them."""
    from fam.experiments.demo import ITEMS_QUERY_PROMPT
    items = Path(res["items"])
    model = Path(res["paths"].get("fam", res["paths"]["vlm2vec"]))
    index = items.parent / "index"
    return (f"items of the eval images (for fam encode / fam index build): {items}\n"
            f"  fam index build --model {model} --items {items} --out {index} "
            f"--query-prompt '{ITEMS_QUERY_PROMPT}'\n"
            f"  fam search --index {index} --text 'a large red triangle'\n"
            f"  fam serve --model {model} --index {index}   (then open http://127.0.0.1:8000)")


def add_demo_subcommand(sub: Any) -> argparse.ArgumentParser:
    d = sub.add_parser("demo", help="run the main job (Scenes → stage 0 → adaptation → eval)")
    d.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    d.add_argument("--quick", action="store_true", help="tiny sizes (about a minute)")
    d.add_argument("--preset", default=None,
                   help="budgets: a preset name or YAML file (default: demo, or demo_quick)")
    d.add_argument("--seed", type=nonneg_int, default=0)
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("--threads", type=nonneg_int, default=None,
                   help="torch threads (default 1: fastest for the tiny models; 0 = torch's own)")
    d.add_argument("--workers", type=int, choices=(1, 2), default=2,
                   help="processes: 2 (default) trains FAM's stages beside the baseline's, "
                        "1 one after the other (the same models)")
    d.set_defaults(func=cmd_demo)
    return d


def cmd_ablate(args: argparse.Namespace) -> int:
    from fam.config import DemoConfig
    from fam.experiments.ablation import run_ablation
    from fam.experiments.ablation_report import format_ablation
    from fam.experiments.presets import load_preset
    if args.sweep:
        from fam.experiments.sweep import format_sweep, run_sweep
        report = run_sweep(args.out, args.sweep, seeds=args.seeds,
                           progress=not args.no_progress, threads=args.threads,
                           workers=args.workers, report_only=args.report_only,
                           base=args.preset, export=args.export)
        log.info("sweep written to %s\n%s", args.out, format_sweep(report))
        return 0
    plan = load_preset(DemoConfig, args.preset) if args.preset else None
    report = run_ablation(args.out, seeds=args.seeds, size=args.size, groups=args.only,
                          progress=not args.no_progress, plan=plan, threads=args.threads,
                          configs=args.configs, report_only=args.report_only,
                          probes=not args.no_probes, workers=args.workers)
    log.info("ablation written to %s\n%s", args.out, format_ablation(report))
    return 0


def add_ablate_subcommand(sub: Any) -> argparse.ArgumentParser:
    """Register ``fam ablate`` (returns the sub-parser)."""
    from fam.config.experiments import ABLATION_DEFAULT_GROUPS as DEFAULT_GROUPS
    from fam.config.experiments import ABLATION_GROUPS as GROUPS
    from fam.config.experiments import ABLATION_SIZES as SIZES
    p = sub.add_parser(
        "ablate", help="FAM ablations on Scenes over seeds (MAC/VEIN and its inversion variant, "
                       "MAC terms, the data control, γ, layers) with paired confidence intervals")
    p.add_argument("--out", required=True, help="output folder (resumable)")
    p.add_argument("--seeds", type=nonneg_int, nargs="+", default=[0, 1], help="training seeds")
    p.add_argument("--size", choices=list(SIZES), default="small",
                   help="budget preset (" + ", ".join(f"{k}: {v}" for k, v in SIZES.items()) + ")")
    p.add_argument("--preset", default=None, help="budgets from another preset or YAML file")
    p.add_argument("--only", nargs="+", choices=GROUPS, default=None, metavar="GROUP",
                   help=f"run only these groups ({', '.join(GROUPS)}; default: "
                        f"{' '.join(DEFAULT_GROUPS)})")
    p.add_argument("--configs", nargs="+", default=None, metavar="LABEL",
                   help="run only these configs of the groups (e.g. fam gamma=0.5 last); "
                        "the baseline always runs")
    p.add_argument("--threads", type=nonneg_int, default=1,
                   help="torch threads (default 1: fastest for tiny models on shared CPUs; "
                        "0 = torch's default)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes training runs at once, each with --threads threads "
                        "(default 1; 2 on an otherwise idle 2-core machine)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing; rebuild ablation.json/.md from finished runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--sweep", default=None, metavar="NAME",
                   help="a recipe sweep instead of the groups: the preset sweep_NAME (or a "
                        "YAML file) lists its points; every point over --seeds, resumable, "
                        "--workers; --preset replaces the sweep's base; writes "
                        "sweep_NAME.json/.md and the training curves")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="with --sweep: also copy the results, curves and reports (no "
                        "checkpoints) to DIR, e.g. docs/results/sweep")
    p.add_argument("--no-probes", action="store_true",
                   help="skip the mechanism checks (FAM probes) on the checkpoints")
    p.set_defaults(func=cmd_ablate)
    return p


def cmd_projector_compare(args: argparse.Namespace) -> int:
    from fam.config import CompareConfig
    from fam.experiments.presets import load_preset
    from fam.experiments.projector_compare import format_results, run_projector_compare
    plan = load_preset(CompareConfig, args.preset) if args.preset else None
    res = run_projector_compare(args.out, quick=args.quick, seeds=args.seeds,
                                progress=not args.no_progress, plan=plan,
                                threads=args.threads, betas=args.betas,
                                schedules=args.schedules, projectors=args.projectors,
                                llms=args.llms, workers=args.workers)
    print(format_results(res))
    print(f"artefacts in {Path(args.out).resolve()} (projector_results.json/.md, figures)")
    return 0


def add_compare_subcommand(sub: Any) -> argparse.ArgumentParser:
    from fam.config.experiments import TINY_LLMS
    from fam.config.stages import BETA_SCHEDULES, PROJECTOR_TYPES
    pc = sub.add_parser(
        "projector-compare",
        help="the projector study: β sweep, projector types, LLMs, SFT, FAM (Scenes)")
    pc.add_argument("--out", default="runs/projector", help="output folder (resumable)")
    pc.add_argument("--quick", action="store_true",
                    help="every phase at toy sizes (CI; about a minute)")
    pc.add_argument("--preset", default=None,
                    help="budgets: a preset name or YAML file (default: projector_compare)")
    pc.add_argument("--seeds", type=nonneg_int, nargs="+", default=None,
                    help="projector seeds (default: the preset's, 0 1 2)")
    pc.add_argument("--betas", type=float, nargs="+", default=None, metavar="BETA",
                    help="β sweep (default: the preset's, 0 0.5 1 2.5 5)")
    pc.add_argument("--schedules", nargs="+", default=None, choices=BETA_SCHEDULES,
                    help="β schedules of the sweep (default: ramped constant)")
    pc.add_argument("--projectors", nargs="+", default=None, choices=PROJECTOR_TYPES,
                    help="projector types of the cross-architecture check "
                         "(default: linear mlp cabstractor)")
    pc.add_argument("--llms", nargs="+", default=None, choices=TINY_LLMS,
                    help="language models of the tiny LLaVA (default: llama qwen2)")
    pc.add_argument("--workers", type=int_at_least(1), default=None,
                    help="processes running independent runs (default: the preset's, 1)")
    pc.add_argument("--threads", type=nonneg_int, default=None,
                    help="torch threads per process (default: the preset's, 1; 0 = torch's own)")
    pc.add_argument("--no-progress", action="store_true")
    pc.set_defaults(func=cmd_projector_compare)
    return pc
