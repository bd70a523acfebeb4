"""Items to index, read as ``fam encode`` reads them, plus ids and metadata.

One JSON object per line: ``text`` (may contain ``<|image_1|>``), ``image`` (a path relative to
the image root), optional ``id`` (default: the 0-based row number) and any other fields, which
are kept as metadata and returned with search results.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fam.data.types import MMItem
from fam.errors import DataError
from fam.utils.io import read_jsonl, resolve_under


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


def apply_prompt(prompt: str, text: str) -> str:
    """``prompt`` with ``{text}`` replaced by ``text``, or ``prompt + text`` if it has none.

    So a plain instruction works as a prefix (sentence-transformers' convention) and a
    template can put the text anywhere; the empty prompt leaves the text as it is.
    """
    return prompt.replace("{text}", text) if "{text}" in prompt else prompt + text


def read_items(path: str | Path, image_root: str | Path | None = None,
               document_prompt: str = "") -> list[ItemRecord]:
    """Read and validate an items JSONL (every row, before any work starts).

    Args:
        path: the JSONL file.
        image_root: folder the ``image`` paths are relative to (default: the file's folder).
        document_prompt: applied to each item's text by :func:`apply_prompt`.

    Raises:
        DataError: naming the file, line and field of the first bad row.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    out: list[ItemRecord] = []
    seen: dict[str, int] = {}
    for line, row in read_jsonl(path):
        text = row.get("text", "")
        img = row.get("image") or None
        if not isinstance(text, str):
            raise DataError(f"expected a string, got {type(text).__name__}", path, line, "text")
        if img is not None and not isinstance(img, str):
            raise DataError(f"expected a relative image path (string), got "
                            f"{type(img).__name__}", path, line, "image")
        if not text and img is None:
            raise DataError("the row has neither 'text' nor 'image'; give at least one",
                            path, line)
        rid = row.get("id", len(out))
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise DataError(f"expected a string or integer id, got {type(rid).__name__}",
                            path, line, "id")
        rid = str(rid)
        if rid in seen:
            raise DataError(f"duplicate id {rid!r} (first on line {seen[rid]}); ids must be "
                            "unique", path, line, "id")
        seen[rid] = line
        resolved = (resolve_under(root, img, source=path, line=line, field="image")
                    if img else None)
        meta = {k: v for k, v in row.items() if k not in ("id", "text", "image")}
        item = MMItem(apply_prompt(document_prompt, text), resolved, source=str(path),
                      line=line, field="image")
        out.append(ItemRecord(rid, text, img, meta, item))
    if not out:
        raise DataError("no items (the file is empty)", path)
    return out


def items_fingerprint(records: list[ItemRecord]) -> str:
    """SHA-256 over what is embedded (text and image path per item, in order).

    Image *contents* are not hashed (that would mean reading the whole collection twice);
    a resumed build therefore trusts that files under the same names did not change.
    """
    h = hashlib.sha256()
    for r in records:
        h.update(r.item.text.encode() + b"\0" + str(r.item.image or "").encode() + b"\n")
    return "sha256:" + h.hexdigest()
