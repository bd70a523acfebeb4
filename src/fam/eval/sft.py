"""Evaluate a generative LVLM after SFT: VQA exact match per task, REC accuracy@0.5, and
Scenes caption quality of greedy captions.

Inputs are the files the study writes: ``sft_eval.json`` (:mod:`fam.data.instructions`:
``{image, question, answer, task[, box]}``) and the Scenes ``pad.jsonl`` with its
``captions_eval.json``. Every score keeps its per-item values (``hits``, ``per_caption``)
so that arms can be compared with paired intervals (:mod:`fam.analysis.stats`).

VQA answers are compared after lower-casing and stripping punctuation; only the first word
of the answer counts for one-word tasks (colour, count, yes/no), so "red." and "red circle"
both answer "red".

Example:
    >>> score_vqa(["Red.", "three objects", "no"], ["red", "two", "no"])["accuracy"]
    0.6666666666666666
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fam.errors import DataError
from fam.eval.captions import caption_scores
from fam.eval.generate import generate
from fam.eval.rec import score_rec
from fam.utils.io import read_jsonl

log = logging.getLogger(__name__)

__all__ = ["evaluate_captions", "evaluate_sft", "score_vqa"]

_WORD = re.compile(r"[a-z0-9]+")


def _first_word(text: str) -> str:
    m = _WORD.search(text.lower())
    return m.group(0) if m else ""


def score_vqa(answers: Sequence[str], gold: Sequence[str]) -> dict[str, Any]:
    """Exact match of the first word of each answer (module docstring)."""
    if len(answers) != len(gold):
        raise ValueError(f"{len(answers)} answers but {len(gold)} gold answers")
    hits = [_first_word(a) == _first_word(g) for a, g in zip(answers, gold)]
    n = len(hits)
    return {"accuracy": sum(hits) / n if n else float("nan"), "n": n, "hits": hits}


def _load_rows(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise DataError("file not found: write the SFT data first (fam.data.instructions)", p)
    rows = json.loads(p.read_text(encoding="utf-8"))
    for i, r in enumerate(rows, start=1):
        for key in ("image", "question", "answer", "task"):
            if not isinstance(r.get(key), str):
                raise DataError(f"missing or non-string {key!r}", p, i, key)
        if r["task"] == "rec" and not (isinstance(r.get("box"), list) and len(r["box"]) == 4):
            raise DataError("a rec row needs 'box' [x0, y0, x1, y1] in 0..100", p, i, "box")
    return rows


def evaluate_sft(adapter, rows_path: str | Path, image_root: str | Path,
                 max_new_tokens: int = 16, batch_size: int = 32) -> dict[str, Any]:
    """Answer every eval question greedily and score it.

    Returns:
        ``{task: {accuracy, n, hits[, mean_iou, invalid]}}`` for ``vqa_count``,
        ``vqa_colour``, ``vqa_relation`` and ``rec``, plus ``vqa`` (all VQA rows pooled)
        and ``examples`` (a few question/answer/gold triples per task).
    """
    rows = _load_rows(rows_path)
    root = Path(image_root)
    answers = generate(adapter, [(root / r["image"], r["question"]) for r in rows],
                       max_new_tokens=max_new_tokens, batch_size=batch_size)
    out: dict[str, Any] = {"examples": {}}
    vqa_hits: list[bool] = []
    for task in sorted({r["task"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["task"] == task]
        got = [answers[i] for i in idx]
        if task == "rec":
            res = score_rec(got, [rows[i]["box"] for i in idx])
        else:
            res = score_vqa(got, [rows[i]["answer"] for i in idx])
            vqa_hits += res["hits"]
        out[task] = res
        out["examples"][task] = [{"question": rows[i]["question"], "answer": answers[i],
                                  "gold": rows[i]["answer"]} for i in idx[:3]]
    if vqa_hits:
        out["vqa"] = {"accuracy": sum(vqa_hits) / len(vqa_hits), "n": len(vqa_hits),
                      "hits": vqa_hits}
    return out


def evaluate_captions(adapter, pad_path: str | Path, captions_path: str | Path,
                      image_root: str | Path, select: str = "images/eval/",
                      max_images: int = 64, prompt: str = "Describe the image.",
                      max_new_tokens: int = 32, batch_size: int = 32) -> dict[str, Any]:
    """Greedy captions of the first ``max_images`` primary images under ``select``, scored
    against the Scenes ground truth (:func:`fam.eval.captions.caption_scores`) and, for
    BLEU-4, the reference captions (caption and short caption).

    Returns:
        :func:`~fam.eval.captions.caption_scores`' result plus ``examples``.
    """
    refs: dict[str, list[str]] = {}
    for r in json.loads(Path(captions_path).read_text(encoding="utf-8")):
        refs[r["image"]] = [c for c in (r.get("caption"), r.get("blip_caption")) if c]
    recs = []
    for line, rec in read_jsonl(pad_path):
        img = rec.get("image", "")
        if select in img and "-" not in Path(img).stem and img in refs:
            objs = []
            for j, reg in enumerate(rec.get("regions", [])):
                a = reg.get("attributes") or {}
                if not all(isinstance(a.get(k), str) for k in ("colour", "shape", "size")):
                    raise DataError("region needs attributes {colour, shape, size}", pad_path,
                                    line, f"regions[{j}].attributes")
                objs.append({**a, "box": reg["box"]})
            recs.append((img, objs))
        if len(recs) >= max_images:
            break
    if not recs:
        raise DataError(f"no primary image under {select!r} has both a PAD record and a "
                        "caption", pad_path)
    root = Path(image_root)
    caps = generate(adapter, [(root / img, prompt) for img, _ in recs],
                    max_new_tokens=max_new_tokens, batch_size=batch_size)
    res = caption_scores(caps, [o for _, o in recs], [refs[img] for img, _ in recs])
    res["examples"] = [{"image": img, "caption": c, "reference": refs[img][0]}
                       for (img, _), c in list(zip(recs, caps))[:4]]
    return res
