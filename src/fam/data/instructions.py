"""Scenes instruction data for stage-2 SFT: VQA (colour, count, relation) and REC as text.

LLaVA's stage 2 fine-tunes the projector and the LLM on instruction data; the paper
(arXiv 2505.17316) measures the patch-aligned projector after the same SFT on referring-
expression grounding (REC) and VQA. This module writes the Scenes miniature of that data
from a generated Scenes folder's ``pad.jsonl`` (every object's colour, shape, size, box,
and a referring expression unique in its scene):

* ``vqa_count`` — "How many objects are in the image?" → ``one`` … ``eight``.
* ``vqa_colour`` — "What colour is the <shape>?" (or "the <size> <shape>" when the shape
  alone is ambiguous; skipped when neither names one object) → the colour word.
* ``vqa_relation`` — "Is the <A> left of / right of / above / below the <B>?" → ``yes`` /
  ``no``, for two objects with unique labels whose centres differ by at least
  ``margin`` (12 % of the side, the Scenes relation margin) along the asked axis; ``yes``
  and ``no`` are drawn with equal probability.
* ``rec`` — "Where is <expression>? Answer with a box." → ``[x0, y0, x1, y1]`` in 0..100
  (:mod:`fam.data.boxes`, the format contract); ``box`` holds the gold box.

Output: JSON lists ``[{image, question, answer, task[, box]}]`` (the ``{image, question,
answer}`` layout that stage 0 reads as ``qa``). Training rows come from
``images/train/`` records (counterfactual re-renders included: they are scenes too), eval
rows from primary ``images/eval/`` scenes only. Deterministic in ``seed``.

Example:
    >>> rows = build_instructions(pad_records, split="eval", seed=0)   # doctest: +SKIP
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fam.errors import DataError
from fam.data.boxes import box_to_text, normalise_box
from fam.utils.io import atomic_write_json, read_jsonl

log = logging.getLogger(__name__)

__all__ = ["REC_PROMPT", "TASKS", "build_instructions", "write_instructions"]

TASKS = ("vqa_count", "vqa_colour", "vqa_relation", "rec")
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight")
REC_PROMPT = "Where is {}? Answer with a box."
#: relation phrase → (axis, sign): "A <phrase> B" holds when sign·(c_A − c_B) ≥ margin
_RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _objects(rec: dict, where: tuple[str, int]) -> list[dict]:
    out = []
    for j, reg in enumerate(rec["regions"]):
        attrs = reg.get("attributes")
        box = reg.get("box")
        if not isinstance(attrs, dict) or not all(isinstance(attrs.get(k), str)
                                                  for k in ("colour", "shape", "size")):
            raise DataError("region needs 'attributes' {colour, shape, size} (a Scenes PAD "
                            "record); instruction data is built from Scenes ground truth",
                            where[0], where[1], f"regions[{j}].attributes")
        if not (isinstance(box, list) and len(box) == 4):
            raise DataError("region needs a 'box' [x0, y0, x1, y1]", where[0], where[1],
                            f"regions[{j}].box")
        out.append({"colour": attrs["colour"], "shape": attrs["shape"], "size": attrs["size"],
                    "label": reg["label"], "box": [float(v) for v in box],
                    "expression": reg.get("expression") or ""})
    return out


def _centre(box: Sequence[float]) -> tuple[float, float]:
    return ((box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0)


def _image_rows(rec: dict, objs: list[dict], rng: np.random.Generator, per_task: int,
                margin: float) -> list[dict]:
    img, w, h = rec["image"], int(rec["width"]), int(rec["height"])
    rows: list[dict] = []
    if 1 <= len(objs) <= len(NUMBER_WORDS):
        rows.append({"task": "vqa_count", "question": "How many objects are in the image?",
                     "answer": NUMBER_WORDS[len(objs) - 1]})
    shapes = Counter(o["shape"] for o in objs)
    size_shapes = Counter((o["size"], o["shape"]) for o in objs)
    colour_q = []
    for o in objs:
        if shapes[o["shape"]] == 1:
            colour_q.append((f"What colour is the {o['shape']}?", o["colour"]))
        elif size_shapes[(o["size"], o["shape"])] == 1:
            colour_q.append((f"What colour is the {o['size']} {o['shape']}?", o["colour"]))
    for i in rng.permutation(len(colour_q))[:per_task]:
        q, a = colour_q[int(i)]
        rows.append({"task": "vqa_colour", "question": q, "answer": a})
    labels = Counter(o["label"] for o in objs)
    rel_q = []
    for a, oa in enumerate(objs):
        for b, ob in enumerate(objs):
            if a == b or labels[oa["label"]] > 1 or labels[ob["label"]] > 1:
                continue
            for phrase, (axis, sign) in _RELATIONS.items():
                side = w if axis == 0 else h
                d = sign * (_centre(oa["box"])[axis] - _centre(ob["box"])[axis])
                if d >= margin * side:   # "A <phrase> B" is clearly true
                    rel_q.append((oa["label"], phrase, ob["label"]))
    for i in rng.permutation(len(rel_q))[:per_task]:
        la, phrase, lb = rel_q[int(i)]
        truth = bool(rng.random() < 0.5)
        said = phrase if truth else _OPPOSITE[phrase]
        rows.append({"task": "vqa_relation", "question": f"Is the {la} {said} the {lb}?",
                     "answer": "yes" if truth else "no"})
    rec_q = [o for o in objs if o["expression"]]
    for i in rng.permutation(len(rec_q))[:per_task]:
        o = rec_q[int(i)]
        rows.append({"task": "rec", "question": REC_PROMPT.format(o["expression"]),
                     "answer": box_to_text(o["box"], w, h),
                     "box": list(normalise_box(o["box"], w, h))})
    for r in rows:
        r["image"] = img
    return rows


def build_instructions(records: Iterable[tuple[int, dict]], split: str, seed: int = 0,
                       per_task: int = 2, margin: float = 12 / 112, source: str = "pad.jsonl",
                       max_per_task: int | None = None) -> list[dict]:
    """Instruction rows of one split (module docstring).

    Args:
        records: ``(line, PAD record)`` pairs of a Scenes ``pad.jsonl``.
        split: "train" (``images/train/``, counterfactuals included) or "eval" (primary
            ``images/eval/`` scenes).
        seed: row sampling seed.
        per_task: at most this many colour / relation / REC rows per image.
        margin: relation margin as a fraction of the image side.
        source: file name for error messages.
        max_per_task: cap on rows per task (eval sets: equal-size task blocks).

    Returns:
        ``[{image, question, answer, task[, box]}]``.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: expected 'train' or 'eval'")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    prefix = f"images/{split}/"
    rows: list[dict] = []
    for line, rec in records:
        image = rec.get("image", "")
        if not image.startswith(prefix):
            continue
        if split == "eval" and "-" in Path(image).stem:
            continue  # counterfactual re-renders repeat their scene
        rows.extend(_image_rows(rec, _objects(rec, (source, line)), rng, per_task, margin))
    if max_per_task is not None:
        kept, seen = [], Counter()
        for r in rows:
            if seen[r["task"]] < max_per_task:
                seen[r["task"]] += 1
                kept.append(r)
        rows = kept
    counts = Counter(r["task"] for r in rows)
    log.info("instructions (%s): %d rows %s", split, len(rows), dict(counts))
    return rows


