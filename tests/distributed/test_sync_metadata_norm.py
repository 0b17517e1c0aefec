"""The synced MDN layers on 2 gloo processes against one process holding the union batch.

One spawn of 2 processes (module fixture ``results``) runs every scenario and returns what each
rank saw; the oracle is a plain MetadataNorm in this process, fed the union batches.
"""

from __future__ import annotations

import datetime
import inspect
import time

import pytest
import torch
import torch.distributed as dist
from _spawn import requires_gloo, spawn
from torch.nn.parallel import DistributedDataParallel as DDP

from metanorm.nn import (
    MetadataLocationScaleNorm,
    MetadataNorm,
    MetadataScaleNorm,
    PenaltyMetadataNorm,
    RecursiveMetadataNorm,
    SyncMetadataLocationScaleNorm,
    SyncMetadataNorm,
    SyncMetadataScaleNorm,
    SyncPenaltyMetadataNorm,
    SyncRecursiveMetadataNorm,
    global_design_statistics,
    revert_sync_metadata_norm,
)
from metanorm.nn.utils import refit_running_beta

pytestmark = requires_gloo

N, K = 64, 3
SHAPE = (2, 3)  # per-sample feature shape (D = 6)
STEPS = 3
SPLITS = {"even": (32, 32), "uneven": (7, 57), "empty": (0, 20), "small": (2, 1)}
DTYPES = {"float64": torch.float64, "float32": torch.float32}
MOMENTA = {"0.1": 0.1, "None": None}
# the synced running β agrees without DDP's buffer broadcast (renamed in newer torch)
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    else {"broadcast_buffers": False}
)
EXACT = {"atol": 1e-12, "rtol": 0}
BUFFERS = ("running_beta", "num_batches_tracked", "num_samples_tracked", "num_batches_skipped")


def _design(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (N, 1), generator=g).double()
    return torch.cat([y, torch.randn(N, 1, generator=g) + y, torch.ones(N, 1)], 1).to(dtype)


def _batch(step, m, dtype, seed=0):
    """The union batch of a step: features, design rows and the upstream gradient."""
    g = torch.Generator().manual_seed(100 * seed + step)
    idx = torch.randint(0, N, (m,), generator=g)
    rows = _design(dtype)[idx]
    feats = (torch.randn(m, *SHAPE, generator=g, dtype=torch.float64) + 2 * rows[:, 1:2, None]).to(
        dtype
    )
    grad = torch.randn(m, *SHAPE, generator=g, dtype=torch.float64).to(dtype)
    return feats, rows, grad


def _layer(cls, dtype, momentum, **kw):
    return cls(SHAPE[0] * SHAPE[1], _design(), keep=[0], momentum=momentum, dtype=dtype, **kw)


def _channelwise(cls):
    return cls(SHAPE[0], _design(), keep=[0], channelwise=True, dtype=torch.float64)


ESTIMATORS = ("recursive", "penalty", "scale", "location-scale")


def _estimator(name, dtype, synced=False):
    """A layer of another estimator on the (2, 3) maps (scale: 2 channels)."""
    if name == "recursive":
        cls = SyncRecursiveMetadataNorm if synced else RecursiveMetadataNorm
        return cls(6, K, keep=[0], forgetting=0.99, dtype=dtype)
    if name == "penalty":
        cls = SyncPenaltyMetadataNorm if synced else PenaltyMetadataNorm
        return cls(6, K, keep=[0], lr=0.05, dtype=dtype)
    if name == "location-scale":
        cls = SyncMetadataLocationScaleNorm if synced else MetadataLocationScaleNorm
        return cls(SHAPE[0], _design(), keep=[0], momentum=0.1, num_positions=SHAPE[1], dtype=dtype)
    cls = SyncMetadataScaleNorm if synced else MetadataScaleNorm
    return cls(SHAPE[0], _design(), keep=[0], momentum=0.1, dtype=dtype)


def _state(layer):
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def _buffers(layer):
    return {name: getattr(layer, name).detach().clone() for name in BUFFERS}


