"""Uncertainty of precision@1 differences between models: over seeds and over eval rows.

Two sources of noise separate a measured difference from the true one:

- **Training noise** (seed to seed): each seed gives one paired difference ``d_s`` between
  two configurations trained from the same stage-0 model. :func:`paired_t` reports their
  mean with a Student-t 95 % interval, ``d̄ ± t_{0.975, n−1} · sd / √n`` (paired by seed).
- **Evaluation noise** (which rows the benchmark happens to contain): with the models
  fixed, :func:`paired_bootstrap` resamples each dataset's eval rows with replacement —
  the same rows for both models of a seed, so the difference stays paired — recomputes the
  MMEB aggregates (equal-weight means of dataset means, as :func:`fam.eval.metrics.aggregate`)
  and averages the difference over seeds; the 2.5 / 97.5 percentiles of the replicates are
  the interval.

The t interval already contains the evaluation noise of each seed's run; the bootstrap
isolates it (a bootstrap interval almost as wide as the t interval means more eval rows,
not more seeds, would narrow it).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["paired_t", "paired_bootstrap", "group_members", "t_quantile"]

#: Aggregates reported by MMEB besides the meta-tasks.
SPLITS = ("IND", "OOD", "overall")


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (scipy.stats)."""
    from scipy import stats  # the training extra; only the ablation report needs it
    return float(stats.t.ppf(p, df))


def paired_t(diffs: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean of paired differences with a t-based confidence interval.

    Args:
        diffs: one difference per seed (same seed, same stage-0 model, two configs).
        level: confidence level.

    Returns:
        ``{"mean", "sd", "n", "ci95": [lo, hi]}`` (``sd`` and ``ci95`` are None with one
        seed: no interval can be estimated).
    """
    x = np.asarray([float(d) for d in diffs], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"mean": None, "sd": None, "n": 0, "ci95": None}
    mean = float(x.mean())
    if n < 2:
        return {"mean": mean, "sd": None, "n": n, "ci95": None}
    sd = float(x.std(ddof=1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "ci95": [mean - half, mean + half]}


def group_members(datasets: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """``{meta_task | "IND" | "OOD" | "overall": [dataset, ...]}`` from a results dict's
    ``datasets`` block (each entry carries ``meta_task`` and ``split``)."""
    groups: dict[str, list[str]] = {}
    for name, d in datasets.items():
        for g in (d["meta_task"], d["split"], "overall"):
            groups.setdefault(g, []).append(name)
    return groups


def paired_bootstrap(credits_a: Sequence[Mapping[str, Sequence[float]]],
                     credits_b: Sequence[Mapping[str, Sequence[float]]],
                     groups: Mapping[str, Sequence[str]], n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, dict[str, Any]]:
    """Bootstrap over eval rows of the seed-averaged difference ``A − B`` per aggregate.

    Args:
        credits_a, credits_b: one entry per seed (paired: same position = same seed);
            each ``{dataset: per-row precision@1 credits in [0, 1]}`` with the same rows
            in the same order for A and B.
        groups: aggregate name → its datasets (see :func:`group_members`).
        n_boot: bootstrap replicates.
        seed: RNG seed of the resampling (the report is reproducible).
        level: interval level.

    Returns:
        ``{group: {"mean": Δ in points, "sd": bootstrap sd, "ci95": [lo, hi]}}``; ``mean``
        is the observed (not resampled) seed-averaged difference.

    Raises:
        ValueError: unpaired inputs (seed counts or row counts differ).
    """
    if len(credits_a) != len(credits_b) or not credits_a:
        raise ValueError(f"paired_bootstrap: {len(credits_a)} vs {len(credits_b)} seeds; "
                         "give the same seeds for both configs")
    rng = np.random.default_rng(seed)
    names = sorted({n for g in groups.values() for n in g})
    # (seeds, boot) dataset means of A − B, per dataset; and the observed ones.
    boot: dict[str, np.ndarray] = {}
    observed: dict[str, np.ndarray] = {}
    for name in names:
        reps, obs = [], []
        for a_s, b_s in zip(credits_a, credits_b):
            a = np.asarray(a_s[name], dtype=np.float64)
            b = np.asarray(b_s[name], dtype=np.float64)
            if a.shape != b.shape or a.ndim != 1 or a.size == 0:
                raise ValueError(f"paired_bootstrap: dataset {name!r} has {a.shape} vs {b.shape} "
                                 "rows; both configs must be scored on the same rows")
            idx = rng.integers(0, a.size, size=(n_boot, a.size))
            reps.append((a[idx] - b[idx]).mean(axis=1))
            obs.append((a - b).mean())
        boot[name] = np.stack(reps)  # (S, R)
        observed[name] = np.asarray(obs)  # (S,)
    out: dict[str, dict[str, Any]] = {}
    lo_q, hi_q = 50 * (1 - level), 50 * (1 + level)
    for g, members in groups.items():
        if not members:
            continue
        rep = 100.0 * np.mean([boot[n] for n in members], axis=0).mean(axis=0)  # (R,)
        obs = 100.0 * float(np.mean([observed[n] for n in members], axis=0).mean())
        out[g] = {"mean": obs, "sd": float(rep.std(ddof=1)),
                  "ci95": [float(np.percentile(rep, lo_q)), float(np.percentile(rep, hi_q))]}
    return out
