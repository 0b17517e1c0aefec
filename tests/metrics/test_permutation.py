"""The permutation test: sane p-values, seeded, both routes (few levels, continuous)."""

import dcor
import numpy as np
import pytest
import torch

from metanorm.metrics import distance_correlation_sqr, distance_correlation_test


def data(n=120, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5))
    return x, rng


@pytest.mark.parametrize("unbiased", [False, True])
def test_dependent_gives_small_pvalue(unbiased):
    x, rng = data()
    for y in (x[:, 0] + 0.3 * rng.normal(size=120), (x[:, 0] > 0).astype(float)):
        res = distance_correlation_test(
            x, y, num_permutations=99, random_state=0, unbiased=unbiased
        )
        assert res.pvalue == pytest.approx(0.01)  # the smallest possible: 1 / (1 + 99)
        assert res.num_permutations == 99
        assert res.statistic == pytest.approx(distance_correlation_sqr(x, y, unbiased=unbiased))


def test_independent_pvalues_are_roughly_uniform():
    pvalues = []
    for seed in range(24):
        x, rng = data(n=40, seed=seed)
        y = rng.normal(size=40) if seed % 2 else rng.integers(0, 3, size=40).astype(float)
        pvalues.append(
            distance_correlation_test(x, y, num_permutations=49, random_state=seed).pvalue
        )
    pvalues = np.array(pvalues)
    assert 0.3 < pvalues.mean() < 0.7
    assert (pvalues <= 0.05).sum() <= 4  # expected ~1.2 of 24


def test_seeded_and_reproducible():
    x, rng = data(n=60)
    y = rng.normal(size=(60, 2))
    a = distance_correlation_test(x, y, num_permutations=29, random_state=7)
    b = distance_correlation_test(x, y, num_permutations=29, random_state=7, block_size=9)
    c = distance_correlation_test(x, y, num_permutations=29, random_state=np.random.default_rng(7))
    assert a.pvalue == b.pvalue == c.pvalue
    assert a.statistic == pytest.approx(b.statistic, rel=1e-12)
    g1 = distance_correlation_test(
        x, y, num_permutations=29, random_state=torch.Generator().manual_seed(3)
    )
    g2 = distance_correlation_test(
        x, y, num_permutations=29, random_state=torch.Generator().manual_seed(3)
    )
    assert g1 == g2


def brute_force_pvalue(x, y, perms, unbiased):
    t0 = distance_correlation_sqr(x, y, unbiased=unbiased)
    tp = np.array([distance_correlation_sqr(x, y[p], unbiased=unbiased) for p in perms])
    return (1 + np.sum(tp >= t0 - 1e-12)) / (1 + len(perms))


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("kind", ["continuous", "levels", "multicolumn", "onehot"])
def test_equals_brute_force_over_the_same_permutations(kind, unbiased):
    x, rng = data(n=50, seed=3)
    if kind == "onehot":  # the variable with more columns has few levels: it is the one permuted
        x = x[:, :1]
        y = np.eye(3)[rng.integers(0, 3, size=50) * (x[:, 0] > -1)]
    elif kind == "continuous":
        y = x[:, :1] * 0.3 + rng.normal(size=(50, 1))
    elif kind == "levels":
        y = rng.integers(0, 4, size=(50, 1)).astype(float) + (x[:, :1] > 1)
    else:
        y = x[:, :2] * 0.2 + rng.normal(size=(50, 2))
    res = distance_correlation_test(
        x, y, num_permutations=40, random_state=11, unbiased=unbiased, block_size=13
    )
    perms = np.random.default_rng(11).permuted(np.broadcast_to(np.arange(50), (40, 50)), axis=1)
    assert res.pvalue == pytest.approx(brute_force_pvalue(x, y, perms, unbiased))


def test_ties_count_as_extreme():
    # a permutation that only swaps equal values of y leaves the statistic unchanged
    x = np.arange(6.0)
    y = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    res = distance_correlation_test(x, y, num_permutations=200, random_state=0)
    # exactly 1 / C(6, 3) = 1/20 of the permutations give the observed split or its mirror
    assert 0.04 < res.pvalue < 0.2


def test_errors():
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="num_permutations"):
        distance_correlation_test(x, x, num_permutations=0)
    with pytest.raises(TypeError, match="num_permutations"):
        distance_correlation_test(x, x, num_permutations=9.5)
    with pytest.raises(ValueError, match="more than 3"):
        distance_correlation_test(x[:3], x[:3], unbiased=True)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("kind", ["continuous", "levels", "multicolumn"])
def test_permuted_statistics_equal_dcor_of_the_permuted_data(kind, unbiased):
    # every permuted statistic, not only the p-value, against dCor² of the permuted rows
    from metanorm.metrics.permutation import _permutations, permutation_statistics

    rng = np.random.default_rng(5)
    x = rng.normal(size=(70, 6))
    if kind == "continuous":
        y = x[:, :1] ** 2 + rng.normal(size=(70, 1))
    elif kind == "levels":
        y = rng.integers(0, 3, size=(70, 1)).astype(float)
    else:
        y = x[:, :2] * 0.3 + rng.normal(size=(70, 2))
    drawn = _permutations(70, 15, 4)  # the stream of random_state=4
    perms = torch.from_numpy(np.concatenate([np.arange(70)[None], drawn]))
    stat, values, _, _ = permutation_statistics(
        torch.from_numpy(x),
        torch.from_numpy(y),
        perms,
        unbiased=unbiased,
        block=16,
        max_memory=2**20,
    )
    assert stat == pytest.approx(distance_correlation_sqr(x, y, unbiased=unbiased), rel=1e-12)
    for p, v in zip(perms.numpy(), values.tolist(), strict=True):
        want = (
            dcor.u_distance_correlation_sqr(x, y[p])
            if unbiased
            else (dcor.distance_correlation_sqr(x, y[p]))
        )
        assert v == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_same_permutation_stream_as_before():
    # random_state=0 draws numpy's default_rng(0).permuted rows: the stream is part of the API
    drawn = __import__("metanorm.metrics.permutation", fromlist=["x"])._permutations(8, 2, 0)
    want = np.random.default_rng(0).permuted(np.broadcast_to(np.arange(8), (2, 8)), axis=1)
    assert (drawn == want).all()


def test_continuous_route_with_two_threads_equals_one():
    # with several torch threads the tiles are shared by Python threads (one torch thread each)
    x, rng = data(n=300, seed=9)
    y = x[:, 0] ** 2 + rng.normal(size=300)
    one = distance_correlation_test(x, y, num_permutations=30, random_state=2, unbiased=True)
    torch.set_num_threads(2)  # the autouse fixture restores the count
    two = distance_correlation_test(
        x, y, num_permutations=30, random_state=2, unbiased=True, block_size=64
    )
    assert torch.get_num_threads() == 2
    assert two.pvalue == one.pvalue
    assert two.statistic == pytest.approx(one.statistic, rel=1e-12)
