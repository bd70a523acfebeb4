"""Natural-image-like background texture for Scenes images (the tower/projector study).

A Scenes image is 1–4 flat-coloured objects on a flat grey background: about 80 % of its
patches are identical. Any vision tower maps identical patches to (nearly) identical
features, so the matrix entropy of an image's patch features is low whatever the tower
learned (0.43 nats measured on a jointly trained tower; 0.7 for a random one), and there
is nothing for a projector to compress. Natural photographs, on which CLIP's patch
entropy (≈ 4.8 in arXiv 2505.17316) is measured, have no flat regions. This texture makes
every background patch different while leaving the objects, their masks and every label
untouched:

    background + amplitude · (smooth colour field + fine grain)

* smooth field: a random ``g_h × g_w`` grid (3–8 cells a side) of independent N(0, 1)
  colour offsets, bicubically upsampled to the image (large-scale shading and colour
  blotches);
* fine grain: per-pixel N(0, 0.3²) colour noise.

Pixels under any object mask keep their drawn colour exactly.

Example:
    >>> img = np.full((112, 112, 3), 128, np.uint8)
    >>> fg = np.zeros((112, 112), bool); fg[10:20, 10:20] = True
    >>> out = add_background_texture(img, fg, np.random.default_rng(0), amplitude=25)
    >>> bool((out[fg] == 128).all()), bool((out[~fg] != 128).any())
    (True, True)
"""
from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["add_background_texture"]


def add_background_texture(image: np.ndarray, foreground: np.ndarray,
                           rng: np.random.Generator, amplitude: float = 25.0) -> np.ndarray:
    """Texture the background of an RGB image (module docstring).

    Args:
        image: ``(H, W, 3)`` uint8.
        foreground: ``(H, W)`` bool, the union of the object masks (left unchanged).
        rng: the image's random stream (deterministic output for a given stream).
        amplitude: texture strength in grey levels (0 = no change).

    Returns:
        A new ``(H, W, 3)`` uint8 image.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    if foreground.shape != (h, w):
        raise ValueError(f"foreground mask {foreground.shape} != image size {(h, w)}")
    if amplitude < 0:
        raise ValueError(f"amplitude={amplitude} must be >= 0")
    if amplitude == 0:
        return image.copy()
    gh, gw = (int(v) for v in rng.integers(3, 9, size=2))
    grid = rng.normal(0.0, 1.0, (gh, gw, 3)).astype(np.float32)
    field = np.stack([np.asarray(Image.fromarray(grid[..., c], mode="F").resize(
        (w, h), Image.BICUBIC)) for c in range(3)], axis=-1)
    grain = rng.normal(0.0, 0.3, (h, w, 3)).astype(np.float32)
    textured = np.clip(image.astype(np.float32) + amplitude * (field + grain), 0, 255)
    out = np.where(foreground[..., None], image, np.rint(textured).astype(np.uint8))
    return out.astype(np.uint8)
