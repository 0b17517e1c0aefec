"""MetadataNorm against closed-form least squares, and its contract (modes, buffers, errors)."""

import numpy as np
import pytest
import torch
from torch import nn

from metanorm.design import make_design
from metanorm.nn import (
    MetadataNorm,
    MetadataSequential,
    NonFiniteEstimateError,
    metadata_norm,
)


def _problem(rng, n=240, d=7, dtype=np.float64):
    """Features depending on a label y, a continuous confounder c correlated with y, and a site."""
    y = rng.integers(0, 2, n)
    c = rng.uniform(1, 4, n) + 2 * y
    site = rng.choice(["a", "b", "c"], n)
    x = np.column_stack([y, c, site == "b", site == "c", np.ones(n)]).astype(dtype)
    f = (
        np.outer(y, rng.normal(size=d))
        + np.outer(c, rng.normal(size=d))
        + np.outer(site == "b", rng.normal(size=d))
        + rng.normal(size=(n, d))
    ).astype(dtype)
    return x, f, y, c


def _lstsq_residual(x, f, keep):
    beta = np.linalg.lstsq(x, f, rcond=None)[0]
    remove = [k for k in range(x.shape[1]) if k not in keep]
    return f - x[:, remove] @ beta[remove], beta


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_full_batch_equals_lstsq_residual(rng, dtype, tol):
    x, f, _, _ = _problem(rng)
    expected, _ = _lstsq_residual(x, f, keep=[0])
    layer = MetadataNorm(f.shape[1], x, keep=[0], dtype=dtype)
    out = layer(torch.tensor(f, dtype=dtype), torch.tensor(x, dtype=dtype))
    # error relative to the input's scale (float32 sums of m products carry ~1e-7 relative error)
    scale = np.abs(f).max()
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=0, atol=tol * scale)
    assert out.dtype == dtype


def test_kept_column_is_not_subtracted(rng):
    x, f, _, _ = _problem(rng)
    kept, beta = _lstsq_residual(x, f, keep=[0])
    removed_all, _ = _lstsq_residual(x, f, keep=[])
    layer = MetadataNorm(f.shape[1], x, keep=[0], dtype=torch.float64)
    out = layer(torch.tensor(f), torch.tensor(x)).detach().numpy()
    # the label's part x[:, 0] * beta[0] is still in the output
    np.testing.assert_allclose(out - removed_all, np.outer(x[:, 0], beta[0]), atol=1e-10)
    np.testing.assert_allclose(out, kept, atol=1e-10)


@pytest.mark.parametrize("batch_size", [32, 50, 237, 240])
def test_epoch_average_of_batch_estimates_is_full_data_beta(rng, batch_size):
    x, f, _, _ = _problem(rng)  # n = 240: 50 leaves a short last batch of 40, 237 one of 3 ≤ K
    expected, beta = _lstsq_residual(x, f, keep=[0])
    layer = MetadataNorm(f.shape[1], x, keep=[0], momentum=None, dtype=torch.float64)
    perm = rng.permutation(len(x))
    ft, xt = torch.tensor(f), torch.tensor(x)
    for i in range(0, len(x), batch_size):
        idx = torch.as_tensor(perm[i : i + batch_size])
        layer(ft[idx], xt[idx])
    np.testing.assert_allclose(layer.running_beta.numpy(), beta, atol=1e-10)
    assert int(layer.num_batches_tracked) == -(-len(x) // batch_size)
    assert int(layer.num_samples_tracked) == len(x)
    layer.eval()
    out = layer(ft, xt).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-10)
    # eval ignores the kept (label) column
    xt0 = xt.clone()
    xt0[:, 0] = 0
    np.testing.assert_allclose(layer(ft, xt0).numpy(), out, atol=0)


