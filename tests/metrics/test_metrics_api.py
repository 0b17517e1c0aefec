"""The public contract of ``metanorm.metrics``: its exports and how they are called."""

import numpy as np
import pytest

import metanorm as mn


def test_exports():
    assert set(mn.metrics.__all__) == {
        "DEFAULT_MAX_MEMORY",
        "BalancedAccuracy",
        "DcorEstimate",
        "Interval",
        "DistanceCorrelationSqr",
        "DistanceCorrelationTestResult",
        "GroupAccuracy",
        "GroupedDistanceCorrelationSqr",
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
    }
    for name in mn.metrics.__all__:
        assert getattr(mn.metrics, name) is not None
    assert mn.metrics.DEFAULT_MAX_MEMORY == 256 * 2**20


def test_contract_calls():
    x = np.arange(10.0)
    assert mn.metrics.distance_correlation_sqr(x, 2 * x, unbiased=False) == pytest.approx(1.0)
    assert mn.metrics.balanced_accuracy([0, 1, 1], [0, 1, 0]) == pytest.approx(0.75)
