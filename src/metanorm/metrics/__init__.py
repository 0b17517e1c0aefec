"""Bias and accuracy metrics: how much metadata the features still encode, and fairness views.

Functions:

- :func:`distance_correlation_sqr`: squared distance correlation, biased or bias-corrected,
  blocked (memory O(n · block)), float64, on the input's device (:mod:`metanorm.metrics.dcor`);
- :func:`grouped_distance_correlation_sqr`: the same within each group (e.g. each label class);
- :func:`distance_correlation_test`: permutation p-value for independence
  (:mod:`metanorm.metrics.permutation`);
- :func:`balanced_accuracy` and :func:`group_accuracy` (:mod:`metanorm.metrics.accuracy`).

Accumulating forms for evaluation loops (:mod:`metanorm.metrics.metric`), each with
``update`` / ``compute`` / ``reset``: :class:`DistanceCorrelationSqr`,
:class:`GroupedDistanceCorrelationSqr`, :class:`BalancedAccuracy`, :class:`GroupAccuracy`.
"""

from metanorm.metrics._distance import DEFAULT_MAX_MEMORY
from metanorm.metrics.accuracy import balanced_accuracy, group_accuracy
from metanorm.metrics.dcor import distance_correlation_sqr, grouped_distance_correlation_sqr
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
    "DistanceCorrelationSqr",
    "DistanceCorrelationTestResult",
    "GroupAccuracy",
    "GroupedDistanceCorrelationSqr",
    "balanced_accuracy",
    "distance_correlation_sqr",
    "distance_correlation_test",
    "group_accuracy",
    "grouped_distance_correlation_sqr",
]
