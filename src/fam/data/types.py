"""Plain data types shared by loaders, models and evaluation."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: The MMEB image placeholder. Adapters translate it to their family's image token(s).
IMAGE_PLACEHOLDER = "<|image_1|>"


@dataclass(frozen=True)
class MMItem:
    """One side of a pair: an instruction-formatted text, optionally with one image.

    ``text`` may contain :data:`IMAGE_PLACEHOLDER` where the image goes (MMEB convention);
    if ``image`` is set and the text has no placeholder, the image is placed first.
    ``image`` is an absolute path (already resolved under the data root) or ``None``.
    ``content`` optionally gives the character span ``(start, end)`` of the text *content*
    inside ``text`` (e.g. the caption after an instruction); tokens outside it are not
    text-content tokens (method.md §1). ``None`` means the whole text is content.
    ``source``/``line``/``field`` say where the item came from, so that an error loading its
    image names the data file, row and field. They do not take part in equality.
    """

    text: str
    image: Path | None = None
    content: tuple[int, int] | None = None
    source: str | None = field(default=None, compare=False)
    line: int | None = field(default=None, compare=False)
    field: str | None = field(default=None, compare=False)

    @property
    def has_image(self) -> bool:
        return self.image is not None
