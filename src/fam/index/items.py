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

    def row(self) -> dict[str, Any]:
        """The JSON row stored in the index (``id``, ``text``, ``image``, metadata)."""
        return {"id": self.id, "text": self.text, "image": self.image, **self.metadata}


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
    return [ItemRecord(r.id, r.text, r.image, r.metadata, r.item) for r in rows]


def items_fingerprint(records: list[ItemRecord]) -> str:
    """SHA-256 over what is embedded (text and image path per item, in order).

    Image *contents* are not hashed (that would mean reading the whole collection twice);
    a resumed build therefore trusts that files under the same names did not change.
    """
    h = hashlib.sha256()
    for r in records:
        h.update(r.item.text.encode() + b"\0" + str(r.item.image or "").encode() + b"\n")
    return "sha256:" + h.hexdigest()
