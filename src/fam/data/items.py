"""Items to embed, as ``fam encode`` reads them (JSONL of ``{"text", "image"}`` rows)."""
from __future__ import annotations

from pathlib import Path

from fam.data.types import MMItem

__all__ = ["read_items"]


def read_items(path: str | Path, image_root: str | Path | None = None) -> list[MMItem]:
    """Read the items of a JSONL file (what ``fam encode`` embeds).

    Each row is ``{"text": ..., "image": ...}`` (both optional); ``image`` is a path relative
    to ``image_root`` (default: the file's folder) and may not escape it.

    Raises:
        DataError: a malformed row or an image path outside the root (names file and line).
    """
    from fam.errors import DataError
    from fam.utils.io import read_jsonl, resolve_under

    root = Path(image_root) if image_root else Path(path).parent
    items = []
    for line, row in read_jsonl(path):
        text, img = row.get("text", ""), row.get("image") or None
        if not isinstance(text, str):
            raise DataError(f"'text' must be a string, got {type(text).__name__}", path, line,
                            "text")
        if img is not None and not isinstance(img, str):
            raise DataError(f"'image' must be a relative path string, got {type(img).__name__}",
                            path, line, "image")
        items.append(MMItem(text, resolve_under(root, img, source=path, line=line, field="image")
                            if img else None, source=str(path), line=line, field="image"))
    return items
