"""Paired CIs: t quantiles against published table values, hand-computed intervals."""
import math

import numpy as np
import pytest

from fam.analysis.stats import (paired_bootstrap_ci, paired_t_ci, seeds_for_half_width, t_cdf,
                                t_quantile)


@pytest.mark.parametrize("df,q", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764),
                                  (9, 2.2622), (29, 2.0452)])
def test_t_quantile_matches_the_table(df, q):
    # two-sided 95 % critical values of Student's t (any statistics table, 4 decimals)
    assert t_quantile(0.975, df) == pytest.approx(q, abs=2e-4)
    # the table gives 4 decimals: half a unit in the last place is 5e-5; 2e-4 also covers the bisection
    assert t_quantile(0.025, df) == pytest.approx(-q, abs=2e-4)


def test_t_cdf_limits():
    assert t_cdf(0.0, 3) == 0.5
    # df = 1 is the Cauchy distribution: CDF = 1/2 + atan(x)/π exactly
    for x in (-3.0, 0.5, 10.0):
        # Simpson's rule in θ = atan x: for df = 1 the integrand is constant, only float64 rounding is left
        assert t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-9)
    # large df → normal
    assert t_quantile(0.975, 10_000) == pytest.approx(1.95996, abs=1e-3)


def test_paired_t_ci_hand_computed():
    a, b = [0.1, 0.2, 0.3], [0.3, 0.35, 0.5]
    d = np.array([0.2, 0.15, 0.2])
    r = paired_t_ci(a, b)
    half = 4.302653 * d.std(ddof=1) / math.sqrt(3)
    assert r["mean"] == pytest.approx(d.mean())
    # the hand value uses the 7-digit table quantile 4.302653 (±5e-7 × s/√3)
    assert r["lo"] == pytest.approx(d.mean() - half, abs=1e-5)
    # the hand value uses the 7-digit table quantile 4.302653 (±5e-7 × s/√3)
    assert r["hi"] == pytest.approx(d.mean() + half, abs=1e-5)
    one = paired_t_ci([1.0], [2.0])
    assert one["mean"] == 1.0 and math.isnan(one["lo"])
    with pytest.raises(ValueError, match="equal 1-d"):
        paired_t_ci([1, 2], [1])


def test_paired_bootstrap_constant_difference_has_zero_width():
    a = [np.array([0.0, 1.0, 0.0, 1.0]), np.array([1.0, 1.0, 0.0])]
    b = [x + 0.25 for x in a]
    r = paired_bootstrap_ci(a, b, n_boot=200)
    assert r["mean"] == pytest.approx(0.25)
    assert r["lo"] == pytest.approx(0.25) and r["hi"] == pytest.approx(0.25)
    assert r["n_seeds"] == 2 and r["n_items"] == 7


def test_paired_bootstrap_covers_the_truth_and_is_deterministic():
    rng = np.random.default_rng(0)
    a = [rng.random(300) < 0.5 for _ in range(3)]
    b = [rng.random(300) < 0.6 for _ in range(3)]
    r1 = paired_bootstrap_ci(a, b, n_boot=500, seed=1)
    r2 = paired_bootstrap_ci(a, b, n_boot=500, seed=1)
    assert r1 == r2
    assert r1["lo"] < r1["mean"] < r1["hi"]
    assert r1["lo"] < 0.1 < r1["hi"]       # the true difference of the two rates
    with pytest.raises(ValueError, match="same non-empty items"):
        paired_bootstrap_ci([np.ones(3)], [np.ones(2)])


def test_stratified_bootstrap_is_the_equal_weight_aggregate_of_the_evaluation_noise():
    """Strata (MMEB datasets of different sizes): the statistic is the mean of the stratum
    means; with the seeds fixed only the rows are resampled (the ablation's "rows" interval)."""
    rng = np.random.default_rng(2)
    sizes = {"A": 40, "B": 200, "C": 100}
    labels = [k for k, n in sizes.items() for _ in range(n)]
    a = [np.concatenate([rng.random(n) < 0.4 for n in sizes.values()]).astype(float)
         for _ in range(3)]
    b = [np.concatenate([rng.random(n) < p for n, p in zip(sizes.values(), (0.9, 0.5, 0.5))])
         .astype(float) for _ in range(3)]
    r = paired_bootstrap_ci(a, b, n_boot=400, strata=[labels] * 3, resample_seeds=False)
    lab = np.array(labels)
    want = np.mean([np.mean([(y - x)[lab == k].mean() for k in sizes]) for x, y in zip(a, b)])
    assert r["mean"] == pytest.approx(want)  # equal weight per stratum, not per row
    assert r["mean"] != pytest.approx(np.mean([(y - x).mean() for x, y in zip(a, b)]))
    assert r["lo"] < r["mean"] < r["hi"] and r["lo"] > 0
    # identical arms: every replicate's difference is exactly zero
    z = paired_bootstrap_ci(a, a, n_boot=50, strata=[labels] * 3, resample_seeds=False)
    assert z["lo"] == z["hi"] == 0.0
    both = paired_bootstrap_ci(a, b, n_boot=400, strata=[labels] * 3, resample_seeds=True)
    assert both["mean"] == pytest.approx(want)
    with pytest.raises(ValueError, match="stratum labels"):
        paired_bootstrap_ci(a, b, strata=[labels[:-1]] * 3)
    with pytest.raises(ValueError, match="strata"):
        paired_bootstrap_ci(a, b, strata=[labels] * 2)


@pytest.mark.parametrize("sd,half", [(2.3, 1.0), (2.3, 2.0), (1.0, 1.0), (0.1, 1.0), (5.0, 1.0),
                                     (3.0, 0.5), (0.0, 1.0)])
def test_seeds_for_half_width_is_the_smallest_sufficient_n(sd, half):
    # n is enough and n − 1 is not (the half-width t(n−1)·sd/√n falls with n, so this is
    # the first sufficient n).
    n = seeds_for_half_width(sd, half)
    assert t_quantile(0.975, n - 1) * sd / math.sqrt(n) <= half
    if n > 2:
        assert t_quantile(0.975, n - 2) * sd / math.sqrt(n - 1) > half


def test_seeds_for_half_width_hand_values_and_limits():
    # sd 2.3 (the MAC-only overall spread): n = 23 gives t(22) = 2.0739,
    # 2.0739 · 2.3 / √23 = 0.9946 ≤ 1, while n = 22 gives 2.0796 · 2.3 / √22 = 1.0198 > 1.
    assert seeds_for_half_width(2.3, 1.0) == 23
    assert seeds_for_half_width(50.0, 0.01, max_n=1000) is None
    assert seeds_for_half_width(float("nan"), 1.0) is None
    with pytest.raises(ValueError):
        seeds_for_half_width(1.0, 0.0)