def _run_steps(layer, splits, dtype, rank=None):
    """STEPS training steps; with ``rank`` the rank's share of each union batch, else all."""
    outs, grads = [], []
    for step in range(STEPS):
        m0, m1 = splits
        feats, rows, grad = _batch(step, m0 + m1, dtype)
        if rank is not None:
            part = slice(0, m0) if rank == 0 else slice(m0, m0 + m1)
            feats, rows, grad = feats[part], rows[part], grad[part]
        feats = feats.clone().requires_grad_()
        out = layer(feats, rows)
        out.backward(grad)
        outs.append(out.detach())
        grads.append(feats.grad)
    return outs, grads


# --------------------------------------------------------------------------------------------
# what the 2 processes run
# --------------------------------------------------------------------------------------------


class _SmallCNN(torch.nn.Module):
    """The paper's CNN in small: conv, MDN with one β per position, pool, fc, MDN, fc."""

    def __init__(self, design):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 4, 5)  # 12×12 → 8×8
        self.norm1 = MetadataNorm(4 * 8 * 8, design, keep=[0])
        self.fc1 = torch.nn.Linear(4 * 4 * 4, 8)
        self.norm2 = MetadataNorm(8, design, keep=[0])
        self.fc2 = torch.nn.Linear(8, 1)

    def forward(self, x, rows):
        h = torch.nn.functional.max_pool2d(torch.relu(self.norm1(self.conv1(x), rows)), 2)
        features = self.norm2(self.fc1(h.flatten(1)), rows)
        return self.fc2(torch.relu(features)), features


def _ddp_cnn(rank, world_size, splits, seed):
    """A few SGD steps of the small MDN CNN under DDP; loss_r = W·(sum of rank r's losses)/M."""
    torch.manual_seed(seed)
    model = _SmallCNN(_design()).double()
    model = SyncMetadataNorm.convert_sync_metadata_norm(model)
    ddp = DDP(model, **_NO_BUFFER_SYNC)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for step in range(STEPS):
        x, rows, y = _cnn_batch(step, sum(splits), seed)
        part = slice(0, splits[0]) if rank == 0 else slice(splits[0], sum(splits))
        logits, _ = ddp(x[part], rows[part])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits.squeeze(1), y[part], reduction="sum"
        )
        opt.zero_grad()
        (loss * world_size / sum(splits)).backward()
        opt.step()
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "types": sorted({type(m).__name__ for m in model.modules()}),
    }


def _cnn_batch(step, m, seed):
    g = torch.Generator().manual_seed(1000 + 10 * seed + step)
    idx = torch.randint(0, N, (m,), generator=g)
    rows = _design()[idx]
    x = torch.randn(m, 1, 12, 12, generator=g, dtype=torch.float64) + rows[:, 1, None, None, None]
    return x, rows, rows[:, 0].clone()


