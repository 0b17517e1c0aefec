"""Fairness views and bootstrap confidence intervals for the metrics.

- :func:`worst_group_accuracy` and :func:`equalized_odds_difference` (the definitions of
  fairlearn's ``MetricFrame(...).group_min()`` and ``equalized_odds_difference``);
- :func:`bootstrap_interval`: a percentile bootstrap interval of any statistic of the rows, and
  the ready-made :func:`balanced_accuracy_interval` and :func:`group_accuracy_intervals`;
- :func:`subsampling_interval` and :func:`grouped_dcor_intervals`: for distance statistics, which
  a bootstrap's repeated rows bias, intervals from half-samples without repeats.

Resampling draws the rows with replacement (within each group for the per-group statistics, so
every resample keeps the group sizes) from ``numpy.random.default_rng(seed)``; the interval is
the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles of the resampled values.
The result states the number of resamples, the confidence and the seed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from metanorm.metrics._inputs import as_labels, as_sample_pair, label_key
from metanorm.metrics.accuracy import _pair_labels, balanced_accuracy, group_accuracy
from metanorm.metrics.dcor import dcor_of_samples

__all__ = [
    "Interval",
    "balanced_accuracy_interval",
    "bootstrap_interval",
    "equalized_odds_difference",
    "group_accuracy_intervals",
    "grouped_dcor_intervals",
    "subsampling_interval",
    "worst_group_accuracy",
]


class Interval(NamedTuple):
    """A point estimate with its percentile bootstrap interval."""

    #: The statistic on the data.
    estimate: float
    #: Lower end of the interval.
    low: float
    #: Upper end of the interval.
    high: float
    #: Confidence level, e.g. 0.95.
    confidence: float
    #: Number of bootstrap resamples.
    num_resamples: int
    #: Seed of the resampling.
    seed: int


def _check(num_resamples: int, confidence: float) -> None:
    if isinstance(num_resamples, bool) or not isinstance(num_resamples, int) or num_resamples < 2:
        raise ValueError(f"expected num_resamples to be an integer >= 2, got {num_resamples!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"expected confidence in (0, 1), got {confidence!r}")


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    n: int,
    *,
    strata: np.ndarray | None = None,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``statistic(rows)`` over resampled row indices.

    Args:
        statistic: maps an index array (rows, with repeats) to a number.
        n: number of rows.
        strata: one label per row; rows are resampled within each label. Default: none.
        num_resamples: number of resamples. Default: 1000.
        confidence: level of the interval. Default: 0.95.
        seed: seed of ``numpy.random.default_rng``. Default: 0.

    Returns:
        :class:`Interval`; NaN resampled values are left out of the percentiles.

    Examples::

        >>> import numpy as np
        >>> v = np.arange(100.0)
        >>> iv = bootstrap_interval(lambda r: v[r].mean(), 100, num_resamples=200)
        >>> iv.low < 49.5 < iv.high
        True
    """
    _check(num_resamples, confidence)
    rng = np.random.default_rng(seed)
    if strata is None:
        groups = [np.arange(n)]
    else:
        _, inverse = np.unique(strata, return_inverse=True)
        inverse = inverse.reshape(-1)
        groups = [np.flatnonzero(inverse == k) for k in range(int(inverse.max()) + 1)]
    values = np.empty(num_resamples)
    for b in range(num_resamples):
        rows = np.concatenate([g[rng.integers(0, len(g), size=len(g))] for g in groups])
        values[b] = statistic(rows)
    alpha = (1.0 - confidence) / 2.0
    finite = values[np.isfinite(values)]
    low, high = np.quantile(finite, [alpha, 1.0 - alpha]) if finite.size else (np.nan, np.nan)
    return Interval(
        float(statistic(np.arange(n))), float(low), float(high), confidence, num_resamples, seed
    )


