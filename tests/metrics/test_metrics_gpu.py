"""On CUDA: the estimators run on the GPU tensors they are given and equal CPU float64."""

import numpy as np
import pytest
import torch

from metanorm.metrics import (
    DistanceCorrelationSqr,
    distance_correlation_sqr,
    distance_correlation_test,
)
from metanorm.metrics._projection import cross_sums_1d

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def data(q, seed=0, n=700):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 20))
    y = x[:, :q] ** 2 + rng.normal(size=(n, q))
    return torch.from_numpy(x), torch.from_numpy(y)


@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("unbiased", [False, True])
def test_exact_on_cuda_equals_cpu(q, unbiased):
    x, y = data(q)
    cpu = distance_correlation_sqr(x, y, unbiased=unbiased, block_size=128)
    for dtype in (torch.float64, torch.float32):
        got = distance_correlation_sqr(
            x.cuda().to(dtype), y.cuda(), unbiased=unbiased, block_size=128
        )
        ref = (
            cpu
            if dtype == torch.float64
            else distance_correlation_sqr(x.to(dtype), y, unbiased=unbiased, block_size=128)
        )
        assert got == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("q", [1, 3])
def test_projection_on_cuda_equals_cpu(q):
    x, y = data(q, seed=1)
    kw = {"unbiased": True, "method": "projection", "num_projections": 12, "seed": 4}
    cpu = distance_correlation_sqr(x, y, **kw)
    gpu = distance_correlation_sqr(x.cuda(), y.cuda(), **kw)
    assert float(gpu) == pytest.approx(float(cpu), rel=1e-9)
    assert gpu.standard_error == pytest.approx(cpu.standard_error, rel=1e-8)


def test_one_dimensional_sums_on_cuda():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5000, generator=g, dtype=torch.float64)
    y = torch.round(x + torch.randn(3, 5000, generator=g, dtype=torch.float64))
    np.testing.assert_allclose(
        cross_sums_1d(x.cuda(), y.cuda()).cpu().numpy(), cross_sums_1d(x, y).numpy(), rtol=1e-12
    )


def test_permutation_test_and_metric_on_cuda():
    x, y = data(1, seed=2, n=300)
    kw = {"num_permutations": 49, "random_state": 3, "unbiased": True}
    cpu = distance_correlation_test(x, y, **kw)
    gpu = distance_correlation_test(x.cuda(), y.cuda(), **kw)
    assert gpu.pvalue == cpu.pvalue
    assert gpu.statistic == pytest.approx(cpu.statistic, rel=1e-9)
    metric = DistanceCorrelationSqr(unbiased=True)
    for rows in (slice(0, 100), slice(100, 300)):
        metric.update(x[rows].cuda(), y[rows].cuda())
    assert metric.compute() == pytest.approx(cpu.statistic, rel=1e-9)
