"""Error types with enough context to fix the problem.

Every data error names *where* it happened (file, line, field) and *what to do*,
so a bad row in a 100K-row file is found in seconds.
"""
from __future__ import annotations

from pathlib import Path


class FamError(Exception):
    """Base class of all errors raised by fam."""


class DataError(FamError, ValueError):
    """A problem with input data: a malformed row, a missing or corrupt image, a bad path.

    Args:
        message: what is wrong and, where possible, what to do about it.
        path: the file the problem is in (a JSONL/parquet/JSON file or an image).
        line: 1-based line (JSONL) or row (parquet/JSON list) number, if known.
        field: the offending field of the row, if known.
    """

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None):
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        self.reason = message
        where = []
        if self.path is not None:
            where.append(self.path)
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)


class InputError(DataError):
    """An input item (text or image) the contract refuses: the same ``reason`` everywhere.

    ``fam encode``/``eval``/training print it with the data file, line and field (and the
    image path); ``fam serve`` answers HTTP ``status`` with the request's JSON path and the
    same reason (``fam.data.items``, ``fam.data.images``).

    Args:
        reason: what is wrong and what to do, without where.
        path, line, field: as :class:`DataError`.
        status: the HTTP status the server answers (400, or 413 for a size limit).
        image: the image file the reason is about, when a data row referenced it.
    """

    def __init__(self, reason: str, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None, *, status: int = 400,
                 image: str | Path | None = None):
        super().__init__((f"image {image}: " if image is not None else "") + reason, path,
                         line, field)
        self.reason = reason
        self.status = status
        self.image = str(image) if image is not None else None


class ConfigError(FamError, ValueError):
    """An invalid configuration value (names the key and the accepted values).

    Args:
        message: what is wrong and what to do, starting with the key (``optim.lr=nan: ...``).
        key: the dotted config key at fault (``optim.lr``), if there is one.
    """

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        super().__init__(message)
