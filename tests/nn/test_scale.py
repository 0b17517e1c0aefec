"""MetadataScaleNorm against its closed form (numpy as the oracle)."""

import numpy as np
import pytest
import torch

from metanorm.design import make_design
from metanorm.nn import MetadataScaleNorm


def _problem(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    c = rng.uniform(1, 6, n)
    d = make_design({"y": y, "c": c}, keep=["y"])
    g = rng.normal(size=(n, 3, 4, 4)) * (1 + 0.5 * y)[:, None, None, None]
    f = np.exp(0.3 * c)[:, None, None, None] * g + 2.0
    return d, torch.as_tensor(f)


def _log_sigma(t):
    return 0.5 * np.log(t.detach().double().flatten(2).var(2, unbiased=False).numpy())


def test_batch_estimate_is_the_closed_form_and_the_output_divides_it_out():
    d, f = _problem()
    x = d.matrix
    layer = MetadataScaleNorm(3, d, momentum=1.0, eps=1e-12, dtype=torch.float64)
    rows = torch.as_tensor(x[:40])
    out = layer(f[:40], rows)
    s = 0.5 * np.log(f[:40].flatten(2).var(2, unbiased=False).numpy() + 1e-12)
    beta = (len(x) / 40) * np.linalg.inv(x.T @ x) @ x[:40].T @ (s - s.mean(0))
    np.testing.assert_allclose(layer.running_beta.numpy(), beta, rtol=1e-10, atol=1e-12)
    removed = np.array([0.0, 1.0, 0.0])  # y kept, the intercept (constant) kept
    want = f[:40].numpy() * np.exp(-(x[:40] * removed) @ beta)[:, :, None, None]
    np.testing.assert_allclose(out.detach().numpy(), want, rtol=1e-10)
    assert layer.keep == (0, 2)


def test_an_exactly_multiplicative_effect_is_removed_and_the_label_kept():
    d, f = _problem()
    layer = MetadataScaleNorm(3, d, momentum=1.0)
    out = layer(f.float(), d.tensor().float())
    coef_in, *_ = np.linalg.lstsq(d.matrix, _log_sigma(f), rcond=None)
    coef, *_ = np.linalg.lstsq(d.matrix, _log_sigma(out), rcond=None)
    assert np.all(coef_in[1] > 0.25)
    np.testing.assert_allclose(coef[1], 0.0, atol=1e-4)
    np.testing.assert_allclose(coef[0], coef_in[0], atol=1e-4)
    layer.eval()
    torch.testing.assert_close(layer(f.float(), d.tensor().float()), out)


def test_vector_input_uses_one_scale_per_sample():
    d, f = _problem()
    layer = MetadataScaleNorm(5, d, momentum=1.0, dtype=torch.float64)
    v = f.flatten(1)[:, :5]
    out = layer(v, torch.as_tensor(d.matrix))
    s = 0.5 * np.log(v.var(1, unbiased=False).numpy() + 1e-5)[:, None]
    x = d.matrix
    beta = np.linalg.inv(x.T @ x) @ x.T @ (s - s.mean(0))
    np.testing.assert_allclose(layer.running_beta.numpy(), np.repeat(beta, 5, 1), rtol=1e-10)
    want = v.numpy() * np.exp(-(x[:, 1:2] * beta[1]))
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-10)


def test_bad_inputs():
    d, f = _problem()
    layer = MetadataScaleNorm(3, d)
    with pytest.raises(ValueError, match=r"expected input of shape \(m, 3, ...\)"):
        layer(f[:, :2].float(), d.tensor()[:200].float())
    with pytest.raises(ValueError, match="design rows"):
        layer(f.float(), d.tensor().float()[:, :2])
    with pytest.raises(ValueError, match="keep lists all"):
        MetadataScaleNorm(3, torch.ones(10, 1), keep=())
