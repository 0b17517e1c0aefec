"""MetadataLocationScaleNorm: ComBat's location-scale model removed batch by batch.

The oracles: the closed form of the model (an input built to follow it exactly), the batch GLM
(:class:`~metanorm.nn.MetadataNorm`) on a pure-location input and the scale layer
(:class:`~metanorm.nn.MetadataScaleNorm`) on a pure-scale input, numpy least squares for the
refit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metanorm.nn import (
    LazyMetadataLocationScaleNorm,
    MetadataLocationScaleNorm,
    MetadataNorm,
    MetadataScaleNorm,
)
from metanorm.nn.utils import refit_running_beta

C, H = 3, 4
P = H * H
KEPT = [0, 4]  # the label and the intercept


def _design(n0: int = 60, seed: int = 0) -> torch.Tensor:
    """Columns [y, site 1, site 2, age, 1]; every row twice (rows i and n0 + i are equal)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n0,), generator=g).double()
    site = torch.randint(0, 3, (n0,), generator=g)
    age = torch.rand(n0, generator=g, dtype=torch.float64) * 2 - 1 + 0.3 * y
    x0 = torch.stack(
        [y, (site == 1).double(), (site == 2).double(), age, torch.ones(n0, dtype=torch.float64)],
        dim=1,
    )
    return torch.cat([x0, x0])


def _unit_noise(n0: int, seed: int = 1) -> torch.Tensor:
    """ε of spatial mean 0 and standard deviation 1 per sample and channel, orthogonal to the
    design per feature: the second half is the first negated (the design rows repeat)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n0, C, P, generator=g, dtype=torch.float64)
    e = e - e.mean(dim=2, keepdim=True)
    e = e / e.std(dim=2, unbiased=False, keepdim=True)
    return torch.cat([e, -e])


def _coefficients(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    beta = torch.randn(5, C * P, generator=g, dtype=torch.float64)
    gamma = 0.4 * torch.randn(5, C, generator=g, dtype=torch.float64)
    return beta, gamma


def _compose(x, beta, gamma, eps):
    loc = (x @ beta).reshape(len(x), C, P)
    return (loc + torch.exp(x @ gamma)[:, :, None] * eps).reshape(len(x), C, H, H)


def _masks() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kept, constant, removed) column masks as float64 rows to multiply the design by."""
    kept, constant = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    kept[KEPT] = 1
    constant[4] = 1
    return kept, constant, 1 - kept


def _layer(x: torch.Tensor, **kw) -> MetadataLocationScaleNorm:
    return MetadataLocationScaleNorm(
        C, x, keep=[0], num_positions=P, eps=1e-30, dtype=torch.float64, **kw
    )


