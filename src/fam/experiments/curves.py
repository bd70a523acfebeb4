"""Training curves of experiment runs, side by side (``fam ablate --sweep``'s report, or
:func:`curves_of_ablation` for an ablation folder).

Every stage writes its curve to ``train_metrics.json``'s ``history`` (one point per
:data:`fam.train.trainer.CURVE_EVERY` steps: the loss terms, in-batch accuracy, the
embedding-geometry gauges of :func:`fam.losses.contrastive.embedding_geometry`, the
gradient norm before clipping and the learning rate). This module collects them per
(point or group, config, seed), writes them as JSON, a markdown summary (each curve at a few
steps) and a figure (one panel per gauge, one line per run).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from fam.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["GAUGES", "load_curve", "write_curves", "format_curves", "plot_curves"]

#: The gauges summarised and plotted (keys of a history point), in panel order.
GAUGES: tuple[str, ...] = ("task_loss", "accuracy", "grad_norm", "q_anisotropy",
                           "t_anisotropy", "q_eff_rank", "pos_cos", "neg_cos")


def load_curve(run_dir: Path) -> list[dict[str, float]]:
    """The ``history`` of ``<run_dir>/train_metrics.json`` ([] when absent or older)."""
    f = Path(run_dir) / "train_metrics.json"
    if not f.exists():
        return []
    return list(json.loads(f.read_text()).get("history") or [])


def _at(curve: Sequence[Mapping[str, float]], frac: float) -> Mapping[str, float]:
    """The curve point nearest to ``frac`` of the run's steps."""
    last = curve[-1]["step"]
    return min(curve, key=lambda p: abs(p["step"] - frac * last))


def format_curves(curves: Mapping[tuple[str, str, int], Sequence[Mapping[str, float]]],
                  fractions: Sequence[float] = (0.0, 0.1, 0.25, 0.5, 1.0)) -> str:
    """Markdown: per gauge, one row per run, the gauge at a few fractions of its steps
    (the nearest curve point), and the maximum gradient norm over the run."""
    runs = [k for k in sorted(curves) if curves[k]]
    if not runs:
        return "No training curves (runs from before the trainer recorded them).\n"
    lines = ["Training curves: each value is the mean over the "
             "10 steps ending at the step shown (fractions of the run's steps).", ""]
    for g in GAUGES:
        if not any(g in p for k in runs for p in curves[k]):
            continue
        steps = [int(_at(curves[runs[0]], f)["step"]) for f in fractions]
        lines += [f"### {g}", "", "| point | config | seed | " +
                  " | ".join(f"step {s}" for s in steps) + (" | max |" if g == "grad_norm"
                                                             else " |"),
                  "|---|---|---|" + "---|" * (len(steps) + (g == "grad_norm"))]
        for k in runs:
            c = curves[k]
            vals = [_at(c, f).get(g) for f in fractions]
            row = f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(
                "-" if v is None else f"{v:.3g}" for v in vals)
            if g == "grad_norm":
                row += f" | {max(p.get(g, 0.0) for p in c):.3g}"
            lines.append(row + " |")
        lines.append("")
    return "\n".join(lines)


def plot_curves(curves: Mapping[tuple[str, str, int], Sequence[Mapping[str, float]]],
                path: Path) -> Path | None:
    """One panel per gauge; colour = seed, line style = config, one column per point.
    ``None`` without matplotlib (the ``plots`` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - optional extra
        log.warning("matplotlib not installed: no curve figure (pip install fam[plots])")
        return None
    runs = [k for k in sorted(curves) if curves[k]]
    if not runs:
        return None
    points = list(dict.fromkeys(k[0] for k in runs))
    configs = list(dict.fromkeys(k[1] for k in runs))
    seeds = sorted({k[2] for k in runs})
    gauges = [g for g in GAUGES if any(g in p for k in runs for p in curves[k])]
    styles = ["-", "--", ":", "-."]
    # One point: its gauges in two columns; several: one column of gauges per point.
    wrap = 2 if len(points) == 1 else 1
    rows = -(-len(gauges) // wrap)
    fig, axes = plt.subplots(rows, len(points) * wrap, squeeze=False,
                             figsize=(3.2 * len(points) * wrap + 1, 1.9 * rows), sharex="col")
    cmap = plt.get_cmap("tab10")
    for a in axes.flat[len(gauges):] if wrap > 1 else []:
        a.set_visible(False)
    for j, pt in enumerate(points):
        for n, g in enumerate(gauges):
            i, col = (n // wrap, n % wrap) if wrap > 1 else (n, j)
            ax = axes[i][col]
            for k in runs:
                if k[0] != pt:
                    continue
                c = [p for p in curves[k] if g in p]
                ax.plot([p["step"] for p in c], [p[g] for p in c],
                        styles[configs.index(k[1]) % len(styles)],
                        color=cmap(seeds.index(k[2]) % 10), lw=1,
                        label=f"{k[1]} s{k[2]}")
            ax.set_ylabel(g, fontsize=8)
            if i == 0:
                ax.set_title(pt, fontsize=9)
            if g == "grad_norm":
                ax.set_yscale("log")
            ax.tick_params(labelsize=7)
            if i == rows - 1 or n + wrap >= len(gauges):
                ax.set_xlabel("step", fontsize=8)
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_curves(out: Path, name: str, run_dirs: Mapping[tuple[str, str, int], Path]
                 ) -> dict[str, Any]:
    """``<out>/<name>.json`` (every curve), ``.md`` (:func:`format_curves`) and ``.png``
    (:func:`plot_curves`) for ``{(point, config, seed): run folder}``."""
    curves = {k: load_curve(d) for k, d in run_dirs.items()}
    data = {"curves": [{"point": k[0], "config": k[1], "seed": k[2], "history": v}
                       for k, v in sorted(curves.items())]}
    atomic_write_json(out / f"{name}.json", data)
    atomic_write_text(out / f"{name}.md", format_curves(curves))
    png = plot_curves(curves, out / f"{name}.png")
    data["plot"] = str(png) if png else None
    return data
