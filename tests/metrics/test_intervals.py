"""Fairness views against fairlearn; bootstrap intervals against a plain numpy bootstrap."""

import dcor
import numpy as np
import pytest
import torch
from fairlearn.metrics import MetricFrame
from fairlearn.metrics import equalized_odds_difference as fl_eod
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from metanorm.metrics import (
    balanced_accuracy_interval,
    bootstrap_interval,
    distance_correlation_sqr,
    equalized_odds_difference,
    group_accuracy_intervals,
    grouped_dcor_intervals,
    subsampling_interval,
    worst_group_accuracy,
)


def labels(seed, n=300):
    rng = np.random.default_rng(seed)
    groups = np.array(["site A", "site B", "site C"])[rng.integers(0, 3, size=n)]
    y = rng.integers(0, 2, size=n)
    flip = rng.random(n) < np.where(groups == "site C", 0.4, 0.15)
    return y, np.where(flip, 1 - y, y), groups


@pytest.mark.parametrize("seed", range(5))
def test_fairness_views_equal_fairlearn(seed):
    y, p, g = labels(seed)
    frame = MetricFrame(metrics=accuracy_score, y_true=y, y_pred=p, sensitive_features=g)
    assert worst_group_accuracy(y, p, g) == pytest.approx(frame.group_min(), abs=1e-15)
    assert equalized_odds_difference(y, p, g) == pytest.approx(
        fl_eod(y, p, sensitive_features=g), abs=1e-15
    )


def test_equalized_odds_needs_both_classes_in_every_group():
    with pytest.raises(ValueError, match="'b' with 2 positive and 0 negative"):
        equalized_odds_difference([0, 1, 1, 1], [0, 1, 1, 0], ["a", "a", "b", "b"])


def percentile_bootstrap(stat, n, strata, b, seed, confidence=0.95):
    # the documented procedure, written out: rows drawn within each stratum in sorted order
    rng = np.random.default_rng(seed)
    levels = np.unique(strata)
    values = []
    for _ in range(b):
        rows = np.concatenate(
            [
                np.flatnonzero(strata == lv)[
                    rng.integers(0, (strata == lv).sum(), (strata == lv).sum())
                ]
                for lv in levels
            ]
        )
        values.append(stat(rows))
    a = (1 - confidence) / 2
    return np.quantile(values, [a, 1 - a])


def test_balanced_accuracy_interval_is_the_stated_percentile_bootstrap():
    y, p, _ = labels(7)
    iv = balanced_accuracy_interval(y, p, num_resamples=300, seed=4)
    assert iv.estimate == pytest.approx(balanced_accuracy_score(y, p))
    low, high = percentile_bootstrap(
        lambda r: balanced_accuracy_score(y[r], p[r]), len(y), y, 300, 4
    )
    assert (iv.low, iv.high) == pytest.approx((low, high), abs=1e-12)
    assert iv.low < iv.estimate < iv.high
    assert (iv.num_resamples, iv.seed, iv.confidence) == (300, 4, 0.95)


def test_group_accuracy_intervals():
    y, p, g = labels(8)
    out = group_accuracy_intervals(y, p, g, num_resamples=200, seed=1)
    assert list(out) == ["site A", "site B", "site C"]
    for s, iv in out.items():
        hit = (y == p)[g == s].astype(float)
        low, high = percentile_bootstrap(
            lambda r, hit=hit: hit[r].mean(), len(hit), np.zeros(len(hit)), 200, 1
        )
        assert iv.estimate == pytest.approx(hit.mean())
        assert (iv.low, iv.high) == pytest.approx((low, high), abs=1e-12)


def test_grouped_dcor_intervals_cover_and_match_dcor():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 3))
    cls = np.arange(120) % 2
    cf = x[:, 0] * (1 + cls) + rng.normal(size=120)
    out = grouped_dcor_intervals(x, cf, cls, unbiased=True, num_resamples=40, seed=2)
    for c, iv in out.items():
        sel = cls == c
        assert iv.estimate == pytest.approx(dcor.u_distance_correlation_sqr(x[sel], cf[sel]))
        assert iv.low < iv.estimate < iv.high
    assert out[1].estimate > out[0].estimate


def test_bootstrap_interval_coverage_of_a_mean():
    # 95 % intervals of a normal mean cover the truth in about 95 % of 60 data sets
    covered = 0
    for seed in range(60):
        v = np.random.default_rng(seed).normal(size=80)
        iv = bootstrap_interval(lambda r, v=v: v[r].mean(), 80, num_resamples=300, seed=seed)
        covered += iv.low <= 0.0 <= iv.high
    assert covered >= 50  # expected 57; binomial(60, 0.95) is below 52 with probability ~0.3 %


def test_dcor_intervals_cover_the_estimate_under_independence():
    # a bootstrap's repeated rows are pairs at distance 0: on 2000 independent samples its 95 %
    # intervals of the bias-corrected dCor² were [0.021, 0.030], far above the estimate (0.0003)
    # and the truth (0); the subsampling interval contains both
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 20, generator=g, dtype=torch.float64)
    cf = torch.rand(600, 1, generator=g, dtype=torch.float64)
    cls = np.arange(600) % 2
    out = grouped_dcor_intervals(x, cf, cls, unbiased=True, num_resamples=40, seed=0)
    for iv in out.values():
        assert iv.low <= iv.estimate <= iv.high and iv.low <= 0.0 <= iv.high
        assert iv.high - iv.low < 0.05
    boot = bootstrap_interval(
        lambda r: float(distance_correlation_sqr(x[r], cf[r], unbiased=True)),
        600,
        num_resamples=20,
    )
    assert boot.low > boot.estimate  # the bias the subsampling interval avoids


def test_subsampling_interval_of_a_mean_covers():
    covered = 0
    for seed in range(40):
        v = np.random.default_rng(seed).normal(size=80)
        iv = subsampling_interval(lambda r, v=v: v[r].mean(), 80, num_resamples=200, seed=seed)
        covered += iv.low <= 0.0 <= iv.high
    assert covered >= 32  # expected about 38 (the half-sample spread approximates the full one)
    with pytest.raises(ValueError, match="at least 8 rows"):
        subsampling_interval(lambda r: 0.0, 5)
