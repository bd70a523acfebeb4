"""Atomic, durable checkpoint directories.

A checkpoint is written into a temporary sibling directory and renamed into place only when
complete, so an interrupted run never leaves a half-written checkpoint where the resume logic
would pick it up. The previous checkpoint at the same path is replaced only after the new
one is complete. Before the rename every file and the directory itself are fsync'd, and the
parent is fsync'd after it, so a power loss cannot leave a renamed folder whose files were
still in the page cache (the rename is only as durable as the data it points to).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (directories: the entries, i.e. renames and creations)."""
    fd = os.open(str(path), os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_mode(directory: bool) -> int:
    """The mode a normal ``mkdir``/``open`` would give under the current umask.

    ``tempfile`` creates 0700 folders and 0600 files; results must not keep that.
    """
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        # Writers inside may create private files too (safetensors writes 0600 through
        # its own temporary file): give everything the modes a plain open/mkdir would.
        file_mode, dir_mode = default_mode(False), default_mode(True)
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                os.chmod(f, file_mode)
                fsync_path(f)
        for d in [*(d for d in tmp.rglob("*") if d.is_dir() and not d.is_symlink()), tmp]:
            os.chmod(d, dir_mode)
            fsync_path(d)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_path(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
