"""MMEB-V2 data in its published layouts: video rows, moment-retrieval clip folders and
visual-document retrieval in the BEIR layout, read into one form, a :class:`RankTask`.

A task is a set of queries, each with its candidates and its relevance labels:

- **local** tasks (image and video classification/QA/retrieval rows, moment retrieval):
  every query ranks its own candidates;
- **global** tasks (BEIR: visual documents, caption→video retrieval, video classification
  over all labels): every query ranks the whole corpus.

Layouts under a benchmark folder (every path in a row is relative to the media root, by
default the benchmark folder; paths escaping it are refused):

- ``<Dataset>.jsonl`` / ``<Dataset>.parquet``: **rows**, MMEB's evaluation fields
  ``qry_text``, ``qry_img_path``, ``tgt_text``, ``tgt_img_path`` (positive first), each
  optional where a video stands in: ``qry_video`` (a frame folder, ``frames/<video_id>``)
  and ``tgt_video`` (a list of frame folders, or one string for every candidate).
  A row with ``clip_dir`` is a **moment-retrieval** row: ``<clip_dir>/query/`` holds the
  query video's frames (optional), every other subfolder is a candidate clip, those whose
  name starts with ``positive`` are relevant (several allowed, as in MomentSeeker);
  ``tgt_text`` may then be one string for every clip.
- ``<Dataset>/`` with ``queries``, ``corpus`` and ``qrels`` (``.jsonl`` or ``.parquet``):
  **BEIR**. ``queries``: ``query-id``, ``query`` (text) and optional ``image``/``video``;
  ``corpus``: ``corpus-id`` and at least one of ``image`` (a page image), ``video`` (a
  frame folder), ``text``; ``qrels``: ``query-id``, ``corpus-id``, ``score`` (graded; rows
  with score ≤ 0 are dropped, as VLM2Vec does; a query left without a positive is dropped
  with a warning). Image bytes embedded in parquet are not read: ``image`` is a path.

Frame folders hold the frames in natural sort order (:mod:`fam.data.video`).
Instructions: a query becomes ``qry_inst + " " + query`` and a corpus entry
``"<|image_1|> " + tgt_inst`` (``<|video_1|>`` for a video), VLM2Vec-V2's prompts; the
defaults (:data:`INSTRUCTIONS`) are set per modality and a dataset's entry in
``datasets.json`` may override ``qry_inst`` / ``tgt_inst``.

Every row is validated on load; a bad one raises :class:`~fam.errors.DataError` naming the
file, line and field.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fam.data.mmeb.layout import iter_rows
from fam.data.types import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, MMItem
from fam.data.video import frame_paths, natural_key
from fam.errors import DataError
from fam.utils.io import resolve_under

logger = logging.getLogger(__name__)

__all__ = ["RankQuery", "RankTask", "INSTRUCTIONS", "discover_v2", "read_task", "is_beir"]

#: VLM2Vec-V2's default instructions per kind of corpus (query side, target side).
INSTRUCTIONS: dict[str, tuple[str, str]] = {
    "visdoc": ("Find a document image that matches the given query:",
               "Understand the content of the provided document image."),
    "video": ("Find a video that contains the following visual content:",
              "Understand the content of the provided video."),
}
_BEIR_PARTS = ("queries", "corpus", "qrels")
_SUFFIXES = (".jsonl", ".parquet")


@dataclass
class RankQuery:
    """One query: its item, its candidate ids (``None``: the whole corpus) and relevance."""

    item: MMItem
    relevance: dict[str, float]
    candidates: list[str] | None = None
    line: int = 0


@dataclass
class RankTask:
    """A dataset as queries over a corpus of items keyed by id."""

    name: str
    kind: str  # "rows" (local) or "beir" (global)
    corpus: dict[str, MMItem]
    queries: list[RankQuery]
    source: str
    has_video: bool = False
    has_image: bool = False
    dropped: int = field(default=0)


def _part(folder: Path, name: str) -> Path | None:
    for suffix in _SUFFIXES:
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    return None


def is_beir(folder: Path) -> bool:
    """Whether ``folder`` holds a BEIR dataset (queries, corpus and qrels files)."""
    return folder.is_dir() and all(_part(folder, p) is not None for p in _BEIR_PARTS)


def discover_v2(data_dir: str | Path) -> dict[str, tuple[str, Path]]:
    """``{dataset: ("rows" | "beir", path)}`` under a benchmark folder (sorted by name)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError("not a folder: an MMEB-V2 benchmark folder holds <Dataset>.jsonl|"
                        "parquet rows and BEIR folders", data_dir)
    found: dict[str, tuple[str, Path]] = {}
    for p in sorted(data_dir.iterdir(), key=lambda p: natural_key(p.name)):
        if p.is_file() and p.suffix in _SUFFIXES and p.stem != "datasets":
            found[p.stem] = ("rows", p)
        elif is_beir(p):
            found[p.name] = ("beir", p)
    return found