def _scenarios(rank, world_size):
    res = {}
    # 1. parity: outputs, input gradients, buffers; then an all-empty step (M = 0)
    for dname, dtype in DTYPES.items():
        for mname, momentum in MOMENTA.items():
            for sname, splits in SPLITS.items():
                layer = _layer(SyncMetadataNorm, dtype, momentum)
                outs, grads = _run_steps(layer, splits, dtype, rank)
                before = _buffers(layer)
                empty = torch.zeros(0, *SHAPE, dtype=dtype, requires_grad=True)
                out_empty = layer(empty, torch.zeros(0, K, dtype=dtype))
                out_empty.sum().backward()
                res[dname, mname, sname] = {
                    "outs": outs,
                    "grads": grads,
                    "buffers": before,
                    "after_empty": _buffers(layer),
                    "out_empty_shape": tuple(out_empty.shape),
                }
    # 1b. a channel-wise layer (β per channel of the (2, 3) map) syncs through the same seam
    layer = _channelwise(SyncMetadataNorm)
    outs, grads = _run_steps(layer, SPLITS["uneven"], torch.float64, rank)
    res["channelwise"] = {"outs": outs, "grads": grads, "buffers": _buffers(layer)}
    # 1c. a group of one process: exactly a MetadataNorm on the local batch
    singletons = [dist.new_group([r]) for r in range(world_size)]
    alone = _layer(SyncMetadataNorm, torch.float64, 0.1, process_group=singletons[rank])
    plain = _layer(MetadataNorm, torch.float64, 0.1)
    got, want = (
        _run_steps(alone, SPLITS["uneven"], torch.float64, rank),
        _run_steps(plain, SPLITS["uneven"], torch.float64, rank),
    )
    res["singleton"] = all(
        torch.equal(a, b) for a, b in zip(got[0] + got[1], want[0] + want[1], strict=True)
    ) and torch.equal(alone.running_beta, plain.running_beta)
    # 1d. every other estimator: its synced class on the rank's share of each union batch, and
    # a refit over the rank's shard of a loader (sums all-reduced)
    for ename in ESTIMATORS:
        for dname, dtype in DTYPES.items():
            layer = _estimator(ename, dtype, synced=True)
            outs, grads = _run_steps(layer, SPLITS["uneven"], dtype, rank)
            res["estimator", ename, dname] = {
                "outs": outs,
                "grads": grads,
                "state": _state(layer),
            }
        layer = _estimator(ename, torch.float64, synced=True)
        _run_steps(layer, SPLITS["even"], torch.float64, rank)
        loader = [_batch(10 + step, 12, torch.float64)[:2] for step in range(3)]
        part = slice(0, 5) if rank == 0 else slice(5, 12)
        refit_running_beta(layer, [(f[part], r[part]) for f, r in loader])
        res["refit", ename] = _state(layer)
    short = dist.new_group(timeout=datetime.timedelta(seconds=3))
    # 2. a NaN feature on rank 1 only: every rank skips the estimate
    layer = _layer(SyncMetadataNorm, torch.float64, 0.1)
    feats, rows, _ = _batch(0, 20, torch.float64)
    feats = feats[:10] if rank == 0 else feats[10:].clone()
    if rank == 1:
        feats[0, 0, 0] = float("nan")
    layer(feats, rows[:10] if rank == 0 else rows[10:])
    res["nonfinite"] = _buffers(layer)
    # 3. evaluation on rank 0 alone (rank 1 makes no call; a collective would time out)
    layer = _layer(SyncMetadataNorm, torch.float64, 0.1, process_group=short)
    _run_steps(layer, SPLITS["even"], torch.float64, rank)
    if rank == 0:
        layer.eval()
        feats, rows, _ = _batch(7, 5, torch.float64)
        start = time.perf_counter()
        out = layer(feats, rows)
        res["eval"] = {
            "seconds": time.perf_counter() - start,
            "out": out,
            "feats": feats,
            "rows": rows,
            "running_beta": layer.running_beta.clone(),
        }
    dist.barrier()
    # 4. sharded design: each rank holds rows of its own; a shard of another width fails on all
    shard = _design()[:20] if rank == 0 else _design()[20:]
    gram, n = global_design_statistics(shard)
    built = SyncMetadataNorm.from_design_statistics(6, gram, n, keep=[0])
    try:
        global_design_statistics(shard if rank == 0 else shard[:, :2])
    except ValueError as exc:
        width_error = str(exc)
    res["sharded"] = {"gram_inverse": built.gram_inverse, "n": n, "width_error": width_error}
    # 5. DDP end to end: equal, then uneven batches
    res["ddp_even"] = _ddp_cnn(rank, world_size, (6, 6), seed=0)
    res["ddp_uneven"] = _ddp_cnn(rank, world_size, (4, 9), seed=1)
    # 6. torch.compile(fullgraph=True) of the training step (collectives traced, no break)
    compiled_layer = _layer(SyncMetadataNorm, torch.float64, 0.1)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")
    outs, grads = _run_steps(compiled, SPLITS["uneven"], torch.float64, rank)
    res["compiled"] = {"outs": outs, "grads": grads, "buffers": _buffers(compiled_layer)}
    # 7. last (it leaves the short group out of step): wrong widths raise on rank 1 before any
    # collective; rank 0 waits in its collective until the group's timeout
    layer = _layer(SyncMetadataNorm, torch.float64, 0.1, process_group=short)
    feats, rows, _ = _batch(0, 8, torch.float64)
    errors = []
    start = time.perf_counter()
    if rank == 1:
        for f, r in ((feats[:, :1], rows), (feats, torch.cat([rows, rows[:, :1]], 1))):
            try:
                layer(f, r)
            except ValueError as exc:
                errors.append(str(exc))
    else:
        try:
            layer(feats, rows)
        except Exception as exc:  # the collective's timeout (a RuntimeError or DistError)
            errors.append(type(exc).__name__)
    res["mismatch"] = {"errors": errors, "seconds": time.perf_counter() - start}
    return res


