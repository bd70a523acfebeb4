"""``fam train <stage>`` (from the stage registry), ``fam data scenes``, ``fam model tiny``."""
from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from fam.cli.args import nonneg_int, positive_int

__all__ = ["add_train_subcommands", "add_data_subcommands", "train_handler"]


def train_handler(name: str) -> Callable[[argparse.Namespace], int]:
    """The handler of ``fam train <name>``: load the stage's config (YAML + overrides,
    validated), run it through the registry, print where the model went."""
    def handler(args: argparse.Namespace) -> int:
        from fam.config import load_config
        from fam.train.registry import STAGES
        from fam.train.runner import run_stage
        stage = STAGES[name]
        config, overrides = args.config, list(args.overrides)
        if config and "=" in config:  # `fam train <stage> k=v`: no YAML, only overrides
            config, overrides = None, [config] + overrides
        for flag, (_, extra) in (stage.flags or {}).items():
            if getattr(args, flag.lstrip("-").replace("-", "_"), False):
                overrides += list(extra)
        for policy in ("restart", "extend"):  # after the overrides: the flag wins
            if getattr(args, policy):
                overrides.append(f"run.on_change={policy}")
        path = run_stage(load_config(stage.config, config, overrides))
        print(f"model saved to {path}")
        return 0
    handler.__name__ = handler.__qualname__ = f"cmd_train_{name}"
    return handler


def add_train_subcommands(sub: Any) -> argparse.ArgumentParser:
    """``fam train <stage>`` for every stage of :data:`fam.train.registry.STAGES`."""
    from fam.train.registry import STAGES
    train = sub.add_parser("train", help="run a training stage")
    stages = train.add_subparsers(dest="stage", required=True)
    for name, stage in STAGES.items():
        tr = stages.add_parser(name, help=stage.help)
        tr.add_argument("config", nargs="?", default=None,
                        help=f"YAML config (optional; keys mirror {stage.config.__name__})")
        tr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4")
        for flag, (help_, _) in (stage.flags or {}).items():
            tr.add_argument(flag, action="store_true", help=help_)
        policy = tr.add_mutually_exclusive_group()
        policy.add_argument("--restart", action="store_true",
                            help="run.out_dir holds a run with other settings: remove its "
                                 "checkpoints and model and start over (run.on_change=restart)")
        policy.add_argument("--extend", action="store_true",
                            help="continue a run to a higher optim.steps from its last "
                                 "checkpoint (run.on_change=extend)")
        tr.set_defaults(func=train_handler(name))
    return train


def cmd_data_scenes(args: argparse.Namespace) -> int:
    from fam.config import ScenesConfig, load_config
    from fam.data.scenes import generate_scenes
    cfg = load_config(ScenesConfig, args.config, args.overrides)
    summary = generate_scenes(cfg, args.out)
    print(json.dumps(summary.get("datasets", summary), indent=2))
    return 0


def cmd_data_scenes_media(args: argparse.Namespace) -> int:
    from fam.config import ScenesMediaConfig, load_config
    from fam.data.scenes.media import generate_media
    cfg = load_config(ScenesMediaConfig, args.config, args.overrides)
    summary = generate_media(cfg, args.out)
    print(json.dumps({"train": summary["train"], "eval": summary["eval"]}, indent=2))
    print(f"train: fam train adapt train_dir={args.out}/train_media image_root={args.out}; "
          f"eval: fam eval --data {args.out}/eval_media")
    return 0


def cmd_model_tiny(args: argparse.Namespace) -> int:
    from fam.backbones import build_tiny
    from fam.data.captions import caption_texts
    corpus = caption_texts(args.corpus) if args.corpus else []
    build_tiny(args.family, args.out, size=args.size, image_size=args.image_size, corpus=corpus,
               seed=args.seed)
    print(f"saved a tiny {args.family} ({args.size}) to {args.out}")
    return 0


def add_data_subcommands(sub: Any) -> None:
    """``fam data scenes``, ``fam data scenes-media`` and ``fam model tiny``."""
    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_cmd", required=True)
    sc = data.add_parser("scenes", help="generate the built-in Scenes benchmark")
    sc.add_argument("--out", required=True)
    sc.add_argument("--config", default=None, help="YAML with ScenesConfig fields")
    sc.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=1")
    sc.set_defaults(func=cmd_data_scenes)
    sm = data.add_parser("scenes-media", help="generate Scenes-Video and Scenes-Docs (MMEB-V2 "
                         "layouts: frame folders, clip folders, BEIR pages)")
    sm.add_argument("--out", required=True)
    sm.add_argument("--config", default=None, help="YAML with ScenesMediaConfig fields")
    sm.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=1")
    sm.set_defaults(func=cmd_data_scenes_media)

    model = sub.add_parser("model", help="models").add_subparsers(dest="model_cmd", required=True)
    ti = model.add_parser("tiny", help="save a tiny random-initialised backbone")
    ti.add_argument("--out", required=True)
    ti.add_argument("--family", default="qwen2_vl")
    ti.add_argument("--size", default="s", choices=["xs", "s", "m"])
    ti.add_argument("--image-size", type=positive_int, default=112)
    ti.add_argument("--corpus", default=None, help="caption JSON to train the tokenizer on")
    ti.add_argument("--seed", type=nonneg_int, default=0)
    ti.set_defaults(func=cmd_model_tiny)

