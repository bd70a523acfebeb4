"""Small I/O helpers: atomic writes, safe path resolution under a data root, JSONL reading.

Used everywhere data or checkpoints touch the disk, so that (1) a crash never leaves a
half-written file behind and (2) every bad row is reported with file, line and field.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from fam.errors import ConfigError, DataError
from fam.utils.checkpoint import default_mode, fsync_path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only on success.

    The rename is atomic on POSIX, so readers see either the old file or the new one,
    never a truncated one. On an exception the temporary file is removed and ``path``
    is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the usual permissions (umask applies).
        os.chmod(tmp_path, default_mode(False))
        fsync_path(tmp_path)  # the data is on disk before the name points at it
        os.replace(tmp_path, path)
        fsync_path(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def resolve_under(root: str | Path, rel: str, *, source: str | Path | None = None,
                  line: int | None = None, field: str | None = None) -> Path:
    """Resolve ``rel`` against ``root`` and refuse paths that escape ``root``.

    An absolute ``rel`` is accepted when it lies under ``root`` (so ``--image-root /`` takes
    absolute paths).

    Args:
        root: the data root (image folder).
        rel: a path from a data row, relative to ``root`` (or absolute, under it).
        source, line, field: where ``rel`` came from, for the error message.

    Raises:
        DataError: ``rel`` is empty, or resolves outside ``root``.
    """
    if not isinstance(rel, str) or not rel:
        raise DataError(f"expected a non-empty relative image path, got {rel!r}",
                        source, line, field)
    root_r = Path(root).resolve()
    cand = (root_r / rel).resolve()
    if cand != root_r and root_r not in cand.parents:
        what = "is absolute and not under" if Path(rel).is_absolute() else "escapes"
        raise DataError(f"image path {rel!r} {what} the data root {str(root_r)!r}; paths must "
                        "be relative to the image root (or give --image-root / for absolute "
                        "paths)", source, line, field)
    return cand


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)`` for each non-empty line of a UTF-8 JSONL file.

    Raises:
        DataError: a line is not UTF-8 (names the byte and column: save the file as UTF-8),
            not valid JSON or not a JSON object (names file and line).
    """
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path)
    with path.open("rb") as f:
        for i, data in enumerate(f, start=1):
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not UTF-8 (byte 0x{data[e.start]:02x} at byte {e.start + 1} "
                                "of the line); save the file as UTF-8", path, i) from None
            if i == 1 and raw.startswith("\ufeff"):
                raw = raw[1:]  # a UTF-8 byte-order mark
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({e.msg} at column {e.colno})", path, i) from None
            if not isinstance(row, dict):
                raise DataError(f"expected a JSON object, got {type(row).__name__}", path, i)
            yield i, row


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write rows as JSONL atomically."""
    with atomic_path(path) as tmp:
        with tmp.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


def output_dir(path: str | Path, what: str) -> Path:
    """Create the output folder ``path`` (parents too) and check it is writable, up front.

    Called before any work so that a file in the way, a read-only or full disk or a missing
    permission fails in the first second, not after hours of training or evaluation.

    Args:
        path: the folder.
        what: the option or key that named it (``--out``, ``run.out_dir``), for the message.

    Raises:
        ConfigError: naming ``what``, the path and what to do.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{what}={p} is a file; give a folder", key=what)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fam-write-test.", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{what}={p}: cannot write there ({e.strerror or e}); choose a "
                          "writable folder", key=what) from None
    return p


def output_file(path: str | Path, what: str) -> Path:
    """Check, up front, that the file ``path`` can be written (its folder is created).

    Raises:
        ConfigError: the path is a folder, or its folder cannot be created or written.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what}={p} is a folder; give a file path", key=what)
    output_dir(p.parent if str(p.parent) else Path("."), what)
    return p
