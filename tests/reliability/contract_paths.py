"""One item through the three entry points of the input contract (issue 23).

:class:`ThreePaths` sends an item (a text and optionally encoded image bytes) through

- the **library**: ``EmbeddingModel.encode([MMItem(text, image_file)])``;
- **fam encode**: ``fam.cli.main(["encode", ...])`` in-process, on a one-row JSONL (the model
  load is cached: the command's own code runs, minus reading the weights again);
- **fam serve**: ``POST /v1/embeddings`` on the FastAPI app through an in-process client;

and returns each path's :class:`Outcome`. :func:`agree` states the contract: all refuse with
the same one-line reason (the CLI exits 2 and logs it, the server answers 4xx JSON carrying
it), or all return the same embedding (max |Δ| ≤ 1e-6: each path embeds the item alone
with the same weights and ops on the same CPU, so the vectors are equal bit for bit in
practice; 1e-6 leaves room for nothing but float summation order).
"""
from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fam.cli import main
from fam.data.types import MMItem
from fam.errors import InputError

TOL = 1e-6
EXT = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp",
       "TIFF": ".tif", None: ".bin"}


@dataclass
class Outcome:
    """``vector`` when the path embedded the item; else ``reason`` (the one line) and
    ``status`` (HTTP status or CLI exit code)."""

    path: str
    vector: torch.Tensor | None = None
    reason: str | None = None
    status: int | None = None

    def __repr__(self) -> str:
        return f"{self.path}: " + ("vector" if self.vector is not None else
                                   f"refused ({self.status}) {self.reason!r}")


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class ThreePaths:
    """The library, ``fam encode`` and ``fam serve`` on one model (see the module docstring)."""

    def __init__(self, model: Any, model_dir: Path, client: Any, work: Path):
        self.model, self.model_dir, self.client, self.work = model, model_dir, client, work
        self.n = 0

    def run(self, text: str | None, image: bytes | None = None, fmt: str | None = "PNG",
            extra: dict | None = None) -> list[Outcome]:
        """All three paths on the item ``{"text": text, "image": <image>}`` (+ ``extra``
        keys for the CLI and the server)."""
        self.n += 1
        d = self.work / f"item{self.n}"
        d.mkdir(parents=True)
        rel = None
        if image is not None:
            rel = "img" + EXT.get(fmt, ".bin")
            (d / rel).write_bytes(image)
        return [self.library(text, d / rel if rel else None),
                self.cli(text, rel, d, extra), self.serve(text, image, extra)]

    def run_visual(self, text: str | None, image: bytes | None = None,
                   images: list[bytes] | None = None, video: list[bytes] | None = None
                   ) -> list[Outcome]:
        """All three paths on an item with several images and/or a video given as frames
        (PNG bytes): files + ``images``/``video`` keys for the library and ``fam encode``,
        data URIs for ``fam serve``."""
        self.n += 1
        d = self.work / f"item{self.n}"
        d.mkdir(parents=True)

        def files(name: str, blobs: list[bytes] | None) -> list[str]:
            out = []
            for j, b in enumerate(blobs or []):
                (d / f"{name}{j}.png").write_bytes(b)
                out.append(f"{name}{j}.png")
            return out

        img = files("img", [image] if image is not None else None)
        ims, frames = files("ims", images), files("frame", video)
        row: dict[str, Any] = {} if text is None else {"text": text}
        obj = dict(row)
        uri = lambda b: "data:image/png;base64," + base64.b64encode(b).decode("ascii")  # noqa: E731
        if img:
            row["image"], obj["image"] = img[0], uri(image)
        if images is not None:
            row["images"], obj["images"] = ims, [uri(b) for b in images]
        if video is not None:
            row["video"], obj["video"] = frames, [uri(b) for b in video]
        try:
            item = MMItem(text or "", d / img[0] if img else None,
                          images=[d / f for f in ims], video=[d / f for f in frames])
            v = self.model.encode([item], batch_size=1)
            lib = Outcome("library", vector=v[0])
        except InputError as e:
            lib = Outcome("library", reason=e.reason, status=e.status)
        return [lib, self._cli_row(row, d), self._post(obj)]

    def library(self, text: str | None, image: Path | None) -> Outcome:
        try:
            v = self.model.encode([MMItem(text or "", image)], batch_size=1)
        except InputError as e:
            return Outcome("library", reason=e.reason, status=e.status)
        return Outcome("library", vector=v[0])

    def cli(self, text: str | None, rel: str | None, d: Path, extra: dict | None) -> Outcome:
        row: dict[str, Any] = dict(extra or {})
        if text is not None:
            row["text"] = text
        if rel is not None:
            row["image"] = rel
        return self._cli_row(row, d)

    def _cli_row(self, row: dict, d: Path) -> Outcome:
        (d / "items.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
        out = d / "emb.safetensors"
        handler = _Errors()
        root = logging.getLogger()
        root.addHandler(handler)
        try:
            rc = main(["encode", "--model", str(self.model_dir), "--input",
                       str(d / "items.jsonl"), "--image-root", str(d), "--out", str(out),
                       "--batch-size", "1"])
        finally:
            root.removeHandler(handler)
        if rc == 0:
            return Outcome("cli", vector=load_file(str(out))["embeddings"][0])
        return Outcome("cli", reason=" | ".join(handler.lines), status=rc)

    def serve(self, text: str | None, image: bytes | None, extra: dict | None) -> Outcome:
        obj: dict[str, Any] = dict(extra or {})
        if text is not None:
            obj["text"] = text
        if image is not None:
            obj["image"] = "data:application/octet-stream;base64," + \
                base64.b64encode(image).decode("ascii")
        return self._post(obj)

    def _post(self, obj: dict) -> Outcome:
        # Serialised here with ASCII escapes: a lone surrogate in a text is valid JSON
        # (a client library's UTF-8 encoder would choke on it first).
        r = self.client.post("/v1/embeddings", content=json.dumps({"input": obj}),
                             headers={"Content-Type": "application/json"})
        if r.status_code == 200:
            return Outcome("serve", vector=torch.tensor(r.json()["data"][0]["embedding"]))
        try:
            msg = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = r.text
        return Outcome("serve", reason=msg, status=r.status_code)


def agree(outcomes: list[Outcome]) -> str | None:
    """``None`` when the paths agree (module docstring), else what differs."""
    lib, cli, srv = outcomes
    if all(o.vector is not None for o in outcomes):
        d = max(float((o.vector - lib.vector).abs().max()) for o in outcomes[1:])
        return None if d <= TOL else f"embeddings differ by {d:.3g}: {outcomes}"
    if any(o.vector is not None for o in outcomes):
        return f"some embed, some refuse: {outcomes}"
    r = lib.reason or ""
    if "\n" in r or not r:
        return f"not a one-line reason: {outcomes}"
    if cli.status != 2 or r not in (cli.reason or "") or len(cli.reason.splitlines()) != 1:
        return f"fam encode does not refuse with exit 2 and the reason: {outcomes}"
    if not (400 <= (srv.status or 0) < 500) or not (srv.reason or "").endswith(": " + r):
        return f"fam serve does not answer 4xx with the reason: {outcomes}"
    return None