def test_equal_batches_plain_average_and_momentum(rng):
    x, f, _, _ = _problem(rng, n=200)
    ft, xt = torch.tensor(f), torch.tensor(x)
    layer = MetadataNorm(f.shape[1], x, keep=[0], momentum=0.25, dtype=torch.float64)
    expected = torch.zeros_like(layer.running_beta)
    gram_inverse = torch.linalg.inv(xt.T @ xt)
    # debiased: the cumulative average (factor 1/t) until 1/t falls below the momentum
    for t, i in enumerate(range(0, 200, 40), start=1):
        b = (200 / 40) * gram_inverse @ xt[i : i + 40].T @ ft[i : i + 40]
        factor = max(0.25, 1 / t)
        expected = (1 - factor) * expected + factor * b
        layer(ft[i : i + 40], xt[i : i + 40])
    torch.testing.assert_close(layer.running_beta, expected, atol=1e-10, rtol=0)


def test_removes_confounder_within_class_keeps_label(rng):
    n = 4000
    y = rng.integers(0, 2, n)
    c = rng.uniform(1, 4, n) + 2 * y  # corr(y, c) ~ 0.7
    f = (2.0 * y + 1.5 * c + 0.5 * rng.normal(size=n))[:, None]
    design = make_design({"y": y, "c": c}, keep=["y"])
    layer = MetadataNorm(1, design, momentum=None)
    ft = torch.tensor(f, dtype=torch.float32)
    xt = design.tensor()
    outs = [layer(ft[i : i + 200], xt[i : i + 200]) for i in range(0, n, 200)]
    train_out = torch.cat(outs).detach().numpy().ravel()
    layer.eval()
    eval_out = layer(ft, xt).detach().numpy().ravel()
    # batch estimates (m = 200) are noisy, the running β is the full-data β
    # corr(2y + 0.5·noise, y) ≈ 0.89: the label's effect must stay
    for out, bound, label_corr in ((train_out, 0.15, 0.6), (eval_out, 0.03, 0.85)):
        for cls in (0, 1):
            sel = y == cls
            assert abs(np.corrcoef(out[sel], c[sel])[0, 1]) < bound
            assert np.corrcoef(f[sel, 0], c[sel])[0, 1] > 0.8  # before: strongly dependent
        assert np.corrcoef(out, y)[0, 1] > label_corr


def test_gradcheck(rng):
    x, f, _, _ = _problem(rng, n=30, d=3)
    layer = MetadataNorm(3, x, keep=[0], dtype=torch.float64)
    xt = torch.tensor(x[:12])
    inp = torch.tensor(f[:12], requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t, xt), (inp,))
    layer.eval()
    assert torch.autograd.gradcheck(lambda t: layer(t, xt), (inp,))


def test_gradient_flows_through_batch_estimate(rng):
    # out = (I - (N/m) X_R Σ⁻¹_R· Xᵀ) F: the gradient of sum(out * g) is that operator's transpose.
    x, f, _, _ = _problem(rng, n=50, d=4)
    layer = MetadataNorm(4, x, keep=[0], dtype=torch.float64)
    xt, inp = torch.tensor(x[:20]), torch.tensor(f[:20], requires_grad=True)
    g = torch.randn(20, 4, dtype=torch.float64)
    (layer(inp, xt) * g).sum().backward()
    gram_inverse = torch.linalg.inv(torch.tensor(x).T @ torch.tensor(x))
    xr = xt.clone()
    xr[:, 0] = 0
    op = torch.eye(20, dtype=torch.float64) - (50 / 20) * xr @ gram_inverse @ xt.T
    torch.testing.assert_close(inp.grad, op.T @ g, atol=1e-12, rtol=0)


def test_state_dict_round_trip(rng):
    x, f, _, _ = _problem(rng)
    a = MetadataNorm(7, x, keep=[0])
    for i in range(0, 240, 60):
        a(torch.tensor(f[i : i + 60], dtype=torch.float32), torch.tensor(x[i : i + 60]))
    sd = a.state_dict()
    assert set(sd) == {
        "gram_inverse",
        "n_samples",
        "remove_mask",
        "running_beta",
        "num_batches_tracked",
        "num_samples_tracked",
        "num_batches_skipped",
        "num_batches_fallback",
    }
    assert sd["gram_inverse"].dtype == torch.float64
    with pytest.raises(ValueError, match="another design"):  # a layer on another design
        MetadataNorm(7, np.eye(5), keep=[]).load_state_dict(sd)
    b = MetadataNorm(7, num_metadata=5)  # no design: everything is restored
    b.load_state_dict(sd)
    a.eval()
    b.eval()
    inp, xt = torch.tensor(f[:9], dtype=torch.float32), torch.tensor(x[:9])
    torch.testing.assert_close(a(inp, xt), b(inp, xt), atol=0, rtol=0)
    assert b.keep == (0,)
    assert int(b.num_batches_tracked) == 4