@pytest.fixture(scope="module")
def results():
    return spawn(_scenarios, 2, timeout_s=180)


# --------------------------------------------------------------------------------------------
# parity with one process on the union batch
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle():
    """Plain MetadataNorm on the union batches, per scenario."""
    out = {}
    for dname, dtype in DTYPES.items():
        for mname, momentum in MOMENTA.items():
            for sname, splits in SPLITS.items():
                layer = _layer(MetadataNorm, dtype, momentum)
                outs, grads = _run_steps(layer, splits, dtype)
                out[dname, mname, sname] = {
                    "outs": outs,
                    "grads": grads,
                    "buffers": _buffers(layer),
                }
    return out


@pytest.mark.parametrize("sname", list(SPLITS))
@pytest.mark.parametrize("mname", list(MOMENTA))
@pytest.mark.parametrize("dname", list(DTYPES))
def test_outputs_gradients_and_running_beta_match_the_union_batch(
    results, oracle, dname, mname, sname
):
    key = (dname, mname, sname)
    tol = {"atol": 1e-12, "rtol": 0} if dname == "float64" else {"atol": 1e-5, "rtol": 1e-5}
    m0, _ = SPLITS[sname]
    want = oracle[key]
    for rank, part in ((0, slice(0, m0)), (1, slice(m0, None))):
        got = results[rank][key]
        for step in range(STEPS):
            torch.testing.assert_close(got["outs"][step], want["outs"][step][part], **tol)
            torch.testing.assert_close(got["grads"][step], want["grads"][step][part], **tol)
        for name in BUFFERS:
            torch.testing.assert_close(got["buffers"][name], want["buffers"][name], **tol)
    # identical on both ranks, without a broadcast
    for name in BUFFERS:
        assert torch.equal(results[0][key]["buffers"][name], results[1][key]["buffers"][name])
    assert int(want["buffers"]["num_samples_tracked"]) == STEPS * sum(SPLITS[sname])


def test_compiled_fullgraph_step_matches_the_union_batch(results, oracle):
    """torch.compile(fullgraph=True, backend="aot_eager"): the functional collectives trace."""
    want = oracle["float64", "0.1", "uneven"]
    m0 = SPLITS["uneven"][0]
    for rank, part in ((0, slice(0, m0)), (1, slice(m0, None))):
        got = results[rank]["compiled"]
        for step in range(STEPS):
            torch.testing.assert_close(got["outs"][step], want["outs"][step][part], **EXACT)
            torch.testing.assert_close(got["grads"][step], want["grads"][step][part], **EXACT)
        for name in BUFFERS:
            torch.testing.assert_close(got["buffers"][name], want["buffers"][name], **EXACT)


def test_channelwise_layer_matches_the_union_batch(results):
    layer = _channelwise(MetadataNorm)
    want_outs, want_grads = _run_steps(layer, SPLITS["uneven"], torch.float64)
    m0 = SPLITS["uneven"][0]
    for rank, part in ((0, slice(0, m0)), (1, slice(m0, None))):
        got = results[rank]["channelwise"]
        assert got["buffers"]["running_beta"].shape == (K, SHAPE[0])
        for step in range(STEPS):
            torch.testing.assert_close(got["outs"][step], want_outs[step][part], **EXACT)
            torch.testing.assert_close(got["grads"][step], want_grads[step][part], **EXACT)
        for name, want in _buffers(layer).items():
            torch.testing.assert_close(got["buffers"][name], want, **EXACT)


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("ename", ESTIMATORS)
def test_every_estimator_synced_matches_the_union_batch(results, ename, dname):
    """RLS (XᵀX, XᵀF and m summed), PMDN (its gradient statistics summed), the scale layer
    (Xᵀ log σ, Σ log σ, Σ x and m summed) and the location-scale layer (XᵀF and m, then the
    residual's Xᵀ s, Σ s and Σ x) take the step of the union batch on every rank."""
    dtype = DTYPES[dname]
    tol = {"atol": 1e-12, "rtol": 1e-12} if dname == "float64" else {"atol": 1e-5, "rtol": 1e-5}
    layer = _estimator(ename, dtype)
    outs, grads = _run_steps(layer, SPLITS["uneven"], dtype)
    m0 = SPLITS["uneven"][0]
    for rank in (0, 1):
        got = results[rank]["estimator", ename, dname]
        part = slice(0, m0) if rank == 0 else slice(m0, None)
        for a, b in zip(got["outs"], outs, strict=True):
            torch.testing.assert_close(a, b[part], **tol)
        for a, b in zip(got["grads"], grads, strict=True):
            torch.testing.assert_close(a, b[part], **tol)
        for name, value in _state(layer).items():
            torch.testing.assert_close(got["state"][name], value, **tol)


