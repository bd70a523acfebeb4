"""COCO run-length encoding (RLE) of binary masks, without pycocotools.

PAD records (method.md §4) store each region's mask as a COCO RLE dict
``{"size": [h, w], "counts": ...}``. This module reads and writes that format
bit-for-bit like pycocotools (``maskApi.c``), so files written here load in
pycocotools and vice versa:

* The mask is flattened in column-major (Fortran) order: all of column 0 top to
  bottom, then column 1, ...
* ``counts`` alternates run lengths of 0s and 1s and always starts with a 0-run
  (which is 0 when the first pixel is set).
* The compressed string form (``rleToString``) writes each count as a signed
  LEB128-like varint with 5 payload bits per character (chars 48..111; bit 0x20 =
  "more chars follow", bit 0x10 of the last char = sign). From the fourth count on
  (index ``i > 2``, pycocotools' exact condition) the value written is the difference
  to the count two places earlier, which is small because consecutive runs of the
  same value have similar lengths.

Boxes: :func:`rle_to_bbox` returns ``[x0, y0, x1, y1]`` with an *exclusive* end (one
past the last mask pixel, so ``x1 - x0`` is the COCO width) by default, or COCO
``[x, y, w, h]`` with ``fmt="xywh"``. An empty mask gives all zeros in both formats.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from fam.errors import DataError

__all__ = ["rle_encode", "rle_decode", "rle_area", "rle_to_bbox", "counts_to_string",
           "string_to_counts", "mask_to_counts"]


def mask_to_counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO counts of a 2-D mask (column-major runs, starting with 0s).

    Args:
        mask: ``(H, W)`` array; non-zero means foreground.

    Returns:
        Run lengths ``[n0, n1, n0, ...]`` summing to ``H * W``. Like pycocotools, an
        all-zero mask gives ``[H*W]``, an all-one mask ``[0, H*W]`` and an empty
        (0-pixel) mask ``[0]``.
    """
    flat = np.asarray(mask).astype(bool).ravel(order="F")  # COCO is column-major
    n = flat.size
    if n == 0:
        return [0]
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [n]))
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs.insert(0, 0)  # the first run always counts zeros
    return [int(r) for r in runs]


def counts_to_string(counts: list[int]) -> str:
    """Compress counts exactly like pycocotools ``rleToString``."""
    out: list[str] = []
    for i, c in enumerate(counts):
        x = int(c)
        if i > 2:  # delta to the run two back (same pixel value); pycocotools uses i > 2
            x -= int(counts[i - 2])
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5  # arithmetic shift, like C's on a signed long
            # Stop once the rest is pure sign extension of the bit 0x10 just written.
            more = (x != -1) if (ch & 0x10) else (x != 0)
            if more:
                ch |= 0x20
            out.append(chr(ch + 48))
    return "".join(out)


def string_to_counts(s: str, *, where: str | None = None) -> list[int]:
    """Decompress a pycocotools ``counts`` string (inverse of :func:`counts_to_string`).

    Raises:
        DataError: a character is outside the 48..111 alphabet or the string ends
            in the middle of a value.
    """
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise DataError("RLE counts string ends in the middle of a value", where,
                                field="counts")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise DataError(f"invalid character {s[p]!r} in RLE counts string at "
                                f"position {p}", where, field="counts")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)  # sign-extend
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """Encode a binary mask as a COCO compressed RLE dict.

    Args:
        mask: ``(H, W)`` boolean (or 0/1) array.

    Returns:
        ``{"size": [H, W], "counts": str}`` (``counts`` is a ``str``, not ``bytes``,
        so the dict is JSON-serialisable).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2-D (H, W) mask, got shape {mask.shape}")
    h, w = mask.shape
    return {"size": [int(h), int(w)], "counts": counts_to_string(mask_to_counts(mask))}


def _parse(rle: dict[str, Any], where: str | None) -> tuple[int, int, list[int]]:
    """Validate an RLE dict and return ``(h, w, uncompressed counts)``."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise DataError("expected a COCO RLE dict with keys 'size' and 'counts'", where,
                        field="mask")
    size = rle["size"]
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, (int, np.integer)) and v >= 0 for v in size)):
        raise DataError(f"RLE 'size' must be [height, width] of non-negative ints, got "
                        f"{size!r}", where, field="size")
    h, w = int(size[0]), int(size[1])
    counts = rle["counts"]
    if isinstance(counts, bytes):  # pycocotools hands out bytes
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = string_to_counts(counts, where=where)
    elif isinstance(counts, (list, tuple)):
        if not all(isinstance(c, (int, np.integer)) for c in counts):
            raise DataError("uncompressed RLE counts must be a list of ints", where,
                            field="counts")
        counts = [int(c) for c in counts]
    else:
        raise DataError(f"RLE 'counts' must be a string or a list of ints, got "
                        f"{type(counts).__name__}", where, field="counts")
    if any(c < 0 for c in counts):
        raise DataError("RLE counts must be non-negative", where, field="counts")
    if sum(counts) != h * w:
        raise DataError(f"RLE counts sum to {sum(counts)} but size {h}x{w} has {h * w} "
                        "pixels; the mask is corrupt or 'size' is wrong", where,
                        field="counts")
    return h, w, counts


def rle_decode(rle: dict[str, Any], *, where: str | None = None) -> np.ndarray:
    """Decode a COCO RLE dict (compressed string or uncompressed list counts).

    Args:
        rle: ``{"size": [H, W], "counts": str | bytes | list[int]}``.
        where: optional file name used in error messages.

    Returns:
        ``(H, W)`` boolean mask.

    Raises:
        DataError: malformed dict, bad characters, or counts that do not sum to H*W.
    """
    h, w, counts = _parse(rle, where)
    values = np.arange(len(counts)) % 2 == 1  # runs alternate 0, 1, 0, ...
    flat = np.repeat(values, counts)
    return flat.reshape((h, w), order="F")


def rle_area(rle: dict[str, Any]) -> int:
    """Number of foreground pixels (sum of the 1-runs; no decoding needed)."""
    _, _, counts = _parse(rle, None)
    return int(sum(counts[1::2]))


def rle_to_bbox(rle: dict[str, Any], fmt: str = "xyxy") -> list[int]:
    """Tight bounding box of an RLE mask.

    Args:
        rle: COCO RLE dict.
        fmt: ``"xyxy"`` for ``[x0, y0, x1, y1]`` with exclusive ``x1, y1`` (one past
            the last foreground column/row; the convention of PAD boxes here) or
            ``"xywh"`` for COCO ``[x, y, w, h]`` as pycocotools ``toBbox`` returns.

    Returns:
        Four ints; ``[0, 0, 0, 0]`` for an empty mask.
    """
    if fmt not in ("xyxy", "xywh"):
        raise ValueError(f"fmt must be 'xyxy' or 'xywh', got {fmt!r}")
    m = rle_decode(rle)
    cols = np.flatnonzero(m.any(axis=0))
    rows = np.flatnonzero(m.any(axis=1))
    if cols.size == 0:
        return [0, 0, 0, 0]
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    if fmt == "xywh":
        return [x0, y0, x1 - x0, y1 - y0]
    return [x0, y0, x1, y1]
