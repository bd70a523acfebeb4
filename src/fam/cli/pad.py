"""``fam pad build``: the command-line front of :func:`fam.pad.build_pad`.

    fam pad build --images scenes --out scenes/pad_gt.jsonl --provider gt
    fam pad build --images DIR --out pad.jsonl --provider hf \\
        --detector models/grounding-dino --segmenter models/sam \\
        --tagger caption --captions captions.json [--vocabulary tags.txt]

Registered on the main parser (:func:`fam.cli.build_parser`) by :func:`add_pad_subcommand`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_pad_subcommand", "cmd_pad_build"]


def add_pad_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``pad build`` on the ``fam`` CLI's sub-parsers.

    Args:
        subparsers: the object returned by ``parser.add_subparsers()``.

    Returns:
        The ``pad`` parser (its ``build`` sub-command sets ``func=cmd_pad_build``).
    """
    pad = subparsers.add_parser("pad", help="Patch-Aligned Dataset (method.md §4)")
    sub = pad.add_subparsers(dest="pad_cmd", required=True)
    b = sub.add_parser(
        "build", help="tag → detect → segment images into a PAD JSONL (resumable)",
        description="Tagger → open-vocabulary detector → box-prompted segmenter, one PAD "
                    "record per image appended to --out; rerun the same command to resume.")
    b.add_argument("--images", required=True,
                   help="folder of images (searched recursively) or a Scenes root "
                        "(only its images/ are used)")
    b.add_argument("--out", required=True, help="output PAD JSONL (appended to / resumed)")
    b.add_argument("--provider", choices=("gt", "hf"), default="hf",
                   help="gt: replay a ground-truth PAD (Scenes' pad.jsonl); hf: Grounding "
                        "DINO + SAM from local folders (default)")
    b.add_argument("--gt", help="ground-truth PAD for --provider gt (default: "
                                "IMAGES/pad.jsonl)")
    b.add_argument("--detector", help="local Grounding DINO folder (save_pretrained output)")
    b.add_argument("--segmenter", help="local SAM folder (save_pretrained output)")
    b.add_argument("--tagger", choices=("caption", "list"),
                   help="caption: noun phrases of --captions; list: the fixed --tags "
                        "(default: the ground truth's tags for gt, caption for hf)")
    b.add_argument("--captions", action="append", default=[],
                   help="LLaVA-style captions JSON/JSONL {image, caption|blip_caption}; "
                        "repeatable")
    b.add_argument("--caption-field", action="append", default=None,
                   help="caption field(s) to read, in order (default: caption, blip_caption)")
    b.add_argument("--vocabulary", help="text file, one allowed tag per line (caption tagger)")
    b.add_argument("--tags", help="comma-separated tags for --tagger list, or @FILE (one "
                                  "per line)")
    b.add_argument("--box-threshold", type=float, default=0.25,
                   help="Grounding DINO box threshold (method.md §4: 0.25)")
    b.add_argument("--text-threshold", type=float, default=0.2,
                   help="Grounding DINO text threshold (method.md §4: 0.2)")
    b.add_argument("--nms", type=float, default=0.5, help="class-aware box NMS IoU (0.5)")
    b.add_argument("--min-area", type=float, default=0.0005,
                   help="smallest region: fraction of the image if < 1, else pixels")
    b.add_argument("--dedup-iou", type=float, default=0.9,
                   help="same-label regions with mask IoU above this are duplicates")
    b.add_argument("--limit", type=int, help="only the first N images (sorted)")
    b.add_argument("--device", default=None, help="torch device for hf models (default cpu)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_pad_build)
    return pad


def _read_tags(spec: str) -> list[str]:
    if spec.startswith("@"):
        return [t.strip() for t in Path(spec[1:]).read_text(encoding="utf-8").splitlines()
                if t.strip()]
    return [t.strip() for t in spec.split(",") if t.strip()]


def cmd_pad_build(args: argparse.Namespace) -> int:
    """Run ``fam pad build``; prints the run's counts as JSON."""
    from fam.errors import ConfigError
    from fam.pad import (CaptionNounTagger, GroundTruthProvider, HFGroundingDinoDetector,
                         HFSamSegmenter, ListTagger, build_pad, list_images)

    images = list_images(args.images)
    tagger_kind = args.tagger or ("caption" if args.provider == "hf" else None)
    tagger = None
    if tagger_kind == "list":
        if not args.tags:
            raise ConfigError("--tagger list needs --tags 'a,b,c' or --tags @file")
        tagger = ListTagger(_read_tags(args.tags))
    elif tagger_kind == "caption":
        if not args.captions:
            raise ConfigError("--tagger caption needs --captions FILE (LLaVA-style "
                              "{image, caption|blip_caption}); or use --tagger list --tags")
        vocab = None
        if args.vocabulary:
            vocab = [v for v in Path(args.vocabulary).read_text(encoding="utf-8").splitlines()
                     if v.strip()]
        tagger = CaptionNounTagger(args.captions, vocabulary=vocab,
                                   fields=tuple(args.caption_field or ("caption",
                                                                       "blip_caption")))
    if args.provider == "gt":
        gt = GroundTruthProvider(args.gt or Path(args.images) / "pad.jsonl", args.images)
        detector, segmenter = gt, gt
        tagger = tagger or gt
    else:
        if not args.detector or not args.segmenter:
            raise ConfigError("--provider hf needs --detector DIR (Grounding DINO) and "
                              "--segmenter DIR (SAM), local save_pretrained folders")
        detector = HFGroundingDinoDetector(args.detector, box_threshold=args.box_threshold,
                                           text_threshold=args.text_threshold,
                                           nms_iou=args.nms, device=args.device)
        segmenter = HFSamSegmenter(args.segmenter, device=args.device)
    stats = build_pad(images, tagger, detector, segmenter, args.out, min_area=args.min_area,
                      dedup_iou=args.dedup_iou, limit=args.limit,
                      progress=not args.no_progress)
    summary = stats.to_dict()
    summary["failed"] = summary["failed"][:10]  # the full list is in <out>.stats.json
    print(json.dumps(summary, indent=2))
    return 0
