"""Videos and several images per item, for every adapter (see ``fam.backbones.base``).

An item's video (:attr:`fam.data.types.MMItem.video`) reaches the model in one of two ways,
chosen by the family's :attr:`~fam.backbones.base.BackboneAdapter.video_input`:

- ``"native"`` (Qwen2-VL, Qwen2.5-VL): the sampled frames become ONE video input
  (``pixel_values_videos``, ``video_grid_thw``) behind the family's video block
  (``<|vision_start|>`` + N × ``<|video_pad|>`` + ``<|vision_end|>``; bare ``<|video_pad|>``
  under ``prompt_format="vlm2vec"``), as VLM2Vec-V2 feeds it;
- ``"frames"`` (multi-image families): the sampled frames become that many images at the
  video's place in the text;
- ``None``: the family takes neither, and an item with a video is one clear error.

Frames: :data:`fam.data.video.NUM_FRAMES` (8) chosen by ``linspace(0, n - 1, 8)``
(:func:`fam.data.video.sample_indices`), all when fewer.

Qwen2-VL's video patching (:func:`qwen_video_patches`) is done without torchvision (which
transformers' ``Qwen2VLVideoProcessor`` needs and which does not load here): every frame
goes through the adapter's own image processor (PIL backend: ``smart_resize`` to multiples of
``patch_size · merge_size`` within the min/max pixel budget, bicubic resize, rescale,
normalise), the frame count is padded to a multiple of ``temporal_patch_size`` by repeating
the last frame, and each spatial patch's vector is ``(channel, time, patch, patch)`` over the
frames of its temporal group, the layout of ``Qwen2VLVideoProcessor.patchify``. The pixel
budget is the image processor's: VLM2Vec-V2's pinned transformers processed videos with the
same ``Qwen2VLImageProcessor`` (one ``min_pixels``/``max_pixels``).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch
from PIL import Image

from fam.data.images import DEFAULT_RULES, ImageRules, load_image
from fam.data.types import VIDEO_PLACEHOLDER, MMItem, Visuals
from fam.data.video import NUM_FRAMES, check_frame_sizes, sample
from fam.errors import ConfigError, InputError

__all__ = ["load_video_frames", "place_videos", "qwen_video_patches", "split_visuals"]


def load_video_frames(item: MMItem, num_frames: int = NUM_FRAMES,
                      given: Sequence[Image.Image] | None = None,
                      rules: ImageRules = DEFAULT_RULES) -> list[Image.Image]:
    """The item's sampled frames, loaded (in their own mode) with the backbone's image
    ``rules``, all of one size.

    ``given``: the video's frames already decoded (:class:`fam.data.types.Visuals`, checked
    where they were decoded), sampled here as frame files are.

    Raises:
        InputError: a frame is missing/unreadable, or the frames differ in size.
    """
    if given:
        frames = sample(list(given), num_frames)
    else:
        chosen = sample(list(item.video), num_frames)
        frames = [load_image(p, source=item.source, line=item.line, field=item.field,
                             rgb=False, rules=rules) for p in chosen]
    try:
        check_frame_sizes([f.size for f in frames])
    except InputError as e:
        where = item.source or (None if given else item.video[0].parent)
        raise InputError(e.reason, where, item.line, item.field) from None
    return frames


def split_visuals(images: Sequence[Any]) -> tuple[list[list[Image.Image]],
                                                   list[Sequence[Image.Image] | None]]:
    """Per item, ``(its images, its decoded video frames or None)`` from the entries of an
    ``images`` argument: None, one image, a list of images or a :class:`Visuals`."""
    per_item: list[list[Image.Image]] = []
    given: list[Sequence[Image.Image] | None] = []
    for im in images:
        if isinstance(im, Visuals):
            per_item.append(list(im.images))
            given.append(im.video or None)
        else:
            per_item.append([] if im is None else list(im) if isinstance(im, (list, tuple))
                            else [im])
            given.append(None)
    return per_item, given


def _slot_text(item: MMItem, slot: str) -> MMItem:
    """The item with its video placeholder replaced by ``slot`` (first when absent)."""
    text, content = item.text, item.content
    pos = text.find(VIDEO_PLACEHOLDER)
    if pos < 0:
        new = slot + "\n"
        text = new + text
        shift, at = len(new), -1
    else:
        text = text[:pos] + slot + text[pos + len(VIDEO_PLACEHOLDER):]
        shift, at = len(slot) - len(VIDEO_PLACEHOLDER), pos
    if content is not None:
        content = tuple(c + shift if c > at else c for c in content)  # type: ignore[assignment]
    # The rest of the text must not carry a second video placeholder.
    return replace(item, text=text.replace(VIDEO_PLACEHOLDER, ""), content=content)


def place_videos(adapter: Any, items: Sequence[MMItem], per_item: list[list[Image.Image]],
                 num_frames: int = NUM_FRAMES,
                 given: Sequence[Sequence[Image.Image] | None] | None = None) -> tuple[list[MMItem], list[list[Image.Image]], list[int | None],
                            list[list[Image.Image]]]:
    """Turn each item's video into what its family takes.

    Returns ``(items, per_item images, video slot per item, native videos)``: with
    ``"native"`` the video becomes image slot ``k = n_images + 1`` (``<|image_k|>`` in the
    text, the slot number returned, its frames in ``native videos``); with ``"frames"`` it
    becomes that many further images at its place. ``given``: per item, its video's frames
    already decoded (None: read the item's frame files).

    Raises:
        ConfigError: an item has a video and the family takes none.
    """
    out_items: list[MMItem] = []
    slots: list[int | None] = []
    videos: list[list[Image.Image]] = []
    for b, item in enumerate(items):
        frames_in = given[b] if given is not None else None
        if not item.video and not frames_in:
            out_items.append(item)
            slots.append(None)
            continue
        mode = adapter.video_input
        if mode is None:
            raise ConfigError(f"the {adapter.family} family takes neither a video nor several "
                              "images per item; use a Qwen2-VL/Qwen2.5-VL (video) or a "
                              "multi-image family (llava_next, idefics3), or give one frame as "
                              "the item's image")
        frames = load_video_frames(item, num_frames, frames_in, adapter.input_rules.images)
        n = len(per_item[b])
        if mode == "native":
            out_items.append(_slot_text(item, f"<|image_{n + 1}|>"))
            slots.append(n + 1)
            videos.append(frames)
        else:
            tags = "".join(f"<|image_{n + 1 + i}|>" for i in range(len(frames)))
            out_items.append(_slot_text(item, tags))
            slots.append(None)
            per_item[b] = per_item[b] + frames
    return out_items, per_item, slots, videos


def qwen_video_patches(frames: Sequence[Image.Image], image_processor: Any
                       ) -> tuple[torch.Tensor, list[int]]:
    """One video's ``pixel_values_videos`` rows and ``video_grid_thw`` for Qwen2-VL.

    Args:
        frames: the sampled frames, RGB, all of one size.
        image_processor: the adapter's Qwen2-VL image processor (its resize, normalisation,
            pixel budget, ``patch_size``, ``temporal_patch_size``, ``merge_size``).

    Returns:
        ``(patches (t·h·w, C·T·P·P), [t, h, w])``.
    """
    tp = int(image_processor.temporal_patch_size)
    p = int(image_processor.patch_size)
    frames = list(frames)
    if pad := -len(frames) % tp:
        frames += [frames[-1]] * pad
    # The image processor repeats each frame temporal_patch_size times in its patch vector;
    # its first time step is the frame itself.
    out = image_processor(frames, return_tensors="pt")
    grids = out["image_grid_thw"]
    _, gh, gw = (int(v) for v in grids[0])
    per_frame = out["pixel_values"].reshape(len(frames), gh * gw, -1, tp, p, p)[:, :, :, 0]
    c = per_frame.shape[2]
    t = len(frames) // tp
    # (t, tp, hw, C, P, P) -> (t, hw, C, tp, P, P)
    grouped = per_frame.reshape(t, tp, gh * gw, c, p, p).permute(0, 2, 3, 1, 4, 5)
    return grouped.reshape(t * gh * gw, c * tp * p * p), [t, gh, gw]
