"""Paired confidence intervals for arm-vs-arm comparisons over seeds (and items).

Every comparison of the projector study is *paired*: both arms share the seed (projector
initialisation and data order) and the evaluation items (images, regions, questions). Two
intervals for ``mean(B) − mean(A)``:

* :func:`paired_t_ci` — Student-t interval of the per-seed differences (the seed is the
  unit: answers "would another seed flip the sign?"). With 3 seeds ``t₀.₉₇₅,₂ = 4.30``.
* :func:`paired_bootstrap_ci` — hierarchical percentile bootstrap: resample seeds, then
  items within each seed, both arms with the same draws, so both the seed spread and the
  finite evaluation set count (the right interval for accuracies over a few hundred
  questions). With ``strata`` (e.g. MMEB datasets) items are resampled within their
  stratum and the statistic is the equal-weight mean over strata; with
  ``resample_seeds=False`` it isolates the evaluation noise (the ablation's "rows" interval).

The t quantile is computed here (no SciPy): bisection on the t CDF, integrated with
Simpson's rule on a substitution that keeps the tails finite.

Example:
    >>> round(t_quantile(0.975, 2), 3)
    4.303
    >>> paired_t_ci([0.1, 0.2, 0.3], [0.3, 0.35, 0.5])["mean"]
    0.18333333333333335
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["paired_bootstrap_ci", "paired_t_ci", "seeds_for_half_width", "t_cdf", "t_quantile"]


def _t_pdf(x: np.ndarray, df: float) -> np.ndarray:
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return np.exp(c - (df + 1) / 2 * np.log1p(x * x / df))


def t_cdf(x: float, df: float, n: int = 4000) -> float:
    """Student-t CDF, ``P(T ≤ x)``, by Simpson's rule on ``[0, |x|]`` after ``x = tan θ``
    (the density in θ is bounded, so the heavy df = 1 tail integrates accurately)."""
    if df <= 0:
        raise ValueError(f"df={df} must be > 0")
    a = math.atan(abs(x))
    if a == 0:
        return 0.5
    th = np.linspace(0.0, a, 2 * n + 1)
    f = _t_pdf(np.tan(th), df) / np.cos(th) ** 2
    h = a / (2 * n)
    area = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    return 0.5 + math.copysign(area, x)


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection)."""
    if not 0 < p < 1:
        raise ValueError(f"p={p} must be in (0, 1)")
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    target = max(p, 1 - p)
    while t_cdf(hi, df) < target:
        hi *= 2
    for _ in range(80):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < target:
            lo = mid
        else:
            hi = mid
    q = (lo + hi) / 2
    return q if p > 0.5 else -q


