"""Mask → patch coverage follows the real image processors' geometry (method.md §4)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fam.projector.geometry import (
    ImageTransform,
    clip_transform,
    mask_to_patch_coverage,
    qwen2_vl_transform,
    qwen_smart_resize,
    select_patches,
    transform_image,
)


def _rect_mask(h: int, w: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[top:bottom, left:right] = True
    return m


def _mask_image(mask: np.ndarray) -> Image.Image:
    # the pixels encode the mask: white region on black, so the processed pixel values
    # (un-normalised, /255) are the processor's own transform of the mask
    return Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")


def _pool(a: np.ndarray, c: int) -> np.ndarray:
    return a.reshape(a.shape[0] // c, c, a.shape[1] // c, c).mean(axis=(1, 3))


# (H, W) non-square, both orientations, odd sizes; rectangles off-centre
CASES = [
    ((200, 317), (30, 50, 150, 200)),
    ((401, 233), (100, 20, 380, 120)),
]


@pytest.mark.parametrize("size,rect", CASES)
def test_clip_center_crop_matches_processor(size, rect):
    tf = pytest.importorskip("transformers")
    proc = tf.CLIPImageProcessorPil(size={"shortest_edge": 336},
                                    crop_size={"height": 336, "width": 336}, do_normalize=False)
    mask = _rect_mask(*size, *rect)
    px = np.asarray(proc(_mask_image(mask), return_tensors="np")["pixel_values"][0])  # (3,336,336)
    ref = _pool(px.mean(0), 14)
    tr = clip_transform(size, size=336, patch_size=14)
    assert tr.final_size == (336, 336) and tr.crop_box is not None
    cov = mask_to_patch_coverage(mask, tr)
    assert cov.shape == (24, 24)
    # the processor resizes with bicubic PIL filtering (ringing at mask edges); our coverage is the exact area
    np.testing.assert_allclose(cov, ref, atol=0.01)
    # the crop really cut something: a naive "resize whole image to 336²" is far off
    naive = ImageTransform(orig_size=size, resized_size=(336, 336), patch_size=14)
    assert np.abs(mask_to_patch_coverage(mask, naive) - ref).max() > 0.2


@pytest.mark.parametrize("size,rect", CASES)
def test_llava_pad_to_square_matches_processor(size, rect):
    tf = pytest.importorskip("transformers")
    # mean 0 makes the processor's pad colour black, i.e. "not in the mask"
    proc = tf.LlavaImageProcessorPil(size={"shortest_edge": 336},
                                     crop_size={"height": 336, "width": 336}, do_pad=True,
                                     image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
                                     do_normalize=False)
    mask = _rect_mask(*size, *rect)
    px = np.asarray(proc(_mask_image(mask), return_tensors="np")["pixel_values"][0])
    ref = _pool(px.mean(0), 14)
    tr = clip_transform(size, size=336, pad_to_square=True)
    assert tr.pre_pad is not None and tr.crop_box is None
    # the processor resizes with bicubic PIL filtering (ringing at mask edges); our coverage is the exact area
    np.testing.assert_allclose(mask_to_patch_coverage(mask, tr), ref, atol=0.01)


@pytest.mark.parametrize("size,rect", CASES)
def test_qwen2_vl_smart_resize_matches_processor(size, rect):
    tf = pytest.importorskip("transformers")
    max_pixels = 28 * 28 * 64  # small, fast, and forces the down-scaling branch
    proc = tf.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_pixels,
                                       do_normalize=False)
    mask = _rect_mask(*size, *rect)
    out = proc(_mask_image(mask), return_tensors="np")
    t, gh, gw = (int(x) for x in out["image_grid_thw"][0])
    # rows are patches in merge-block order (gh/2, gw/2, 2, 2); row mean = patch mean
    means = np.asarray(out["pixel_values"]).mean(1).reshape(gh // 2, gw // 2, 2, 2)
    ref_patch = means.transpose(0, 2, 1, 3).reshape(gh, gw)
    ref_token = _pool(ref_patch, 2)

    tr = qwen2_vl_transform(size, max_pixels=max_pixels)
    assert tr.grid_size("patch") == (gh, gw)
    assert tr.resized_size[0] != tr.resized_size[1]
    np.testing.assert_allclose(mask_to_patch_coverage(mask, tr, level="patch"), ref_patch,
                               atol=0.01)
    # the processor resizes with bicubic PIL filtering (ringing at mask edges); our coverage is the exact area
    np.testing.assert_allclose(mask_to_patch_coverage(mask, tr), ref_token, atol=0.01)
    assert mask_to_patch_coverage(mask, tr).shape == (gh // 2, gw // 2)


def test_smart_resize_matches_transformers():
    pytest.importorskip("transformers")
    # the PIL module carries a copy of smart_resize and does not need torchvision
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    rng = np.random.default_rng(0)
    sizes = [(14, 14), (42, 70), (98, 126), (1000, 20), (3000, 4000), (28 * 3 + 14, 28 * 5 + 14)]
    sizes += [tuple(int(x) for x in rng.integers(10, 3000, 2)) for _ in range(300)]
    for h, w in sizes:
        for kw in ({}, {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 256},
                   {"factor": 32, "min_pixels": 128 * 128, "max_pixels": 32 * 32 * 512}):
            assert qwen_smart_resize(h, w, **kw) == smart_resize(h, w, **kw), (h, w, kw)
    with pytest.raises(ValueError):
        qwen_smart_resize(10, 2500)


def test_transform_image_matches_mask_frame():
    size = (120, 90)
    tr = clip_transform(size, size=56, patch_size=14)
    im = transform_image(Image.new("RGB", (size[1], size[0])), tr)
    assert (im.height, im.width) == tr.final_size == (56, 56)
    with pytest.raises(ValueError, match="orig_size"):
        mask_to_patch_coverage(np.zeros((90, 120), bool), tr)


def test_select_patches_threshold_and_fallback():
    cov = np.array([[[0.0, 0.6], [0.5, 0.49]],      # normal: two patches ≥ 0.5
                    [[0.1, 0.3], [0.0, 0.2]],       # tiny region: arg-max fallback
                    [[0.0, 0.0], [0.0, 0.0]]])      # cropped away: empty
    sel = select_patches(cov, theta=0.5)
    assert sel.dtype == bool and sel.shape == cov.shape
    assert sel[0].tolist() == [[False, True], [True, False]]
    assert sel[1].tolist() == [[False, True], [False, False]]
    assert not sel[2].any()
    np.testing.assert_array_equal(select_patches(cov.reshape(3, 4), flat=True), sel.reshape(3, 4))
    np.testing.assert_array_equal(select_patches(cov[1]), sel[1])
