"""The image half of the input contract: every image fam reads goes through here.

A file on disk (``fam encode``, ``fam eval``, training, the index) and the bytes of an HTTP
request (``fam serve``) are opened by the same code, so they give the same pixels and the
same one-line refusals:

- **format**: one of :data:`IMAGE_FORMATS` (others are refused by name);
- **size**: at most :data:`MAX_IMAGE_PIXELS` pixels, read from the header before anything
  is decoded (decompression bombs never decode), width and height at least 1;
- **backbone limits** (:class:`ImageRules`, declared by the backbone adapter): e.g. Qwen2-VL
  refuses an aspect ratio above 200; checked on the size the model will see (after the
  adapter's pre-resize), from the header, so a training run's up-front check catches it;
- **orientation**: the EXIF orientation tag is applied (a phone photo stands upright);
- **modes**: every PIL mode becomes one :func:`to_rgb` handles (16/32-bit and float
  greyscale scaled to 8 bits, CMYK/YCbCr/LAB/HSV to RGB, premultiplied alpha un-multiplied);
  transparency is composited onto white by :func:`to_rgb` (the adapter's
  ``prepare_image``), the same on every path;
- **truncated or corrupt** files are refused when decoded.

Refusals are :class:`fam.errors.InputError`: the same ``reason`` wherever the image came
from; the location (data file, line, field, image path, or the request's JSON path) is
added around it.
"""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal, NamedTuple

from PIL import Image, UnidentifiedImageError

from fam.errors import InputError

__all__ = ["ImageRef", "ImageRules", "AlphaRule", "to_rgb", "load_image", "open_image",
           "verify_image", "check_image", "check_images", "CHECK_MODES", "IMAGE_FORMATS",
           "MAX_IMAGE_PIXELS"]

#: How thoroughly :func:`check_images` looks at each image: ``exists`` (the file is there),
#: ``verify`` (the header: format, size and backbone limits, and the file's structure: PNG
#: chunks and CRCs, no decoding), ``decode`` (every pixel decoded).
CHECK_MODES = ("exists", "verify", "decode")

#: Image formats fam opens (files and HTTP alike; JPEG includes phones' MPO files).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

#: Largest width × height opened (a 50-megapixel photo passes; a decompression bomb does not).
#: ``ServeConfig.max_image_pixels`` defaults to the same number.
MAX_IMAGE_PIXELS = 64_000_000

#: The reason given for a file whose structure or pixel data is incomplete or damaged
#: (one reason, whichever check finds it, so every path refuses it alike).
TRUNCATED = "corrupt or truncated image"

# What PIL raises for a file it cannot read; DecompressionBombError is none of these.
_UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
               IndexError, KeyError, TypeError, ZeroDivisionError, struct.error)


@dataclass(frozen=True)
class ImageRules:
    """What images a model accepts: declared by the backbone adapter, checked by the contract.

    Attributes:
        max_pixels: largest width × height of the file (the decompression-bomb guard).
        max_aspect: largest ratio long side / short side the model's processor accepts, on the
            size it sees (after ``resize``); ``None``: no limit.
        min_side: smallest side the processor accepts (after ``resize``).
        resize: the size the model sees for a file of (width, height) (the adapter's
            pre-resize); ``None``: the file's own size.
        family: the backbone family, named in refusals of its limits.
    """

    max_pixels: int = MAX_IMAGE_PIXELS
    max_aspect: float | None = None
    min_side: int = 1
    resize: Callable[[tuple[int, int]], tuple[int, int]] | None = None
    family: str = ""

    def check_size(self, width: int, height: int) -> None:
        """Refuse a file of ``width`` × ``height`` pixels the model cannot take.

        Raises:
            InputError: too many pixels (413), or outside the backbone's limits (400).
        """
        if width < 1 or height < 1:
            raise InputError(f"image of {width}x{height} pixels is empty")
        if width * height > self.max_pixels:
            raise InputError(f"image of {width}x{height} pixels is larger than the limit of "
                             f"{self.max_pixels} pixels", status=413)
        w, h = self.resize((width, height)) if self.resize is not None else (width, height)
        who = f"the {self.family} backbone" if self.family else "this backbone"
        if min(w, h) < self.min_side:
            raise InputError(f"image of {w}x{h} pixels is smaller than {who} accepts "
                             f"(shorter side at least {self.min_side})")
        if self.max_aspect is not None and max(w, h) / min(w, h) > self.max_aspect:
            raise InputError(f"image of {w}x{h} pixels has an aspect ratio of "
                             f"{max(w, h) / min(w, h):.0f}:1; {who} accepts at most "
                             f"{self.max_aspect:g}:1 (crop or pad it)")


DEFAULT_RULES = ImageRules()


class ImageRef(NamedTuple):
    """An image a data row points to: the resolved path and where it was referenced."""

    path: Path
    source: str | None = None  # the data file
    line: int | None = None  # its 1-based line / record
    field: str | None = None  # the field holding the path