class _Media:
    """Resolves row paths under the media root into items (cached, validated)."""

    def __init__(self, root: Path, source: Path):
        self.root, self.source = root, source
        self._videos: dict[str, tuple[Path, ...]] = {}

    def path(self, rel: Any, line: int, key: str) -> Path | None:
        if rel is None or rel == "":
            return None
        if isinstance(rel, dict) and isinstance(rel.get("path"), str):
            rel = rel["path"]
        if not isinstance(rel, str):
            raise DataError(f"expected a relative path string, got {type(rel).__name__}",
                            self.source, line, key)
        return resolve_under(self.root, rel, source=self.source, line=line, field=key)

    def video(self, rel: Any, line: int, key: str) -> tuple[Path, ...]:
        if isinstance(rel, str) and rel in self._videos:
            return self._videos[rel]
        folder = self.path(rel, line, key)
        if folder is None:
            return ()
        frames = tuple(frame_paths(folder, source=str(self.source), line=line, field=key))
        self._videos[str(rel)] = frames
        return frames

    def item(self, text: str, image: Path | None, video: tuple[Path, ...], line: int,
             key: str) -> MMItem:
        if not text and image is None and not video:
            raise DataError("empty item: no text, image or video", self.source, line, key)
        if image is not None and IMAGE_PLACEHOLDER not in text:
            text = f"{IMAGE_PLACEHOLDER} {text}".rstrip()
        if video and VIDEO_PLACEHOLDER not in text:
            text = f"{VIDEO_PLACEHOLDER} {text}".rstrip()
        return MMItem(text, image, video=video, source=str(self.source), line=line, field=key)


def _str(row: dict, key: str, source: Path, line: int, required: bool = False) -> str:
    v = row.get(key)
    if v is None:
        if required:
            raise DataError("field missing", source, line, key)
        return ""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and key.endswith("-id"):
        return str(v)
    if not isinstance(v, str):
        raise DataError(f"expected a string, got {type(v).__name__}", source, line, key)
    return v


def _candidates(value: Any, n: int | None, source: Path, line: int, key: str) -> list:
    """A per-candidate list (a single string is broadcast to ``n``)."""
    if value is None:
        return [None] * (n or 0)
    if isinstance(value, str):
        return [value] * (n or 1)
    if not isinstance(value, list):
        raise DataError(f"expected a list, got {type(value).__name__}", source, line, key)
    return value


def _read_rows(name: str, path: Path, media_root: Path, max_rows: int | None) -> RankTask:
    media = _Media(media_root, path)
    corpus: dict[str, MMItem] = {}
    ids: dict[MMItem, str] = {}
    queries: list[RankQuery] = []

    def cid(item: MMItem) -> str:
        if item not in ids:
            ids[item] = str(len(ids))
            corpus[ids[item]] = item
        return ids[item]

    cols = ["qry_text", "qry_img_path", "qry_video", "tgt_text", "tgt_img_path", "tgt_video",
            "clip_dir"]
    for line, row in iter_rows(path, cols, ["qry_text"]):
        if max_rows is not None and len(queries) >= max_rows:
            break
        if not isinstance(row, dict):
            raise DataError("expected a JSON object", path, line)
        qtext = _str(row, "qry_text", path, line, required=True)
        qimg = media.path(row.get("qry_img_path"), line, "qry_img_path")
        qvid = media.video(row.get("qry_video"), line, "qry_video")
        positives: set[int]
        if row.get("clip_dir"):
            folder = media.path(row["clip_dir"], line, "clip_dir")
            assert folder is not None
            if not folder.is_dir():
                raise DataError(f"clip folder {folder} does not exist", path, line, "clip_dir")
            clips = sorted((p for p in folder.iterdir() if p.is_dir() and p.name != "query"),
                           key=lambda p: natural_key(p.name))
            if (folder / "query").is_dir():
                qvid = tuple(frame_paths(folder / "query", source=str(path), line=line,
                                         field="clip_dir"))
            positives = {i for i, c in enumerate(clips) if c.name.startswith("positive")}
            if not positives or len(clips) < 2:
                raise DataError(f"clip folder {folder} needs a 'positive*' clip and at least "
                                f"one other clip; it has {[c.name for c in clips]}", path, line,
                                "clip_dir")
            texts = _candidates(row.get("tgt_text") or "", len(clips), path, line, "tgt_text")
            rels = [str(c.relative_to(media_root.resolve())) for c in clips]
            imgs, vids = [None] * len(clips), rels
        else:
            texts = row.get("tgt_text")
            n = len(texts) if isinstance(texts, list) else None
            imgs = _candidates(row.get("tgt_img_path"), n, path, line, "tgt_img_path")
            n = n if n is not None else len(imgs) or None
            vids = _candidates(row.get("tgt_video"), n, path, line, "tgt_video")
            n = n if n is not None else len(vids)
            texts = _candidates(texts if texts is not None else "", n, path, line, "tgt_text")
            imgs = imgs if imgs else [None] * n
            vids = vids if vids else [None] * n
            positives = {0}
        if not (len(texts) == len(imgs) == len(vids)):
            raise DataError(f"candidate lists differ in length (tgt_text {len(texts)}, "
                            f"tgt_img_path {len(imgs)}, tgt_video {len(vids)})", path, line,
                            "tgt_text")
        if len(texts) < 2:
            raise DataError(f"need at least 2 candidates, got {len(texts)}", path, line,
                            "tgt_text")
        cands = []
        for i, (t, im, v) in enumerate(zip(texts, imgs, vids)):
            if t is not None and not isinstance(t, str):
                raise DataError(f"expected a string, got {type(t).__name__}", path, line,
                                f"tgt_text[{i}]")
            item = media.item(t or "", media.path(im, line, f"tgt_img_path[{i}]"),
                              media.video(v, line, f"tgt_video[{i}]"), line, f"tgt_text[{i}]")
            cands.append(cid(item))
        query = media.item(qtext, qimg, qvid, line, "qry_text")
        queries.append(RankQuery(query, {cands[i]: 1.0 for i in positives}, cands, line))
    return _finish(RankTask(name, "rows", corpus, queries, str(path)))


