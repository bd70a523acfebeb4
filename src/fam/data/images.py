"""Image loading and up-front image checks, with errors that name the file, row and field,
and the RGB conversion rules."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal, NamedTuple

from PIL import Image, UnidentifiedImageError

from fam.errors import DataError

__all__ = ["ImageRef", "AlphaRule", "to_rgb", "load_image", "check_image", "check_images",
           "CHECK_MODES"]

#: How thoroughly :func:`check_images` looks at each image: ``exists`` (the file is there),
#: ``verify`` (the header opens within PIL's decompression-bomb limit and the file's
#: structure is intact: PNG chunks and CRCs, no decoding), ``decode`` (every pixel decoded).
CHECK_MODES = ("exists", "verify", "decode")

# What PIL raises for a file it cannot read; DecompressionBombError is none of these.
_UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)


class ImageRef(NamedTuple):
    """An image a data row points to: the resolved path and where it was referenced."""

    path: Path
    source: str | None = None  # the data file
    line: int | None = None  # its 1-based line / record
    field: str | None = None  # the field holding the path


def _where(source: str | Path | None, line: int | None, field: str | None) -> str:
    if not source:
        return ""
    return f" (referenced by {source}" + (f", line {line}" if line else "") + \
        (f", field '{field}'" if field else "") + ")"


def _open_error(e: BaseException, path: Path, where: str, source: str | Path | None,
                line: int | None, field: str | None) -> DataError:
    if isinstance(e, Image.DecompressionBombError):
        return DataError(f"image {path} is too large to open safely ({e}); resize it or drop "
                         f"the row{where}", source or path, line, field)
    return DataError(f"corrupt or unreadable image {path}: {e}{where}", source or path, line,
                     field)


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
        DataError: the image is missing, cannot be decoded, or is a decompression bomb
            (more pixels than PIL's safety limit). The message names the image and, when
            given, the data file, line and field that pointed to it.
    """
    path = Path(path)
    where = _where(source, line, field)
    if not path.is_file():
        raise DataError(f"image not found: {path}{where}", source or path, line, field)
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im) if rgb else im.copy()
    except (Image.DecompressionBombError, *_UNREADABLE) as e:
        raise _open_error(e, path, where, source, line, field) from None


def check_image(ref: ImageRef, mode: Literal["exists", "verify", "decode"] = "verify") -> None:
    """Check one image without keeping it (see :data:`CHECK_MODES`).

    Raises:
        DataError: missing, unreadable, truncated or too large; names the referencing row.
    """
    where = _where(ref.source, ref.line, ref.field)
    if not ref.path.is_file():
        raise DataError(f"image not found: {ref.path}{where}", ref.source or ref.path,
                        ref.line, ref.field)
    if mode == "exists":
        return
    if mode == "decode":
        load_image(ref.path, source=ref.source, line=ref.line, field=ref.field)
        return
    try:
        with Image.open(ref.path) as im:  # the size (bomb) check happens on open
            im.verify()
    except (Image.DecompressionBombError, *_UNREADABLE) as e:
        raise _open_error(e, ref.path, where, ref.source, ref.line, ref.field) from None


def check_images(refs: Iterable[ImageRef], mode: str = "verify", progress: bool = False,
                 desc: str = "check images") -> int:
    """Check every distinct image up front, so a bad file fails in seconds, not hours in.

    Missing files are collected first and reported together (the first one with its row,
    and how many more); then each image is checked as ``mode`` says, with a progress bar.

    Args:
        refs: the images and the rows that reference them (duplicates are checked once).
        mode: one of :data:`CHECK_MODES`.
        progress: show a progress bar.
        desc: its label.

    Returns:
        The number of distinct images checked.

    Raises:
        DataError: the first bad image, naming its data file, line and field.
    """
    if mode not in CHECK_MODES:
        raise ValueError(f"mode must be one of {CHECK_MODES}, got {mode!r}")
    unique: dict[Path, ImageRef] = {}
    for r in refs:
        unique.setdefault(r.path, r)
    missing = [r for r in unique.values() if not r.path.is_file()]
    if missing:
        r = missing[0]
        more = f" (and {len(missing) - 1} more missing images)" if len(missing) > 1 else ""
        raise DataError(f"image not found: {r.path}{more}; check the image root",
                        r.source or r.path, r.line, r.field)
    if mode != "exists":
        from tqdm.auto import tqdm
        for r in tqdm(unique.values(), desc=desc, unit="img", disable=not progress,
                      leave=False):
            check_image(r, mode)  # type: ignore[arg-type]
    return len(unique)
