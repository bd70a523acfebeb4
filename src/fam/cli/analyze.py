"""``fam analyze alignment`` (the projector paper's report) and ``fam analyze probes`` (FAM)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Sequence

from fam.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["add_analyze_subcommands"]


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


def _parse_models(specs: Sequence[str]) -> dict[str, str]:
    models: dict[str, str] = {}
    for s in specs:
        if "=" not in s:
            raise ConfigError(f"--models entry {s!r} is not NAME=DIR")
        k, v = s.split("=", 1)
        if not k or not v:
            raise ConfigError(f"--models entry {s!r} is not NAME=DIR")
        if k in models:
            raise ConfigError(f"--models: the name {k!r} is given twice")
        models[k] = v
    return models


def cmd_probes(args: argparse.Namespace) -> int:
    from fam.analysis.probes import format_probes, run_probes
    from fam.config import ProbeConfig
    from fam.utils.threads import use_threads
    # Tiny models: one thread avoids OpenMP oversubscription on shared CPUs.
    use_threads(args.threads)
    cfg = ProbeConfig(max_images=args.max_images, attention_images=args.attention_images,
                      margin=args.margin, split=args.split, seed=args.seed)
    cfg.validate()
    res = run_probes(_parse_models(args.models), args.data, args.out, cfg)
    log.info("probes written to %s\n%s", args.out, format_probes(res))
    return 0


def add_analyze_subcommands(sub: Any) -> None:
    """``fam analyze alignment`` and ``fam analyze probes``."""
    from fam.config import ProbeConfig
    analyze = sub.add_parser("analyze", help="analysis of trained models").add_subparsers(
        dest="analyze_cmd", required=True)
    al = analyze.add_parser(
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
    p = analyze.add_parser(
        "probes", help="FAM pilot probes: global-local and object-caption similarity, "
                       "layer-wise attention of the embedding token")
    p.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR",
                   help="checkpoints to probe, e.g. stage0=out/stage0/model fam=out/fam/model")
    p.add_argument("--data", required=True, help="Scenes benchmark root (holds pad.jsonl)")
    p.add_argument("--out", required=True, help="output folder")
    d = ProbeConfig()  # defaults shown in --help
    p.add_argument("--max-images", type=int, default=d.max_images)
    p.add_argument("--attention-images", type=int, default=d.attention_images)
    p.add_argument("--margin", type=float, default=d.margin)
    p.add_argument("--split", default=d.split)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.set_defaults(func=cmd_probes)
