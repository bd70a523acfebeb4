"""Referring-expression grounding (REC) answered as text, scored by box IoU.

A generative LVLM answers "where is the red circle left of the blue square?" with a box
written as text, ``[x0, y0, x1, y1]`` in integer percent of the image side (the format
contract is in :mod:`fam.data.boxes`, which also writes the answers of the Scenes
instruction data). One unit is 1.12 px on a 112-px Scenes image, finer than any box needs
for IoU ≥ 0.5.

Scoring (RefCOCO protocol): a prediction is correct when ``IoU(pred, gold) ≥ 0.5``. An
answer that does not contain a well-formed box (fewer than four numbers, an edge outside
0..100, ``x1 ≤ x0`` or ``y1 ≤ y0``) is wrong, and counted separately as ``invalid`` so that
a model that never learned the format is told apart from one that points at the wrong
object.

Example:
    >>> box_to_text([28, 56, 46, 74], width=112, height=112)
    '[25, 50, 41, 66]'
    >>> parse_box("[25, 50, 41, 66]")
    (25.0, 50.0, 41.0, 66.0)
    >>> score_rec(["[25, 50, 41, 66]", "no idea"], [(25, 50, 41, 66), (0, 0, 10, 10)])["accuracy"]
    0.5
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from fam.data.boxes import BOX_SCALE, box_to_text, normalise_box

__all__ = ["BOX_SCALE", "IOU_THRESHOLD", "box_iou", "box_to_text", "normalise_box",
           "parse_box", "score_rec"]

#: RefCOCO's hit criterion.
IOU_THRESHOLD = 0.5

Box = tuple[float, float, float, float]

# A number: optional sign, digits, optional decimals (decimals and signs are parsed so that
# "[0.25, ...]" or "[-3, ...]" is recognised as a box and then rejected as out of format,
# rather than read as other numbers).
_NUM = r"[-+]?\d+(?:\.\d+)?"
_BRACKETED = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")
_ANY_NUM = re.compile(_NUM)


def parse_box(text: str) -> Box | None:
    """The box of an answer, or ``None`` when the answer holds no well-formed box.

    The first bracketed group of four numbers is read (``"[25, 50, 41, 66]"``, spaces
    optional); without brackets, the first four numbers of the text are read (a model
    that drops the brackets still located the object). The box must lie in 0..100 with
    ``x1 > x0`` and ``y1 > y0``.
    """
    m = _BRACKETED.search(text)
    if m:
        nums = [float(g) for g in m.groups()]
    else:
        found = _ANY_NUM.findall(text)
        if len(found) < 4:
            return None
        nums = [float(g) for g in found[:4]]
    x0, y0, x1, y1 = nums
    if any(v < 0 or v > BOX_SCALE for v in nums) or x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1, y1)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes (continuous edges)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def score_rec(answers: Sequence[str], gold: Sequence[Sequence[float]],
              threshold: float = IOU_THRESHOLD) -> dict[str, Any]:
    """REC accuracy of generated answers against gold boxes (both in 0..100 units).

    Args:
        answers: generated texts, one per question.
        gold: gold boxes ``[x0, y0, x1, y1]`` in the answer scale (:func:`normalise_box`).
        threshold: IoU needed for a hit (0.5, RefCOCO).

    Returns:
        ``accuracy`` (fraction with IoU ≥ threshold), ``mean_iou`` (invalid answers count
        0), ``invalid`` (fraction without a well-formed box), ``n``, and ``hits`` (per
        answer, for paired statistics).
    """
    if len(answers) != len(gold):
        raise ValueError(f"{len(answers)} answers but {len(gold)} gold boxes")
    hits, ious, invalid = [], [], 0
    for text, g in zip(answers, gold):
        box = parse_box(text)
        if box is None:
            invalid += 1
            iou = 0.0
        else:
            iou = box_iou(box, g)
        ious.append(iou)
        hits.append(iou >= threshold)
    n = len(answers)
    return {"accuracy": sum(hits) / n if n else float("nan"),
            "mean_iou": sum(ious) / n if n else float("nan"),
            "invalid": invalid / n if n else float("nan"), "n": n, "hits": hits}
