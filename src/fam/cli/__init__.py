"""The ``fam`` command line: all argument parsing of fam lives in this package.

    fam demo [--quick] [--out DIR]              the main job on the embedded default
    fam data scenes --out DIR [...]             generate the built-in Scenes benchmark
    fam data scenes-media --out DIR [...]       Scenes-Video and Scenes-Docs (MMEB-V2 layouts)
    fam model tiny --out DIR [--family ...]     save a tiny random-initialised backbone
    fam train <stage> [CONFIG] [k=v ...]        a training stage (fam.train.registry)
    fam analyze alignment|probes ...            alignment analysis, FAM probes
    fam ablate --out DIR --seeds 0 1            FAM ablations on Scenes (mean ± std)
    fam projector-compare [--quick]             caption-only vs patch-aligned projectors
    fam eval --model DIR --data DIR             MMEB-protocol evaluation
    fam encode --model DIR --input F --out F    embed items (inference)
    fam index build --model DIR --items F --out IDX   index a collection (FAISS; resumable)
    fam search --index IDX --text T [--image P] top-k search of an index
    fam serve --model DIR [--index IDX]         HTTP server: /v1/embeddings, /v1/search, page
    fam export --model DIR --out DIR2           a sentence-transformers / vLLM folder
    fam bench mac|gradcache|encode|peer|search|serve|gpu|startup  benchmarks; GPU check; start-up
    fam plan ...                                estimate peak memory, suggest a chunk size
    fam pad build --images DIR --out pad.jsonl  build a patch-aligned dataset (PAD)

Training subcommands take an optional YAML config and ``key=value`` overrides, e.g.
``fam train adapt configs/adapt.yaml optim.lr=1e-4 lora.r=16``. Modules: ``train``
(stages, data, models), ``infer`` (eval, encode), ``analyze``, ``experiments`` (demo,
ablate, projector-compare), ``pad``, ``bench`` (benchmarks, plan), ``deploy`` (index,
search, serve), ``export``; each registers its
subcommands on the parser built here and holds their handlers.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from fam.errors import user_error

log = logging.getLogger("fam")

__all__ = ["build_parser", "main"]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # Offline by default: nothing in the embedded pipeline may reach a hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # transformers: errors only, no progress bars. Through its environment variables while
    # it is not imported yet (importing it costs seconds: only the commands that load a
    # model pay for it), through its functions once it is.
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def build_parser() -> argparse.ArgumentParser:
    """The ``fam`` parser with every subcommand."""
    from fam.cli import analyze, bench, deploy, experiments, export, infer, pad, train

    p = argparse.ArgumentParser(prog="fam", description="fam: fine-grained multimodal embedding "
                                "learning with vision-language models")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of an error (also: FAM_DEBUG=1); accepted "
                        "anywhere on the command line")
    sub = p.add_subparsers(dest="command", required=True)
    experiments.add_demo_subcommand(sub)
    train.add_data_subcommands(sub)
    train.add_train_subcommands(sub)
    analyze.add_analyze_subcommands(sub)
    infer.add_infer_subcommands(sub)
    export.add_export_subcommand(sub)
    bench.add_bench_subcommands(sub)
    pad.add_pad_subcommand(sub)
    experiments.add_ablate_subcommand(sub)
    experiments.add_compare_subcommand(sub)
    deploy.add_deploy_subcommands(sub)
    return p


def _strip_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``--debug`` may be given anywhere (before or after the subcommand)."""
    debug = "--debug" in argv
    env = os.environ.get("FAM_DEBUG", "").strip().lower()
    return [a for a in argv if a != "--debug"], debug or env not in ("", "0", "false", "no")


def main(argv: Sequence[str] | None = None) -> int:
    argv, debug = _strip_debug(list(sys.argv[1:] if argv is None else argv))
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
    args.debug = debug  # (fam search: a traceback needs the search in this process)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        log.error("interrupted; rerun the same command to resume from the last checkpoint")
        return 130
    except Exception as e:  # noqa: BLE001 - the last-resort handler of the command line
        if debug:
            log.error("traceback (--debug):", exc_info=e)
        message = user_error(e)
        if message is not None:
            log.error("%s", message)
            return 2
        first = (str(e).strip().splitlines() or [""])[0][:300]
        log.error("internal error: %s: %s; rerun with --debug for the traceback and report "
                  "it (command: fam %s)", type(e).__name__, first, " ".join(argv))
        return 1


if __name__ == "__main__":
    sys.exit(main())
