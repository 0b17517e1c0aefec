"""The random-projection estimator: the 1-D O(n log n) sums, C_p, unbiasedness, the SE."""

import dcor
import numpy as np
import pytest
import torch

from metanorm.metrics import distance_correlation_sqr
from metanorm.metrics._projection import (
    cross_sums_1d,
    dcov_1d,
    projection_constant,
    projection_terms,
)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 16, 17, 100, 513])
def test_one_dimensional_cross_sums_equal_brute_force(n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(3, n))
    y = x + rng.normal(size=(3, n))
    x[1], y[2] = np.round(x[1]), np.round(2 * y[2])  # ties in either variable
    want = [
        (np.abs(a[:, None] - a) * np.abs(b[:, None] - b)).sum() for a, b in zip(x, y, strict=True)
    ]
    # the default, and small segments (the top levels over everything, then segment by segment)
    for segment in (2**15, 2, 8):
        got = cross_sums_1d(torch.from_numpy(x), torch.from_numpy(y), segment=segment).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12)
    # one y row shared by every row of x
    got = cross_sums_1d(torch.from_numpy(x), torch.from_numpy(y[:1])).numpy()
    want = [(np.abs(a[:, None] - a) * np.abs(y[0][:, None] - y[0])).sum() for a in x]
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
def test_one_dimensional_dcov_equals_dcor_package(unbiased):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 300))
    y = np.sin(x) + 0.5 * rng.normal(size=(2, 300))
    got = dcov_1d(torch.from_numpy(x), torch.from_numpy(y), unbiased).numpy()
    f = dcor.u_distance_covariance_sqr if unbiased else dcor.distance_covariance_sqr
    want = [f(a, b, method="naive") for a, b in zip(x, y, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-9)


@pytest.mark.parametrize("p", [1, 2, 3, 7, 84, 512])
def test_projection_constant_is_the_mean_absolute_coordinate(p):
    g = torch.Generator().manual_seed(p)
    u = torch.randn(50_000 if p < 100 else 10_000, p, generator=g, dtype=torch.float64)
    first = (u[:, 0] / u.norm(dim=1)).abs()
    # Monte Carlo mean within 5 standard errors; and |x| = E|u'x| / C_p for a fixed x
    se = float(first.std()) / np.sqrt(len(first))
    assert abs(float(first.mean()) - projection_constant(p)) <= 5 * se + 1e-15
    if p == 2:
        assert projection_constant(2) == pytest.approx(2 / np.pi, rel=1e-14)
    assert projection_constant(1) == 1.0


def test_distance_variance_uses_two_independent_directions():
    # the x-variance term averaged over many projections is unbiased for the exact dVar²,
    # which would not hold with the same direction twice (E|u'd|² / C_p² != |d|²)
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(200, 5)) * [3, 1, 1, 0.5, 0.2])
    y = x[:, :1]
    terms, _ = projection_terms(x, y, unbiased=True, num_projections=2000, seed=0)
    est = terms.var_x / projection_constant(5) ** 2
    xs = x.numpy() / np.abs(x.numpy()).max()  # the terms are of the rescaled samples
    exact = dcor.u_distance_covariance_sqr(xs, xs)
    se = float(est.std()) / np.sqrt(len(est))
    assert abs(float(est.mean()) - exact) < 4 * se
    # the same direction twice is biased (here by about +40 %)
    g = torch.Generator().manual_seed(1)
    u = torch.randn(5, 2000, generator=g, dtype=torch.float64)
    z = (torch.from_numpy(xs) @ (u / u.norm(dim=0))).T.contiguous()
    twice = dcov_1d(z, z, True) / projection_constant(5) ** 2
    assert float(twice.mean()) - exact > 10 * float(twice.std()) / np.sqrt(2000)


@pytest.mark.parametrize(
    ("strength", "unbiased"), [(0.0, True), (0.3, True), (1.0, True), (3.0, True), (1.0, False)]
)
def test_projection_is_within_four_standard_errors_of_exact(strength, unbiased):
    # margins over projection seeds 0-9 on these data: the largest |error| was 0.38 of the bar
    rng = np.random.default_rng(10)
    n = 5000
    x = rng.normal(size=(n, 12))
    y = strength * (x[:, 0] + x[:, 1] ** 2) + rng.normal(size=n)
    exact = distance_correlation_sqr(x, y, unbiased=unbiased)
    est = distance_correlation_sqr(
        x, y, unbiased=unbiased, method="projection", num_projections=30, seed=3
    )
    assert est.method == "projection" and est.num_projections == 30 and est.unbiased == unbiased
    assert 0 < est.standard_error < 0.1
    assert abs(est - exact) <= 4 * est.standard_error + 1e-3
    # seeded: the same directions every time
    again = distance_correlation_sqr(
        x, y, unbiased=unbiased, method="projection", num_projections=30, seed=3
    )
    assert float(again) == float(est)


