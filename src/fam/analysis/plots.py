"""Figures: the alignment analysis (method.md §5: heatmaps, entropy bars, MP energy curves),
precision@1 per model with CI whiskers, and the retrieval gallery.

matplotlib is imported lazily with the non-interactive Agg backend, so ``import fam`` and
headless training never need a display (or matplotlib at all).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)


def _plt() -> Any:
    import sys

    import matplotlib

    # headless: never try to open a window on servers/CI; but leave an already-chosen
    # backend alone (a notebook that imported pyplot keeps its inline display)
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _plt().close(fig)
    logger.info("wrote %s", path)
    return path


def plot_similarity_heatmaps(image: Image.Image, sim_maps: Sequence[Any], labels: Sequence[str],
                             path: str | Path, cols: int = 4, alpha: float = 0.55,
                             normalize: bool = True) -> Path:
    """Overlay patch-to-label similarity maps on the image, one panel per label.

    The maps live on the token grid of the *processed* image; pass the image in that frame
    (:func:`fam.projector.geometry.transform_image`) so patches line up. Each map is
    stretched over the whole image (nearest-neighbour: one block per patch).

    Args:
        image: PIL image in the processed frame.
        sim_maps: K arrays ``(G_h, G_w)`` (numpy or torch) of cosines.
        labels: K panel titles.
        path: output file (png/pdf/svg by extension).
        cols: panels per row.
        alpha: heatmap opacity.
        normalize: min-max each map to [0, 1] (as Align(V, W) does) instead of a shared
            [-1, 1] colour scale.
    """
    if len(sim_maps) != len(labels):
        raise ValueError(f"{len(sim_maps)} maps but {len(labels)} labels")
    plt = _plt()
    k = max(1, len(sim_maps))
    cols = max(1, min(cols, k))
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    w, h = image.size
    for ax in axes.flat:
        ax.axis("off")
    for ax, m, lab in zip(axes.flat, sim_maps, labels):
        m = np.asarray(m.detach().float().cpu() if hasattr(m, "detach") else m, dtype=np.float32)
        if m.ndim != 2:
            raise ValueError(f"similarity map for {lab!r} must be (G_h, G_w), got {m.shape}")
        if normalize:
            lo, hi = float(m.min()), float(m.max())
            m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
            vmin, vmax = 0.0, 1.0
        else:
            vmin, vmax = -1.0, 1.0
        ax.imshow(image)
        im = ax.imshow(m, extent=(0, w, h, 0), cmap="jet", alpha=alpha, vmin=vmin, vmax=vmax,
                       interpolation="nearest")
        ax.set_title(str(lab), fontsize=10)
    if len(sim_maps):
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.7)
    return _save(fig, path)


def plot_entropy_comparison(entropies: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """Grouped bars of matrix entropy before/after the projector and of text (method.md §5).

    Args:
        entropies: name → ``(H_before, H_after, H_text)`` in nats (``H_text`` may be NaN
            or missing). ΔH is written above each pair.
        path: output file.
    """
    plt = _plt()
    names = list(entropies)
    series = ("vision (before P)", "vision (after P)", "text")
    vals = np.full((len(names), 3), np.nan)
    for i, n in enumerate(names):
        v = list(entropies[n])[:3]
        vals[i, :len(v)] = v
    x = np.arange(len(names))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(4.0, 1.8 * len(names) + 2), 3.6))
    for j, s in enumerate(series):
        ax.bar(x + (j - 1) * width, np.nan_to_num(vals[:, j]), width, label=s)
    for i in range(len(names)):
        if not np.isnan(vals[i, :2]).any():
            ax.text(x[i], np.nanmax(vals[i]) * 1.02, f"ΔH={vals[i, 0] - vals[i, 1]:.2f}",
                    ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x, names)
    ax.set_ylabel("matrix entropy (nats)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_explained_energy(curves: Mapping[str, Any], path: str | Path) -> Path:
    """Matching-pursuit explained energy vs number of atoms K (method.md §5).

    Args:
        curves: name → ``(K+1,)`` mean curve (e.g. ``MPResult.explained_energy.mean(0)``),
            or ``(M, K+1)`` per-vector curves (their mean is drawn with a 25–75% band).
        path: output file.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for name, c in curves.items():
        c = np.asarray(c.detach().float().cpu() if hasattr(c, "detach") else c, dtype=np.float64)
        ks = np.arange(c.shape[-1])
        if c.ndim == 2:
            ax.fill_between(ks, np.quantile(c, 0.25, axis=0), np.quantile(c, 0.75, axis=0),
                            alpha=0.2)
            c = c.mean(0)
        ax.plot(ks, c, marker="o", ms=3, label=name)
    ax.set_xlabel("atoms K")
    ax.set_ylabel("explained energy 1 − ‖r‖²/‖v‖²")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_curves(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float],
                                                     Sequence[float]]]],
                path: str | Path, xlabel: str, ylabel: str,
                hlines: Mapping[str, Mapping[str, float]] | None = None) -> Path:
    """Side-by-side panels of curves with error bars (e.g. a metric vs β per schedule).

    Args:
        panels: panel title → series label → ``(x, mean, err)`` (err: e.g. the seed std).
        path: output file.
        xlabel, ylabel: axis labels (shared).
        hlines: panel title → label → y of a dashed reference line (e.g. a baseline).
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items()):
        for label, (x, m, e) in series.items():
            ax.errorbar(np.asarray(x, float), np.asarray(m, float), yerr=np.asarray(e, float),
                        marker="o", ms=4, capsize=3, label=label)
        for label, y in ((hlines or {}).get(title) or {}).items():
            ax.axhline(y, ls="--", lw=1, color="grey")
            ax.text(ax.get_xlim()[0], y, f" {label}", va="bottom", fontsize=7, color="grey")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_grouped_bars(panels: Mapping[str, Mapping[str, Mapping[str, tuple[float, float]]]],
                      path: str | Path, ylabel: str,
                      reference: Mapping[str, float] | None = None) -> Path:
    """Panels of grouped bars with error bars (e.g. accuracy per task, projector, arm).

    Args:
        panels: panel title → group (x tick) → series (bar) → ``(mean, err)``.
        path: output file.
        ylabel: y axis label.
        reference: panel title → y of a dashed line (e.g. the no-image baseline).
    """
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, (title, groups) in zip(axes[0], panels.items()):
        names = list(groups)
        series = list(dict.fromkeys(k for g in groups.values() for k in g))
        width = 0.8 / max(1, len(series))
        x = np.arange(len(names))
        for j, sname in enumerate(series):
            m = [groups[g].get(sname, (np.nan, 0.0))[0] for g in names]
            e = [groups[g].get(sname, (np.nan, 0.0))[1] for g in names]
            ax.bar(x + (j - (len(series) - 1) / 2) * width, np.nan_to_num(m), width,
                   yerr=np.nan_to_num(e), capsize=2, label=sname)
        if reference and title in reference and reference[title] is not None:
            ax.axhline(reference[title], ls="--", lw=1, color="grey", label="no-image baseline")
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _cell(s: str) -> str:
    # keep a decoded token visible and the table intact: show spaces, escape pipes
    return s.replace("|", "\\|").replace("\n", "\\n").replace(" ", "␣") or "∅"


def atoms_table(atoms: Any, decode: Callable[[int], str], row_labels: Sequence[str] | None = None,
                coefs: Any | None = None, k: int | None = None, max_rows: int = 50) -> str:
    """Markdown table of the top matching-pursuit atoms per row, as decoded strings.

    Args:
        atoms: ``(R, k_max)`` atom ids (``MPResult.atoms``).
        decode: token id → string (the tokenizer's decode; passed in so this stays pure).
        row_labels: R names (e.g. region labels or patch positions); default row numbers.
        coefs: ``(R, k_max)`` coefficients, shown as ``token (0.42)``.
        k: atoms per row to show (default all).
        max_rows: at most this many rows.
    """
    a = np.asarray(atoms.cpu() if hasattr(atoms, "cpu") else atoms)
    c = None if coefs is None else np.asarray(coefs.cpu() if hasattr(coefs, "cpu") else coefs)
    k = a.shape[1] if k is None else min(k, a.shape[1])
    n = min(a.shape[0], max_rows)
    head = "| " + " | ".join(["row"] + [f"atom {j + 1}" for j in range(k)]) + " |"
    lines = [head, "|" + "---|" * (k + 1)]
    for i in range(n):
        name = row_labels[i] if row_labels is not None else str(i)
        cells = []
        for j in range(k):
            t = _cell(decode(int(a[i, j])))
            cells.append(f"{t} ({float(c[i, j]):.2f})" if c is not None else t)
        lines.append("| " + " | ".join([_cell(str(name))] + cells) + " |")
    if a.shape[0] > n:
        lines.append(f"\n({a.shape[0] - n} more rows not shown)")
    return "\n".join(lines)


def plot_precision(models: Mapping[str, Mapping[str, Any]], chance: Mapping[str, float | None],
                   path: str | Path, title: str = "precision@1 (%)",
                   heading: str = "precision@1 per meta-task, IND, OOD and overall "
                                  "(dashed: chance)",
                   metrics: Sequence[str] | None = None) -> Path:
    """Grouped bars of precision@1 per meta-task, IND, OOD and overall, one bar per model,
    each bar without a CI whisker labelled with its value.

    Args:
        models: label → ``{metric: value}`` or ``{metric: {"mean": v, "ci95": [lo, hi]}}``
            (a CI draws a whisker; ``None`` values are skipped), in display order.
        chance: metric → chance level (a dashed line over that metric's bars).
        path: output file.
        title: y-axis label.
        heading: the figure's title.
        metrics: the metrics in order (default: the four meta-tasks, IND, OOD, overall);
            a ``/`` in a name breaks its tick label (``video/qa``).
    """
    plt = _plt()
    metrics = [m for m in (metrics or ("classification", "vqa", "retrieval", "grounding", "IND",
                                       "OOD", "overall"))
               if any(_value(v.get(m))[0] is not None for v in models.values())]
    labels = list(models)
    width = 0.8 / max(1, len(labels))
    # 16 in at most (a 13-metric, 4-model figure would be 29 in wide)
    fig_w = min(16.0, max(6.0, 1.1 * len(metrics) * max(1, len(labels)) ** 0.5))
    fig, ax = plt.subplots(figsize=(fig_w, 3.6))
    cmap = plt.get_cmap("tab10")
    for i, label in enumerate(labels):
        xs, ys, err = [], [], [[], []]
        for j, m in enumerate(metrics):
            mean, ci = _value(models[label].get(m))
            if mean is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            ys.append(mean)
            lo, hi = ci if ci is not None else (mean, mean)
            err[0].append(max(0.0, mean - lo))
            err[1].append(max(0.0, hi - mean))
        has_ci = any(e > 0 for e in err[0] + err[1])
        bars = ax.bar(xs, ys, width, label=label, color=cmap(i % 10),
                      yerr=np.array(err) if has_ci else None, capsize=2, error_kw={"lw": 0.8})
        if not has_ci:  # values on the bars (whiskers would cross them)
            ax.bar_label(bars, labels=[f"{y:.1f}" for y in ys], padding=1,
                         fontsize=6 if len(labels) < 5 else 5,
                         rotation=0 if len(labels) < 5 else 90)
    for j, m in enumerate(metrics):
        c = chance.get(m)
        if c is not None:
            ax.hlines(c, j - 0.45, j + 0.45, colors="k", linestyles="dashed", lw=0.9,
                      label="chance" if j == 0 else None)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([m.replace("/", "\n") for m in metrics], fontsize=8)
    ax.set_ylabel(title)
    ax.set_title(heading, fontsize=9)
    ax.margins(y=0.08)
    ax.legend(fontsize=7, ncol=min(4, len(labels) + 1), loc="upper left",
              bbox_to_anchor=(0.0, -0.12), frameon=False)
    return _save(fig, path)


def _value(v: Any) -> tuple[float | None, tuple[float, float] | None]:
    if v is None:
        return None, None
    if isinstance(v, Mapping):
        ci = v.get("ci95")
        return v.get("mean"), (tuple(ci) if ci else None)
    return float(v), None


def plot_gallery(gallery: Mapping[str, Any], path: str | Path) -> Path:
    """Draw :func:`fam.experiments.gallery.retrieval_gallery`'s (and
    :func:`~fam.experiments.gallery.media_gallery`'s) result: one row per query, the query
    first, then each model's top-k, the correct one (a relevant one: ``grade`` > 0) in green,
    wrong ones in red. Images are drawn, a video as a grid of its frames (in order, left to
    right, top to bottom), texts as text."""
    import textwrap

    plt = _plt()
    models, k = list(gallery["models"]), int(gallery["k"])
    blocks = [(d, gallery[d]) for d in ("t2i", "i2t", "video", "visdoc") if d in gallery]
    n_rows = sum(len(b["rows"]) for _, b in blocks)
    n_cols = 1 + len(models) * k
    height = 1.9 * n_rows + 0.4
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.7 * n_cols, height), squeeze=False)
    # The title's band is 0.4 in, whatever the number of rows (no empty band under it).
    fig.subplots_adjust(top=1 - 0.55 / height, bottom=0.02, hspace=0.5)

    def draw(ax: Any, item: Mapping[str, Any], width: int, colour: str = "k") -> str:
        if item.get("video"):
            ax.imshow(_frame_grid(item["video"]))
            return "video"
        if item.get("image"):
            from PIL import Image as PILImage
            ax.imshow(PILImage.open(item["image"]).convert("RGB"))
            return "image"
        ax.text(0.02, 0.5, textwrap.fill(item["text"], width), fontsize=6 if width > 22
                else 5.5, va="center", color=colour, transform=ax.transAxes)
        return "text"

    r = 0
    for _, block in blocks:
        for row in block["rows"]:
            digits = _tie_digits([cos for label in models for _, cos in row["top"][label]])
            what = draw(axes[r][0], row["query"], 24)
            axes[r][0].set_title(f"{block['dataset']}\nquery {what}", fontsize=7)
            for m, label in enumerate(models):
                for j, (idx, cos) in enumerate(row["top"][label]):
                    a = axes[r][1 + m * k + j]
                    cand = row["candidates"][idx]
                    ok = cand.get("grade", 1.0 if idx == 0 else 0.0) > 0
                    colour = "#1a7f37" if ok else "#cf222e"
                    draw(a, cand, 22, colour)
                    for s in a.spines.values():
                        s.set_visible(True)
                        s.set_edgecolor(colour)
                        s.set_linewidth(3 if ok else 1.5)
                    a.set_title(f"{label} #{j + 1} {'✓' if ok else '✗'}\n{cos:.{digits}f}",
                                fontsize=7, color=colour)
            r += 1
    for row_axes in axes:
        for a in row_axes:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(f"top-{k} retrievals (cosine), first rows of each dataset (green = correct)",
                 fontsize=8, y=1 - 0.12 / height, va="top")
    return _save(fig, path)


def _frame_grid(frames: Sequence[str | Path]) -> np.ndarray:
    """The frames a model sees (:func:`fam.data.video.sample`: 8 by index) as one image,
    four per row (two when there are at most four), 2-px white gaps."""
    from PIL import Image as PILImage

    from fam.data.video import sample
    shown = [np.asarray(PILImage.open(f).convert("RGB")) for f in sample(list(frames))]
    h, w = shown[0].shape[:2]
    cols = 4 if len(shown) > 4 else 2
    rows = math.ceil(len(shown) / cols)
    grid = np.full((rows * (h + 2) - 2, cols * (w + 2) - 2, 3), 255, dtype=np.uint8)
    for i, f in enumerate(shown):
        y, x = divmod(i, cols)
        grid[y * (h + 2):y * (h + 2) + h, x * (w + 2):x * (w + 2) + w] = f[:h, :w]
    return grid


def _tie_digits(values: Sequence[float], least: int = 2, most: int = 6) -> int:
    """Decimals that show different values differently (``least`` to ``most``), so two
    scores print alike only when they are tied (or differ below 10^-most)."""
    distinct = len(set(values))
    for d in range(least, most + 1):
        if len({round(v, d) for v in values}) == distinct:
            return d
    return most


def plot_token_maps(examples: Mapping[str, Mapping[str, Any]], image_root: str | Path,
                    path: str | Path, alpha: float = 0.55) -> Path:
    """MaxSim maps of one query over one image: a row per model, a column per query token
    (then their mean), each map min-max stretched over the image on its token grid.

    Args:
        examples: model label → ``{"image": path under image_root, "caption", "tokens":
            [n], "maps": (n, N) nested lists, "grid": [G_h, G_w], "box": the part of the
            image the grid covers, fractions (x0, y0, x1, y1), default the whole image}``
            (:func:`fam.experiments.multivector_study.map_check`'s ``example``).
        image_root: folder the images are relative to.
        path: output file.
    """
    from PIL import Image as PILImage

    plt = _plt()
    cols = max(len(e["tokens"]) for e in examples.values()) + 2
    rows = len(examples)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.8 * rows + 0.4), squeeze=False)
    first = next(iter(examples.values()))
    for r, (label, e) in enumerate(examples.items()):
        img = np.asarray(PILImage.open(Path(image_root) / e["image"]).convert("RGB"))
        h, w = img.shape[:2]
        gh, gw = e["grid"]
        maps = np.asarray(e["maps"], dtype=np.float32).reshape(-1, gh, gw)
        panels = [("image", None)] + list(zip(e["tokens"], maps)) + [("mean", maps.mean(0))]
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(panels):
                continue
            name, m = panels[c]
            ax.imshow(img)
            if m is not None:
                lo, hi = float(m.min()), float(m.max())
                m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
                x0, y0, x1, y1 = e.get("box", (0.0, 0.0, 1.0, 1.0))
                ax.imshow(m, cmap="jet", alpha=alpha, extent=(x0 * w, x1 * w, y1 * h, y0 * h),
                          interpolation="nearest", vmin=0.0, vmax=1.0)
            ax.set_title(f"'{name}'" if m is not None and name != "mean" else name, fontsize=8)
            if c == 0:
                ax.text(-0.08, 0.5, label, transform=ax.transAxes, rotation=90, va="center",
                        ha="right", fontsize=8)
    fig.suptitle(f"MaxSim maps of \"{first['caption']}\" over its image (query token × image "
                 "token similarity, min-max per map)", fontsize=9)
    return _save(fig, path)
