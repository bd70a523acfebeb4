"""PAD records: the Patch-Aligned Dataset's one-JSON-line-per-image format (method.md §4).

A record::

    {"image": "images/train/tr00001.png", "width": 112, "height": 112,
     "tags": ["red circle", "blue square"],
     "regions": [{"label": "red circle", "score": 0.93, "box": [x0, y0, x1, y1],
                  "mask": {"size": [112, 112], "counts": "..."}}]}

``image`` is relative to the image root; ``box`` is in pixels, ``x1, y1`` exclusive-end
(like :func:`fam.data.rle.rle_to_bbox`), inside ``[0, width] x [0, height]``; ``mask``
is a COCO RLE of the full image (``size == [height, width]``). Extra keys (the Scenes
generator adds ``expression`` and ``attributes`` to regions) are kept in ``extra`` and
written back unchanged.

Every reader here validates each line and raises :class:`~fam.errors.DataError` naming
the file, the line and the field (``regions[2].box``), so a bad row among 558K is found
in seconds.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from fam.data.rle import rle_decode, rle_encode, string_to_counts
from fam.errors import DataError
from fam.utils.io import atomic_path, read_jsonl, resolve_under

__all__ = ["PadRegion", "PadRecord", "parse_pad_record", "iter_pad", "read_pad",
           "write_pad", "pad_line", "region_mask"]

_RECORD_KEYS = ("image", "width", "height", "tags", "regions")
_REQUIRED_KEYS = ("image", "width", "height", "regions")  # tags default to []
_REGION_KEYS = ("label", "score", "box", "mask")


@dataclass
class PadRegion:
    """One annotated region of an image.

    Attributes:
        label: the region's text label (a tag, e.g. ``"red circle"``).
        score: detector confidence in ``[0, 1]`` (1.0 for ground truth).
        box: ``[x0, y0, x1, y1]`` in pixels, exclusive end.
        mask: COCO RLE ``{"size": [H, W], "counts": str}`` of the whole image.
        extra: any other keys of the region, written back unchanged.
    """

    label: str
    score: float
    box: list[float]
    mask: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mask(cls, label: str, score: float, box: Sequence[float],
                  mask: np.ndarray) -> "PadRegion":
        """Build a region from a boolean ``(H, W)`` mask (encoded as COCO RLE)."""
        return cls(label=label, score=float(score), box=[_num(v) for v in box],
                   mask=rle_encode(np.asarray(mask, dtype=bool)))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the four PAD keys first, then ``extra``)."""
        d = {"label": self.label, "score": self.score, "box": list(self.box),
             "mask": self.mask}
        d.update(self.extra)
        return d


