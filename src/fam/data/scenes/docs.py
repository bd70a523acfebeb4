"""Scenes-Docs: rendered document pages (title, text lines, a table, a bar chart, a drawing
of a scene object), three pages per document, all about the document's topic object.

Page kinds: ``"drawing"`` (the topic object drawn large, with the title and text),
``"chart"`` (bars in the topic colour) and ``"table"`` (a table whose header is the topic
colour, with a small drawing of the shape). A query names what a page shows; the page
that shows exactly that is relevant with grade 2, the document's other pages with grade 1
(graded relevance, several relevant pages, several documents may share a topic).
OOD pages (``layout="mirrored"``): dark pages with the layout mirrored left to right.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from fam.config.scenes import COLOURS, SHAPES
from fam.data.scenes.render import _shape_mask

__all__ = ["PAGE_KINDS", "Doc", "sample_doc", "render_page", "page_query"]

PAGE_KINDS: tuple[str, ...] = ("drawing", "chart", "table")


@dataclass(frozen=True)
class Doc:
    """A document: its topic object, a number for its title, and its layout."""

    id: str
    shape: str
    colour: str
    number: int
    layout: str = "plain"  # "plain" or "mirrored" (OOD)
    bars: tuple[int, ...] = (3, 5, 2, 4)


def sample_doc(rng: np.random.Generator, did: str, layout: str = "plain") -> Doc:
    colours = sorted(COLOURS)
    return Doc(did, SHAPES[int(rng.integers(len(SHAPES)))],
               colours[int(rng.integers(len(colours)))], int(rng.integers(1, 100)), layout,
               tuple(int(v) for v in rng.integers(1, 7, 4)))


def render_page(doc: Doc, kind: str, size: int) -> np.ndarray:
    """One page of ``doc`` as ``(size, size, 3)`` uint8."""
    dark = doc.layout == "mirrored"
    paper, ink = ((40, 40, 48), (230, 230, 230)) if dark else ((250, 250, 245), (20, 20, 20))
    im = Image.new("RGB", (size, size), paper)
    d = ImageDraw.Draw(im)
    col = COLOURS[doc.colour]
    u = size // 16
    d.text((u, u // 2), f"Report {doc.number}", fill=ink)
    d.line([(u, 2 * u), (size - u, 2 * u)], fill=ink)
    for k in range(3):  # body text lines (grey bars: too small to read at 112 px anyway)
        d.line([(u, (3 + k) * u), (size // 2 - u, (3 + k) * u)], fill=(128, 128, 128))
    arr = np.asarray(im).copy()
    box = (size // 2, 3 * u, size - u, size - u)  # the figure region (right half)
    x0, y0, x1, y1 = box
    if kind == "drawing":
        s = min(x1 - x0, y1 - y0)
        arr[y0:y0 + s, x0:x0 + s][_shape_mask(doc.shape, s)] = col
    elif kind == "chart":
        w = (x1 - x0) // len(doc.bars)
        for k, v in enumerate(doc.bars):
            top = y1 - v * (y1 - y0) // 7
            arr[top:y1, x0 + k * w + 1:x0 + (k + 1) * w - 1] = col
    else:
        arr[y0:y0 + 2 * u, x0:x1] = col
        for r in range(3):
            yl = y0 + (3 + 2 * r) * u
            arr[yl, x0:x1] = ink
        for c in range(3):
            arr[y0:y1 - u, x0 + c * (x1 - x0) // 3] = ink
        s = 3 * u
        arr[y1 - s:y1, u:u + s][_shape_mask(doc.shape, s)] = col
    if dark:
        arr = arr[:, ::-1].copy()
    return arr


def page_query(doc: Doc, kind: str) -> str:
    """What a page of ``kind`` in ``doc`` shows, as a search query."""
    if kind == "drawing":
        return f"a drawing of a {doc.colour} {doc.shape}"
    if kind == "chart":
        return f"a bar chart with {doc.colour} bars"
    return f"a table with a {doc.colour} header and a small {doc.shape}"