#: How transparency becomes RGB: ``"composite"`` onto white (what transformers 5 image
#: processors do, ``image_transforms.convert_to_rgb``) or ``"drop"`` the alpha channel
#: (``Image.convert("RGB")``: what transformers 4.46, the version VLM2Vec pins, did).
AlphaRule = Literal["composite", "drop"]


def to_rgb(image: Image.Image, alpha: AlphaRule = "composite") -> Image.Image:
    """Convert ``image`` to RGB with the given transparency rule.

    ``"composite"`` blends any transparency (an alpha band, or a palette/RGB/L image with a
    ``transparency`` entry) onto a white background with ``Image.alpha_composite``;
    ``"drop"`` is ``Image.convert("RGB")``, which discards alpha (transparent pixels keep
    whatever colour they store, often black). Modes ``convert`` cannot take directly are
    normalised first (:func:`normalise_mode`).
    """
    if alpha not in ("composite", "drop"):
        raise ValueError(f"alpha must be 'composite' or 'drop', got {alpha!r}")
    image = normalise_mode(image)
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if image.mode == "RGB" and not has_alpha:
        return image
    if alpha == "drop" or not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def normalise_mode(image: Image.Image) -> Image.Image:
    """``image`` in a mode :func:`to_rgb` converts faithfully (every PIL mode is handled).

    16-bit greyscale is scaled to 8 bits (``>> 8``), 32-bit integer greyscale too when its
    values exceed 255, float greyscale from [0, 1] (or clipped to [0, 255] otherwise);
    premultiplied ``La``/``RGBa`` become ``LA``/``RGBA``; CMYK, YCbCr, LAB, HSV and RGBX
    become RGB. The common modes (1, L, P, LA, PA, RGB, RGBA) are returned as they are.
    """
    mode = image.mode
    if mode in ("1", "L", "P", "LA", "PA", "RGB", "RGBA"):
        return image
    if mode in ("La", "RGBa"):
        return image.convert(mode.upper())
    if mode.startswith("I") or mode == "F":
        import numpy as np
        a = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            a = a / 256.0
        elif mode == "F" and a.size and 0.0 <= a.min() and a.max() <= 1.0:
            a = a * 255.0
        elif mode == "I" and a.size and a.max() > 255:
            a = a / 256.0 if a.max() < 65536 else a / 16777216.0
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


#: EXIF orientation → the transpose that makes the image upright (as ImageOps.exif_transpose).
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
           6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def _orientation(im: Image.Image) -> int | None:
    """The EXIF orientation, read from the header before decoding (PIL forgets it for some
    formats, e.g. TIFF, once the pixels are loaded)."""
    try:
        value = im.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a malformed EXIF block: the image as stored
        return None
    return value if value in _ORIENT else None


def _displayed_size(im: Image.Image) -> tuple[int, int]:
    """The size after the EXIF orientation is applied (orientations 5-8 swap the sides)."""
    w, h = im.size
    return (h, w) if _orientation(im) in (5, 6, 7, 8) else (w, h)


def _open(src: Path | bytes, rules: ImageRules) -> Image.Image:
    """Open the header (no decoding) and check format and size. The caller closes it."""
    fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src
    try:
        with warnings.catch_warnings():
            # fam checks the size itself, against its own limit, right below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        raise InputError(f"image is larger than the limit of {rules.max_pixels} pixels",
                         status=413) from None
    except UnidentifiedImageError:
        raise InputError(f"corrupt, or not an image in an accepted format "
                         f"({', '.join(IMAGE_FORMATS)})") from None
    except _UNREADABLE as e:
        raise InputError(f"corrupt or unreadable image ({type(e).__name__})") from None
    try:
        rules.check_size(*_displayed_size(im))
    except InputError:
        im.close()
        raise
    return im


def _decode(im: Image.Image) -> Image.Image:
    """Decode every pixel, apply the EXIF orientation and normalise the mode."""
    orientation = _orientation(im)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            size = im.size
            im.load()
            # PIL applies a TIFF's orientation itself while loading (and drops the tag): then
            # the size changed or the tag is gone, and it is not applied twice.
            done = im.size != size or _orientation(im) is None
            out = im.transpose(_ORIENT[orientation]) \
                if orientation is not None and not done else im
            return normalise_mode(out)
    except (Image.DecompressionBombError, *_UNREADABLE):
        raise InputError(TRUNCATED) from None


def _verify(src: Path | bytes) -> None:
    """The file's structure (PNG chunks and CRCs; no decoding)."""
    fp = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp, formats=IMAGE_FORMATS) as im:  # verify() needs a fresh open
                im.verify()
    except (Image.DecompressionBombError, *_UNREADABLE):
        raise InputError(TRUNCATED) from None


