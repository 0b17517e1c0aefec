"""Bias and accuracy metrics: how much metadata the features still encode, and fairness views.

Functionals (:mod:`metanorm.metrics.functional`):

- :func:`distance_correlation_sqr`: squared distance correlation, biased or bias-corrected,
  blocked (memory O(n · block)), float64, on the input's device;
- :func:`grouped_distance_correlation_sqr`: the same within each group (e.g. each label class);
- :func:`distance_correlation_test`: permutation p-value for independence;
- :func:`balanced_accuracy` and :func:`group_accuracy`.

Accumulating forms for evaluation loops (:mod:`metanorm.metrics.metric`), each with
``update`` / ``compute`` / ``reset``: :class:`DistanceCorrelationSqr`,
:class:`GroupedDistanceCorrelationSqr`, :class:`BalancedAccuracy`, :class:`GroupAccuracy`.
"""

from metanorm.metrics.functional import (
    DEFAULT_MAX_MEMORY,
    DistanceCorrelationTestResult,
    balanced_accuracy,
    distance_correlation_sqr,
    distance_correlation_test,
    group_accuracy,
    grouped_distance_correlation_sqr,
)
from metanorm.metrics.metric import (
    BalancedAccuracy,
    DistanceCorrelationSqr,
    GroupAccuracy,
    GroupedDistanceCorrelationSqr,
)

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
