"""Channel-wise β (K×C shared over positions) against least squares on the pooled positions."""

import numpy as np
import pytest
import torch

from metanorm.nn import LazyMetadataNorm, MetadataNorm, convert_metadata_norm


def _problem(rng, n=96, c=3, spatial=(4, 5)):
    y = rng.integers(0, 2, n)
    site = rng.integers(0, 3, n)
    age = rng.normal(size=n) + y
    x = np.column_stack([y, site == 1, site == 2, age, np.ones(n)]).astype(np.float64)
    # a per-channel metadata effect at every position, plus a per-position pattern and noise
    effect = x @ rng.normal(size=(5, c))
    effect = effect.reshape(n, c, *([1] * len(spatial)))
    f = effect * (1 + rng.normal(size=(1, c, *spatial)) * 0.3)
    f = f + rng.normal(size=(n, c, *spatial))
    return x, f


def _pooled_lstsq(x, f, keep):
    """β of shape (K, C): least squares over every (sample, position) pair, pooled."""
    n, c = f.shape[:2]
    positions = int(np.prod(f.shape[2:]))
    xs = np.repeat(x, positions, axis=0)  # (n·P, K), the row of each position's sample
    fs = f.reshape(n, c, positions).transpose(0, 2, 1).reshape(n * positions, c)
    beta = np.linalg.lstsq(xs, fs, rcond=None)[0]
    remove = [k for k in range(x.shape[1]) if k not in keep]
    fitted = x[:, remove] @ beta[remove]  # (n, C)
    return f - fitted[:, :, None, None], beta


def test_full_batch_equals_pooled_least_squares_and_eval_uses_it(rng):
    x, f = _problem(rng)
    expected, beta = _pooled_lstsq(x, f, keep=[0])
    layer = MetadataNorm(3, x, keep=[0], momentum=None, channelwise=True, dtype=torch.float64)
    ft, xt = torch.tensor(f), torch.tensor(x)
    out = layer(ft, xt)
    np.testing.assert_allclose(out.detach().numpy(), expected, atol=1e-10, rtol=0)
    np.testing.assert_allclose(layer.running_beta.numpy(), beta, atol=1e-10, rtol=0)
    assert layer.running_beta.shape == (5, 3)
    layer.eval()
    np.testing.assert_allclose(layer(ft, xt).numpy(), expected, atol=1e-10, rtol=0)


def test_epoch_of_batches_gives_the_pooled_beta_3d(rng):
    x, f = _problem(rng, n=90, c=2, spatial=(2, 3, 2))
    n, c = f.shape[:2]
    # the 3-D version of the oracle: pool every position
    xs = np.repeat(x, 12, axis=0)
    fs = f.reshape(n, c, 12).transpose(0, 2, 1).reshape(-1, c)
    beta = np.linalg.lstsq(xs, fs, rcond=None)[0]
    layer = LazyMetadataNorm(x, keep=[0], momentum=None, channelwise=True, dtype=torch.float64)
    ft, xt = torch.tensor(f), torch.tensor(x)
    for i in range(0, n, 32):  # 32, 32, 26: a short last batch
        layer(ft[i : i + 32], xt[i : i + 32])
    assert type(layer) is MetadataNorm and layer.num_features == 2
    np.testing.assert_allclose(layer.running_beta.numpy(), beta, atol=1e-10, rtol=0)
    layer.eval()
    out = layer(ft, xt).numpy()
    remove = [1, 2, 3, 4]
    fitted = (x[:, remove] @ beta[remove])[:, :, None, None, None]
    np.testing.assert_allclose(out, f - fitted, atol=1e-10, rtol=0)


def test_gradients_flow_through_the_channel_means(rng):
    x, f = _problem(rng, n=12, c=2, spatial=(2, 2))
    layer = MetadataNorm(2, x, keep=[0], channelwise=True, dtype=torch.float64)
    xt = torch.tensor(x)
    ft = torch.tensor(f, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t, xt), (ft,))
    # the map is F - P(F̄) broadcast: its gradient is the oracle's explicit matrix
    g = torch.randn_like(ft)
    (layer(ft, xt) * g).sum().backward()
    remove = [1, 2, 3, 4]
    h = x[:, remove] @ np.linalg.pinv(x)[remove]  # (m, m): the fitted part of the means
    g_np = g.numpy()
    expected = g_np - (h.T @ g_np.sum(axis=(2, 3)))[:, :, None, None] / 4
    np.testing.assert_allclose(ft.grad.numpy(), expected, atol=1e-10, rtol=0)


def test_checks_repr_state_dict_and_convert(rng):
    x, f = _problem(rng, n=40, c=3)
    layer = MetadataNorm(3, x, keep=(), channelwise=True)
    with pytest.raises(ValueError, match=r"expected input of shape \(m, C, \*\) with C = 3"):
        layer(torch.randn(40, 4, 2, 2), torch.tensor(x).float())
    with pytest.raises(TypeError, match="channelwise to be a bool"):
        MetadataNorm(3, x, keep=(), channelwise="yes")
    assert "channelwise=True" in repr(layer)
    out = layer(torch.tensor(f).float(), torch.tensor(x).float())
    assert out.shape == f.shape and out.dtype == torch.float32
    empty = MetadataNorm(3, num_metadata=5, channelwise=True)
    empty.load_state_dict(layer.state_dict())
    layer.eval()
    empty.eval()
    probe = torch.randn(7, 3, 6, 6)
    torch.testing.assert_close(
        empty(probe, torch.tensor(x[:7]).float()), layer(probe, torch.tensor(x[:7]).float())
    )
    # in a converted model: BatchNorm2d replaced by channel-wise MDN of C features
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU())
    model = convert_metadata_norm(net, x, replace=[torch.nn.BatchNorm2d], channelwise=True, keep=())
    model(torch.randn(8, 1, 6, 6), metadata=torch.tensor(x[:8]).float())
    assert net[1].num_features == 3 and net[1].running_beta.shape == (5, 3)