def verify_image(src: Path | bytes, rules: ImageRules = DEFAULT_RULES) -> tuple[int, int]:
    """Check one image without decoding it: format, size and the backbone's limits from the
    header, then the file's structure (``check_images``' ``verify`` mode; video frames the
    model does not sample are checked so).

    Returns:
        The displayed ``(width, height)``.

    Raises:
        InputError: as :func:`open_image` (the reason only).
    """
    im = _open(src, rules)
    try:
        size = _displayed_size(im)
    finally:
        im.close()
    _verify(src)
    return size


def open_image(src: Path | bytes, rules: ImageRules = DEFAULT_RULES) -> Image.Image:
    """Open, check and decode one image (file path or encoded bytes), as every path does.

    Returns:
        The decoded image, upright, in a normalised mode (not yet RGB: transparency is
        composited by the adapter's ``prepare_image``, :func:`to_rgb`).

    Raises:
        InputError: unknown format, too large, outside the backbone's limits, corrupt or
            truncated (the reason only; callers add where the image came from).
    """
    if not isinstance(src, (bytes, bytearray)):
        # A file is read into memory and decoded as the bytes of a request are: one code
        # path (PIL treats a file and a buffer differently in places, e.g. TIFF orientation).
        src = Path(src).read_bytes()
    _open(src, rules).close()  # format, size and the backbone's limits, from the header
    _verify(src)
    im = _open(src, rules)
    try:
        out = _decode(im)
        return out if out is not im else im.copy()
    finally:
        im.close()


def _locate(e: InputError, path: Path, source: str | Path | None, line: int | None,
            field: str | None) -> InputError:
    """``e`` with the data file, line and field (and the image path) it is about."""
    return InputError(e.reason, source or path, line, field, status=e.status,
                      image=path if source else None)


def load_image(path: str | Path, *, source: str | Path | None = None, line: int | None = None,
               field: str | None = None, rgb: bool = True,
               rules: ImageRules = DEFAULT_RULES) -> Image.Image:
    """Open an image file through the contract (:func:`open_image`).

    Args:
        path: absolute path of the image (already resolved under the data root).
        source, line, field: the data file, row and field that referenced the image.
        rgb: convert to RGB (transparency composited onto white, as image processors do);
            ``False`` keeps the normalised mode, for a backbone adapter that pre-resizes and
            converts with its own rule (:meth:`fam.backbones.BackboneAdapter.prepare_image`).
        rules: the model's image rules (default: only the size limit).

    Raises:
        InputError: the image is missing, cannot be decoded, is too large or outside the
            backbone's limits; names the image and, when given, the data file, line and field.
    """
    path = Path(path)
    if not path.is_file():
        raise _locate(InputError("image not found"), path, source, line, field)
    try:
        im = open_image(path, rules)
    except InputError as e:
        raise _locate(e, path, source, line, field) from None
    return to_rgb(im) if rgb else im


def check_image(ref: ImageRef, mode: Literal["exists", "verify", "decode"] = "verify",
                rules: ImageRules = DEFAULT_RULES) -> None:
    """Check one image without keeping it (see :data:`CHECK_MODES`).

    Raises:
        InputError: missing, unreadable, truncated, too large or outside the backbone's
            limits; names the referencing row.
    """
    if not ref.path.is_file():
        raise _locate(InputError("image not found"), ref.path, ref.source, ref.line, ref.field)
    if mode == "exists":
        return
    if mode == "decode":
        load_image(ref.path, source=ref.source, line=ref.line, field=ref.field, rules=rules)
        return
    try:
        verify_image(ref.path, rules)  # format, size and the backbone's limits; structure
    except InputError as e:
        raise _locate(e, ref.path, ref.source, ref.line, ref.field) from None


def check_images(refs: Iterable[ImageRef], mode: str = "verify", progress: bool = False,
                 desc: str = "check images", rules: ImageRules = DEFAULT_RULES) -> int:
    """Check every distinct image up front, so a bad file fails in seconds, not hours in.

    Missing files are collected first and reported together (the first one with its row,
    and how many more); then each image is checked as ``mode`` says, with a progress bar.

    Args:
        refs: the images and the rows that reference them (duplicates are checked once).
        mode: one of :data:`CHECK_MODES`.
        progress: show a progress bar.
        desc: its label.
        rules: the model's image rules (the backbone's limits are checked in every mode but
            ``exists``).

    Returns:
        The number of distinct images checked.

    Raises:
        InputError: the first bad image, naming its data file, line and field.
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
        raise InputError(f"image not found: {r.path}{more}; check the image root",
                         r.source or r.path, r.line, r.field)
    if mode != "exists":
        from tqdm.auto import tqdm
        for r in tqdm(unique.values(), desc=desc, unit="img", disable=not progress,
                      leave=False):
            check_image(r, mode, rules)  # type: ignore[arg-type]
    return len(unique)