def paired_t_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """t interval of ``mean(b − a)`` over paired values (one pair per seed).

    Returns:
        ``mean``, ``lo``, ``hi``, ``sd`` (of the differences), ``n``; with one pair the
        interval is undefined (``lo = hi = NaN``).
    """
    a_, b_ = np.asarray(a, float), np.asarray(b, float)
    if a_.shape != b_.shape or a_.ndim != 1:
        raise ValueError(f"paired values need equal 1-d shapes, got {a_.shape} and {b_.shape}")
    d = b_ - a_
    n = d.size
    if n == 0:
        raise ValueError("no pairs")
    m = float(d.mean())
    if n < 2:
        return {"mean": m, "lo": float("nan"), "hi": float("nan"), "sd": float("nan"), "n": 1}
    sd = float(d.std(ddof=1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": m, "lo": m - half, "hi": m + half, "sd": sd, "n": n}


def seeds_for_half_width(sd: float, half_width: float, level: float = 0.95,
                         max_n: int = 100_000) -> int | None:
    """Fewest pairs ``n ≥ 2`` whose t interval is at most ``± half_width`` wide when the
    differences have standard deviation ``sd``: the budget that tells a difference of
    ``half_width`` from zero (the smallest ``n`` with ``t(level, n−1)·sd/√n ≤ half_width``).

    Returns ``None`` when even ``max_n`` pairs are not enough (or ``sd`` is not finite).
    """
    if half_width <= 0:
        raise ValueError(f"half_width={half_width} must be > 0")
    if not math.isfinite(sd) or sd < 0:
        return None

    def ok(n: int) -> bool:
        return t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n) <= half_width

    # The normal quantile is below t's for every n, so the normal-theory n is a lower bound;
    # t's excess shrinks fast with n, so a few steps up from it reach the answer (each
    # t quantile is a numeric integration: few calls matter).
    z = 1.959963984540054 if level == 0.95 else t_quantile(0.5 + level / 2, 1e6)
    n = max(2, math.ceil((z * sd / half_width) ** 2))
    if n > max_n:
        return None
    step = 1
    while not ok(n):
        lo = n
        n = min(max_n, n + step)
        step *= 2
        if n == max_n and not ok(n):
            return None
        if ok(n):
            # bisect between the last failing and the first passing n
            hi = n
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if ok(mid) else (mid, hi)
            return hi
    return n


def paired_bootstrap_ci(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]],
                        level: float = 0.95, n_boot: int = 2000, seed: int = 0, *,
                        strata: Sequence[Sequence[Any]] | None = None,
                        resample_seeds: bool = True) -> dict[str, float]:
    """Hierarchical paired bootstrap of ``mean(b) − mean(a)`` (seeds, then items).

    Args:
        a, b: per seed, the per-item values of arm A and arm B (same items in the same
            order for both arms of a seed; seeds may have different item counts).
        level: interval coverage.
        n_boot: bootstrap replicates.
        seed: resampling seed (the interval is deterministic given it).
        strata: per seed, a label per item (e.g. its evaluation dataset). Items are then
            resampled within their stratum and a seed's statistic is the mean over strata
            of the stratum means — MMEB's equal-weight aggregate over datasets.
        resample_seeds: also resample the seeds (both noise sources). False keeps every
            seed once: the interval of the evaluation noise alone (which rows the
            benchmark happens to contain), the models held fixed.

    Returns:
        ``mean`` (observed difference of the grand means), ``lo``, ``hi``, ``n_seeds``,
        ``n_items`` (total).
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same, non-zero number of seeds, got {len(a)} and {len(b)}")
    da = [np.asarray(x, float) for x in a]
    db = [np.asarray(x, float) for x in b]
    for i, (x, y) in enumerate(zip(da, db)):
        if x.shape != y.shape or x.ndim != 1 or x.size == 0:
            raise ValueError(f"seed {i}: arms must have the same non-empty items, got "
                             f"{x.shape} and {y.shape}")
    if strata is not None and len(strata) != len(da):
        raise ValueError(f"strata: {len(strata)} seeds for {len(da)}")
    diffs = [y - x for x, y in zip(da, db)]
    rng = np.random.default_rng(seed)
    alpha = (1 - level) / 2
    s = len(diffs)
    if strata is None and resample_seeds:
        observed = float(np.mean([d.mean() for d in diffs]))
        reps = np.empty(n_boot)
        for r in range(n_boot):
            picks = rng.integers(0, s, s)
            reps[r] = np.mean([diffs[i][rng.integers(0, diffs[i].size, diffs[i].size)].mean()
                               for i in picks])
    else:
        # Per seed: its statistic (mean over strata of stratum means) and n_boot resampled
        # values of it, items drawn within strata (vectorised: one draw per stratum).
        observed_s, reps_s = [], []
        for i, d in enumerate(diffs):
            labels = np.asarray(strata[i]) if strata is not None else np.zeros(d.size, int)
            if labels.shape != d.shape:
                raise ValueError(f"seed {i}: {labels.size} stratum labels for {d.size} items")
            groups = [d[labels == k] for k in dict.fromkeys(labels.tolist())]
            observed_s.append(np.mean([g.mean() for g in groups]))
            reps_s.append(np.mean([g[rng.integers(0, g.size, (n_boot, g.size))].mean(axis=1)
                                   for g in groups], axis=0))
        per_seed = np.stack(reps_s)  # (S, n_boot)
        observed = float(np.mean(observed_s))
        if resample_seeds:
            picks = rng.integers(0, s, (n_boot, s))
            reps = per_seed[picks, np.arange(n_boot)[:, None]].mean(axis=1)
        else:
            reps = per_seed.mean(axis=0)
    return {"mean": observed, "lo": float(np.quantile(reps, alpha)),
            "hi": float(np.quantile(reps, 1 - alpha)), "n_seeds": s,
            "n_items": int(sum(d.size for d in diffs))}
