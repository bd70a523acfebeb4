"""Build a Patch-Aligned Dataset (method.md §4): tagger → detector → segmenter → PAD JSONL.

The run is resumable and crash-safe, because the original PAD is 558K images:

* each record is appended to the output as one line and flushed, so a crash loses at
  most the image in progress;
* on restart the images already in the output are skipped; a truncated last line (the
  crash happened mid-write) is detected and cut off before appending;
* a missing or corrupt image (or one the tagger has no caption for) is logged with its
  path, counted and skipped; it is retried on the next run.

Counts go to ``<out>.stats.json`` (written atomically) and are returned as
:class:`PadStats`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from fam.data.images import load_image
from fam.errors import DataError
from fam.pad.protocols import Detector, ImageMeta, Segmenter, Tagger
from fam.pad.records import PadRecord, PadRegion, pad_line
from fam.utils.io import atomic_write_json

logger = logging.getLogger(__name__)

__all__ = ["PadStats", "build_pad", "list_images", "filter_regions", "mask_iou",
           "stats_path", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class PadStats:
    """What a :func:`build_pad` run did.

    Attributes:
        images_total: images considered (after ``limit``).
        images_done: records written by this run.
        images_skipped: images already in the output (resumed).
        images_failed: missing/corrupt images (or no caption), skipped; see ``failed``.
        images_empty: records written with no region.
        regions: regions written by this run.
        regions_filtered_small: regions dropped by ``min_area``.
        regions_filtered_duplicate: regions dropped as same-label mask duplicates.
        labels: regions per label written by this run.
        records_in_file: records in the output file after the run (all runs).
        regions_in_file: regions in the output file after the run (all runs).
        truncated_line_dropped: a partial last line from a crash was cut off.
        failed: ``[{"image", "error"}]`` for the failed images.
        elapsed_s: wall time of the run.
    """

    images_total: int = 0
    images_done: int = 0
    images_skipped: int = 0
    images_failed: int = 0
    images_empty: int = 0
    regions: int = 0
    regions_filtered_small: int = 0
    regions_filtered_duplicate: int = 0
    labels: dict[str, int] = field(default_factory=dict)
    records_in_file: int = 0
    regions_in_file: int = 0
    truncated_line_dropped: bool = False
    failed: list[dict[str, str]] = field(default_factory=list)
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def stats_path(out_path: str | Path) -> Path:
    """``<out>.stats.json`` next to the output file."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".stats.json")


