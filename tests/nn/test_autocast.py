"""Training and evaluation under torch.autocast: computed in float32, the input's dtype out."""

import pytest
import torch

from metanorm.linalg import fit_beta
from metanorm.nn import MetadataNorm, MetadataSequential


def _data(n=256):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n, 1), generator=g).float()
    cf = torch.rand(n, 1, generator=g) * 3 + 2 * y
    design = torch.cat([y, cf, torch.ones(n, 1)], dim=1)
    x = torch.randn(n, 6, generator=g) + cf
    return design, x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_training_and_evaluation_under_cpu_autocast(dtype):
    design, x = _data()
    torch.manual_seed(0)
    model = MetadataSequential(
        torch.nn.Linear(6, 16),
        MetadataNorm(16, design, keep=[0]),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 1),
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for i in range(0, 256, 64):
        with torch.autocast("cpu", dtype=dtype):
            out = model(x[i : i + 64], design[i : i + 64])
            assert out.dtype == dtype
            loss = out.float().square().mean()
        loss.backward()  # outside autocast, as recommended
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        opt.zero_grad()
    mdn = model[1]
    assert mdn.running_beta.dtype == torch.float32 and int(mdn.num_batches_tracked) == 4
    assert int(mdn.num_batches_skipped) == 0
    model.eval()
    with torch.autocast("cpu", dtype=dtype):
        hidden = model[0](x)
        out = mdn(hidden, design)
    assert hidden.dtype == dtype and out.dtype == dtype
    expected = hidden.float() - design[:, 1:] @ mdn.running_beta[1:]
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_under_autocast_computes_in_float32(dtype):
    design, x = _data()
    feats = (x @ torch.randn(6, 5)).to(dtype)
    layer = MetadataNorm(5, design, keep=[0], track_running_stats=False)
    with torch.autocast("cpu", dtype=dtype):
        out = layer(feats, design)
    # the float32 full-batch residual of the same rounded input, rounded once at the end
    f32 = feats.float()
    beta = fit_beta(design, f32).float()
    expected = (f32 - design[:, 1:] @ beta[1:]).to(dtype)
    assert out.dtype == dtype
    # one rounding of the output to `dtype` (its unit roundoff relative to the scale), no more
    ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
    scale = float(expected.float().abs().max())
    torch.testing.assert_close(out.float(), expected.float(), atol=2 * ulp * scale, rtol=0)


def test_backward_inside_autocast_region():
    design, x = _data()
    feats = x.clone().requires_grad_()
    layer = MetadataNorm(6, design, keep=[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.nn.functional.linear(feats, torch.eye(6)), design)
        out.float().sum().backward()  # the layer's backward turns autocast off inside
    assert feats.grad.dtype == torch.float32 and torch.isfinite(feats.grad).all()
