"""Plain data types shared by loaders, models and evaluation."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

#: The MMEB image placeholder. Adapters translate it to their family's image token(s).
IMAGE_PLACEHOLDER = "<|image_1|>"
#: Where an item's video goes in its text (adapters translate it; absent: the video goes first).
VIDEO_PLACEHOLDER = "<|video_1|>"


@dataclass(frozen=True)
class MMItem:
    """One side of a pair: an instruction-formatted text with zero or more images or a video.

    ``text`` may contain :data:`IMAGE_PLACEHOLDER` where the image goes (MMEB convention);
    if ``image`` is set and the text has no placeholder, the image is placed first.
    ``image`` is an absolute path (already resolved under the data root) or ``None``.
    ``content`` optionally gives the character span ``(start, end)`` of the text *content*
    inside ``text`` (e.g. the caption after an instruction); tokens outside it are not
    text-content tokens (method.md §1). ``None`` means the whole text is content.
    ``images`` are further images: the item's images are ``image`` (when set) then ``images``,
    referred to in the text as ``<|image_1|>``, ``<|image_2|>``, ... (unmentioned ones go
    first). ``video`` is a video as its frames: a list of frame paths, or a folder of frames
    (expanded here to its frames in natural sort order, :func:`fam.data.video.frame_paths`);
    the text refers to it as :data:`VIDEO_PLACEHOLDER` (absent: the video goes first).
    ``source``/``line``/``field`` say where the item came from, so that an error loading its
    image names the data file, row and field. They do not take part in equality.
    """

    text: str
    image: Path | None = None
    content: tuple[int, int] | None = None
    images: Sequence[Path] = ()
    video: Sequence[Path] | Path | str = ()
    source: str | None = field(default=None, compare=False)
    line: int | None = field(default=None, compare=False)
    field: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", tuple(Path(p) for p in self.images))
        video = self.video
        if isinstance(video, (str, Path)):
            from fam.data.video import frame_paths
            video = frame_paths(video, source=self.source, line=self.line, field=self.field)
        object.__setattr__(self, "video", tuple(Path(p) for p in video))

    @property
    def all_images(self) -> list[Path]:
        """``image`` (when set) followed by ``images``."""
        return ([self.image] if self.image is not None else []) + list(self.images)

    @property
    def has_image(self) -> bool:
        """Whether the item carries any visual input (an image or a video)."""
        return self.image is not None or bool(self.images) or bool(self.video)


@dataclass(frozen=True)
class Visuals:
    """An item's visual inputs already decoded (what ``fam serve`` reads from a request), an
    entry of the ``images`` argument of :meth:`fam.model.encode.EncodePipeline.encode` and
    :meth:`fam.backbones.BackboneAdapter.encode` beside one image or a list of images.

    ``images`` stand for the item's ``image`` then ``images`` (``<|image_1|>``, ...);
    ``video`` is a video's frames in order (PIL images of one size). The adapter samples the
    frames as it samples a video read from files (:func:`fam.data.video.sample`): a caller
    may pass every frame, or the sampled ones only (sampling those again keeps them all).
    """

    images: tuple = ()
    video: tuple = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", tuple(self.images))
        object.__setattr__(self, "video", tuple(self.video))
