"""Image loading with errors that name the file, row and field, and the RGB conversion rules."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from PIL import Image, UnidentifiedImageError

from fam.errors import DataError

#: How transparency becomes RGB: ``"composite"`` onto white (what transformers 5 image
#: processors do, ``image_transforms.convert_to_rgb``) or ``"drop"`` the alpha channel
#: (``Image.convert("RGB")``: what transformers 4.46, the version VLM2Vec pins, did).
AlphaRule = Literal["composite", "drop"]


def to_rgb(image: Image.Image, alpha: AlphaRule = "composite") -> Image.Image:
    """Convert ``image`` to RGB with the given transparency rule.

    ``"composite"`` blends any transparency (an alpha band, or a palette/RGB/L image with a
    ``transparency`` entry) onto a white background with ``Image.alpha_composite``;
    ``"drop"`` is ``Image.convert("RGB")``, which discards alpha (transparent pixels keep
    whatever colour they store, often black).
    """
    if alpha not in ("composite", "drop"):
        raise ValueError(f"alpha must be 'composite' or 'drop', got {alpha!r}")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if image.mode == "RGB" and not has_alpha:
        return image
    if alpha == "drop" or not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def load_image(path: str | Path, *, source: str | Path | None = None, line: int | None = None,
               field: str | None = None, rgb: bool = True) -> Image.Image:
    """Open an image, fully decoded.

    Args:
        path: absolute path of the image (already resolved under the data root).
        source, line, field: the data file, row and field that referenced the image.
        rgb: convert to RGB (transparency composited onto white, as image processors do);
            ``False`` keeps the file's own mode, for a backbone adapter that pre-resizes and
            converts with its own rule (:meth:`fam.backbones.BackboneAdapter.prepare_image`).

    Raises:
        DataError: the image is missing or cannot be decoded. The message names the image
            and, when given, the data file, line and field that pointed to it.
    """
    path = Path(path)
    where = f" (referenced by {source}" + (f", line {line}" if line else "") + \
        (f", field '{field}'" if field else "") + ")" if source else ""
    if not path.is_file():
        raise DataError(f"image not found: {path}{where}", source or path, line, field)
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im) if rgb else im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt or unreadable image {path}: {e}{where}", source or path,
                        line, field) from None
