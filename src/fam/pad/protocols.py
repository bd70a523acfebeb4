"""The three pluggable stages of the PAD pipeline (method.md §4): tagger → detector → segmenter.

The original PAD run used RAM (tags) → Grounding DINO (boxes; box threshold 0.25, text
threshold 0.2, NMS 0.5) → SAM (box-prompted masks). Here the stages are protocols:
:mod:`fam.pad.taggers` (tags from captions or a fixed list, and the ground-truth replay
that plays all three roles) and :mod:`fam.pad.detect` (Grounding DINO and SAM from local
folders).

Every stage receives the image as a PIL RGB image and, as the keyword ``meta``, the
image's :class:`ImageMeta` (relative and absolute path); model-based stages ignore it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

__all__ = ["ImageMeta", "Detection", "Tagger", "Detector", "Segmenter"]


@dataclass(frozen=True)
class ImageMeta:
    """Where an image comes from.

    Attributes:
        image: path relative to the image root (the PAD record's ``image``).
        path: absolute path of the file.
    """

    image: str
    path: Path


class Detection(NamedTuple):
    """One detected box: ``label`` (one of the prompted tags), ``score`` in [0, 1],
    ``box`` ``(x0, y0, x1, y1)`` in pixels of the original image."""

    label: str
    score: float
    box: tuple[float, float, float, float]


@runtime_checkable
class Tagger(Protocol):
    """Stage 1: the labels to look for in an image (RAM in the paper)."""

    def tags(self, image: Image.Image, meta: ImageMeta) -> list[str]:
        """Return the image's tags (deduplicated, in a deterministic order)."""
        ...


@runtime_checkable
class Detector(Protocol):
    """Stage 2: open-vocabulary boxes for the given labels (Grounding DINO in the paper)."""

    def detect(self, image: Image.Image, labels: Sequence[str], *,
               meta: ImageMeta | None = None) -> list[Detection]:
        """Return detections whose ``label`` is one of ``labels``, best score first."""
        ...


@runtime_checkable
class Segmenter(Protocol):
    """Stage 3: one mask per box (box-prompted SAM in the paper)."""

    def segment(self, image: Image.Image, boxes: Sequence[Sequence[float]], *,
                meta: ImageMeta | None = None) -> list[np.ndarray]:
        """Return one boolean ``(H, W)`` mask (the image's size) per box, in order."""
        ...
