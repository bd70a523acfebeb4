"""``generate_media``: Scenes-Video and Scenes-Docs written in MMEB-V2's published layouts.

Layout under ``out`` (a contract; the loaders of :mod:`fam.data.mmeb.v2` and
:func:`fam.data.mmeb.load_train` read it, so every run exercises the real-data readers):

* ``train_media/<Dataset>.jsonl``: MMEB training rows (``qry``, ``qry_image_path``,
  ``qry_video``, ``pos_text``, ``pos_image_path``, ``pos_video``, ``neg_*``), paths relative
  to ``out``; media under ``media/train/``;
* ``eval_media/``: the evaluation benchmark, paths relative to it:
  ``frames/<video_id>/frame_0001.png ...`` (frame folders), ``clips/<row>/{query,
  positive_1, negative_1..5}/`` (moment retrieval), ``pages/<doc>_<kind>.png``;
  ``SceneVideoCls[-OOD].jsonl`` (which event, local over the 7 events),
  ``SceneVideoQA.jsonl`` (options), ``SceneMomentRet.jsonl`` (clip folders),
  ``SceneVideoRet/`` (BEIR, caption → video over the pool, every clip with the same
  caption relevant), ``SceneDocRet[-OOD]/`` (BEIR parquet, graded qrels) and
  ``datasets.json`` (``{name: {modality, meta_task, split}}``);
* ``captions_media.json``: ``[{video, caption}]`` of the training clips (``fam train align``:
  MAC with a video's tokens as its fine-grained tokens);
* ``media.json``: the summary, written last.

Deterministic in ``cfg.seed``: each part draws from ``default_rng([seed, 0x5EED, stream])``.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fam.config.scenes import ScenesMediaConfig
from fam.data.scenes.docs import PAGE_KINDS, Doc, page_query, render_page, sample_doc
from fam.data.scenes.video import (EVENTS, REVERSED, Clip, caption, question, render_clip,
                                   sample_clip)
from fam.data.types import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from fam.utils.io import atomic_write_json, write_jsonl

__all__ = ["generate_media", "MEDIA_DATASETS", "VIDEO_CLS_INST", "VIDEO_TGT", "DOC_QRY",
           "DOC_TGT", "VIDEO_QRY"]

VIDEO_CLS_INST = "Recognize the category of the video content."
VIDEO_QRY = "Find a video that contains the following visual content:"
VIDEO_TGT = "Understand the content of the provided video."
DOC_QRY = "Find a document image that matches the given query:"
DOC_TGT = "Understand the content of the provided document image."
#: ``{name: (modality, meta_task, split)}`` of the evaluation sets.
MEDIA_DATASETS: dict[str, tuple[str, str, str]] = {
    "SceneVideoCls": ("video", "classification", "IND"),
    "SceneVideoCls-OOD": ("video", "classification", "OOD"),
    "SceneVideoQA": ("video", "qa", "IND"),
    "SceneVideoRet": ("video", "retrieval", "IND"),
    "SceneMomentRet": ("video", "moment_retrieval", "IND"),
    "SceneDocRet": ("visdoc", "retrieval", "IND"),
    "SceneDocRet-OOD": ("visdoc", "retrieval", "OOD"),
}


def _rng(cfg: ScenesMediaConfig, stream: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, 0x5EED, stream])


def _save_frames(frames: list[np.ndarray], folder: Path, level: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"frame_{i + 1:04d}.png", compress_level=level)


def _clips(cfg: ScenesMediaConfig, n: int, stream: int, prefix: str, style: str = "plain"
           ) -> list[Clip]:
    rng = _rng(cfg, stream)
    # events cycle so every event is equally frequent
    return [sample_clip(rng, f"{prefix}{i:04d}", cfg.frame_size, EVENTS[i % len(EVENTS)], style)
            for i in range(n)]


def _write_clips(cfg: ScenesMediaConfig, clips: list[Clip], root: Path) -> None:
    for c in clips:
        _save_frames(render_clip(c, cfg.n_frames, cfg.frame_size), root / c.id,
                     cfg.png_compress_level)


def _video_train(cfg: ScenesMediaConfig, out: Path) -> dict[str, list[dict]]:
    clips = _clips(cfg, cfg.n_train_videos, 1, "tv")
    _write_clips(cfg, clips, out / "media" / "train" / "frames")
    rel = "media/train/frames/"
    cls, ret = [], []
    for c in clips:
        cls.append({"qry": f"{VIDEO_PLACEHOLDER} {VIDEO_CLS_INST}", "qry_image_path": "",
                    "qry_video": rel + c.id, "pos_text": c.event, "pos_image_path": "",
                    "neg_text": REVERSED[c.event] if REVERSED[c.event] != c.event else
                    "moves right", "neg_image_path": ""})
        ret.append({"qry": f"{VIDEO_QRY} {caption(c)}", "qry_image_path": "",
                    "pos_text": f"{VIDEO_PLACEHOLDER} {VIDEO_TGT}", "pos_image_path": "",
                    "pos_video": rel + c.id})
    atomic_write_json(out / "captions_media.json",
                      [{"video": rel + c.id, "caption": caption(c)} for c in clips])
    return {"SceneVideoCls": cls, "SceneVideoRet": ret}


def _video_eval(cfg: ScenesMediaConfig, ev: Path) -> dict[str, Any]:
    ind = _clips(cfg, cfg.n_eval_videos, 2, "ev")
    ood = _clips(cfg, cfg.n_eval_videos, 3, "ov", style="striped")
    _write_clips(cfg, ind + ood, ev / "frames")
    out: dict[str, Any] = {}
    for name, clips in (("SceneVideoCls", ind), ("SceneVideoCls-OOD", ood)):
        out[name] = [{"qry_text": f"{VIDEO_PLACEHOLDER} {VIDEO_CLS_INST}",
                      "qry_video": f"frames/{c.id}",
                      "tgt_text": [c.event] + [e for e in EVENTS if e != c.event]}
                     for c in clips]
    qa = []
    for c in ind:
        q, options = question(c)
        qa.append({"qry_text": f"{VIDEO_PLACEHOLDER} {q}", "qry_video": f"frames/{c.id}",
                   "tgt_text": options})
    out["SceneVideoQA"] = qa
    caps = {c.id: caption(c) for c in ind}
    texts = sorted(set(caps.values()))
    out["SceneVideoRet"] = {
        "queries": [{"query-id": f"q{i}", "query": t} for i, t in enumerate(texts)],
        "corpus": [{"corpus-id": c.id, "video": f"frames/{c.id}"} for c in ind],
        "qrels": [{"query-id": f"q{i}", "corpus-id": cid, "score": 1}
                  for i, t in enumerate(texts) for cid, ct in caps.items() if ct == t]}
    return out


def _moments(cfg: ScenesMediaConfig, ev: Path) -> list[dict]:
    rng = _rng(cfg, 4)
    videos = []
    for m in range(cfg.n_moments):
        events = [EVENTS[int(k)] for k in rng.choice(len(EVENTS), 4, replace=False)]
        first = sample_clip(rng, f"m{m:03d}s0", cfg.frame_size, events[0])
        segs = [first] + [sample_clip(rng, f"m{m:03d}s{k}", cfg.frame_size, e,
                                      shape=first.shape, colour=first.colour)
                          for k, e in enumerate(events[1:], 1)]
        videos.append(segs)
    rows = []
    for m, segs in enumerate(videos):
        target = int(rng.integers(4))
        other = videos[(m + 1) % len(videos)]
        folder = ev / "clips" / f"m{m:03d}"
        frames = [f for s in segs for f in render_clip(s, cfg.n_frames, cfg.frame_size)]
        _save_frames(frames, folder / "query", cfg.png_compress_level)
        negatives = [s for k, s in enumerate(segs) if k != target] + other[:2]
        for name, seg in [("positive_1", segs[target])] + [
                (f"negative_{k + 1}", s) for k, s in enumerate(negatives)]:
            _save_frames(render_clip(seg, cfg.n_frames, cfg.frame_size), folder / name,
                         cfg.png_compress_level)
        t = segs[target]
        what = (f"the {t.shape} changes from {t.colour} to {t.colour2}"
                if t.event == "changes colour" else f"the {t.colour} {t.shape} {t.event}")
        rows.append({"qry_text": f"{VIDEO_PLACEHOLDER} Find the moment when {what}.",
                     "clip_dir": f"clips/m{m:03d}", "tgt_text": f"{VIDEO_PLACEHOLDER} {VIDEO_TGT}"})
    return rows


def _docs(cfg: ScenesMediaConfig, n: int, stream: int, prefix: str, layout: str
          ) -> list[Doc]:
    rng = _rng(cfg, stream)
    return [sample_doc(rng, f"{prefix}{i:03d}", layout) for i in range(n)]


def _write_pages(cfg: ScenesMediaConfig, docs: list[Doc], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for d in docs:
        for kind in PAGE_KINDS:
            Image.fromarray(render_page(d, kind, cfg.page_size)).save(
                folder / f"{d.id}_{kind}.png", compress_level=cfg.png_compress_level)


def _doc_beir(docs: list[Doc]) -> dict[str, list[dict]]:
    """Queries (one per distinct page description), corpus pages, graded qrels."""
    queries: dict[str, str] = {}
    qrels: dict[tuple[str, str], int] = {}
    for d in docs:
        for kind in PAGE_KINDS:
            text = page_query(d, kind)
            qid = queries.setdefault(text, f"q{len(queries)}")
            # every doc with the same description: its page grade 2, its other pages 1
            for e in docs:
                if page_query(e, kind) == text:
                    for k in PAGE_KINDS:
                        grade = 2 if k == kind else 1
                        key = (qid, f"{e.id}_{k}")
                        qrels[key] = max(qrels.get(key, 0), grade)
    return {"queries": [{"query-id": q, "query": t} for t, q in queries.items()],
            "corpus": [{"corpus-id": f"{d.id}_{k}", "image": f"pages/{d.id}_{k}.png"}
                       for d in docs for k in PAGE_KINDS],
            "qrels": [{"query-id": q, "corpus-id": c, "score": s} for (q, c), s in qrels.items()]}


def _write_beir(folder: Path, parts: dict[str, list[dict]], parquet: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in parts.items():
        if parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.Table.from_pylist(rows), folder / f"{name}.parquet")
        else:
            write_jsonl(folder / f"{name}.jsonl", rows)


def generate_media(cfg: ScenesMediaConfig, out_dir: str | Path) -> dict[str, Any]:
    """Write Scenes-Video and Scenes-Docs under ``out_dir`` (layout in the module docstring);
    an earlier generation there is replaced. Returns the summary (``media.json``)."""
    out = Path(out_dir)
    for sub in ("media", "train_media", "eval_media"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "media.json").unlink(missing_ok=True)
    (out / "captions_media.json").unlink(missing_ok=True)
    ev = out / "eval_media"
    train = _video_train(cfg, out)
    tdocs = _docs(cfg, cfg.n_train_docs, 5, "td", "plain")
    _write_pages(cfg, tdocs, out / "media" / "train" / "pages")
    train["SceneDocRet"] = [
        {"qry": f"{DOC_QRY} {page_query(d, k)}", "qry_image_path": "",
         "pos_text": f"{IMAGE_PLACEHOLDER} {DOC_TGT}",
         "pos_image_path": f"media/train/pages/{d.id}_{k}.png",
         "neg_text": f"{IMAGE_PLACEHOLDER} {DOC_TGT}",
         "neg_image_path": f"media/train/pages/{d.id}_{PAGE_KINDS[(i + 1) % 3]}.png"}
        for d in tdocs for i, k in enumerate(PAGE_KINDS)]
    for name, rows in train.items():
        write_jsonl(out / "train_media" / f"{name}.jsonl", rows)
    evals = _video_eval(cfg, ev)
    evals["SceneMomentRet"] = _moments(cfg, ev)
    for name, docs in (("SceneDocRet", _docs(cfg, cfg.n_eval_docs, 6, "ed", "plain")),
                       ("SceneDocRet-OOD", _docs(cfg, cfg.n_eval_docs, 7, "od", "mirrored"))):
        _write_pages(cfg, docs, ev / "pages")
        evals[name] = _doc_beir(docs)
    for name, data in evals.items():
        if isinstance(data, dict):
            _write_beir(ev / name, data, parquet=name.startswith("SceneDoc"))
        else:
            write_jsonl(ev / f"{name}.jsonl", data)
    atomic_write_json(ev / "datasets.json", {
        n: {"modality": m, "meta_task": t, "split": s} for n, (m, t, s) in MEDIA_DATASETS.items()})
    summary = {"config": dataclasses.asdict(cfg),
               "train": {n: len(r) for n, r in train.items()},
               "eval": {n: len(d) if isinstance(d, list) else len(d["queries"])
                        for n, d in evals.items()}}
    atomic_write_json(out / "media.json", summary)
    return json.loads(json.dumps(summary))
