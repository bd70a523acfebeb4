"""Image loading with errors that name the file, row and field."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from fam.errors import DataError


def load_image(path: str | Path, *, source: str | Path | None = None, line: int | None = None,
               field: str | None = None) -> Image.Image:
    """Open an image as RGB, fully decoded.

    Args:
        path: absolute path of the image (already resolved under the data root).
        source, line, field: the data file, row and field that referenced the image.

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
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"corrupt or unreadable image {path}: {e}{where}", source or path,
                        line, field) from None