def test_method_arguments():
    x = np.random.default_rng(0).normal(size=(50, 3))
    auto = distance_correlation_sqr(x, x[:, 0], unbiased=True, method="auto")
    assert auto == distance_correlation_sqr(x, x[:, 0], unbiased=True)
    assert type(auto) is float  # the exact estimator gives a plain float, as before
    with pytest.raises(ValueError, match="method"):
        distance_correlation_sqr(x, x, unbiased=True, method="fast")
    with pytest.raises(ValueError, match="num_projections"):
        distance_correlation_sqr(x, x, unbiased=True, num_projections=10)
    with pytest.raises(ValueError, match="num_projections"):
        distance_correlation_sqr(x, x, unbiased=True, method="projection", num_projections=1)


def test_one_dimensional_terms_do_not_depend_on_the_thread_count_and_restore_it(monkeypatch):
    from metanorm.metrics import _projection

    monkeypatch.setattr(_projection, "_CHUNK_VALUES", 4 * 1024)  # 4 rows of 1024 per chunk
    dcov_1d = _projection.dcov_1d
    g = torch.Generator().manual_seed(3)
    n = 1024
    rows = 12  # three chunks: they run side by side on 2 threads
    x = torch.randn(rows, n, generator=g, dtype=torch.float64)
    y = torch.randn(1, n, generator=g, dtype=torch.float64) + x[:1]
    before = torch.get_num_threads()
    try:
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[threads] = dcov_1d(x, y, True)
            assert torch.get_num_threads() == threads
        assert torch.equal(out[1], out[2])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("q", [1, 3])
def test_control_variate_means_are_their_averages_over_the_sphere(q):
    # every feature's closed-form mean equals its Monte Carlo average over uniform directions
    from metanorm.metrics._projection import _directions, control_variates

    rng = np.random.default_rng(q)
    p, n, num = 6, 400, 60_000
    x = torch.from_numpy(rng.normal(size=(n, p)) * [3.0, 1, 1, 0.5, 2, 1])
    y = torch.from_numpy(np.abs(rng.normal(size=(n, q))) + x[:, :1].numpy())
    gen = torch.Generator().manual_seed(0)
    u, u2 = _directions(p, num, gen, x.device), _directions(p, num, gen, x.device)
    v = v2 = None
    if q > 1:
        v, v2 = _directions(q, num, gen, x.device), _directions(q, num, gen, x.device)
    features = control_variates(x, y, (u, u2, v, v2), gen)
    kinds = [f for f in features if f is not None]
    assert len(kinds) == (2 if q == 1 else 3)
    for f in kinds:
        assert f.values.shape[0] == num and f.values.shape[1] >= 3
        mc = f.values.mean(0)
        se = f.values.std(0) / np.sqrt(num)
        assert torch.all((mc - f.means).abs() <= 5 * se), (mc, f.means, se)


@pytest.mark.parametrize("kind", ["dependent", "binary", "several columns"])
def test_control_variates_cut_the_spread_over_directions(kind):
    # over projection seeds 0-9 the control-variate estimate spreads far less than the plain
    # average, around the same (exact) value: over data seeds 4-6 the SD ratio was 0.06-0.23
    # (bar 0.5) and the distance of the mean from the exact value at most 0.58 of its bar
    from metanorm.metrics._inputs import as_sample_pair
    from metanorm.metrics.dcor import projection_dcor

    rng = np.random.default_rng(4)
    n = 2000
    x = rng.normal(size=(n, 32))
    y = {
        "dependent": x[:, 0] + x[:, 1] ** 2 + rng.normal(size=n),
        "binary": (x[:, 0] + rng.normal(size=n) > 0).astype(float),
        "several columns": np.stack([x[:, 0], np.abs(x[:, 1])], 1) + rng.normal(size=(n, 2)),
    }[kind]
    exact = distance_correlation_sqr(x, y, unbiased=True)
    a, b = as_sample_pair(x, y)
    est = {}
    for control in (False, True):
        est[control] = np.array(
            [
                float(
                    projection_dcor(
                        a, b, unbiased=True, num_projections=30, seed=s, control=control
                    )
                )
                for s in range(10)
            ]
        )
    assert est[True].std() <= 0.5 * est[False].std()
    assert abs(est[True].mean() - exact) <= 4 * est[True].std() / np.sqrt(10) + 1e-4
