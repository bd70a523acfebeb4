"""Videos in the sentence-transformers export (``fam export --video``; docs/deploy.md "Videos").

sentence-transformers hands a ``{"video": ..., "text": ...}`` input to the processor's video
processor. Every video processor of transformers 5.25 needs torchvision, so only a Qwen2-VL /
Qwen2.5-VL export written with ``--video`` (the stock processor with its
``Qwen2VLVideoProcessor`` set up as fam's video patching) takes videos natively, and only
where torchvision imports. :func:`st_video` gives it a video as fam embeds the same frames.
Families that take a video as its frames (LLaVA-1.5, LLaVA-NeXT) need no flag: their export
takes fam's sampled frames as images.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from fam.errors import ConfigError

__all__ = ["VIDEO_FPS", "probe_video", "st_video", "torchvision_missing", "video_probes",
           "video_spec_or_fail"]

#: The frame rate a video's frames are given to sentence-transformers with
#: (``video_metadata``): fam gives Qwen2.5-VL no ``second_per_grid_ts``, which its M-RoPE
#: reads as 1 s per temporal patch of 2 frames; transformers assumes 24 fps for frames
#: without metadata. (Qwen2-VL has no time scale.)
VIDEO_FPS = 2.0


def probe_video(n: int, size: tuple[int, int]) -> list:
    """``n`` frames of a circle crossing the frame (the order matters)."""
    from PIL import Image, ImageDraw
    frames = []
    for i in range(n):
        im = Image.new("RGB", size, (90, 100, 110))
        x = 4 + i * (size[0] - 30) // max(1, n - 1)
        ImageDraw.Draw(im).ellipse([x, 8, x + 24, 32], fill=(240, 40 + 17 * i, 30))
        frames.append(im)
    return frames


def st_video(frames: Sequence) -> dict[str, Any]:
    """A video as sentence-transformers takes it for a ``--video`` export, embedded as fam
    embeds the same frames: fam's 8 frames (:func:`fam.data.video.sample`) with
    :data:`VIDEO_FPS` in their metadata."""
    from fam.data.video import sample
    chosen = sample(list(frames))
    return {"array": chosen, "video_metadata": {"total_num_frames": len(chosen),
                                                "fps": VIDEO_FPS}}


def torchvision_missing() -> str | None:
    """Why transformers' video processors cannot run here (None when torchvision imports)."""
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # ImportError, or a RuntimeError from ops built for another torch
        return f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    return None


def video_probes(st, folder: Path) -> tuple[torch.Tensor, list, list[None]]:
    """sentence-transformers' and fam's inputs for two video probes: 11 frames (fam samples
    8; sentence-transformers is given those 8) without a placeholder, and 5 frames placed by
    ``<|video_1|>`` in the text."""
    from fam.data.types import MMItem
    texts = ["what happens in the clip?", "clip: <|video_1|> where does the circle go?"]
    items, st_in = [], []
    for v, (n, text) in enumerate(zip((11, 5), texts)):
        frames = probe_video(n, (96, 40))
        (folder / str(v)).mkdir(parents=True)
        for k, f in enumerate(frames):
            f.save(folder / str(v) / f"frame_{k + 1}.png")
        items.append(MMItem(text, video=folder / str(v)))
        st_in.append({"video": st_video(frames), "text": text})
    emb = st.encode(st_in, prompt="", convert_to_tensor=True, show_progress_bar=False)
    return emb, items, [None] * len(items)


def video_spec_or_fail(adapter) -> dict:
    """The adapter's ``video_processor_spec()`` (Qwen2-VL/2.5-VL: the stock processor with its
    video processor), refused in one line for a family that takes no video natively."""
    if not hasattr(adapter, "video_processor_spec"):
        raise ConfigError(f"--video exports a processor that takes a video natively, which the "
                          f"{adapter.family} family does not"
                          + (" (it takes a video as its frames: pass them to "
                             "sentence-transformers as images, see docs/deploy.md)"
                             if adapter.video_input == "frames" else ""))
    return adapter.video_processor_spec()
