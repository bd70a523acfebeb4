"""Command-line entry points of projector training and the alignment analysis.

Wired into ``fam/cli.py`` by :func:`add_projector_subcommands`:

    fam train projector [CONFIG] [k=v ...]      patch-aligned projector training (SPEC §4)
    fam analyze alignment --model DIR --pad pad.jsonl --image-root DIR --out DIR
                                                 entropy / Align(V,W) / MP report (SPEC §5)
    fam projector-compare --out DIR [--quick] [--seeds 0 1 2]
                                                 caption-only vs patch-aligned on Scenes

Each subparser sets ``func`` to a handler ``(args) -> int`` (the CLI's convention).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_train_projector(args: argparse.Namespace) -> int:
    from fam.config import load_config
    from fam.projector.recipe import ProjectorConfig, run_projector
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:  # `fam train projector k=v`: no YAML, only overrides
        config, overrides = None, [config] + overrides
    path = run_projector(load_config(ProjectorConfig, config, overrides))
    print(f"model saved to {path}")
    return 0


def cmd_analyze_alignment(args: argparse.Namespace) -> int:
    from fam.projector.report import analyze_alignment
    rep = analyze_alignment(args.model, args.pad, args.image_root or Path(args.pad).parent,
                            args.out, max_images=args.max_images, k_max=args.k_max,
                            theta=args.theta, select=args.select, captions=args.captions,
                            plots=not args.no_plots)
    e, a, r = rep["entropy"], rep["align"], rep["retrieval"]
    k = rep["matching_pursuit"]["k_max"]
    rec = rep["matching_pursuit"]["recovery"]
    print(f"ΔH {e['delta_H']:.3f} (H before {e['H_before']:.3f}, after {e['H_after']:.3f}, "
          f"text {e['H_text']:.3f})")
    print(f"Align(V,W): mIoU {a['miou']:.3f}, in-mask cos {a['in_mask_cos']:.3f}, "
          f"contrast {a['contrast']:.3f} over {int(a['n_regions'])} regions")
    print(f"region→phrase retrieval top-1 {r['top1']:.3f} (chance {r['chance']:.3f})")
    print(f"MP label recovery@{k}: regions {rec[f'region@{k}']:.3f}, "
          f"patches {rec[f'patch@{k}']:.3f} (chance {rec[f'chance_patch@{k}']:.3f})")
    print(f"report written to {Path(args.out) / 'alignment.json'}")
    return 0


def cmd_projector_compare(args: argparse.Namespace) -> int:
    from fam.projector_demo import format_results, run_projector_compare
    from fam.projector_demo import ComparePlan, quick_plan
    plan = quick_plan() if args.quick else ComparePlan()
    if args.threads:
        plan.threads = args.threads
    res = run_projector_compare(args.out, seeds=args.seeds, progress=not args.no_progress,
                                plan=plan)
    print(format_results(res))
    print(f"artefacts in {Path(args.out).resolve()} (projector_results.json/.md)")
    return 0


def add_projector_subcommands(train_subparsers: Any | None, analyze_subparsers: Any | None,
                              top_subparsers: Any | None) -> None:
    """Add ``train projector``, ``analyze alignment`` and ``projector-compare``.

    Args:
        train_subparsers: the ``fam train`` ``add_subparsers()`` action (or None to skip).
        analyze_subparsers: the ``fam analyze`` ``add_subparsers()`` action (or None).
        top_subparsers: the top-level ``add_subparsers()`` action (or None).
    """
    if train_subparsers is not None:
        tp = train_subparsers.add_parser(
            "projector", help="patch-aligned projector pre-training (towers frozen)")
        tp.add_argument("config", nargs="?", default=None,
                        help="YAML with ProjectorConfig fields (optional)")
        tp.add_argument("overrides", nargs="*",
                        help="key=value overrides, e.g. beta_max=0 projector=linear")
        tp.set_defaults(func=cmd_train_projector)
    if analyze_subparsers is not None:
        al = analyze_subparsers.add_parser(
            "alignment", help="entropy, Align(V,W) and matching pursuit of a LLaVA checkpoint")
        al.add_argument("--model", required=True, help="LLaVA-style checkpoint directory")
        al.add_argument("--pad", required=True, help="PAD JSONL with region masks")
        al.add_argument("--image-root", default=None,
                        help="root of the PAD image paths (default: the PAD file's folder)")
        al.add_argument("--out", required=True, help="output folder")
        al.add_argument("--captions", default=None,
                        help="caption JSON for the text-entropy reference (optional)")
        al.add_argument("--select", default=None,
                        help="keep records whose image path contains this, e.g. images/eval/")
        al.add_argument("--max-images", type=int, default=32)
        al.add_argument("--k-max", type=int, default=10, help="matching-pursuit steps")
        al.add_argument("--theta", type=float, default=0.5, help="coverage threshold of S_k")
        al.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
        al.set_defaults(func=cmd_analyze_alignment)
    if top_subparsers is not None:
        pc = top_subparsers.add_parser(
            "projector-compare", help="caption-only vs patch-aligned projectors on Scenes")
        pc.add_argument("--out", default="runs/projector", help="output folder")
        pc.add_argument("--quick", action="store_true", help="tiny sizes (under 2 minutes)")
        pc.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="projector seeds (default: the plan's, 0 1 2)")
        pc.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: torch's; use 1 on a shared machine)")
        pc.add_argument("--no-progress", action="store_true")
        pc.set_defaults(func=cmd_projector_compare)


__all__ = ["add_projector_subcommands", "cmd_analyze_alignment", "cmd_projector_compare",
           "cmd_train_projector"]
