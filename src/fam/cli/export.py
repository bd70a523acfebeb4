"""``fam export --model DIR --out DIR2 [--format st]``: a sentence-transformers / vLLM folder."""
from __future__ import annotations

import argparse
from typing import Any, Sequence

__all__ = ["add_export_subcommand"]


def _parse_prompts(pairs: Sequence[str]) -> dict[str, str]:
    from fam.errors import ConfigError
    from fam.export import DEFAULT_PROMPTS
    prompts = dict(DEFAULT_PROMPTS)
    for p in pairs:
        name, sep, text = p.partition("=")
        if not sep or not name:
            raise ConfigError(f"--prompt {p!r}: expected NAME=TEXT, e.g. --prompt "
                              "query='Find an image of: '")
        prompts[name] = text.encode("utf-8").decode("unicode_escape") if "\\n" in text else text
    return prompts


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "multivector":
        if args.video:
            from fam.errors import ConfigError
            raise ConfigError("--video writes the sentence-transformers processor of --format "
                              "st; the multi-vector export takes no video yet")
        return _export_multivector(args)
    from fam.export import export_sentence_transformers
    res = export_sentence_transformers(args.model, args.out, prompts=_parse_prompts(args.prompt),
                                       results=args.results, check=not args.no_check,
                                       overwrite=args.overwrite, lora=args.adapter,
                                       video=args.video)
    chk = res.check
    verdict = (f"checked with sentence-transformers {chk['sentence_transformers']}: min cosine "
               f"{chk['min_cosine']:.6f} over {chk['items']} probes" if "min_cosine" in chk
               else f"not checked ({chk['skipped']})")
    print(f"exported the {res.family} model (dim {res.dim}) to {res.path}; {verdict}")
    print(f"use it: SentenceTransformer({str(res.path)!r})  |  vllm serve {res.path} "
          "--runner pooling")
    return 0


def _export_multivector(args: argparse.Namespace) -> int:
    from fam.export.multivector import export_multivector
    res = export_multivector(args.model, args.out, prompts=_parse_prompts(args.prompt),
                             check=not args.no_check, overwrite=args.overwrite, lora=args.adapter)
    chk = res.check
    verdict = (f"checked with sentence-transformers {chk['sentence_transformers']}: max |Δ| "
               f"token vectors {chk['max_token_diff']:.1e}, {chk['similarity']} scores "
               f"{chk['max_score_diff']:.1e} over {chk['items']} probes"
               if "max_token_diff" in chk else f"not checked ({chk['skipped']})")
    print(f"exported the {res.family} model (token vectors of dim {res.dim}) to {res.path}; "
          f"{verdict}")
    print(f"use it: MultiVectorEncoder({str(res.path)!r})")
    return 0


def add_export_subcommand(sub: Any) -> None:
    """Register ``fam export`` on the CLI's subparsers."""
    ex = sub.add_parser("export", help="write a sentence-transformers / vLLM folder")
    ex.add_argument("--model", required=True, help="fam model folder (e.g. runs/demo/fam/model)")
    ex.add_argument("--out", required=True, help="export folder")
    ex.add_argument("--adapter", default=None,
                    help="peft adapter folder (LoRA/DoRA) trained on --model, merged first")
    ex.add_argument("--format", default="st", choices=["st", "multivector"],
                    help="st: sentence-transformers (also what vLLM serves); multivector: "
                         "sentence-transformers' MultiVectorEncoder (late interaction)")
    ex.add_argument("--prompt", action="append", default=[], metavar="NAME=TEXT",
                    help="set a prompt (repeatable; defaults: query, document for Scenes/MMEB "
                         "retrieval)")
    ex.add_argument("--results", default=None,
                    help="evaluation results JSON for the model card (default: "
                         "<model>/eval_results.json or the demo's results.json)")
    ex.add_argument("--video", action="store_true",
                    help="Qwen2-VL/2.5-VL: write transformers' stock processor with its video "
                         "processor, so sentence-transformers embeds {'video': frames, 'text': "
                         "...} natively (loading it needs torchvision)")
    ex.add_argument("--no-check", action="store_true",
                    help="skip the sentence-transformers parity check")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ex.set_defaults(func=cmd_export)
