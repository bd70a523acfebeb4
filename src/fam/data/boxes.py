"""Boxes written as text: the answer format of referring-expression grounding (REC).

    [x0, y0, x1, y1]

four **integers in 0..100**: the box's left, top, right and bottom edges as a percentage of
the image width (x) and height (y), rounded to the nearest integer; ``x1 > x0`` and
``y1 > y0``. This is Qwen-VL's integer grid (0..1000) scaled to 0..100 so that each
coordinate is one short number a tiny byte-level BPE vocabulary learns as a single token;
LLaVA-1.5 writes the same four edges as fractions with two decimals. One unit is 1 % of
the side (1.12 px on a 112-px Scenes image).

The Scenes instruction data (:mod:`fam.data.instructions`) writes answers with
:func:`box_to_text`; :mod:`fam.eval.rec` parses and scores them.

Example:
    >>> box_to_text([28, 56, 46, 74], width=112, height=112)
    '[25, 50, 41, 66]'
"""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["BOX_SCALE", "box_to_text", "normalise_box"]

#: Coordinates are written as integers in 0..BOX_SCALE (percent of the image side).
BOX_SCALE = 100


def normalise_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """A pixel box ``[x0, y0, x1, y1)`` (exclusive end, as Scenes/PAD boxes) → 0..100 ints.

    Raises:
        ValueError: a non-positive image size or an empty box.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty box {list(box)}: need x1 > x0 and y1 > y0")
    s = BOX_SCALE
    out = (round(x0 / width * s), round(y0 / height * s), round(x1 / width * s),
           round(y1 / height * s))
    a, b, c, d = (min(s, max(0, v)) for v in out)
    # a box thinner than one unit would round to zero width; keep it one unit wide
    if c <= a:
        c = min(s, a + 1) if a < s else s
        a = c - 1
    if d <= b:
        d = min(s, b + 1) if b < s else s
        b = d - 1
    return a, b, c, d


def box_to_text(box: Sequence[float], width: int, height: int) -> str:
    """The answer text of a pixel box: ``"[x0, y0, x1, y1]"`` in 0..100 (module docstring)."""
    return "[{}, {}, {}, {}]".format(*normalise_box(box, width, height))