def worst_group_accuracy(y_true: Any, y_pred: Any, groups: Any) -> float:
    """The lowest accuracy over the groups (fairlearn: ``MetricFrame(...).group_min()``).

    Examples::

        >>> worst_group_accuracy([1, 1, 0, 0], [1, 0, 0, 0], ["a", "a", "b", "b"])
        0.5
    """
    return min(group_accuracy(y_true, y_pred, groups).values())


def equalized_odds_difference(
    y_true: Any, y_pred: Any, groups: Any, *, pos_label: Any = 1
) -> float:
    """The larger of the between-group ranges of the true- and false-positive rates.

    As fairlearn's ``equalized_odds_difference`` (its default ``agg="worst_case"``): for binary
    labels, ``max(max_g TPR_g - min_g TPR_g, max_g FPR_g - min_g FPR_g)``.

    Args:
        y_true: true labels, two classes.
        y_pred: predicted labels, same length.
        groups: group of each sample.
        pos_label: the positive class. Default: 1.

    Returns:
        A float in [0, 1].

    Raises:
        ValueError: when a group has no positive or no negative sample (a rate is undefined).
    """
    t, p = _pair_labels(y_true, y_pred)
    g = as_labels(groups, "groups", t.shape[0])
    pos_t, pos_p = t == pos_label, p == pos_label
    tpr, fpr = [], []
    for level in np.unique(g):
        sel = g == level
        npos, nneg = int((pos_t & sel).sum()), int((~pos_t & sel).sum())
        if npos == 0 or nneg == 0:
            raise ValueError(
                f"expected every group to have positive and negative samples, got group "
                f"{label_key(level)!r} with {npos} positive and {nneg} negative"
            )
        tpr.append((pos_p & pos_t & sel).sum() / npos)
        fpr.append((pos_p & ~pos_t & sel).sum() / nneg)
    return float(max(max(tpr) - min(tpr), max(fpr) - min(fpr)))


