"""Helpers of the reliability suite (imported by its tests and conftest)."""
from __future__ import annotations

import json
import logging
import shutil
import struct
import zlib
from pathlib import Path

from fam.cli import main


def adapt_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """``fam train adapt`` on the benchmark: 2 steps of 4 pairs, a checkpoint every step."""
    return ["train", "adapt", f"model={model}", f"train_dir={data / 'train'}",
            f"image_root={data}", f"run.out_dir={out}", "optim.steps=2", "optim.batch_size=4",
            "run.progress=false", "run.save_every=1", "run.keep_checkpoints=5", *extra]


def append_row(data: Path, subset: str, image: str) -> int:
    """Append a training row whose query is ``image`` (referenced nowhere else); its line."""
    path = data / "train" / f"{subset}.jsonl"
    rows = path.read_text().splitlines()
    rows.append(json.dumps({"qry": "<|image_1|> Represent the given image.",
                            "qry_image_path": image, "pos_text": "a red circle",
                            "pos_image_path": "", "neg_text": "", "neg_image_path": ""}))
    path.write_text("\n".join(rows) + "\n")
    return len(rows)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


class Cli:
    """Runs ``fam`` in-process: ``rc, out, text = cli(*argv)``; ``cli.error`` is the one
    ERROR line a failing command logged. Asserts that nothing printed a traceback."""

    def __init__(self, capsys, caplog):
        self.capsys, self.caplog = capsys, caplog
        self.errors: list[str] = []

    def __call__(self, *argv: object) -> tuple[int, str, str]:
        self.caplog.clear()
        self.capsys.readouterr()
        with self.caplog.at_level(logging.INFO):
            rc = main([str(a) for a in argv])
        cap = self.capsys.readouterr()
        records = [r for r in self.caplog.records if r.levelno >= logging.WARNING]
        assert not any(r.exc_info for r in records), "a traceback was logged"
        self.errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
        text = cap.err + self.caplog.text
        assert "Traceback" not in text
        return rc, cap.out, text

    @property
    def error(self) -> str:
        assert len(self.errors) == 1, self.errors
        return self.errors[0]


def bomb_png(path: Path, side: int = 30000) -> Path:
    """A valid PNG header claiming ``side`` x ``side`` pixels (a decompression bomb): PIL
    refuses it on open, before decoding, so the file can stay a few bytes long."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path