def _finish(task: RankTask) -> RankTask:
    items = list(task.corpus.values()) + [q.item for q in task.queries]
    task.has_video = any(it.video for it in items)
    task.has_image = any(it.image is not None for it in items)
    if not task.queries:
        raise DataError("dataset has no queries", task.source)
    return task


def _read_beir(name: str, folder: Path, media_root: Path, max_rows: int | None,
               instructions: tuple[str, str] | None) -> RankTask:
    parts = {p: _part(folder, p) for p in _BEIR_PARTS}
    corpus: dict[str, MMItem] = {}
    raw: list[tuple[str, str, Path | None, tuple[Path, ...], Path, int]] = []
    cpath = parts["corpus"]
    assert cpath is not None
    media = _Media(media_root, cpath)
    rows = list(iter_rows(cpath, ["corpus-id", "image", "video", "text"], ["corpus-id"]))
    any_video = any(r.get("video") for _, r in rows)
    kind = "video" if any_video else "visdoc"
    q_inst, t_inst = instructions or INSTRUCTIONS[kind]
    for line, row in rows:
        c = _str(row, "corpus-id", cpath, line, required=True)
        if c in corpus:
            raise DataError(f"corpus-id {c!r} appears twice", cpath, line, "corpus-id")
        image = media.path(row.get("image"), line, "image")
        video = media.video(row.get("video"), line, "video")
        text = _str(row, "text", cpath, line)
        if image is None and not video and not text:
            raise DataError("corpus entry has no image, video or text", cpath, line, "image")
        body = (t_inst + (" " + text if text else "")) if (image or video) else text
        corpus[c] = media.item(body, image, video, line, "image" if image else "text")
    qpath = parts["queries"]
    assert qpath is not None
    qmedia = _Media(media_root, qpath)
    queries: dict[str, MMItem] = {}
    qline: dict[str, int] = {}
    for line, row in iter_rows(qpath, ["query-id", "query", "image", "video"],
                               ["query-id", "query"]):
        q = _str(row, "query-id", qpath, line, required=True)
        if q in queries:
            raise DataError(f"query-id {q!r} appears twice", qpath, line, "query-id")
        text = _str(row, "query", qpath, line, required=True)
        queries[q] = qmedia.item(f"{q_inst} {text}".strip(), qmedia.path(row.get("image"), line,
                                 "image"), qmedia.video(row.get("video"), line, "video"),
                                 line, "query")
        qline[q] = line
    rpath = parts["qrels"]
    assert rpath is not None
    rel: dict[str, dict[str, float]] = {}
    for line, row in iter_rows(rpath, ["query-id", "corpus-id", "score"],
                               ["query-id", "corpus-id", "score"]):
        q = _str(row, "query-id", rpath, line, required=True)
        c = _str(row, "corpus-id", rpath, line, required=True)
        s = row.get("score")
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise DataError(f"score must be a number, got {s!r}", rpath, line, "score")
        if q not in queries:
            raise DataError(f"query-id {q!r} is not in {qpath.name}", rpath, line, "query-id")
        if c not in corpus:
            raise DataError(f"corpus-id {c!r} is not in {cpath.name}", rpath, line, "corpus-id")
        if s <= 0:
            continue
        grades = rel.setdefault(q, {})
        if c in grades and grades[c] != float(s):
            raise DataError(f"({q!r}, {c!r}) is graded twice ({grades[c]} and {s})", rpath,
                            line, "score")
        grades[c] = float(s)
    out = [RankQuery(queries[q], rel[q], None, qline[q]) for q in queries if q in rel]
    dropped = len(queries) - len(out)
    if dropped:
        logger.warning("%s: %d of %d queries have no qrel with score > 0 and are not scored",
                       name, dropped, len(queries))
    if max_rows is not None:
        out = out[:max_rows]
    task = _finish(RankTask(name, "beir", corpus, out, str(folder)))
    task.dropped = dropped
    return task


def read_task(name: str, kind: str, path: Path, media_root: str | Path,
              max_rows: int | None = None, instructions: tuple[str, str] | None = None
              ) -> RankTask:
    """Read and validate one dataset found by :func:`discover_v2`."""
    root = Path(media_root)
    if kind == "beir":
        return _read_beir(name, path, root, max_rows, instructions)
    return _read_rows(name, path, root, max_rows)
