"""Distance tiles: exact and Gram-form distances, the tile cover, row sums, the block size."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from metanorm.metrics._distance import (
    LIVE_TILES,
    CentredPoints,
    add_row_sums,
    exact_distances,
    gram_distances,
    resolve_block,
    row_sums_1d,
    upper_tiles,
)


def naive(x):
    x = np.asarray(x, dtype=float)
    return np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))


@pytest.mark.parametrize("p", [1, 3, 8, 20])
def test_exact_distances_match_naive(p):
    rng = np.random.default_rng(p)
    u, v = rng.normal(size=(7, p)), rng.normal(size=(5, p))
    got = exact_distances(torch.from_numpy(u), torch.from_numpy(v)).numpy()
    np.testing.assert_allclose(got, cdist(u, v), rtol=1e-14, atol=0)


@pytest.mark.parametrize("kind", ["continuous", "clusters", "duplicates"])
def test_gram_distances_keep_a_small_relative_error(kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 12))
    if kind == "clusters":  # tight clusters far apart: many entries need the exact form
        x = 100.0 + 1e-3 * x + 50.0 * rng.integers(0, 3, size=(60, 1))
    elif kind == "duplicates":
        x = x[rng.integers(0, 10, size=60)]
    pts = CentredPoints(torch.from_numpy(x))
    assert pts.sq is not None  # 12 columns: the Gram form
    ref = naive(x)
    for rows, cols in [(slice(0, 25), slice(0, 25)), (slice(0, 25), slice(25, 60))]:
        got = pts.tile(rows, cols).numpy()
        want = ref[rows, cols]
        nz = want > 0
        assert (got[~nz] == 0).all()
        assert np.abs(got[nz] / want[nz] - 1).max() < 1e-12
    # the diagonal of a diagonal tile is exactly zero
    assert (torch.diagonal(pts.tile(slice(0, 25), slice(0, 25))) == 0).all()
    # direct call with the same rows on both sides
    u = pts.x[:10]
    same = gram_distances(u, u, pts.sq[:10], pts.sq[:10], True)
    np.testing.assert_allclose(same.numpy(), ref[:10, :10], rtol=1e-12, atol=1e-12)


def test_centred_points_leave_distances_and_use_the_exact_form_for_few_columns():
    rng = np.random.default_rng(1)
    x = 1e6 + rng.normal(size=(30, 3))
    pts = CentredPoints(torch.from_numpy(x))
    assert pts.sq is None
    np.testing.assert_allclose(pts.x.mean(0).numpy(), 0, atol=1e-9)
    np.testing.assert_allclose(pts.tile(slice(0, 30), slice(0, 30)).numpy(), naive(x), rtol=1e-9)


@pytest.mark.parametrize(("n", "block"), [(1, 1), (5, 1), (7, 3), (10, 10), (10, 4)])
def test_upper_tiles_cover_every_pair_once(n, block):
    count = np.zeros((n, n))
    for rows, cols, weight in upper_tiles(n, block):
        assert rows.stop - rows.start <= block
        count[rows, cols] += weight / 2 if rows != cols else 1.0
        if rows != cols:
            count[cols, rows] += weight / 2
            assert cols.start == rows.stop and cols.stop == n and weight == 2.0
        else:
            assert weight == 1.0
    np.testing.assert_array_equal(count, np.ones((n, n)))


def test_row_sums_from_tiles_and_in_one_dimension():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(23, 2))
    x[5] = x[3]  # a tie
    pts = CentredPoints(torch.from_numpy(x))
    out = torch.zeros(23, dtype=torch.float64)
    for rows, cols, _ in upper_tiles(23, 4):
        add_row_sums(out, pts.tile(rows, cols), rows, cols)
    np.testing.assert_allclose(out.numpy(), naive(x).sum(1), rtol=1e-12)
    v = np.round(rng.normal(size=31), 1)  # with ties
    got = row_sums_1d(torch.from_numpy(v)).numpy()
    np.testing.assert_allclose(got, np.abs(v[:, None] - v[None, :]).sum(1), rtol=1e-12)


def test_resolve_block():
    assert resolve_block(100, 7, 1, LIVE_TILES) == 7
    assert resolve_block(5, 7, 1, LIVE_TILES) == 5  # never more than n
    assert resolve_block(100, None, 8 * 6 * 100 * 10, 6) == 10
    assert resolve_block(100, None, 1, 6) == 1  # at least one row
    assert resolve_block(0, None, 2**20, 6) == 1
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="block_size"):
            resolve_block(10, bad, 2**20, 6)
    for bad in (0, -1, 1.5, False):
        with pytest.raises(ValueError, match="max_memory"):
            resolve_block(10, None, bad, 6)