def balanced_accuracy_interval(
    y_true: Any,
    y_pred: Any,
    *,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Balanced accuracy with a percentile bootstrap interval (rows resampled within classes).

    Examples::

        >>> iv = balanced_accuracy_interval([0, 0, 1, 1] * 10, [0, 1, 1, 1] * 10, num_resamples=100)
        >>> iv.estimate, iv.low <= 0.75 <= iv.high, iv.num_resamples
        (0.75, True, 100)
    """
    t, p = _pair_labels(y_true, y_pred)
    return bootstrap_interval(
        lambda r: balanced_accuracy(t[r], p[r]),
        t.shape[0],
        strata=t,
        num_resamples=num_resamples,
        confidence=confidence,
        seed=seed,
    )


def group_accuracy_intervals(
    y_true: Any,
    y_pred: Any,
    groups: Any,
    *,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[Any, Interval]:
    """Accuracy of each group with a percentile bootstrap interval (rows resampled in the group).

    Returns:
        ``{group: Interval}``, groups in sorted order; each group uses ``seed``.
    """
    t, p = _pair_labels(y_true, y_pred)
    g = as_labels(groups, "groups", t.shape[0])
    out: dict[Any, Interval] = {}
    for level in np.unique(g):
        hit = (t == p)[g == level].astype(np.float64)

        def mean_hit(rows: np.ndarray, hit: np.ndarray = hit) -> float:
            return float(hit[rows].mean())

        out[label_key(level)] = bootstrap_interval(
            mean_hit,
            hit.shape[0],
            num_resamples=num_resamples,
            confidence=confidence,
            seed=seed,
        )
    return out


def grouped_dcor_intervals(
    x: Any,
    y: Any,
    groups: Any,
    *,
    unbiased: bool,
    categorical: bool | None = None,
    num_resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[Any, Interval]:
    """Per-group dCor² (exact) with subsampling intervals (half of the group's rows, no repeats).

    A bootstrap with repeated rows biases distance statistics (see :func:`subsampling_interval`).
    Each subsample costs one exact dCor² of half the group, so the default is 200 subsamples.

    Args:
        x: features, one row per sample.
        y: metadata (coded as :func:`~metanorm.metrics.distance_correlation_sqr` does).
        groups: one label per row (e.g. the class).
        unbiased: the estimator; pass it explicitly.
        categorical: see :func:`~metanorm.metrics.distance_correlation_sqr`.
        num_resamples: number of resamples per group. Default: 200.
        confidence: level. Default: 0.95.
        seed: seed of the resampling (every group uses it). Default: 0.

    Returns:
        ``{group: Interval}``, groups in sorted order; a group of fewer than 8 rows gets NaN
        bounds.
    """
    a, b = as_sample_pair(x, y, None, categorical=categorical)
    g = as_labels(groups, "groups", a.shape[0])
    out = {}
    for level in np.unique(g):
        sel = torch.from_numpy(np.flatnonzero(g == level)).to(a.device)
        ag, bg = a[sel], b[sel]
        if ag.shape[0] < 8:  # too few rows for half-samples: NaN (the estimate if defined)
            nan = float("nan")
            est = (
                nan if unbiased and ag.shape[0] <= 3 else dcor_of_samples(ag, bg, unbiased=unbiased)
            )
            out[label_key(level)] = Interval(est, nan, nan, confidence, num_resamples, seed)
            continue

        def stat(rows: np.ndarray, ag: torch.Tensor = ag, bg: torch.Tensor = bg) -> float:
            idx = torch.from_numpy(rows).to(ag.device)
            return dcor_of_samples(ag[idx], bg[idx], unbiased=unbiased)

        out[label_key(level)] = subsampling_interval(
            stat, ag.shape[0], num_resamples=num_resamples, confidence=confidence, seed=seed
        )
    return out


def subsampling_interval(
    statistic: Callable[[np.ndarray], float],
    n: int,
    *,
    num_resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    r"""Subsampling interval (Politis & Romano) of ``statistic(rows)``: half-samples, no repeats.

    A bootstrap resample repeats rows, and a repeated row is a pair at distance 0: distance
    statistics such as dCor² are strongly biased on such resamples (under independence the
    resampled bias-corrected dCor² sits far above the estimate). Subsampling draws
    :math:`m = \lfloor n/2 \rfloor` distinct rows; with :math:`\hat\theta` the estimate and
    :math:`q_a` the quantiles of :math:`\theta^*_m - \hat\theta`, the interval is
    :math:`[\hat\theta - \sqrt{m/n}\, q_{1-\alpha/2},\; \hat\theta - \sqrt{m/n}\, q_{\alpha/2}]`
    (the :math:`\sqrt n` rate of a dependent pair; under independence the statistic converges
    faster, so the interval is conservative there).

    Args:
        statistic: maps an index array (distinct rows) to a number.
        n: number of rows (at least 8).
        num_resamples: number of subsamples. Default: 200.
        confidence: level of the interval. Default: 0.95.
        seed: seed of ``numpy.random.default_rng``. Default: 0.

    Returns:
        :class:`Interval` (its ``num_resamples`` is the number of subsamples).
    """
    _check(num_resamples, confidence)
    if n < 8:
        raise ValueError(f"expected at least 8 rows for a subsampling interval, got {n}")
    rng = np.random.default_rng(seed)
    m = n // 2
    estimate = float(statistic(np.arange(n)))
    values = np.empty(num_resamples)
    for b in range(num_resamples):
        values[b] = statistic(np.sort(rng.choice(n, size=m, replace=False)))
    alpha = (1.0 - confidence) / 2.0
    finite = values[np.isfinite(values)] - estimate
    if not finite.size:
        return Interval(estimate, np.nan, np.nan, confidence, num_resamples, seed)
    q_low, q_high = np.quantile(finite, [alpha, 1.0 - alpha])
    scale = float(np.sqrt(m / n))
    return Interval(
        estimate,
        float(estimate - scale * q_high),
        float(estimate - scale * q_low),
        confidence,
        num_resamples,
        seed,
    )
