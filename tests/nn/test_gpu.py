"""The MDN layers on a CUDA device (``pytest -m gpu``; skipped without CUDA).

Each check is against float64 results computed on the CPU, for every estimator where it
applies: training and evaluation in float32, no host sync in the training forward (sync debug
mode "error"), ``torch.compile(fullgraph=True)`` with inductor, autocast float16/bfloat16, a CUDA
graph capture of a training step, and dcor² on the device.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metanorm import metrics
from metanorm.nn import (
    MetadataNorm,
    MetadataScaleNorm,
    MetadataSequential,
    PenaltyMetadataNorm,
    RecursiveMetadataNorm,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = torch.device("cuda")
BATCH = 128


def _problem(n: int = 512, d: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n, 1), generator=g).double()
    cf = torch.rand(n, 1, generator=g, dtype=torch.float64) * 3 + 2 * y
    site = torch.randint(0, 3, (n,), generator=g)
    design = torch.cat(
        [y, cf, (site == 1).double()[:, None], (site == 2).double()[:, None], torch.ones(n, 1)], 1
    )
    feats = torch.randn(n, d, generator=g, dtype=torch.float64) + design @ torch.randn(
        5, d, generator=g, dtype=torch.float64
    )
    return design, feats


DESIGN, FEATS = _problem()
K, D = DESIGN.shape[1], FEATS.shape[1]

ESTIMATORS = {
    "batch": lambda dtype=None: MetadataNorm(D, DESIGN, keep=[0], dtype=dtype),
    "recursive": lambda dtype=None: RecursiveMetadataNorm(D, K, keep=[0], dtype=dtype),
    "penalty": lambda dtype=None: PenaltyMetadataNorm(D, K, keep=[0], lr=0.05, dtype=dtype),
    "scale": lambda dtype=None: MetadataScaleNorm(D, DESIGN, keep=[0], dtype=dtype),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_train_and_eval_in_float32_match_float64_on_the_cpu(name):
    ref = ESTIMATORS[name](torch.float64)
    gpu = ESTIMATORS[name]().to(DEV)
    worst = 0.0
    for i in range(0, len(FEATS), BATCH):
        f64 = FEATS[i : i + BATCH].clone().requires_grad_()
        f32 = FEATS[i : i + BATCH].float().to(DEV).requires_grad_()
        g = torch.randn_like(f64)
        o64 = ref(f64, DESIGN[i : i + BATCH])
        o32 = gpu(f32, DESIGN[i : i + BATCH].float().to(DEV))
        o64.backward(g)
        o32.backward(g.float().to(DEV))
        worst = max(worst, _rel(o32, o64), _rel(f32.grad, f64.grad))
    ref.eval()
    gpu.eval()
    worst = max(worst, _rel(gpu(FEATS.float().to(DEV), DESIGN.float().to(DEV)), ref(FEATS, DESIGN)))
    assert worst < 1e-4


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_the_training_forward_makes_no_host_sync(name):
    layer = ESTIMATORS[name]().to(DEV)
    f, x = FEATS[:BATCH].float().to(DEV), DESIGN[:BATCH].float().to(DEV)
    layer(f, x)  # warm-up (allocations, lazy inits)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(f, x)
        layer(f[:3], x[:3])  # m <= K: the fallback path
        layer.training = False  # not eval(): that reads the counters on purpose
        layer(f, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return MetadataSequential(
        nn.Linear(D, 64),
        MetadataNorm(64, DESIGN, keep=[0]),
        nn.ReLU(),
        nn.Linear(64, 8),
        MetadataNorm(8, DESIGN, keep=[0], momentum=None),
    ).to(DEV)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_compile_fullgraph_inductor_train_and_eval(name):
    eager = ESTIMATORS[name]().to(DEV)
    comp = ESTIMATORS[name]().to(DEV)
    torch._dynamo.reset()
    compiled = torch.compile(comp, fullgraph=True)
    f, x = FEATS.float().to(DEV), DESIGN.float().to(DEV)
    worst = 0.0
    for i in range(0, len(f), 100):  # 512 = 5 × 100 + 12: a short last batch
        oe = eager(f[i : i + 100], x[i : i + 100])
        oc = compiled(f[i : i + 100], x[i : i + 100])
        worst = max(worst, _rel(oc, oe))
    eager.eval()
    comp.eval()
    worst = max(worst, _rel(compiled(f, x), eager(f, x)))
    assert worst < 1e-4


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_autocast_train_and_eval(amp):
    net = _model()
    f, x = FEATS.float().to(DEV), DESIGN.float().to(DEV)
    for i in range(0, len(f), BATCH):
        with torch.autocast("cuda", dtype=amp):
            out = net(f[i : i + BATCH], x[i : i + BATCH])
        assert out.dtype == amp
        out.float().square().mean().backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in net.parameters())
    mdn = net[1]
    assert int(mdn.num_batches_skipped) == 0 and int(mdn.num_batches_tracked) == 4
    net.eval()
    with torch.autocast("cuda", dtype=amp):
        hidden = net[0](f)
        out = mdn(hidden, x)
    want = hidden.double().cpu() - DESIGN[:, 1:] @ mdn.running_beta[1:].double().cpu()
    assert _rel(out, want) < (1e-2 if amp == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_cuda_graph_capture_of_a_training_step(name):
    layer = ESTIMATORS[name]().to(DEV)
    f = FEATS[:BATCH].float().to(DEV).requires_grad_()
    x = DESIGN[:BATCH].float().to(DEV)
    g = torch.randn_like(f)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            layer(f, x).backward(g)
    torch.cuda.current_stream().wait_stream(stream)
    layer.reset_running_stats()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(f, x)
        out.backward(g)
    layer.reset_running_stats()
    eager = ESTIMATORS[name]().to(DEV)
    for _ in range(3):
        graph.replay()
        want = eager(f.detach(), x)
    torch.cuda.synchronize()
    assert int(layer.num_batches_tracked) == 3, "replays must update the state"
    assert _rel(out, want) < 1e-5
    for key, value in eager.state_dict().items():
        assert _rel(layer.state_dict()[key], value) < 1e-5, key


def test_dcor_on_the_device_matches_the_cpu():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3000, 16, generator=g, dtype=torch.float64)
    b = a[:, :2] ** 2 + torch.randn(3000, 2, generator=g, dtype=torch.float64)
    for unbiased in (False, True):
        cpu = float(metrics.distance_correlation_sqr(a, b, unbiased=unbiased))
        dev = float(
            metrics.distance_correlation_sqr(
                a.float().to(DEV), b.float().to(DEV), unbiased=unbiased
            )
        )
        assert abs(dev - cpu) < 1e-5
