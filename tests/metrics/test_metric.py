"""Accumulating metrics (metric.py) equal their functions on the concatenated batches."""

import numpy as np
import pytest
import torch

from metanorm.metrics import (
    BalancedAccuracy,
    DistanceCorrelationSqr,
    GroupAccuracy,
    GroupedDistanceCorrelationSqr,
    balanced_accuracy,
    distance_correlation_sqr,
    group_accuracy,
    grouped_distance_correlation_sqr,
)


def batches(n=203, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, 2, 2, generator=g)  # feature maps, flattened per sample
    cf = torch.rand(n, generator=g)
    x[:, 0] += 2 * cf[:, None, None]
    y = (torch.rand(n, generator=g) < 0.5).long()
    return x, cf, y, [slice(i, i + size) for i in range(0, n, size)]


@pytest.mark.parametrize("unbiased", [False, True])
def test_distance_correlation_accumulates(unbiased):
    x, cf, _, parts = batches()
    metric = DistanceCorrelationSqr(unbiased=unbiased, block_size=40)
    for s in parts:
        metric.update(x[s].requires_grad_(), cf[s])
    assert metric.num_samples == x.shape[0]
    expected = distance_correlation_sqr(x, cf, unbiased=unbiased)
    assert metric.compute() == pytest.approx(expected, rel=1e-12)
    metric.reset()
    metric.update(x[:50], cf[:50])
    assert metric.compute() == pytest.approx(
        distance_correlation_sqr(x[:50], cf[:50], unbiased=unbiased), rel=1e-12
    )


def test_distance_correlation_metric_errors():
    metric = DistanceCorrelationSqr()
    with pytest.raises(ValueError, match="update"):
        metric.compute()
    metric.update(torch.randn(5, 3), torch.randn(5))
    with pytest.raises(ValueError, match="3 feature"):
        metric.update(torch.randn(5, 4), torch.randn(5))
    with pytest.raises(ValueError, match="same number of rows"):
        metric.update(torch.randn(5, 3), torch.randn(4))


def test_grouped_distance_correlation_accumulates():
    x, cf, y, parts = batches(seed=1)
    metric = GroupedDistanceCorrelationSqr(unbiased=True)
    for s in parts:
        metric.update(x[s], cf[s], y[s])
    expected = grouped_distance_correlation_sqr(x, cf, y, unbiased=True)
    got = metric.compute()
    assert list(got) == list(expected) == [0, 1]
    for k in expected:
        assert got[k] == pytest.approx(expected[k], rel=1e-12)
    metric.reset()
    with pytest.raises(ValueError, match="update"):
        metric.compute()


def test_balanced_accuracy_accumulates():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, size=250)
    y_pred = np.where(rng.random(250) < 0.5, y_true, rng.integers(0, 5, size=250))
    metric = BalancedAccuracy()
    adj = BalancedAccuracy(adjusted=True)
    for i in range(0, 250, 64):
        metric.update(torch.from_numpy(y_true[i : i + 64]), y_pred[i : i + 64])
        adj.update(y_true[i : i + 64], y_pred[i : i + 64])
    assert metric.compute() == pytest.approx(balanced_accuracy(y_true, y_pred), abs=1e-15)
    assert adj.compute() == pytest.approx(balanced_accuracy(y_true, y_pred, adjusted=True))
    metric.reset()
    with pytest.raises(ValueError, match="at least one sample"):
        metric.compute()


def test_group_accuracy_accumulates():
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 2, size=100)
    y_pred = rng.integers(0, 2, size=100)
    site = np.array(["a", "b", "c"])[rng.integers(0, 3, size=100)]
    metric = GroupAccuracy()
    for i in range(0, 100, 30):
        metric.update(y_true[i : i + 30], y_pred[i : i + 30], site[i : i + 30])
    assert metric.compute() == pytest.approx(group_accuracy(y_true, y_pred, site))
    assert list(metric.compute()) == ["a", "b", "c"]
    metric.reset()
    with pytest.raises(ValueError, match="update"):
        metric.compute()
