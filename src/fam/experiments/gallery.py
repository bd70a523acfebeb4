"""A retrieval gallery: what two (or more) embedding models return for the same queries.

Text→image rows (a caption ranked against images) and image→text rows (an image ranked
against captions) are taken from the benchmark's retrieval datasets — the **first** rows
of each, not a selection — and every model ranks each row's candidates by cosine exactly
as the MMEB protocol does. :func:`retrieval_gallery` returns the top-k of each model (the
positive is candidate 0, so "correct" is ``index == 0``); :func:`plot_gallery` draws them
side by side (:func:`fam.analysis.plots.plot_gallery`; matplotlib, optional ``plots`` extra).
:func:`media_gallery` adds the first video query (a video ranked against its texts) and the
first document query (a text ranked against the page corpus) of an MMEB-V2 folder.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fam.data.mmeb import (EvalRow, dataset_info, discover_datasets, load_dataset_infos,
                           read_eval_rows)
from fam.eval.mmeb import Encoder

log = logging.getLogger(__name__)

__all__ = ["retrieval_gallery", "media_gallery"]


def _direction(row: EvalRow) -> str | None:
    """``"t2i"`` (text query, image candidates), ``"i2t"`` (image query, text candidates)."""
    q_img = row.query.image is not None
    c_img = all(c.image is not None for c in row.candidates)
    c_txt = all(c.image is None for c in row.candidates)
    if not q_img and c_img:
        return "t2i"
    if q_img and c_txt:
        return "i2t"
    return None


def _pick(data_dir: Path, image_root: Path, n: int) -> dict[str, tuple[str, list[EvalRow]]]:
    """The first retrieval dataset of each direction (IND ones first), and its first rows."""
    found = discover_datasets(data_dir, "eval")
    infos = load_dataset_infos(data_dir)
    metas = {name: dataset_info(name, data_dir, infos=infos) for name in found}
    order = sorted((m.split != "IND", name) for name, m in metas.items()
                   if m.meta_task == "retrieval")
    out: dict[str, tuple[str, list[EvalRow]]] = {}
    for _, name in order:
        rows = read_eval_rows(name, found[name], image_root, n)
        d = _direction(rows[0]) if rows else None
        if d is not None and d not in out:
            out[d] = (name, [r for r in rows if _direction(r) == d][:n])
    return out


@torch.no_grad()
def retrieval_gallery(encoders: Mapping[str, Encoder], data_dir: str | Path,
                      image_root: str | Path | None = None, n: int = 3, k: int = 3,
                      ) -> dict[str, Any]:
    """Top-k retrievals of each model for the first ``n`` rows of each direction.

    Args:
        encoders: label → model (e.g. ``{"VLM2Vec": ..., "FAM": ...}``), in display order.
        data_dir: benchmark eval folder (or a root holding ``eval/``).
        image_root: folder the image paths are relative to (default: ``data_dir``).
        n: rows per direction.
        k: candidates shown per row.

    Returns:
        ``{"models": [labels], "k": k, "t2i"/"i2t": {"dataset": name, "rows": [{"query":
        {"text", "image"}, "candidates": [{"text", "image"}, ...], "top": {label: [[index,
        cosine], ...]}}]}}`` (images as absolute paths, ``None`` when absent).
    """
    data_dir = Path(data_dir)
    root = Path(image_root) if image_root is not None else data_dir
    picked = _pick(data_dir, root, n)
    if not picked:
        raise ValueError(f"{data_dir}: no retrieval dataset with text→image or image→text rows")
    out: dict[str, Any] = {"models": list(encoders), "k": k}
    item = lambda it: {"text": it.text, "image": str(it.image) if it.image else None}  # noqa: E731
    for direction, (name, rows) in picked.items():
        shown = []
        for row in rows:
            shown.append({"query": item(row.query), "candidates": [item(c) for c in row.candidates],
                          "top": {}})
        for label, enc in encoders.items():
            for row, rec in zip(rows, shown):
                emb = F.normalize(enc.encode([row.query] + list(row.candidates)).float(), dim=-1)
                scores = emb[1:] @ emb[0]  # (C,)
                # Stable order: among equal scores the positive (index 0) is NOT favoured.
                order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i == 0, i))
                rec["top"][label] = [[i, float(scores[i])] for i in order[:k]]
        out[direction] = {"dataset": name, "rows": shown}
    return out


def _shown(it: Any) -> dict[str, Any]:
    """An item as the gallery records it (absolute paths; ``video``: every frame)."""
    return {"text": it.text, "image": str(it.all_images[0]) if it.all_images else None,
            **({"video": [str(f) for f in it.video]} if it.video else {})}


def _pick_media(data_dir: Path) -> dict[str, Any]:
    """``{"video": task, "visdoc": task}``: the first dataset (IND ones first) whose first
    query is a video ranked against texts, and the first ranking a page corpus."""
    from fam.data.mmeb.v2 import discover_v2, read_task
    found = discover_v2(data_dir)
    out: dict[str, Any] = {}
    for name in sorted(found, key=lambda n: (n.endswith("-OOD"), n)):
        kind, path = found[name]
        task = read_task(name, kind, path, data_dir, max_rows=1)
        if not task.queries:
            continue
        q = task.queries[0]
        cands = [task.corpus[c] for c in (q.candidates or task.corpus)]
        if "video" not in out and q.item.video and q.candidates is not None and \
                all(not c.video and not c.all_images for c in cands):
            out["video"] = task
        elif "visdoc" not in out and task.kind == "beir" and not q.item.video and \
                not q.item.all_images and all(c.all_images and not c.video for c in cands):
            out["visdoc"] = task
    return out


@torch.no_grad()
def media_gallery(encoders: Mapping[str, Encoder], data_dir: str | Path, k: int = 3
                  ) -> dict[str, Any]:
    """Top-k of each model for the first video query and the first document query of an
    MMEB-V2 folder (:mod:`fam.data.mmeb.v2`), ranked as :func:`fam.eval.mmeb_v2.evaluate_v2`
    ranks them (cosine; ties against relevant items).

    Returns:
        ``{"video"/"visdoc": {"dataset": name, "rows": [{"query": item, "candidates":
        [item + "grade", ...], "top": {label: [[index into candidates, cosine], ...]}}]}}``
        (only the candidates some model shows; ``grade`` > 0: relevant). A kind with no
        dataset is left out.
    """
    out: dict[str, Any] = {}
    for kind, task in _pick_media(Path(data_dir)).items():
        q = task.queries[0]
        ids = list(q.candidates if q.candidates is not None else task.corpus)
        tops: dict[str, list[tuple[str, float]]] = {}
        for label, enc in encoders.items():
            emb = F.normalize(enc.encode([q.item] + [task.corpus[c] for c in ids]).float(),
                              dim=-1)
            scores = (emb[1:] @ emb[0]).tolist()
            order = sorted(range(len(ids)), key=lambda i: (-scores[i],
                                                           q.relevance.get(ids[i], 0) > 0, i))
            tops[label] = [(ids[i], scores[i]) for i in order[:k]]
        shown = list(dict.fromkeys(c for top in tops.values() for c, _ in top))
        row = {"query": _shown(q.item),
               "candidates": [dict(_shown(task.corpus[c]), id=c,
                                   grade=float(q.relevance.get(c, 0))) for c in shown],
               "top": {label: [[shown.index(c), cos] for c, cos in top]
                       for label, top in tops.items()}}
        out[kind] = {"dataset": task.name, "rows": [row]}
    return out