def write_instructions(scenes_dir: str | Path, out_dir: str | Path | None = None, seed: int = 0,
                       per_task: int = 2, eval_per_task: int | None = 200) -> dict[str, Any]:
    """Write ``sft_train.json`` and ``sft_eval.json`` next to a Scenes folder's files.

    Args:
        scenes_dir: a folder written by :func:`fam.data.scenes.generate_scenes`.
        out_dir: where the two files go (default ``scenes_dir``; image paths stay
            relative to ``scenes_dir``).
        seed: sampling seed.
        per_task: rows per task per image.
        eval_per_task: cap on eval rows per task.

    Returns:
        ``{"train": path, "eval": path, "counts": {split: {task: n}}}``.
    """
    src = Path(scenes_dir) / "pad.jsonl"
    if not src.exists():
        raise DataError("no pad.jsonl: generate the Scenes benchmark first", src)
    recs = list(read_jsonl(src))
    out = Path(out_dir or scenes_dir)
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"counts": {}}
    for split, cap in (("train", None), ("eval", eval_per_task)):
        rows = build_instructions(recs, split, seed, per_task, source=str(src), max_per_task=cap)
        path = out / f"sft_{split}.json"
        atomic_write_json(path, rows)
        res[split] = str(path)
        res["counts"][split] = dict(Counter(r["task"] for r in rows))
    return res
