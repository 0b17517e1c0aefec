"""The accumulating metrics under torch.distributed: 2 gloo processes equal one over all the data.

One spawn for the whole module: each rank updates the metrics with its share of the data (uneven
row counts, different label and group sets per rank), computes, and writes its results; the
tests compare both ranks with one process over the union, the dcor package and scikit-learn.
"""

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _spawn import requires_gloo, spawn

from metanorm.metrics import (
    BalancedAccuracy,
    DistanceCorrelationSqr,
    GroupAccuracy,
    GroupedDistanceCorrelationSqr,
)

pytestmark = requires_gloo

WORLD = 2
# rank 0 holds rows [0, 30), rank 1 rows [30, 47), each fed in batches of at most 8
SPLIT = 30
N = 47


def make_data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, 3, 2, generator=g)  # flattened per sample: 6 columns
    cf = torch.rand(N, generator=g)
    x[:, 0, 0] += 2 * cf
    # class labels: rank 0 sees {0, 1}, rank 1 sees {1, 2}
    y_true = np.concatenate([np.arange(SPLIT) % 2, 1 + np.arange(N - SPLIT) % 2])
    flip = np.random.default_rng(3).random(N) < 0.3
    y_pred = np.where(flip, (y_true + 1) % 3, y_true)
    # groups: rank 0 sees {"a", "b"}, rank 1 sees {"b", "c"}
    sites = np.array(["a", "b"] * (SPLIT // 2) + ["b", "c"] * ((N - SPLIT + 1) // 2))[:N]
    return x, cf, y_true, y_pred, sites


def batches(lo, hi, size=8):
    return [slice(i, min(i + size, hi)) for i in range(lo, hi, size)]


def _metrics(**kw):
    return {
        "dcor": DistanceCorrelationSqr(**kw),
        "pdcor": DistanceCorrelationSqr(
            unbiased=True, method="projection", num_projections=6, seed=2, **kw
        ),
        "pgrouped": GroupedDistanceCorrelationSqr(
            unbiased=False, method="projection", num_projections=4, seed=5, **kw
        ),
        "udcor": DistanceCorrelationSqr(unbiased=True, block_size=5, **kw),
        "grouped": GroupedDistanceCorrelationSqr(unbiased=True, **kw),
        "bacc": BalancedAccuracy(**kw),
        "bacc_adj": BalancedAccuracy(adjusted=True, **kw),
        "gacc": GroupAccuracy(**kw),
    }


def _feed(metrics, part, data):
    x, cf, y_true, y_pred, sites = data
    for s in part:
        metrics["dcor"].update(x[s], cf[s])
        metrics["pdcor"].update(x[s], cf[s])
        metrics["pgrouped"].update(x[s], cf[s], y_true[s])
        metrics["udcor"].update(x[s], cf[s])
        metrics["grouped"].update(x[s], cf[s], y_true[s])
        metrics["bacc"].update(torch.from_numpy(y_true[s]), y_pred[s])
        metrics["bacc_adj"].update(y_true[s], y_pred[s])
        metrics["gacc"].update(y_true[s], y_pred[s], sites[s])


def _scenarios(rank, world_size):
    data = make_data()
    part = batches(0, SPLIT) if rank == 0 else batches(SPLIT, N)
    out = {}

    synced, local = _metrics(), _metrics(sync_on_compute=False)
    _feed(synced, part, data)
    _feed(local, part, data)
    out["synced"] = {k: m.compute() for k, m in synced.items()}
    out["local"] = {k: m.compute() for k, m in local.items()}
    # the tile work is shared: each rank computes about half of the tiles
    from metanorm.metrics import _exact

    calls = []
    tile = _exact.Points.tile

    def counted(self, rows, cols):
        calls.append((rows.start, cols.start))
        return tile(self, rows, cols)

    _exact.Points.tile = counted
    try:
        rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, N)
        meta = torch.randn(rows.stop - rows.start, 2, generator=torch.Generator().manual_seed(rank))
        wide = DistanceCorrelationSqr(unbiased=True, block_size=4)
        wide.update(data[0].reshape(N, -1)[rows], meta)
        out["shared_value"] = wide.compute()
    finally:
        _exact.Points.tile = tile
    out["tiles"] = calls
    # compute() leaves the local state alone: computing again gives the same
    out["num_samples_after"] = synced["dcor"].num_samples
    out["again"] = synced["udcor"].compute()

    # a rank that saw nothing still takes part (rank 1 here)
    empty = _metrics()
    if rank == 0:
        _feed(empty, part, data)
    out["one_rank"] = {k: m.compute() for k, m in empty.items()}

    # process_group: a group of rank 0 alone means no gathering, for its member and for rank 1
    # (outside the group)
    solo = dist.new_group(ranks=[0])
    solo_metrics = _metrics(process_group=solo)
    _feed(solo_metrics, part, data)
    out["solo"] = {k: m.compute() for k, m in solo_metrics.items()}

    # ranks with different feature widths: both raise the same error
    wrong = DistanceCorrelationSqr()
    wrong.update(torch.randn(5, 3 + rank), torch.randn(5))
    try:
        wrong.compute()
    except ValueError as err:
        out["width_error"] = str(err)

    # nothing on any rank
    out["none_errors"] = []
    for metric in (DistanceCorrelationSqr(), BalancedAccuracy(), GroupAccuracy()):
        try:
            metric.compute()
        except ValueError as err:
            out["none_errors"].append(str(err))
    return out


@pytest.fixture(scope="module")
def results():
    return spawn(_scenarios, WORLD, collective_timeout_s=30.0)


def _single(lo, hi):
    """One process over rows [lo, hi), fed in the same batches."""
    metrics = _metrics()
    _feed(metrics, batches(lo, hi), make_data())
    return {k: m.compute() for k, m in metrics.items()}


def test_ranks_agree_with_one_process_over_all_rows(results):
    expected = _single(0, N)
    for r in range(WORLD):
        got = results[r]["synced"]
        assert list(got) == list(expected)
        for key in ("dcor", "udcor", "pdcor", "bacc", "bacc_adj"):
            assert got[key] == pytest.approx(expected[key], rel=1e-10, abs=1e-15), key
        assert got["pdcor"].standard_error == pytest.approx(
            expected["pdcor"].standard_error, rel=1e-10
        )
        for key in ("grouped", "pgrouped", "gacc"):
            assert list(got[key]) == list(expected[key]), key
            for g in expected[key]:
                assert got[key][g] == pytest.approx(expected[key][g], rel=1e-10, abs=1e-15)
    # both ranks return exactly the same numbers
    assert results[0]["synced"] == results[1]["synced"]


def test_each_rank_computes_its_share_of_the_tiles(results):
    from metanorm.metrics._exact import square_tiles

    # x tiles and y tiles (2-column metadata): 2 calls per tile; 47 rows in blocks of 4
    everything = sorted(2 * [(r.start, c.start) for r, c in square_tiles(N, 4)])
    mine = [results[r]["tiles"] for r in range(WORLD)]
    assert sorted(mine[0] + mine[1]) == everything
    assert abs(len(mine[0]) - len(mine[1])) <= 2
    # and the value is that of one process over all the rows
    x, *_ = make_data()
    y = torch.cat(
        [
            torch.randn(n, 2, generator=torch.Generator().manual_seed(r))
            for r, n in enumerate((SPLIT, N - SPLIT))
        ]
    )
    want = DistanceCorrelationSqr(unbiased=True, sync_on_compute=False)
    want.update(x.reshape(N, -1), y)
    for r in range(WORLD):
        assert results[r]["shared_value"] == pytest.approx(want.compute(), rel=1e-10)


def test_synced_values_match_the_reference_packages(results):
    # imported here, not at the top: the spawned workers import this module and need neither
    dcor = pytest.importorskip("dcor")
    balanced_accuracy_score = pytest.importorskip("sklearn.metrics").balanced_accuracy_score
    x, cf, y_true, y_pred, sites = make_data()
    xn, cfn = x.reshape(N, -1).double().numpy(), cf.double().numpy()
    got = results[1]["synced"]
    assert got["dcor"] == pytest.approx(dcor.distance_correlation_sqr(xn, cfn), rel=1e-10)
    assert got["udcor"] == pytest.approx(dcor.u_distance_correlation_sqr(xn, cfn), rel=1e-10)
    assert sorted(got["grouped"]) == [0, 1, 2]
    for c, value in got["grouped"].items():
        rows = y_true == c
        # class 0 only lives on rank 0, class 2 only on rank 1, class 1 on both
        assert value == pytest.approx(
            dcor.u_distance_correlation_sqr(xn[rows], cfn[rows]), rel=1e-10, abs=1e-14
        )
    assert got["bacc"] == pytest.approx(balanced_accuracy_score(y_true, y_pred), abs=1e-15)
    assert got["bacc_adj"] == pytest.approx(
        balanced_accuracy_score(y_true, y_pred, adjusted=True), abs=1e-15
    )
    assert got["gacc"] == {
        s: pytest.approx(float(np.mean(y_true[sites == s] == y_pred[sites == s])))
        for s in ("a", "b", "c")
    }


def test_sync_off_gives_the_local_values(results):
    for r, (lo, hi) in enumerate([(0, SPLIT), (SPLIT, N)]):
        expected = _single(lo, hi)
        got = results[r]["local"]
        for key in ("dcor", "udcor", "bacc", "bacc_adj"):
            assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key
        assert got["gacc"] == pytest.approx(expected["gacc"])
        assert list(got["grouped"]) == list(expected["grouped"])
    # the local values differ from the synced ones (the test can tell them apart)
    for key in ("dcor", "udcor", "bacc"):
        assert results[0]["local"][key] != pytest.approx(results[0]["synced"][key], rel=1e-6)


def test_state_is_left_alone_by_compute(results):
    assert results[0]["num_samples_after"] == SPLIT
    assert results[1]["num_samples_after"] == N - SPLIT
    assert results[0]["again"] == results[0]["synced"]["udcor"]


def test_a_rank_without_updates(results):
    expected = _single(0, SPLIT)
    for r in range(WORLD):
        got = results[r]["one_rank"]
        for key in ("dcor", "udcor", "bacc", "bacc_adj"):
            assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key
        assert got["gacc"] == pytest.approx(expected["gacc"])
        assert list(got["grouped"]) == [0, 1]


def test_process_group_is_honoured(results):
    for r, (lo, hi) in enumerate([(0, SPLIT), (SPLIT, N)]):
        expected = _single(lo, hi)
        for key in ("dcor", "udcor", "bacc", "bacc_adj"):
            assert results[r]["solo"][key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15)
        assert results[r]["solo"]["gacc"] == pytest.approx(expected["gacc"])


def test_errors_are_raised_on_every_rank(results):
    for r in range(WORLD):
        assert "rank 0: 3 and 1, rank 1: 4 and 1" in results[r]["width_error"]
        dcor_error, bacc_error, gacc_error = results[r]["none_errors"]
        assert "update()" in dcor_error
        assert "at least one sample" in bacc_error
        assert "update()" in gacc_error