def test_short_last_batch_and_batch_of_one(rng):
    x, f, _, _ = _problem(rng)
    layer = MetadataNorm(7, x, keep=[0])
    ft, xt = torch.tensor(f, dtype=torch.float32), torch.tensor(x, dtype=torch.float32)
    assert layer(ft[:37], xt[:37]).shape == (37, 7)
    # m ≤ K = 5: the output uses the running β; the estimate is folded in with a factor in
    # proportion to m (mean batch size so far 37)
    gram_inverse = torch.linalg.inv(torch.tensor(x).T @ torch.tensor(x))
    seen = 37
    for m in (1, 5):
        before = layer.running_beta.clone()
        out = layer(ft[:m], xt[:m])
        assert out.shape == (m, 7)
        expected = ft[:m] - xt[:m, 1:] @ before[1:]
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
        beta_hat = (240 / m) * gram_inverse @ torch.tensor(x[:m]).T @ torch.tensor(f[:m])
        batches = 1 if m == 1 else 2
        factor = max(m / (seen + m), 0.1 * m / (seen / batches))
        want = before.double() + factor * (beta_hat - before.double())
        torch.testing.assert_close(layer.running_beta.double(), want, atol=1e-4, rtol=1e-4)
        seen += m
    assert int(layer.num_batches_tracked) == 3 and int(layer.num_samples_tracked) == 43
    # without a running β the batch estimate is all there is; m = 1: β̂ = N Σ⁻¹ xᵀf exactly
    untracked = MetadataNorm(7, x, keep=[0], track_running_stats=False)
    out1 = untracked(ft[:1], xt[:1])
    assert out1.shape == (1, 7) and torch.isfinite(out1).all()
    beta1 = 240 * gram_inverse @ torch.tensor(x[:1]).T @ torch.tensor(f[:1])
    expected = torch.tensor(f[:1]) - torch.tensor(x[:1, 1:]) @ beta1[1:]
    torch.testing.assert_close(out1.double(), expected, atol=1e-3, rtol=1e-4)


def test_conv_features_are_flattened_per_sample(rng):
    x, _, _, _ = _problem(rng, n=64)
    layer = MetadataNorm(4 * 3 * 3, x, keep=[0], dtype=torch.float64)
    inp = torch.randn(64, 4, 3, 3, dtype=torch.float64)
    out = layer(inp, torch.tensor(x))
    flat = layer(inp.reshape(64, -1), torch.tensor(x))
    assert out.shape == inp.shape
    torch.testing.assert_close(out.reshape(64, -1), flat)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(rng, dtype):
    x, f, _, _ = _problem(rng)
    expected, _ = _lstsq_residual(x, f, keep=[0])
    layer = MetadataNorm(7, x, keep=[0])
    out = layer(torch.tensor(f).to(dtype), torch.tensor(x).to(dtype))
    assert out.dtype == dtype
    # error dominated by rounding the inputs to `dtype`, not by the solve
    tol = 0.02 if dtype == torch.float16 else 0.15
    np.testing.assert_allclose(out.float().numpy(), expected, atol=tol * np.abs(f).max())


