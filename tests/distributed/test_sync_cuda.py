"""The synced MDN layers with CUDA tensors: 2 gloo processes on one GPU (``pytest -m gpu``).

NCCL cannot put two ranks on one GPU, so gloo carries the collectives (it copies CUDA tensors
through the host). Each rank runs its share of the union batches; the oracle is the plain layer
on the CPU, float64, on the union batches.
"""

from __future__ import annotations

import pytest
import torch
from _spawn import requires_gloo, spawn

from metanorm.nn import (
    MetadataNorm,
    MetadataScaleNorm,
    PenaltyMetadataNorm,
    RecursiveMetadataNorm,
    SyncMetadataNorm,
)

pytestmark = [
    pytest.mark.gpu,
    requires_gloo,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

N, K, D, SPLIT, STEPS = 64, 3, 6, (7, 25), 3


def _design():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (N, 1), generator=g).double()
    return torch.cat(
        [y, torch.randn(N, 1, generator=g, dtype=torch.float64) + y, torch.ones(N, 1)], 1
    )


def _build(name):
    if name == "batch":
        return MetadataNorm(D, _design(), keep=[0], dtype=torch.float64)
    if name == "recursive":
        return RecursiveMetadataNorm(D, K, keep=[0], dtype=torch.float64)
    if name == "penalty":
        return PenaltyMetadataNorm(D, K, keep=[0], dtype=torch.float64)
    return MetadataScaleNorm(D, _design(), keep=[0], dtype=torch.float64)


NAMES = ("batch", "recursive", "penalty", "scale")


def _batch(step):
    g = torch.Generator().manual_seed(step)
    idx = torch.randint(0, N, (sum(SPLIT),), generator=g)
    rows = _design()[idx]
    feats = torch.randn(len(idx), D, generator=g, dtype=torch.float64) + 2 * rows[:, 1:2]
    return feats, rows


def _run(layer, rank=None, device="cpu"):
    outs = []
    for step in range(STEPS):
        feats, rows = _batch(step)
        if rank is not None:
            part = slice(0, SPLIT[0]) if rank == 0 else slice(SPLIT[0], None)
            feats, rows = feats[part], rows[part]
        outs.append(layer(feats.to(device), rows.to(device)).detach().cpu())
    return outs


def _scenarios(rank, world_size):
    torch.cuda.set_device(0)
    res = {}
    for name in NAMES:
        layer = SyncMetadataNorm.convert_sync_metadata_norm(_build(name)).to("cuda")
        res[name] = {
            "outs": _run(layer, rank, "cuda"),
            "state": {k: v.cpu() for k, v in layer.state_dict().items()},
        }
    return res


@pytest.fixture(scope="module")
def results():
    return spawn(_scenarios, 2, timeout_s=240)


@pytest.mark.parametrize("name", NAMES)
def test_synced_layers_on_cuda_match_one_process_on_the_union_batch(results, name):
    layer = _build(name)
    outs = _run(layer)
    for rank in (0, 1):
        part = slice(0, SPLIT[0]) if rank == 0 else slice(SPLIT[0], None)
        for got, want in zip(results[rank][name]["outs"], outs, strict=True):
            torch.testing.assert_close(got, want[part], atol=1e-10, rtol=1e-10)
        for key, value in layer.state_dict().items():
            torch.testing.assert_close(
                results[rank][name]["state"][key], value, atol=1e-10, rtol=1e-10
            )
