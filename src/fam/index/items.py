"""Items to index, read as ``fam encode`` reads them (the input contract), plus metadata.

One JSON object per line: ``text`` (may contain ``<|image_1|>``), ``image`` (a path relative to
the image root), optional ``id`` (default: the 0-based row number) and any other fields, which
are kept as metadata and returned with search results.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fam.data.items import apply_prompt
from fam.data.items import read_items as _read_items
from fam.data.types import MMItem
from fam.data.video import sample


@dataclass
class ItemRecord:
    """One indexed item.

    Attributes:
        id: the item's id (string).
        text: its text, as given.
        image: its image path relative to the image root, or None.
        metadata: the row's other fields.
        item: the :class:`MMItem` to embed (image resolved under the root).
    """

    id: str
    text: str
    image: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    item: MMItem | None = None
    images: list[str] = field(default_factory=list)
    video: str | list[str] | None = None

    def row(self) -> dict[str, Any]:
        """The JSON row stored in the index (``id``, ``text``, ``image``, metadata; with
        ``images`` and ``video`` as given, and the video's frames the model sampled in
        ``video_frames`` (relative paths: the search page's frame strip), when present)."""
        row: dict[str, Any] = {"id": self.id, "text": self.text, "image": self.image}
        if self.images:
            row["images"] = list(self.images)
        if self.video:
            row["video"] = self.video
            row["video_frames"] = sampled_frames(self.video, self.item)
        return {**row, **self.metadata}


#: Keys of an index row that are the item itself (the rest is metadata).
ROW_KEYS = ("id", "text", "image", "images", "video", "video_frames")


def sampled_frames(video: str | list[str], item: MMItem | None) -> list[str]:
    """The frames of a video the model takes (:func:`fam.data.video.sample`), as paths
    relative to the image root: a folder's frames as ``folder/name``."""
    if isinstance(video, str):
        assert item is not None and item.video
        return [f"{video.rstrip('/')}/{p.name}" for p in sample(list(item.video))]
    return sample(list(video))


def read_items(path: str | Path, image_root: str | Path | None = None,
               document_prompt: str = "") -> list[ItemRecord]:
    """Read and check an items JSONL through the input contract (:mod:`fam.data.items`).

    Keys other than ``id``, ``text`` and ``image`` are kept as metadata (said once in the
    log); a near-miss of a known key (``imgae``) or a visual key fam does not read is refused.

    Args:
        path: the JSONL file.
        image_root: folder the ``image`` paths are relative to (default: the file's folder).
        document_prompt: applied to each item's text by :func:`apply_prompt`.

    Raises:
        DataError: naming the file, line and field of the first bad row.
    """
    rows = _read_items(path, image_root, prompt=document_prompt)
    return [ItemRecord(r.id, r.text, r.image, r.metadata, r.item, r.images, r.video)
            for r in rows]


def items_fingerprint(records: list[ItemRecord]) -> str:
    """SHA-256 over what is embedded (per item, in order: text, image path, and the paths of
    its further images and of its video's frames, a folder expanded to its frames).

    Image *contents* are not hashed (that would mean reading the whole collection twice);
    a resumed build therefore trusts that files under the same names did not change. An item
    without ``images``/``video`` hashes as it did before they existed (old builds resume).
    """
    h = hashlib.sha256()
    for r in records:
        h.update(r.item.text.encode() + b"\0" + str(r.item.image or "").encode())
        for tag, paths in ((b"images", r.item.images), (b"video", r.item.video)):
            if paths:
                h.update(b"\0" + tag + b"".join(b"\0" + str(p).encode() for p in paths))
        h.update(b"\n")
    return "sha256:" + h.hexdigest()
