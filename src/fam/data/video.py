"""Videos given as frames: a folder of frames in natural sort order, uniform frame sampling.

MMEB-V2 stores a video as ``<frame_root>/<video_id>/`` holding its frames (jpg/png), read in
natural sort order (``frame_2`` before ``frame_10``), and feeds a model 8 frames chosen by
index: ``linspace(0, n - 1, 8)`` truncated to integers, every frame when there are fewer.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from fam.errors import DataError, InputError

__all__ = ["FRAME_SUFFIXES", "NUM_FRAMES", "natural_key", "frame_paths", "sample_indices",
           "sample", "check_frame_sizes"]

#: File suffixes read as frames (case-insensitive).
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
#: Frames fed to a model per video (VLM2Vec-V2's default).
NUM_FRAMES = 8


def natural_key(name: str) -> list:
    """Sort key splitting digit runs into integers: ``f2`` < ``f10``."""
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", name)]


def frame_paths(folder: str | Path, *, source: str | None = None, line: int | None = None,
                field: str | None = None) -> list[Path]:
    """The frame files directly inside ``folder``, in natural sort order.

    Raises:
        DataError: the folder is missing or holds no frame file.
    """
    folder = Path(folder)
    where = (f" (referenced by {source}" + (f", line {line}" if line else "") +
             (f", field '{field}'" if field else "") + ")") if source else ""
    if not folder.is_dir():
        raise DataError(f"video frame folder {folder} does not exist{where}; a video is a "
                        "folder of frames or a list of frame paths", source or folder, line,
                        field)
    frames = sorted((p for p in folder.iterdir()
                     if p.is_file() and p.suffix.lower() in FRAME_SUFFIXES),
                    key=lambda p: natural_key(p.name))
    if not frames:
        raise DataError(f"video frame folder {folder} holds no frame ({'/'.join(FRAME_SUFFIXES)})"
                        f"{where}", source or folder, line, field)
    return frames


def sample_indices(n: int, k: int = NUM_FRAMES) -> list[int]:
    """Indices of ``k`` frames spread uniformly over ``n`` (all ``n`` when ``n <= k``):
    ``int(i * (n - 1) / (k - 1))``, numpy's ``linspace(0, n - 1, k).astype(int)``."""
    if n < 1 or k < 1:
        raise ValueError(f"need n >= 1 frames and k >= 1, got n={n}, k={k}")
    if n <= k:
        return list(range(n))
    if k == 1:
        return [0]
    return [int(i * (n - 1) / (k - 1)) for i in range(k)]


def sample(frames: Sequence, k: int = NUM_FRAMES) -> list:
    """The frames chosen by :func:`sample_indices`."""
    return [frames[i] for i in sample_indices(len(frames), k)]


def check_frame_sizes(sizes: Sequence[tuple[int, int]]) -> None:
    """The sampled frames of one video share one size (they become one video input).

    Raises:
        InputError: the sizes differ (the reason only; callers add where the video is).
    """
    distinct = sorted(set(sizes))
    if len(distinct) > 1:
        got = ", ".join(f"{w}x{h}" for w, h in distinct)
        raise InputError(f"the frames of one video must share one size, got {got}: resize "
                         "them to one size")
