"""Rendering scenes to pixels and masks; crops; the PAD records of the rendered images."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from fam.config.scenes import COLOURS, SHAPES, ScenesConfig
from fam.data.rle import rle_encode
from fam.data.scenes.scene import Scene


@functools.lru_cache(maxsize=None)
def _shape_mask(shape: str, s: int) -> np.ndarray:
    """``(s, s)`` boolean mask of a shape filling an ``s``-px square (no anti-aliasing).

    Cached (there are only ``len(SHAPES) * 2`` distinct masks); the result is read-only.
    """
    im = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(im)
    e = s - 1  # last pixel index
    c = e / 2.0
    if shape == "circle":
        d.ellipse([0, 0, e, e], fill=255)
    elif shape == "square":
        m = round(0.1 * s)  # a square filling its box looks bigger than a circle
        d.rectangle([m, m, e - m, e - m], fill=255)
    elif shape == "triangle":
        d.polygon([(c, 0), (e, e), (0, e)], fill=255)
    elif shape == "diamond":
        d.polygon([(c, 0), (e, c), (c, e), (0, c)], fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            r = c if k % 2 == 0 else 0.45 * c
            ang = np.deg2rad(-90 + 36 * k)
            pts.append((c + r * np.cos(ang), c + r * np.sin(ang)))
        d.polygon(pts, fill=255)
    elif shape == "cross":
        th = max(2, round(0.36 * s))
        a = (s - th) // 2
        d.rectangle([a, 0, a + th - 1, e], fill=255)
        d.rectangle([0, a, e, a + th - 1], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    mask = np.asarray(im) > 0
    mask.setflags(write=False)
    return mask


def render_scene(scene: Scene, image_size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw a scene.

    Args:
        scene: the scene description.
        image_size: side in pixels.

    Returns:
        ``(image, masks)``: ``image`` is ``(H, W, 3)`` uint8 RGB; ``masks[k]`` is the
        ``(H, W)`` boolean mask of object ``k``. Objects never overlap, so every mask
        pixel has exactly the object's colour.
    """
    W = image_size
    bg = scene.background
    if scene.style == "striped":
        yy, xx = np.mgrid[0:W, 0:W]
        stripes = ((xx + yy) // 4) % 2 == 0  # thin diagonal stripes: a texture never in training
        grey = np.where(stripes, bg + 22, bg - 22).astype(np.uint8)
        img = np.repeat(grey[:, :, None], 3, axis=2)
    else:
        img = np.full((W, W, 3), bg, dtype=np.uint8)
    masks = []
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        m = np.zeros((W, W), dtype=bool)
        m[y0:y1, x0:x1] = _shape_mask(o.shape, x1 - x0)
        img[m] = COLOURS[o.colour]
        masks.append(m)
    return img, masks


def crop_window(box: Sequence[int], image_size: int, crop_size: int) -> tuple[int, int, int, int]:
    """Square grounding-crop window ``[x0, y0, x1, y1)`` centred on ``box``, inside the image.

    A fixed window (not a box resized to a fixed size) keeps the object's absolute size,
    which referring expressions ("the large red circle") depend on, and a little context.
    """
    cx = (box[0] + box[2]) // 2
    cy = (box[1] + box[3]) // 2
    x0 = min(max(cx - crop_size // 2, 0), image_size - crop_size)
    y0 = min(max(cy - crop_size // 2, 0), image_size - crop_size)
    return (x0, y0, x0 + crop_size, y0 + crop_size)


def tight_box(mask: np.ndarray) -> list[int]:
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def _write_png(arr: np.ndarray, path: Path, level: int) -> None:
    Image.fromarray(arr).save(path, format="PNG", compress_level=level)


def render_all(scenes: Sequence[Scene], out: Path, cfg: ScenesConfig, with_crops: set[str],
                progress: bool = False) -> tuple[list[dict], int]:
    """Render scenes, write images (and crops) and return their PAD records."""
    records = []
    n_crops = 0
    W = cfg.image_size
    # disable=None: tqdm shows the bar only on a terminal, never in logs or CI output.
    for sc in tqdm(scenes, desc="Scenes: rendering", unit="img",
                   disable=None if progress else True):
        img, masks = render_scene(sc, W)
        _write_png(img, out / sc.image_path, cfg.png_compress_level)
        regions = []
        for k, (o, m) in enumerate(zip(sc.objects, masks)):
            box = tight_box(m)
            regions.append({"label": o.label, "score": 1.0, "box": box, "mask": rle_encode(m),
                            "expression": sc.expressions[k],
                            "attributes": {"shape": o.shape, "colour": o.colour,
                                           "size": o.size}})
            if sc.id in with_crops:
                x0, y0, x1, y1 = crop_window(box, W, cfg.crop_size)
                _write_png(np.ascontiguousarray(img[y0:y1, x0:x1]), out / sc.crop_path(k),
                           cfg.png_compress_level)
                n_crops += 1
        records.append({"image": sc.image_path, "width": W, "height": W,
                        "tags": sorted({o.label for o in sc.objects}), "regions": regions})
    return records, n_crops