def list_images(root: str | Path) -> list[tuple[str, Path]]:
    """All images under ``root`` as sorted ``(relative path, absolute path)`` pairs.

    A Scenes root (it holds ``scenes.json``) contributes only ``images/``: its
    ``crops/`` are object crops, not scenes to annotate.

    Raises:
        DataError: ``root`` is not a folder or holds no image.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError("image folder not found; pass a folder of images or a Scenes root",
                        root)
    base = root / "images" if (root / "scenes.json").is_file() and (root / "images").is_dir() \
        else root
    out = sorted((p.relative_to(root).as_posix(), p.resolve()) for p in base.rglob("*")
                 if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not out:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under this folder", root)
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks of the same shape (0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def filter_regions(regions: Sequence[tuple[str, float, Sequence[float], np.ndarray]], *,
                   min_pixels: float, dedup_iou: float
                   ) -> tuple[list[int], int, int]:
    """Drop tiny regions and same-label duplicates.

    Regions are visited by decreasing score; one is dropped when its mask has fewer
    than ``min_pixels`` pixels (an empty mask always is), or when a kept region with the
    same label has mask IoU > ``dedup_iou`` with it (box NMS misses duplicates whose
    boxes differ but whose SAM masks coincide).

    Args:
        regions: ``(label, score, box, mask)`` tuples; ``mask`` is ``(H, W)`` bool.
        min_pixels: smallest kept mask area in pixels.
        dedup_iou: mask-IoU above which a same-label region is a duplicate.

    Returns:
        ``(kept indices in decreasing-score order, n_small, n_duplicate)``.
    """
    order = sorted(range(len(regions)), key=lambda i: -regions[i][1])  # stable on ties
    kept: list[int] = []
    n_small = n_dup = 0
    for i in order:
        label, _, _, m = regions[i]
        if m.sum() < max(min_pixels, 1):
            n_small += 1
            continue
        if any(regions[j][0] == label and mask_iou(regions[j][3], m) > dedup_iou
               for j in kept):
            n_dup += 1
            continue
        kept.append(i)
    return kept, n_small, n_dup


def _min_pixels(min_area: float, width: int, height: int) -> float:
    """``min_area`` < 1 is a fraction of the image area, otherwise a pixel count."""
    if min_area < 0:
        raise ValueError(f"min_area must be >= 0, got {min_area}")
    return min_area * width * height if min_area < 1 else float(min_area)


def _scan_output(out_path: Path) -> tuple[dict[str, int], bool]:
    """Images already in the output (→ their region counts); repair a crash's partial line.

    Returns:
        ``({image: n_regions}, whether a truncated last line was cut off)``.

    Raises:
        DataError: a line other than the last is not valid JSON (not a crash artefact;
            the file needs a look).
    """
    done: dict[str, int] = {}
    if not out_path.exists():
        return done, False
    data = out_path.read_bytes()
    lines = data.split(b"\n")
    # After split, the last element is b"" when the file ends with "\n".
    good_end = 0
    truncated = False
    for i, raw in enumerate(lines):
        last = i == len(lines) - 1
        if not raw.strip():
            good_end += len(raw) + (0 if last else 1)
            continue
        try:
            row = json.loads(raw)
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise ValueError("not a PAD record")
        except ValueError:
            if last:  # a partial write: drop it, the image is redone
                truncated = True
                break
            raise DataError("invalid PAD line in an existing output file; fix or remove "
                            "the line (or the file) before resuming", out_path, i + 1) from None
        done[row["image"]] = len(row.get("regions") or [])
        good_end += len(raw) + (0 if last else 1)
    if truncated:
        logger.warning("%s: dropping a truncated last line (a crash during its write); "
                       "that image is redone", out_path)
        with out_path.open("r+b") as f:
            f.truncate(good_end)
    elif data and not data.endswith(b"\n"):
        with out_path.open("ab") as f:  # a complete last line missing only its newline
            f.write(b"\n")
    return done, truncated


def _process(image_meta: ImageMeta, tagger: Tagger, detector: Detector,
             segmenter: Segmenter, min_area: float, dedup_iou: float
             ) -> tuple[PadRecord, int, int]:
    image = load_image(image_meta.path)
    w, h = image.size
    tags = tagger.tags(image, image_meta)
    dets = detector.detect(image, tags, meta=image_meta) if tags else []
    masks = segmenter.segment(image, [d.box for d in dets], meta=image_meta) if dets else []
    if len(masks) != len(dets):
        raise RuntimeError(f"segmenter returned {len(masks)} masks for {len(dets)} boxes")
    cands = []
    for d, m in zip(dets, masks):
        m = np.asarray(m, dtype=bool)
        if m.shape != (h, w):
            raise RuntimeError(f"segmenter returned a {m.shape} mask for a {h}x{w} image "
                               f"({image_meta.image}); masks must be the image size")
        cands.append((d.label, float(d.score), d.box, m))
    kept, n_small, n_dup = filter_regions(cands, min_pixels=_min_pixels(min_area, w, h),
                                          dedup_iou=dedup_iou)
    regions = []
    for i in kept:
        label, score, box, m = cands[i]
        x0, y0, x1, y1 = box
        box = [min(max(x0, 0), w), min(max(y0, 0), h), min(max(x1, 0), w), min(max(y1, 0), h)]
        regions.append(PadRegion.from_mask(label, round(score, 4), box, m))
    rec = PadRecord(image=image_meta.image, width=w, height=h, tags=list(tags), regions=regions)
    return rec, n_small, n_dup


def build_pad(images: Sequence[tuple[str, str | Path]], tagger: Tagger, detector: Detector,
              segmenter: Segmenter, out_path: str | Path, *, min_area: float = 0.0005,
              dedup_iou: float = 0.9, limit: int | None = None,
              progress: bool = True) -> PadStats:
    """Run tagger → detector → segmenter over images and append PAD records to a JSONL.

    Args:
        images: ``(relative path, absolute path)`` pairs, in processing order (see
            :func:`list_images`); the relative path becomes the record's ``image``.
        tagger, detector, segmenter: the stages (:mod:`fam.pad.protocols`).
        out_path: output ``pad.jsonl``; appended to, so an interrupted run resumes.
        min_area: smallest kept region: a fraction of the image area if < 1 (default
            0.05% ≈ 6 px of a 112-px image, 154 px of 640x480), else pixels.
        dedup_iou: same-label regions whose masks overlap more than this are duplicates.
        limit: consider only the first ``limit`` images (``None``: all), so repeated
            runs with the same limit are idempotent.
        progress: show a tqdm progress bar.

    Returns:
        The run's :class:`PadStats` (also written to ``<out>.stats.json``).

    Raises:
        DataError: the existing output has a corrupt line that is not the last one.
    """
    t0 = time.perf_counter()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    images = list(images)[:limit] if limit is not None else list(images)
    done, truncated = _scan_output(out_path)
    stats = PadStats(images_total=len(images), truncated_line_dropped=truncated)
    todo = [(rel, Path(p)) for rel, p in images if rel not in done]
    stats.images_skipped = len(images) - len(todo)
    if stats.images_skipped:
        logger.info("resuming %s: %d of %d images already done", out_path,
                    stats.images_skipped, len(images))
    labels: Counter[str] = Counter()
    with out_path.open("a", encoding="utf-8") as f, \
            tqdm(total=len(todo), disable=not progress, desc="pad", unit="img") as bar:
        for rel, path in todo:
            if rel in done:  # listed twice
                stats.images_skipped += 1
                bar.update(1)
                continue
            meta = ImageMeta(rel, path)
            try:
                rec, n_small, n_dup = _process(meta, tagger, detector, segmenter, min_area,
                                               dedup_iou)
            except DataError as e:
                stats.images_failed += 1
                stats.failed.append({"image": rel, "error": str(e)})
                logger.warning("skipping %s (%s): %s", rel, path, e)
                bar.update(1)
                continue
            # One write per record, then flush: a crash leaves at most a partial last line.
            f.write(pad_line(rec))
            f.flush()
            stats.images_done += 1
            stats.images_empty += not rec.regions
            stats.regions += len(rec.regions)
            stats.regions_filtered_small += n_small
            stats.regions_filtered_duplicate += n_dup
            labels.update(r.label for r in rec.regions)
            done[rel] = len(rec.regions)
            bar.update(1)
            bar.set_postfix(regions=stats.regions, failed=stats.images_failed, refresh=False)
        os.fsync(f.fileno())
    stats.labels = dict(sorted(labels.items(), key=lambda kv: (-kv[1], kv[0])))
    stats.records_in_file = len(done)
    stats.regions_in_file = sum(done.values())
    stats.elapsed_s = round(time.perf_counter() - t0, 3)
    atomic_write_json(stats_path(out_path), stats.to_dict())
    logger.info("PAD %s: %d images done, %d skipped (already there), %d failed, %d regions "
                "(%d filtered as small, %d as duplicates) in %.1fs", out_path,
                stats.images_done, stats.images_skipped, stats.images_failed, stats.regions,
                stats.regions_filtered_small, stats.regions_filtered_duplicate,
                stats.elapsed_s)
    return stats