def test_nonfinite_batch_never_reaches_running_beta(rng):
    x, f, _, _ = _problem(rng)
    layer = MetadataNorm(7, x, keep=[0])  # default on_nonfinite="skip": counted, no host sync
    ft, xt = torch.tensor(f, dtype=torch.float32), torch.tensor(x, dtype=torch.float32)
    layer(ft[:60], xt[:60])
    before = layer.running_beta.clone()
    bad = ft[60:120].clone()
    bad[3, 2] = float("nan")
    layer(bad, xt[60:120])
    torch.testing.assert_close(layer.running_beta, before, atol=0, rtol=0)
    assert int(layer.num_batches_tracked) == 1 and int(layer.num_samples_tracked) == 60
    assert int(layer.num_batches_skipped) == 1
    layer.on_nonfinite = "raise"
    with pytest.raises(NonFiniteEstimateError, match="not finite"):
        layer(bad, xt[60:120])
    torch.testing.assert_close(layer.running_beta, before, atol=0, rtol=0)
    assert int(layer.num_batches_tracked) == 1 and int(layer.num_batches_skipped) == 2
    layer.on_nonfinite = "warn"
    bad[3, 2] = float("inf")
    with pytest.warns(RuntimeWarning, match="keeps its previous value"):
        layer(bad, xt[60:120])
    torch.testing.assert_close(layer.running_beta, before, atol=0, rtol=0)
    assert int(layer.num_batches_tracked) == 1 and int(layer.num_samples_tracked) == 60
    assert int(layer.num_batches_skipped) == 3
    # what an fp16 overflow upstream hands the layer: infinite float16 features
    half = MetadataNorm(7, x, keep=[0])
    half(torch.full((60, 7), float("inf"), dtype=torch.float16), xt[:60].half())
    assert torch.count_nonzero(half.running_beta) == 0
    assert int(half.num_batches_skipped) == 1 and int(half.num_batches_tracked) == 0
    # non-finite design rows: skipped too, and named by the "raise" policy
    nan_rows = xt[:60].clone()
    nan_rows[0, 1] = float("nan")
    layer.on_nonfinite = "raise"
    with pytest.raises(ValueError, match="expected finite metadata, got 1 NaN"):
        layer(ft[:60], nan_rows)
    torch.testing.assert_close(layer.running_beta, before, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("inp", "meta", "err", "match"),
    [
        (
            torch.randn(10, 7),
            torch.randn(10, 4),
            ValueError,
            r"shape \(10, 5\).*got tensor of shape \(10, 4\)",
        ),
        (
            torch.randn(10, 7),
            torch.randn(9, 5),
            ValueError,
            "expected metadata with 10 rows.*got 9",
        ),
        (
            torch.randn(10, 6),
            torch.randn(10, 5),
            ValueError,
            "expected 7 features per sample.*got 6",
        ),
        (torch.randn(7), torch.randn(1, 5), ValueError, "expected input of shape"),
        (torch.randn(10, 7), np.zeros((10, 5)), TypeError, "expected metadata .* to be a tensor"),
        (torch.randint(0, 3, (10, 7)), torch.randn(10, 5), TypeError, "floating-point input"),
        ([[1.0] * 7], torch.randn(1, 5), TypeError, "expected input to be a tensor"),
    ],
)
def test_bad_input_errors(rng, inp, meta, err, match):
    x, _, _, _ = _problem(rng)
    layer = MetadataNorm(7, x, keep=[0])
    with pytest.raises(err, match=match):
        layer(inp, meta)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_features": 0}, "positive int"),
        ({"momentum": 1.5}, r"momentum in \[0, 1\]"),
        ({"keep": [9]}, "out of range"),
        ({"keep": [0, 1, 2, 3, 4]}, "nothing would be removed"),
        ({"keep": ["y"]}, "names need a metanorm.design.Design"),
        ({"design": None}, "expected design= .* or num_metadata="),
        ({"num_metadata": 4}, "num_metadata=4 does not match the design's 5 columns"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite"),
    ],
)
def test_bad_construction_errors(rng, kwargs, match):
    x, _, _, _ = _problem(rng)
    args = {"num_features": 7, "design": x, "keep": ()} | kwargs
    with pytest.raises(ValueError, match=match):
        MetadataNorm(**args)


def test_collinear_design_is_refused_with_column_names(rng):
    n = 100
    c = rng.normal(size=n)
    design = make_design({"y": rng.integers(0, 2, n), "c": c, "c2": 3 * c + 1}, keep=["y"])
    with pytest.raises(ValueError, match=r"columns 'c', 'c2' are .*collinear"):
        MetadataNorm(4, design)
    layer = MetadataNorm(4, design, ridge=1e-3)  # a ridge term makes it usable
    assert torch.isfinite(layer(torch.randn(10, 4), design.tensor()[:10])).all()


