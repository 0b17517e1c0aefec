"""Bias and accuracy metrics: how much metadata the features still encode, and fairness views.

Functions:

- :func:`distance_correlation_sqr`: squared distance correlation, biased or bias-corrected,
  blocked (memory O(n · block)), float64, on the input's device (:mod:`metanorm.metrics.dcor`);
- :func:`grouped_distance_correlation_sqr`: the same within each group (e.g. each label class);
- :func:`distance_correlation_test`: permutation p-value for independence
  (:mod:`metanorm.metrics.permutation`);
- :func:`balanced_accuracy` and :func:`group_accuracy` (:mod:`metanorm.metrics.accuracy`);
- :func:`worst_group_accuracy`, :func:`equalized_odds_difference` and bootstrap intervals:
  :func:`balanced_accuracy_interval`, :func:`group_accuracy_intervals`,
  :func:`grouped_dcor_intervals`, :func:`bootstrap_interval`, :func:`subsampling_interval`
  (:mod:`metanorm.metrics.intervals`).

Accumulating forms for evaluation loops (:mod:`metanorm.metrics.metric`), each with
``update`` / ``compute`` / ``reset``: :class:`DistanceCorrelationSqr`,
:class:`GroupedDistanceCorrelationSqr`, :class:`BalancedAccuracy`, :class:`GroupAccuracy`.
"""

from metanorm.metrics._distance import DEFAULT_MAX_MEMORY
from metanorm.metrics.accuracy import balanced_accuracy, group_accuracy
from metanorm.metrics.dcor import (
    DcorEstimate,
    distance_correlation_sqr,
    grouped_distance_correlation_sqr,
)
from metanorm.metrics.intervals import (
    Interval,
    balanced_accuracy_interval,
    bootstrap_interval,
    equalized_odds_difference,
    group_accuracy_intervals,
    grouped_dcor_intervals,
    subsampling_interval,
    worst_group_accuracy,
)
from metanorm.metrics.metric import (
    BalancedAccuracy,
    DistanceCorrelationSqr,
    GroupAccuracy,
    GroupedDistanceCorrelationSqr,
)
from metanorm.metrics.permutation import DistanceCorrelationTestResult, distance_correlation_test

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "BalancedAccuracy",
    "DcorEstimate",
    "DistanceCorrelationSqr",
    "DistanceCorrelationTestResult",
    "GroupAccuracy",
    "GroupedDistanceCorrelationSqr",
    "Interval",
    "balanced_accuracy",
    "balanced_accuracy_interval",
    "bootstrap_interval",
    "distance_correlation_sqr",
    "distance_correlation_test",
    "equalized_odds_difference",
    "group_accuracy",
    "group_accuracy_intervals",
    "grouped_dcor_intervals",
    "grouped_distance_correlation_sqr",
    "subsampling_interval",
    "worst_group_accuracy",
]