@dataclass
class PadRecord:
    """The PAD record of one image.

    Attributes:
        image: image path relative to the image root.
        width, height: image size in pixels.
        tags: tagger output (the detector's text prompt); optional in the file (``[]``).
        regions: the detected, segmented regions.
        extra: any other keys of the record, written back unchanged.
        path: the resolved absolute image path (set by :func:`read_pad`; not written).
        source, line: the file and 1-based line the record was read from (for error
            messages downstream; not written).
    """

    image: str
    width: int
    height: int
    tags: list[str]
    regions: list[PadRegion]
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = field(default=None, compare=False)
    source: str | None = field(default=None, compare=False)
    line: int | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the record."""
        d = {"image": self.image, "width": self.width, "height": self.height,
             "tags": list(self.tags), "regions": [r.to_dict() for r in self.regions]}
        d.update(self.extra)
        return d


def _num(v: Any) -> float | int:
    """Keep ints as ints (ground-truth boxes) and round floats to 1/100 px (compact JSON)."""
    if isinstance(v, (int, np.integer)):
        return int(v)
    return round(float(v), 2)


def region_mask(region: PadRegion | dict[str, Any]) -> np.ndarray:
    """Decode a region's mask.

    Args:
        region: a :class:`PadRegion` or a region dict from a PAD line.

    Returns:
        ``(H, W)`` boolean mask.
    """
    mask = region.mask if isinstance(region, PadRegion) else region["mask"]
    return rle_decode(mask)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_region(d: Any, k: int, width: int, height: int, source: str | None,
                  line: int | None) -> PadRegion:
    where = f"regions[{k}]"
    if not isinstance(d, dict):
        raise DataError(f"a region must be a JSON object, got {type(d).__name__}", source,
                        line, where)
    for key in _REGION_KEYS:
        if key not in d:
            raise DataError(f"region is missing '{key}' (PAD regions need "
                            f"{list(_REGION_KEYS)})", source, line, f"{where}.{key}")
    label, score, box, mask = d["label"], d["score"], d["box"], d["mask"]
    if not isinstance(label, str) or not label.strip():
        raise DataError(f"label must be a non-empty string, got {label!r}", source, line,
                        f"{where}.label")
    if not _is_number(score):
        raise DataError(f"score must be a finite number, got {score!r}", source, line,
                        f"{where}.score")
    if (not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box)):
        raise DataError(f"box must be [x0, y0, x1, y1] (4 numbers), got {box!r}", source,
                        line, f"{where}.box")
    x0, y0, x1, y1 = box
    if not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
        raise DataError(f"box {box} is not inside the {width}x{height} image (need "
                        f"0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height)", source, line,
                        f"{where}.box")
    if not isinstance(mask, dict) or "size" not in mask or "counts" not in mask:
        raise DataError("mask must be a COCO RLE object {size: [h, w], counts: str}", source,
                        line, f"{where}.mask")
    if not isinstance(mask["size"], list) or mask["size"] != [height, width]:
        raise DataError(f"mask size {mask['size']!r} != [height, width] = "
                        f"[{height}, {width}]; masks cover the whole image", source, line,
                        f"{where}.mask.size")
    counts = mask["counts"]
    try:
        # Parsing the counts (not decoding the mask) is enough to catch a corrupt string
        # or a wrong pixel total, and costs a fraction of a full decode.
        n = sum(string_to_counts(counts) if isinstance(counts, str) else counts)
    except (DataError, TypeError) as e:
        raise DataError(f"corrupt mask counts: {getattr(e, 'reason', e)}", source, line,
                        f"{where}.mask.counts") from None
    if n != width * height:
        raise DataError(f"mask counts cover {n} pixels, the {width}x{height} image has "
                        f"{width * height}", source, line, f"{where}.mask.counts")
    extra = {k2: v for k2, v in d.items() if k2 not in _REGION_KEYS}
    return PadRegion(label=label, score=score, box=list(box), mask=mask, extra=extra)


def parse_pad_record(row: Any, *, source: str | Path | None = None, line: int | None = None,
                     image_root: str | Path | None = None) -> PadRecord:
    """Validate one PAD row and return it as a :class:`PadRecord`.

    Args:
        row: the decoded JSON object.
        source, line: file and 1-based line, for error messages.
        image_root: if given, ``image`` is resolved under it (and must not escape it);
            the result is stored in ``PadRecord.path``.

    Raises:
        DataError: a missing or mistyped field, a box outside the image, a mask whose
            size is not ``[height, width]`` or whose counts are corrupt, or an image path
            escaping ``image_root``; the message names file, line and field.
    """
    src = str(source) if source is not None else None
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}", src, line)
    for key in _REQUIRED_KEYS:
        if key not in row:
            raise DataError(f"missing field '{key}' (PAD records need {list(_RECORD_KEYS)})",
                            src, line, key)
    image, width, height, regions = (row[k] for k in _REQUIRED_KEYS)
    tags = row.get("tags", [])
    if not isinstance(image, str) or not image:
        raise DataError(f"image must be a non-empty relative path, got {image!r}", src, line,
                        "image")
    path = None
    if image_root is not None:
        path = resolve_under(image_root, image, source=src, line=line, field="image")
    elif Path(image).is_absolute() or ".." in Path(image).parts:
        raise DataError(f"image path {image!r} must be relative to the image root and stay "
                        "inside it", src, line, "image")
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise DataError(f"{name} must be a positive integer, got {v!r}", src, line, name)
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise DataError(f"tags must be a list of strings, got {tags!r}", src, line, "tags")
    if not isinstance(regions, list):
        raise DataError(f"regions must be a list, got {type(regions).__name__}", src, line,
                        "regions")
    regs = [_parse_region(r, k, width, height, src, line) for k, r in enumerate(regions)]
    extra = {k: v for k, v in row.items() if k not in _RECORD_KEYS}
    return PadRecord(image=image, width=width, height=height, tags=list(tags), regions=regs,
                     extra=extra, path=path, source=src, line=line)


def iter_pad(path: str | Path, image_root: str | Path | None = None,
             select: str | None = None) -> Iterator[PadRecord]:
    """Stream validated records from a PAD JSONL file.

    The one PAD reader of fam: the builder, projector training, the alignment report and
    the probes all read PAD files through it.

    Args:
        path: the ``pad.jsonl`` file.
        image_root: folder the ``image`` paths are relative to; defaults to the folder
            holding ``path`` (the Scenes layout).
        select: keep only records whose ``image`` contains this substring (e.g.
            ``"images/eval/"`` for the Scenes evaluation images); every line is still
            validated.

    Raises:
        DataError: the file is missing or a line is invalid (names file, line, field).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    for line, row in read_jsonl(path):
        rec = parse_pad_record(row, source=path, line=line, image_root=root)
        if select is None or select in rec.image:
            yield rec


def read_pad(path: str | Path, image_root: str | Path | None = None,
             select: str | None = None) -> list[PadRecord]:
    """Read and validate a whole PAD JSONL file (see :func:`iter_pad`)."""
    return list(iter_pad(path, image_root, select))


def pad_line(record: PadRecord | dict[str, Any]) -> str:
    """One JSONL line (with the trailing newline) for a record."""
    d = record.to_dict() if isinstance(record, PadRecord) else record
    return json.dumps(d, ensure_ascii=False, separators=(",", ":")) + "\n"


def write_pad(path: str | Path, records: Iterable[PadRecord | dict[str, Any]]) -> None:
    """Write records as a PAD JSONL file atomically (readers never see half a file)."""
    with atomic_path(path) as tmp:
        with tmp.open("w", encoding="utf-8") as f:
            for r in records:
                f.write(pad_line(r))