def test_design_object_gives_names_and_keep(rng):
    n = 50
    design = make_design(
        {"y": rng.integers(0, 2, n), "site": rng.choice(["a", "b"], n)}, keep=["y"]
    )
    layer = MetadataNorm(3, design)
    assert layer.keep == (0,)
    assert "keep=[0]" in repr(layer) and "n_samples=50" in repr(layer)
    assert MetadataNorm(3, design, keep=["y"]).keep == (0,)  # the design's own: allowed


def test_eval_is_pure_and_reset(rng):
    x, f, _, _ = _problem(rng)
    layer = MetadataNorm(7, x, keep=[0])
    ft, xt = torch.tensor(f, dtype=torch.float32), torch.tensor(x, dtype=torch.float32)
    layer(ft[:100], xt[:100])
    layer.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(ft, xt)
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    layer.reset_running_stats()
    assert torch.count_nonzero(layer.running_beta) == 0 and int(layer.num_batches_tracked) == 0


def test_without_running_stats_uses_batch_estimates(rng):
    x, f, _, _ = _problem(rng)
    layer = MetadataNorm(7, x, keep=[0], track_running_stats=False, dtype=torch.float64)
    assert layer.running_beta is None
    layer.eval()
    out = layer(torch.tensor(f), torch.tensor(x))
    np.testing.assert_allclose(out.numpy(), _lstsq_residual(x, f, [0])[0], atol=1e-10)


def test_functional_refuses_cumulative_average_without_counter(rng):
    x, f, _, _ = _problem(rng)
    layer = MetadataNorm(7, x, keep=[0], dtype=torch.float64)
    running = torch.zeros(5, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match="needs num_samples_tracked"):
        metadata_norm(
            torch.tensor(f),
            torch.tensor(x),
            layer.gram_inverse,
            240,
            layer.remove_mask,
            running,
            momentum=None,
        )
    assert torch.count_nonzero(running) == 0  # refused before any state changed


def test_functional_matches_module(rng):
    x, f, _, _ = _problem(rng)
    layer = MetadataNorm(7, x, keep=[0], dtype=torch.float64)
    ft, xt = torch.tensor(f), torch.tensor(x)
    running = torch.zeros(5, 7, dtype=torch.float64)
    out = metadata_norm(ft, xt, layer.gram_inverse, 240, layer.remove_mask, running, momentum=1.0)
    torch.testing.assert_close(out, layer(ft, xt))
    torch.testing.assert_close(running, layer.running_beta)  # the first update has factor 1


def test_metadata_sequential_routes_metadata(rng):
    x, _, _, _ = _problem(rng, n=64)
    xt = torch.tensor(x, dtype=torch.float32)
    torch.manual_seed(0)
    model = MetadataSequential(
        nn.Linear(3, 7), MetadataNorm(7, x, keep=[0]), nn.ReLU(), nn.Linear(7, 1)
    )
    inp = torch.randn(64, 3)
    out = model(inp, xt)
    lin, mdn = model[0], model[1]
    manual = model[3](torch.relu(mdn(lin(inp), xt)))
    torch.testing.assert_close(out, manual)
    out.sum().backward()
    assert model[0].weight.grad is not None
    # nested containers pass metadata down too
    outer = MetadataSequential(model, nn.Sigmoid())
    assert outer(inp, xt).shape == (64, 1)


def test_design_as_list_of_lists_and_rows_on_the_meta_device():
    rows = [[1.0, 0.2], [1.0, 0.5], [1.0, 0.9], [1.0, 0.1]]
    layer = MetadataNorm(3, rows, keep=())
    want = MetadataNorm(3, torch.tensor(rows, dtype=torch.float64), keep=())
    torch.testing.assert_close(layer.gram_inverse, want.gram_inverse, atol=0, rtol=0)
    assert int(layer.n_samples) == 4
    with pytest.raises(ValueError, match="on the meta device"):
        layer(torch.randn(4, 3), torch.empty(4, 2, device="meta"))
