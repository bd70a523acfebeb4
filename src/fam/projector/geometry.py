"""Region mask → patch coverage, through exactly the image processor's geometric transform.

Patch-aligned training (method.md §4) and the patch-level mIoU (method.md §5) need to know which
vision tokens an annotated region covers. The region mask lives in the *original* image
frame; the tokens live on a grid over the *processed* image (resized, maybe padded to a
square first, maybe center-cropped, maybe padded after). Getting this wrong silently shifts
every target by a few patches on non-square images, so the mask goes through the same
steps as the pixels:

1. ``pre_pad``: pad to a square before resizing (LLaVA-1.5 ``image_aspect_ratio="pad"``,
   ``expand2square``); the mask is 0 in the padding.
2. ``resized_size``: resize to ``(H', W')`` with the processor's resample filter. The mask
   is resized *as a float image* with the same PIL filter (default bicubic) and clipped to
   ``[0, 1]``, which is what PIL does to a white-on-black uint8 image up to 8-bit
   quantisation. Interpolating a float mask (rather than nearest-neighbour on a binary
   mask) keeps partial-pixel area, so pooled coverage is area-consistent.
3. ``crop_box``: crop ``(top, left, h, w)`` (CLIP center crop).
4. ``pad``: pad ``(top, left, bottom, right)`` after resizing (e.g. batch padding); 0 there.
5. Average-pool onto the grid: cells of ``patch_size`` pixels (encoder patches) or of
   ``patch_size * merge_size`` pixels (the tokens the LLM sees after Qwen2-VL's 2×2 merger).

The output grid is in raster (row-major) order. Note that Qwen2-VL's *pre-merge* patch
sequence is not raster order (patches are grouped by 2×2 merge block); at ``level="token"``
(after the merger) the order is raster. Mapping grid cells to sequence positions is the
backbone adapter's job.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from fam.errors import ConfigError

logger = logging.getLogger(__name__)

#: PIL resample filters by name; processors in transformers use the same integer codes.
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

Box4 = tuple[int, int, int, int]


@dataclass(frozen=True)
class ImageTransform:
    """The geometric part of an image processor: what happens to pixel positions.

    Steps apply in order: ``pre_pad`` → resize to ``resized_size`` → ``crop_box`` → ``pad``.

    Attributes:
        orig_size: ``(H, W)`` of the original image, pixels.
        resized_size: ``(H', W')`` after resizing (of the pre-padded image if ``pre_pad``).
        crop_box: ``(top, left, h, w)`` crop of the resized image, or None (no crop).
        pad: ``(top, left, bottom, right)`` zero padding after resize/crop, or None.
        patch_size: vision-encoder patch side, pixels (14 for CLIP-L/14 and Qwen2-VL).
        merge_size: side of the token merger (2 for Qwen2-VL, 1 for LLaVA).
        pre_pad: ``(top, left, bottom, right)`` padding of the *original* image before
            resizing (LLaVA ``expand2square``), or None.
        resample: PIL resample filter name the processor uses ("bicubic" for CLIP/Qwen2-VL).
    """

    orig_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_box: Box4 | None = None
    pad: Box4 | None = None
    patch_size: int = 14
    merge_size: int = 1
    pre_pad: Box4 | None = None
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLE:
            raise ValueError(f"ImageTransform.resample={self.resample!r}: expected one of "
                             f"{sorted(RESAMPLE)}")
        if self.patch_size <= 0 or self.merge_size <= 0:
            raise ValueError(f"ImageTransform: patch_size={self.patch_size} and merge_size="
                             f"{self.merge_size} must be positive")
        if self.crop_box is not None:
            t, l, h, w = self.crop_box
            rh, rw = self.resized_size
            if t < 0 or l < 0 or t + h > rh or l + w > rw:
                # transformers pads when the crop is larger than the image; express that as
                # `pad` instead so each step stays a plain slice.
                raise ValueError(f"ImageTransform.crop_box={self.crop_box} does not fit in "
                                 f"resized_size={self.resized_size}; use `pad` for padding")

    @property
    def final_size(self) -> tuple[int, int]:
        """``(H_f, W_f)`` of the processed image, pixels."""
        h, w = self.resized_size
        if self.crop_box is not None:
            h, w = self.crop_box[2], self.crop_box[3]
        if self.pad is not None:
            h += self.pad[0] + self.pad[2]
            w += self.pad[1] + self.pad[3]
        return h, w

    def cell_size(self, level: Literal["token", "patch"] = "token") -> int:
        """Side of one grid cell in pixels: ``patch_size`` ("patch") or ``patch_size *
        merge_size`` ("token", what the LLM sees)."""
        if level == "patch":
            return self.patch_size
        if level == "token":
            return self.patch_size * self.merge_size
        raise ValueError(f"level={level!r}: expected 'token' or 'patch'")

    def grid_size(self, level: Literal["token", "patch"] = "token") -> tuple[int, int]:
        """``(G_h, G_w)``: the grid of patches or merged tokens over the processed image."""
        c = self.cell_size(level)
        h, w = self.final_size
        return h // c, w // c


def qwen_smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                      max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Qwen2-VL "smart resize": the ``(H', W')`` the processor resizes to.

    Re-implements ``transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize``
    bit-for-bit (including Python's round-half-to-even), so geometry does not need
    transformers. Both sides become multiples of ``factor`` (= patch_size * merge_size) and
    the area lands within ``[min_pixels, max_pixels]`` keeping the aspect ratio.

    Raises:
        ValueError: aspect ratio above 200 (the processor refuses these too).
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got "
                         f"{max(height, width) / min(height, width)} for {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    # transformers' get_resize_output_image_size(default_to_square=False): short side = size,
    # long side = int(size * long / short) (truncation, as torchvision).
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def clip_transform(orig_size: tuple[int, int], size: int = 336, crop_size: int | None = None,
                   patch_size: int = 14, pad_to_square: bool = False,
                   resample: str = "bicubic") -> ImageTransform:
    """CLIP-style processor geometry (LLaVA-1.5): shortest edge → ``size``, center crop.

    Matches ``CLIPImageProcessor`` / ``LlavaImageProcessor`` (``do_pad=True`` with
    ``pad_to_square``, i.e. LLaVA-1.5's ``expand2square``, which pads *before* resizing so
    nothing is cropped).

    Args:
        orig_size: ``(H, W)`` of the original image.
        size: target shortest edge, pixels (336 for LLaVA-1.5).
        crop_size: center-crop side; defaults to ``size``.
        patch_size: encoder patch side (14 for CLIP ViT-L/14).
        pad_to_square: pad the original to a square first (LLaVA ``do_pad``).
        resample: PIL filter name ("bicubic" in CLIP's processor config).
    """
    h, w = orig_size
    pre_pad = None
    if pad_to_square and h != w:
        m = max(h, w)
        # LlavaImageProcessor.pad_to_square: start = (max_dim - short) // 2
        if w > h:
            top = (m - h) // 2
            pre_pad = (top, 0, m - h - top, 0)
        else:
            left = (m - w) // 2
            pre_pad = (0, left, 0, m - w - left)
        h = w = m
    rh, rw = _shortest_edge_size(h, w, size)
    crop = size if crop_size is None else crop_size
    crop_box = None
    pad = None
    if (rh, rw) != (crop, crop):
        if rh < crop or rw < crop:
            raise ValueError(f"clip_transform: crop {crop} larger than resized {rh}x{rw}; "
                             "the processor would zero-pad, which this constructor does not model")
        # transformers' center_crop: top = (H - h) // 2, left = (W - w) // 2
        crop_box = ((rh - crop) // 2, (rw - crop) // 2, crop, crop)
    return ImageTransform(orig_size=tuple(orig_size), resized_size=(rh, rw), crop_box=crop_box,
                          pad=pad, patch_size=patch_size, merge_size=1, pre_pad=pre_pad,
                          resample=resample)


def qwen2_vl_transform(orig_size: tuple[int, int], patch_size: int = 14, merge_size: int = 2,
                       min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280,
                       resample: str = "bicubic") -> ImageTransform:
    """Qwen2-VL processor geometry: smart resize to multiples of ``patch_size*merge_size``.

    Defaults are ``Qwen2VLImageProcessor``'s (``size = {"shortest_edge": 56*56,
    "longest_edge": 28*28*1280}``). No crop, no padding.
    """
    h, w = orig_size
    rh, rw = qwen_smart_resize(h, w, factor=patch_size * merge_size, min_pixels=min_pixels,
                               max_pixels=max_pixels)
    return ImageTransform(orig_size=tuple(orig_size), resized_size=(rh, rw), crop_box=None,
                          pad=None, patch_size=patch_size, merge_size=merge_size,
                          resample=resample)


def _pad2d(a: np.ndarray, pad: Box4, value: float = 0.0) -> np.ndarray:
    t, l, b, r = pad
    return np.pad(a, ((t, b), (l, r)), mode="constant", constant_values=value)


def transform_mask(mask: np.ndarray, transform: ImageTransform) -> np.ndarray:
    """Apply the processor geometry to a mask; the result lives in the processed frame.

    Args:
        mask: ``(H, W)`` bool or float in ``[0, 1]``, in the original image frame.
        transform: the processor geometry.

    Returns:
        ``(H_f, W_f)`` float32 in ``[0, 1]``: per-pixel fraction of the region.
    """
    mask = np.asarray(mask)
    if mask.shape != tuple(transform.orig_size):
        raise ValueError(f"mask shape {mask.shape} != transform.orig_size "
                         f"{tuple(transform.orig_size)}; masks must be in the original image "
                         "frame (decode the RLE at the image's full resolution)")
    m = mask.astype(np.float32)
    if transform.pre_pad is not None:
        m = _pad2d(m, transform.pre_pad)
    rh, rw = transform.resized_size
    if m.shape != (rh, rw):
        # float ("F") image, same filter as the pixels; PIL clips uint8 results, so do we
        im = Image.fromarray(m).resize((rw, rh), RESAMPLE[transform.resample])
        m = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)
    if transform.crop_box is not None:
        t, l, h, w = transform.crop_box
        m = m[t:t + h, l:l + w]
    if transform.pad is not None:
        m = _pad2d(m, transform.pad)
    return m


def transform_image(image: Image.Image, transform: ImageTransform,
                    fill: tuple[int, ...] | int = 0) -> Image.Image:
    """Apply the processor geometry to a PIL image (for overlays in plots and for tests).

    Args:
        image: original image, size ``(W, H)`` = ``transform.orig_size`` reversed.
        transform: the processor geometry.
        fill: colour of ``pre_pad``/``pad`` pixels (LLaVA pads with the CLIP mean colour).

    Returns:
        The image in the processed frame, size ``(W_f, H_f)``.
    """
    if (image.height, image.width) != tuple(transform.orig_size):
        raise ValueError(f"image size (H, W)=({image.height}, {image.width}) != "
                         f"transform.orig_size {tuple(transform.orig_size)}")

    def _pad(im: Image.Image, pad: Box4) -> Image.Image:
        t, l, b, r = pad
        out = Image.new(im.mode, (im.width + l + r, im.height + t + b), fill)
        out.paste(im, (l, t))
        return out

    im = image
    if transform.pre_pad is not None:
        im = _pad(im, transform.pre_pad)
    rh, rw = transform.resized_size
    if (im.height, im.width) != (rh, rw):
        im = im.resize((rw, rh), RESAMPLE[transform.resample])
    if transform.crop_box is not None:
        t, l, h, w = transform.crop_box
        im = im.crop((l, t, l + w, t + h))
    if transform.pad is not None:
        im = _pad(im, transform.pad)
    return im


def _avg_pool(a: np.ndarray, cell: int) -> np.ndarray:
    # (H, W) -> (H//cell, W//cell); processors make H, W multiples of the cell, any
    # remainder (a non-multiple final size) is dropped exactly as patchify would drop it.
    gh, gw = a.shape[0] // cell, a.shape[1] // cell
    a = a[:gh * cell, :gw * cell]
    return a.reshape(gh, cell, gw, cell).mean(axis=(1, 3))


def mask_to_patch_coverage(mask: np.ndarray, transform: ImageTransform,
                           level: Literal["token", "patch"] = "token") -> np.ndarray:
    """Fraction of each patch (or merged token) covered by a region (method.md §4, ``c_k``).

    Args:
        mask: ``(H, W)`` or ``(K, H, W)`` bool/float region mask(s) in the original frame.
        transform: the processor geometry (see :func:`clip_transform`,
            :func:`qwen2_vl_transform`).
        level: "token" pools over ``patch_size*merge_size`` cells (the LLM's tokens, the
            default: the projector outputs merged tokens); "patch" over encoder patches.

    Returns:
        ``(G_h, G_w)`` (or ``(K, G_h, G_w)``) float32 in ``[0, 1]``, raster order.
    """
    mask = np.asarray(mask)
    cell = transform.cell_size(level)
    if mask.ndim == 3:
        if mask.shape[0] == 0:
            return np.zeros((0, *transform.grid_size(level)), np.float32)
        return np.stack([_avg_pool(transform_mask(m, transform), cell) for m in mask])
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W) or (K, H, W), got shape {mask.shape}")
    return _avg_pool(transform_mask(mask, transform), cell).astype(np.float32)


def select_patches(coverage: np.ndarray, theta: float = 0.5, flat: bool = False) -> np.ndarray:
    """Patch set ``S_k = {i : c_k[i] ≥ θ}`` with the arg-max fallback (method.md §4).

    A region smaller than half a patch would select nothing at θ = 0.5; it then gets its
    single best-covered patch. A region with zero coverage everywhere (e.g. cropped away by
    a center crop) gets an empty set: callers must skip it (the patch loss does).

    Args:
        coverage: ``(..., G_h, G_w)`` coverage in ``[0, 1]``; leading axes index regions.
            With ``flat=True``: ``(..., N)``, one flattened grid per region.
        theta: threshold (0.5 in the paper).
        flat: whether the grid is already flattened to its last axis.

    Returns:
        bool array of ``coverage``'s shape.
    """
    cov = np.asarray(coverage, dtype=np.float32)
    grid_ndim = 1 if flat else 2
    if cov.ndim < grid_ndim:
        raise ValueError(f"select_patches: coverage shape {cov.shape} has no "
                         f"{'(N,)' if flat else '(G_h, G_w)'} grid axes")
    n_cells = int(np.prod(cov.shape[cov.ndim - grid_ndim:]))
    flat_cov = cov.reshape(-1, n_cells)  # (R, N): one row per region
    flat_sel = flat_cov >= theta
    peak = flat_cov.max(axis=1, initial=0.0)
    fallback = ~flat_sel.any(axis=1) & (peak > 0)
    if fallback.any():
        rows = np.nonzero(fallback)[0]
        flat_sel[rows, flat_cov[rows].argmax(axis=1)] = True
    n_zero = int((peak <= 0).sum())
    if n_zero:
        logger.debug("select_patches: %d region(s) with zero coverage get an empty set", n_zero)
    return flat_sel.reshape(cov.shape)


_RESAMPLE_NAMES = {int(v): k for k, v in RESAMPLE.items()}


def processor_transform(image_processor: Any, orig_size: tuple[int, int],
                        patch_size: int) -> ImageTransform:
    """The geometric transform a CLIP-style image processor applies to one image.

    Reads ``size`` (``shortest_edge`` or ``height``/``width``), ``do_center_crop`` /
    ``crop_size``, ``do_pad`` (LLaVA's pad-to-square) and ``resample`` from the processor, so
    masks go through exactly what the pixels go through (method.md §4).

    Args:
        image_processor: e.g. ``CLIPImageProcessorPil`` (LLaVA-1.5).
        orig_size: ``(H, W)`` of the original image.
        patch_size: vision-tower patch side (``config.vision_config.patch_size``).

    Raises:
        ConfigError: a processor geometry this function does not model.
    """
    size = dict(getattr(image_processor, "size", None) or {})
    resample = _RESAMPLE_NAMES.get(int(getattr(image_processor, "resample", 3)), "bicubic")
    do_crop = bool(getattr(image_processor, "do_center_crop", False))
    crop = dict(getattr(image_processor, "crop_size", None) or {}) if do_crop else {}
    do_resize = bool(getattr(image_processor, "do_resize", True))
    pad_sq = bool(getattr(image_processor, "do_pad", False))
    h, w = orig_size
    if not do_resize:
        resized = (h, w)
    elif "shortest_edge" in size:
        if do_crop and crop.get("height") == crop.get("width"):
            return clip_transform(orig_size, size=int(size["shortest_edge"]),
                                  crop_size=int(crop["height"]), patch_size=patch_size,
                                  pad_to_square=pad_sq, resample=resample)
        if pad_sq:
            raise ConfigError("processor_transform: do_pad with a non-square crop is not "
                              "modelled; use a square crop_size")
        resized = _shortest_edge_size(h, w, int(size["shortest_edge"]))
    elif "height" in size and "width" in size:
        if pad_sq:
            raise ConfigError("processor_transform: do_pad with a fixed (height, width) "
                              "resize is not modelled")
        resized = (int(size["height"]), int(size["width"]))
    else:
        raise ConfigError(f"processor_transform: unsupported processor size {size!r}; "
                          "expected {'shortest_edge': n} or {'height': h, 'width': w}")
    crop_box = None
    if do_crop:
        ch, cw = int(crop["height"]), int(crop["width"])
        if resized != (ch, cw):
            crop_box = ((resized[0] - ch) // 2, (resized[1] - cw) // 2, ch, cw)
    return ImageTransform(orig_size=(h, w), resized_size=resized, crop_box=crop_box,
                          patch_size=patch_size, merge_size=1, resample=resample)