@pytest.mark.parametrize("ename", ESTIMATORS)
def test_refit_under_ddp_gives_every_rank_the_union_refit(results, ename):
    """refit_running_beta all-reduces its sums: each rank gets the state of a refit over the
    union of the shards (checked against the same refit in one process)."""
    layer = _estimator(ename, torch.float64)
    _run_steps(layer, SPLITS["even"], torch.float64)
    refit_running_beta(layer, [_batch(10 + step, 12, torch.float64)[:2] for step in range(3)])
    for rank in (0, 1):
        got = results[rank]["refit", ename]
        for name, value in _state(layer).items():
            torch.testing.assert_close(got[name], value, atol=1e-10, rtol=1e-10)


def test_a_group_of_one_process_is_a_metadata_norm(results):
    assert results[0]["singleton"] is True and results[1]["singleton"] is True


def test_the_small_union_batch_uses_the_running_beta(results, oracle):
    """M = 3 ≤ K: the output is F − X_R·β_run (the first step: β_run = 0, so F itself)."""
    feats, _, _ = _batch(0, 3, torch.float64)
    torch.testing.assert_close(results[0]["float64", "0.1", "small"]["outs"][0], feats[:2])
    torch.testing.assert_close(results[1]["float64", "0.1", "small"]["outs"][0], feats[2:])


@pytest.mark.parametrize("rank", [0, 1])
def test_an_empty_union_batch_returns_the_input_and_moves_no_buffer(results, rank):
    for value in results[rank].values():
        if isinstance(value, dict) and "after_empty" in value:
            assert value["out_empty_shape"] == (0, *SHAPE)
            for name in BUFFERS:
                assert torch.equal(value["after_empty"][name], value["buffers"][name])


def test_a_nonfinite_estimate_on_one_rank_is_skipped_on_every_rank(results):
    for rank in (0, 1):
        got = results[rank]["nonfinite"]
        assert int(got["num_batches_skipped"]) == 1
        assert int(got["num_batches_tracked"]) == 0 and int(got["num_samples_tracked"]) == 0
        assert torch.equal(got["running_beta"], torch.zeros(K, 6, dtype=torch.float64))


def test_evaluation_on_one_rank_alone_returns_without_a_collective(results):
    got = results[0]["eval"]
    assert got["seconds"] < 2.0  # the group's timeout is 3 s
    beta = got["running_beta"]
    want = got["feats"].reshape(5, -1) - got["rows"][:, 1:] @ beta[1:]
    torch.testing.assert_close(got["out"].reshape(5, -1), want, atol=1e-12, rtol=0)
    assert beta.abs().sum() > 0


def test_mismatched_widths_raise_on_their_rank_before_any_collective(results):
    bad, good = results[1]["mismatch"], results[0]["mismatch"]
    assert len(bad["errors"]) == 2
    assert "features per sample" in bad["errors"][0]
    assert "(8, 3)" in bad["errors"][1] and "got" in bad["errors"][1]
    assert bad["seconds"] < 1.0
    # the other rank is not left hanging: its collective times out with the group
    assert len(good["errors"]) == 1 and good["seconds"] < 30


def test_sharded_design_statistics_give_the_whole_design_layer(results):
    want = MetadataNorm(6, _design(), keep=()).gram_inverse
    for rank in (0, 1):
        got = results[rank]["sharded"]
        assert float(got["n"]) == N
        torch.testing.assert_close(got["gram_inverse"], want, atol=1e-12, rtol=1e-10)
        assert "K = " in got["width_error"] and "from 2 to 3" in got["width_error"]


