"""The public contract of ``metanorm.metrics``: its exports and how they are called."""

import numpy as np
import pytest

import metanorm as mn


def test_exports():
    assert set(mn.metrics.__all__) == {
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
    }
    for name in mn.metrics.__all__:
        assert getattr(mn.metrics, name) is not None
    assert mn.metrics.DEFAULT_MAX_MEMORY == 256 * 2**20


def test_contract_calls():
    x = np.arange(10.0)
    assert mn.metrics.distance_correlation_sqr(x, 2 * x, unbiased=False) == pytest.approx(1.0)
    assert mn.metrics.balanced_accuracy([0, 1, 1], [0, 1, 0]) == pytest.approx(0.75)
