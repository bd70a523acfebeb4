"""A retrieval gallery: what two (or more) embedding models return for the same queries.

Text→image rows (a caption ranked against images) and image→text rows (an image ranked
against captions) are taken from the benchmark's retrieval datasets — the **first** rows
of each, not a selection — and every model ranks each row's candidates by cosine exactly
as the MMEB protocol does. :func:`retrieval_gallery` returns the top-k of each model (the
positive is candidate 0, so "correct" is ``index == 0``); :func:`plot_gallery` draws them
side by side (matplotlib, optional ``plots`` extra).
"""
from __future__ import annotations

import logging
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fam.data.mmeb import EvalRow, dataset_info, discover_datasets, load_dataset_infos, read_eval_rows
from fam.eval.mmeb import Encoder

log = logging.getLogger(__name__)

__all__ = ["retrieval_gallery", "plot_gallery"]


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


def plot_gallery(gallery: Mapping[str, Any], path: str | Path) -> Path:
    """Draw :func:`retrieval_gallery`'s result: one row per query, the query first, then each
    model's top-k (images for text→image, captions for image→text), the correct one in
    green, wrong ones in red."""
    from PIL import Image

    from fam.analysis.plots import _plt, _save
    plt = _plt()
    models, k = list(gallery["models"]), int(gallery["k"])
    blocks = [(d, gallery[d]) for d in ("t2i", "i2t") if d in gallery]
    n_rows = sum(len(b["rows"]) for _, b in blocks)
    n_cols = 1 + len(models) * k
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.7 * n_cols, 1.9 * n_rows), squeeze=False)
    r = 0
    for direction, block in blocks:
        for row in block["rows"]:
            ax = axes[r][0]
            q = row["query"]
            if direction == "i2t":
                ax.imshow(Image.open(q["image"]).convert("RGB"))
                ax.set_title(f"{block['dataset']}\nquery image", fontsize=7)
            else:
                ax.text(0.0, 0.5, textwrap.fill(q["text"], 24), fontsize=6, va="center",
                        transform=ax.transAxes)
                ax.set_title(f"{block['dataset']}\nquery text", fontsize=7)
            for m, label in enumerate(models):
                for j, (idx, cos) in enumerate(row["top"][label]):
                    a = axes[r][1 + m * k + j]
                    ok = idx == 0
                    colour = "#1a7f37" if ok else "#cf222e"
                    cand = row["candidates"][idx]
                    if direction == "t2i":
                        a.imshow(Image.open(cand["image"]).convert("RGB"))
                    else:
                        a.text(0.02, 0.5, textwrap.fill(cand["text"], 22), fontsize=5.5,
                               va="center", color=colour, transform=a.transAxes)
                    for s in a.spines.values():
                        s.set_visible(True)
                        s.set_edgecolor(colour)
                        s.set_linewidth(3 if ok else 1.5)
                    head = f"{label}\n" if r == 0 and j == 0 else ""
                    a.set_title(f"{head}#{j + 1} {'✓' if ok else '✗'} {cos:.2f}", fontsize=7,
                                color=colour)
            r += 1
    for row_axes in axes:
        for a in row_axes:
            a.set_xticks([])
            a.set_yticks([])
    axes[0][0].figure.suptitle("top-3 retrievals, first rows of each dataset (green = correct)",
                               fontsize=8)
    return _save(fig, path)
