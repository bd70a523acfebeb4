"""Paired t intervals over seeds and the paired bootstrap over eval rows (fam.eval.stats)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fam.eval.metrics import aggregate
from fam.eval.stats import group_members, paired_bootstrap, paired_t, t_quantile


def test_t_quantiles_match_tables():
    # Student-t table, two-sided 95 %: df 1, 2, 4, 30.
    for df, want in [(1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042)]:
        assert t_quantile(0.975, df) == pytest.approx(want, abs=1e-3)


def test_paired_t_interval():
    d = [1.0, 2.0, 3.0]
    r = paired_t(d)
    half = 4.302653 * 1.0 / math.sqrt(3)  # sd = 1
    assert r["mean"] == 2.0 and r["sd"] == pytest.approx(1.0) and r["n"] == 3
    assert r["ci95"] == pytest.approx([2.0 - half, 2.0 + half], rel=1e-6)
    assert paired_t([0.5])["ci95"] is None and paired_t([0.5])["mean"] == 0.5
    assert paired_t([])["mean"] is None


DATASETS = {"A": {"meta_task": "retrieval", "split": "IND"},
            "B": {"meta_task": "retrieval", "split": "OOD"},
            "C": {"meta_task": "grounding", "split": "IND"}}


def _credits(rng, n_rows, p):
    return {k: (rng.random(n_rows[k]) < p).astype(float).tolist() for k in DATASETS}


def test_group_members_match_aggregate():
    groups = group_members(DATASETS)
    assert sorted(groups) == ["IND", "OOD", "grounding", "overall", "retrieval"]
    rng = np.random.default_rng(0)
    cr = _credits(rng, {"A": 30, "B": 20, "C": 10}, 0.5)
    scores = {k: 100 * float(np.mean(v)) for k, v in cr.items()}
    infos_free = {g: float(np.mean([scores[n] for n in m])) for g, m in groups.items()}
    from fam.data.mmeb import DatasetInfo
    infos = {k: DatasetInfo(k, v["meta_task"], v["split"]) for k, v in DATASETS.items()}
    agg = aggregate(scores, infos)
    assert infos_free["overall"] == pytest.approx(agg["overall"])
    assert infos_free["IND"] == pytest.approx(agg["IND"])
    assert infos_free["retrieval"] == pytest.approx(agg["meta_task"]["retrieval"])


def test_paired_bootstrap_observed_mean_and_coverage():
    rng = np.random.default_rng(1)
    n_rows = {"A": 200, "B": 200, "C": 200}
    a = [_credits(rng, n_rows, 0.6) for _ in range(3)]
    b = [_credits(rng, n_rows, 0.4) for _ in range(3)]
    groups = group_members(DATASETS)
    r = paired_bootstrap(a, b, groups, n_boot=500, seed=0)
    obs = 100 * np.mean([np.mean([np.mean(a[s][k]) - np.mean(b[s][k]) for s in range(3)])
                         for k in DATASETS])
    assert r["overall"]["mean"] == pytest.approx(obs)
    lo, hi = r["overall"]["ci95"]
    assert lo < obs < hi and lo > 0  # a 20-point gap over 600 rows/seed is clearly positive
    # Identical models: every replicate's difference is exactly 0.
    z = paired_bootstrap(a, a, groups, n_boot=50)
    assert z["overall"] == {"mean": 0.0, "sd": 0.0, "ci95": [0.0, 0.0]}
    with pytest.raises(ValueError, match="same rows"):
        paired_bootstrap(a, [{**b[0], "A": b[0]["A"][:-1]}] + b[1:], groups)
    with pytest.raises(ValueError, match="same seeds"):
        paired_bootstrap(a, b[:2], groups)
    # Same seed of the resampling: reproducible.
    assert paired_bootstrap(a, b, groups, n_boot=100, seed=3) == \
        paired_bootstrap(a, b, groups, n_boot=100, seed=3)