def test_exact_location_scale_input_is_restored_to_the_closed_form():
    x = _design()
    eps = _unit_noise(len(x) // 2)
    beta, gamma = _coefficients()
    f = _compose(x, beta, gamma, eps)
    kept, _, _ = _masks()
    want = _compose(x * kept, beta, gamma, eps)  # X_K β_K + exp(X_K γ_K) ε
    layer = _layer(x, use_kept_rows=True)
    assert layer.keep == (0, 4)  # the intercept is kept without being named
    out = layer(f, x)
    torch.testing.assert_close(out, want, atol=1e-9, rtol=1e-9)
    # the running state took the first batch whole: β, and γ but its intercept (centred s)
    torch.testing.assert_close(layer.running_beta, beta, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(layer.running_gamma[:4], gamma[:4], atol=1e-9, rtol=1e-9)
    layer.eval()
    torch.testing.assert_close(layer(f, x), want, atol=1e-9, rtol=1e-9)


def test_default_output_scales_the_label_location_and_never_reads_the_label():
    x = _design()
    eps = _unit_noise(len(x) // 2)
    beta, gamma = _coefficients()
    f = _compose(x, beta, gamma, eps)
    kept, constant, removed = _masks()
    # X_C β_C + (X_y β_y + exp(X_K γ_K + X_R γ_R) ε) · exp(-X_R γ_R)
    factor = torch.exp(-(x * removed) @ gamma)[:, :, None]
    label = ((x * (kept - constant)) @ beta).reshape(-1, C, P)
    scaled = (label + torch.exp(x @ gamma)[:, :, None] * eps) * factor
    want = (((x * constant) @ beta).reshape(-1, C, P) + scaled).reshape(f.shape)
    layer = _layer(x)
    torch.testing.assert_close(layer(f, x), want, atol=1e-9, rtol=1e-9)
    layer.eval()
    no_label = x.clone()
    no_label[:, 0] = 0  # evaluation does not read the kept column
    torch.testing.assert_close(layer(f, no_label), want, atol=1e-9, rtol=1e-9)
    # with no label effect on the location, the default output is ComBat's too
    beta[0] = 0
    f0 = _compose(x, beta, gamma, eps)
    torch.testing.assert_close(
        _layer(x)(f0, x), _compose(x * kept, beta, gamma, eps), atol=1e-9, rtol=1e-9
    )


@pytest.mark.parametrize("use_kept_rows", [False, True])
def test_pure_location_input_gives_what_metadata_norm_gives(use_kept_rows):
    x = _design()
    eps = _unit_noise(len(x) // 2)
    beta, _ = _coefficients()
    f = _compose(x, beta, torch.zeros(5, C, dtype=torch.float64), eps)
    layer = _layer(x, use_kept_rows=use_kept_rows)
    mdn = MetadataNorm(C * P, x, keep=KEPT, dtype=torch.float64)
    for _ in range(2):  # training, then the running state in evaluation
        torch.testing.assert_close(layer(f, x), mdn(f, x), atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(layer.running_beta, mdn.running_beta, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(
            layer.running_gamma[:4], torch.zeros(4, C, dtype=torch.float64), atol=1e-9, rtol=0
        )
        layer.eval()
        mdn.eval()


@pytest.mark.parametrize("use_kept_rows", [False, True])
def test_pure_scale_input_gives_what_the_scale_layer_gives(use_kept_rows):
    x = _design()
    eps = _unit_noise(len(x) // 2)
    _, gamma = _coefficients()
    f = _compose(x, torch.zeros(5, C * P, dtype=torch.float64), gamma, eps)
    layer = _layer(x, use_kept_rows=use_kept_rows)
    scale = MetadataScaleNorm(C, x, keep=[0], eps=1e-30, dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(layer(f, x), scale(f, x), atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(layer.running_gamma, scale.running_beta, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(
            layer.running_beta, torch.zeros(5, C * P, dtype=torch.float64), atol=1e-9, rtol=0
        )
        layer.eval()
        scale.eval()


def test_features_without_positions_use_the_per_feature_log_absolute_residual():
    """(m, C) input: s = ½·log(r² + eps) per feature; with ε normal and independent of the
    design, γ̂ of the removed columns is close to γ (its sd here is about 0.02: bar 0.1)."""
    g = torch.Generator().manual_seed(7)
    n = 20000
    site = torch.randint(0, 2, (n,), generator=g).double()
    y = torch.randint(0, 2, (n,), generator=g).double()
    x = torch.stack([y, site, torch.ones(n, dtype=torch.float64)], 1)
    beta = torch.tensor([[1.0, -1.0], [2.0, 0.5], [0.3, 0.0]], dtype=torch.float64)
    gamma = torch.tensor([[0.2, 0.0], [0.7, -0.5], [0.0, 0.1]], dtype=torch.float64)
    e = torch.randn(n, 2, generator=g, dtype=torch.float64)
    f = x @ beta + torch.exp(x @ gamma) * e
    layer = MetadataLocationScaleNorm(2, x, keep=[0], dtype=torch.float64)
    out = layer(f, x)
    assert layer.running_beta.shape == (3, 2) and layer.running_gamma.shape == (3, 2)
    np.testing.assert_allclose(layer.running_gamma[1].numpy(), gamma[1].numpy(), atol=0.1)
    # per site, the output's standard deviation no longer depends on the site
    for j in range(2):
        sd = [float(out[(site == s) & (y == 0), j].std()) for s in (0, 1)]
        assert abs(np.log(sd[1] / sd[0])) < 0.1
    # the (m, C) log-scale is the one documented
    r = torch.randn(5, 2, 1, dtype=torch.float64)
    torch.testing.assert_close(layer.log_scale(r), 0.5 * torch.log(r[:, :, 0] ** 2 + layer.eps))


def test_refit_takes_two_passes_least_squares_then_residual_log_scale():
    x = _design()
    eps = _unit_noise(len(x) // 2)
    beta, gamma = _coefficients()
    g = torch.Generator().manual_seed(9)
    f = _compose(x, beta, gamma, eps) + 0.3 * torch.randn(len(x), C, H, H, generator=g).double()
    layer = _layer(x)
    for i in range(0, len(x), 40):  # a few training steps leave a lagging running state
        layer(f[i : i + 40] * 1.5, x[i : i + 40])
    loader = [(f[i : i + 30], x[i : i + 30]) for i in range(0, len(x), 30)]
    assert refit_running_beta(layer, loader) == 1
    flat = f.reshape(len(x), -1).numpy()
    coef, *_ = np.linalg.lstsq(x.numpy(), flat, rcond=None)  # the oracle: numpy lstsq
    np.testing.assert_allclose(layer.running_beta.numpy(), coef, atol=1e-8)
    r = (flat - x.numpy() @ coef).reshape(len(x), C, P)
    s = 0.5 * np.log(r.var(axis=2) + layer.eps)
    coef_s, *_ = np.linalg.lstsq(x.numpy(), s, rcond=None)
    np.testing.assert_allclose(layer.running_gamma.numpy(), coef_s, atol=1e-8)
    assert int(layer.num_samples_tracked) == len(x)


def test_lazy_layer_infers_channels_and_positions():
    x = _design()
    layer = LazyMetadataLocationScaleNorm(x, keep=[0], dtype=torch.float64)
    f = torch.randn(len(x), C, H, H, dtype=torch.float64)
    out = layer(f, x)
    assert type(layer) is MetadataLocationScaleNorm
    assert (layer.num_channels, layer.num_positions) == (C, P)
    assert layer.running_state.shape == (5, C * P + C)
    torch.testing.assert_close(out, _layer(x)(f, x), atol=1e-6, rtol=1e-6)  # eps differs


def test_bad_input_says_what_was_expected():
    x = _design()
    layer = _layer(x)
    with pytest.raises(ValueError, match="16 positions per channel"):
        layer(torch.randn(4, C, 3, 3, dtype=torch.float64), x[:4])
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(4, C, H, H, dtype=torch.long), x[:4])
    with pytest.raises(ValueError, match="num_positions"):
        MetadataLocationScaleNorm(C, x, num_positions=0, keep=())
    with pytest.raises(TypeError, match="use_kept_rows"):
        MetadataLocationScaleNorm(C, x, use_kept_rows=1, keep=())
    with pytest.raises(ValueError, match=r"design= .* or num_metadata="):
        MetadataLocationScaleNorm(C)