# --------------------------------------------------------------------------------------------
# DDP end to end
# --------------------------------------------------------------------------------------------


def _single_process_cnn(splits, seed):
    torch.manual_seed(seed)
    model = _SmallCNN(_design()).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(STEPS):
        x, rows, y = _cnn_batch(step, sum(splits), seed)
        logits, _ = model(x, rows)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.squeeze(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize(("name", "splits", "seed"), [("even", (6, 6), 0), ("uneven", (4, 9), 1)])
def test_ddp_training_matches_one_process_on_the_union_batches(results, name, splits, seed):
    model = _single_process_cnn(splits, seed)
    for rank in (0, 1):
        got = results[rank][f"ddp_{name}"]
        assert "SyncMetadataNorm" in got["types"] and "MetadataNorm" not in got["types"]
        for key, want in model.named_parameters():
            torch.testing.assert_close(got["params"][key], want.detach(), atol=1e-10, rtol=0)
        for key, want in model.named_buffers():
            if "design_rows" in key:  # each process checks its own rows against the design
                continue
            torch.testing.assert_close(got["buffers"][key], want, atol=1e-10, rtol=0)
    assert int(model.norm1.num_batches_tracked) == STEPS


def test_ddp_training_moved_the_weights(results):
    """The comparison above is not vacuous: the weights changed from their initial values."""
    torch.manual_seed(0)
    init = _SmallCNN(_design()).double()
    got = results[0]["ddp_even"]["params"]
    assert (got["conv1.weight"] - init.conv1.weight).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------
# one process: conversion, sharded designs
# --------------------------------------------------------------------------------------------


def test_convert_and_revert_share_buffers_and_attributes():
    model = _SmallCNN(_design())
    model.norm2.custom_option = "carried"
    old = {k: v for k, v in model.named_buffers()}
    synced = SyncMetadataNorm.convert_sync_metadata_norm(model, process_group="group")
    assert synced is model
    for name in ("norm1", "norm2"):
        layer = getattr(model, name)
        assert type(layer) is SyncMetadataNorm and layer.process_group == "group"
    assert model.norm2.custom_option == "carried" and model.norm2.keep == (0,)
    for k, v in model.named_buffers():
        assert v.data_ptr() == old[k].data_ptr()
    reverted = revert_sync_metadata_norm(model)
    for name in ("norm1", "norm2"):
        layer = getattr(reverted, name)
        assert type(layer) is MetadataNorm and not hasattr(layer, "process_group")
    for k, v in reverted.named_buffers():
        assert v.data_ptr() == old[k].data_ptr()
    # a lone layer is returned converted; its containers are its own
    single = MetadataNorm(6, _design(), keep=())
    converted = SyncMetadataNorm.convert_sync_metadata_norm(single)
    assert type(converted) is SyncMetadataNorm and converted._buffers is not single._buffers
    assert converted.gram_inverse is single.gram_inverse
    assert set(converted.state_dict()) == set(single.state_dict())
    # a lazy layer converts once it has run (it is a MetadataNorm then), not before
    from metanorm.nn import LazyMetadataNorm

    lazy = LazyMetadataNorm(_design(), keep=())
    with pytest.raises(ValueError, match="run one batch"):
        SyncMetadataNorm.convert_sync_metadata_norm(lazy)
    lazy(torch.randn(5, 6, dtype=torch.float64), _design()[:5])
    assert type(SyncMetadataNorm.convert_sync_metadata_norm(lazy)) is SyncMetadataNorm

    class Custom(MetadataNorm):
        pass

    with pytest.raises(TypeError, match="Custom"):
        SyncMetadataNorm.convert_sync_metadata_norm(
            torch.nn.Sequential(Custom(6, _design(), keep=()))
        )


def test_without_a_process_group_it_is_a_metadata_norm():
    plain, synced = (
        _layer(MetadataNorm, torch.float64, 0.1),
        _layer(SyncMetadataNorm, torch.float64, 0.1),
    )
    p_out, p_grad = _run_steps(plain, (10, 5), torch.float64)
    s_out, s_grad = _run_steps(synced, (10, 5), torch.float64)
    for a, b in zip(p_out + p_grad, s_out + s_grad, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(plain.running_beta, synced.running_beta)


def test_from_design_statistics_builds_the_whole_design_layer():
    design = _design()
    gram, n = global_design_statistics(design)
    torch.testing.assert_close(gram, design.T @ design, atol=1e-12, rtol=0)
    assert float(n) == N
    built = SyncMetadataNorm.from_design_statistics(6, gram, n, keep=[0], ridge=0.5)
    want = torch.linalg.inv(design.T @ design + 0.5 * torch.eye(K, dtype=torch.float64))
    torch.testing.assert_close(built.gram_inverse, want, atol=1e-12, rtol=1e-10)
    assert built.keep == (0,) and float(built.n_samples) == N
    plain = SyncMetadataNorm.from_design_statistics(6, gram, n, keep=[0])
    torch.testing.assert_close(plain.gram_inverse, MetadataNorm(6, design, keep=()).gram_inverse)
    feats, rows, _ = _batch(0, 12, torch.float64)
    ref = MetadataNorm(6, design, keep=[0])
    torch.testing.assert_close(plain(feats, rows), ref(feats, rows), atol=1e-12, rtol=0)
    collinear = torch.cat([design, 2 * design[:, 1:2]], 1)
    g2, n2 = global_design_statistics(collinear)
    with pytest.raises(ValueError, match="collinear"):
        SyncMetadataNorm.from_design_statistics(6, g2, n2)


class _OneProcess:
    """The synced layer's reducer in a world of one process (a sum over one process)."""

    packs_count = True

    def __init__(self):
        self.calls = 0

    def sum(self, tensor):
        self.calls += 1
        return tensor.clone()


def test_packed_reducer_path_matches_the_plain_map_and_passes_gradgradcheck():
    from metanorm.nn import functional as MF

    design = _design()
    gram_inverse = MetadataNorm(6, design, keep=()).gram_inverse
    mask = torch.tensor([False, True, True])
    feats, rows, grad = _batch(0, 9, torch.float64)
    feats = feats.reshape(9, 6).requires_grad_()
    reducer = _OneProcess()
    out, beta, count = MF.batch_residual(feats, rows, gram_inverse, N, mask, reducer=reducer)
    (dx,) = torch.autograd.grad(out, feats, grad.reshape(9, 6))
    assert reducer.calls == 2 and float(count) == 9  # one collective per direction
    # oracle: the paper's formula, β̂ = (N/m) Σ⁻¹ X_bᵀF by least-squares algebra in autograd
    ref_beta = (N / 9) * gram_inverse @ rows.T @ feats
    ref = feats - (rows * mask) @ ref_beta
    (ref_dx,) = torch.autograd.grad(ref, feats, grad.reshape(9, 6))
    torch.testing.assert_close(out, ref, **EXACT)
    torch.testing.assert_close(beta, ref_beta.detach(), **EXACT)
    torch.testing.assert_close(dx, ref_dx, **EXACT)

    def f(t):
        return MF.batch_residual(t, rows, gram_inverse, N, mask, reducer=_OneProcess())[0]

    assert torch.autograd.gradcheck(f, (feats.detach().requires_grad_(),))
    assert torch.autograd.gradgradcheck(f, (feats.detach().requires_grad_(),))


@pytest.mark.parametrize(("momentum", "counters"), [(0.1, True), (0.1, False), (None, True)])
def test_update_running_beta_with_no_samples_moves_nothing(momentum, counters):
    """M = 0: neither the running β nor any counter moves (momentum=None needs the counters)."""
    from metanorm.nn import functional as MF

    running = torch.arange(6.0, dtype=torch.float64).reshape(3, 2)
    before = running.clone()
    kw = {}
    if counters:
        kw = {name: torch.tensor(4) for name in BUFFERS[1:]}
    zero = torch.zeros((), dtype=torch.float64)
    MF.update_running_beta(running, torch.ones(3, 2, dtype=torch.float64), zero, momentum, **kw)
    assert torch.equal(running, before)
    assert all(int(v) == 4 for v in kw.values())
