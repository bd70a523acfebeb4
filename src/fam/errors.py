"""Error types with enough context to fix the problem.

Every data error names *where* it happened (file, line, field) and *what to do*,
so a bad row in a 100K-row file is found in seconds.
"""
from __future__ import annotations

import errno
import os
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


#: What to do about an OSError on a named path, by errno.
_OS_HINTS = {
    errno.ENOENT: "no such file or folder; check the path",
    errno.EACCES: "permission denied; choose a path you can write to or fix its permissions",
    errno.EPERM: "operation not permitted; choose another path",
    errno.EROFS: "read-only file system; choose a writable path",
    errno.EISDIR: "is a folder; give a file path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; fix the path",
    errno.EEXIST: "already exists; choose another path",
    errno.ENOSPC: "no space left on the device; free space and rerun (finished work is kept)",
    errno.EDQUOT: "disk quota exceeded; free space and rerun (finished work is kept)",
    errno.ENAMETOOLONG: "file name too long; choose a shorter path",
}


def user_error(e: BaseException) -> str | None:
    """The one-line message of an error the user can fix, or None for an internal error.

    A :class:`FamError` carries its own context. An ``OSError`` that names a path (a
    folder where a file goes, an unwritable or full disk, a missing file) is the user's to
    fix too; it is printed with the path and what to do. Anything else is a bug.
    """
    if isinstance(e, FamError):
        return str(e)
    if isinstance(e, OSError) and (e.filename is not None or e.errno == errno.ENOSPC):
        hint = _OS_HINTS.get(e.errno or -1, e.strerror or str(e))
        where = e.filename2 if e.filename2 is not None else e.filename
        if e.errno == errno.EEXIST and where is not None and os.path.isfile(where):
            hint = "is a file, not a folder; fix the path"  # mkdir over a file
        return f"{where}: {hint}" if where is not None else hint
    if isinstance(e, MemoryError):
        return ("out of memory; lower the batch size (optim.batch_size / --batch-size), use "
                "optim.grad_accum or gradcache_chunk, or a smaller model")
    return None
