"""RecursiveMetadataNorm against closed-form (weighted, ridge) least squares."""

import pytest
import torch

from metanorm.nn import MetadataSequential, RecursiveMetadataNorm

D64 = torch.float64


def _data(n=40, k=3, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, dtype=D64, generator=g)
    x[:, -1] = 1.0
    f = x @ torch.randn(k, d, dtype=D64, generator=g) + torch.randn(n, d, dtype=D64, generator=g)
    return x, f


def _partition(n, sizes):
    """Consecutive batches of the given sizes (the last one takes the rest)."""
    out, start = [], 0
    for s in sizes:
        if start >= n:
            break
        out.append(slice(start, min(n, start + s)))
        start += s
    if start < n:
        out.append(slice(start, n))
    return out


def _lstsq(rows, targets):
    return torch.linalg.lstsq(rows, targets, driver="gelsd").solution


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("sizes", [[1], [2], [7], [40], [3, 1, 11, 5, 1, 9]])
def test_one_pass_equals_full_data_least_squares_with_the_prior(sizes):
    # λ = 1, ρ = 0: β = (XᵀX + δI)⁻¹XᵀF, i.e. least squares of [X; √δ I] on [F; 0]
    x, f = _data()
    delta = 0.5
    layer = RecursiveMetadataNorm(5, 3, forgetting=1.0, delta=delta, reg=0.0, dtype=D64)
    batches = _partition(40, sizes * 40)
    for s in batches:
        layer(f[s], x[s])
    aug_x = torch.cat([x, delta**0.5 * torch.eye(3, dtype=D64)])
    aug_f = torch.cat([f, torch.zeros(3, 5, dtype=D64)])
    assert _rel(layer.beta, _lstsq(aug_x, aug_f)) < 1e-6
    # P is the inverse of the information matrix
    assert (
        _rel(layer.covariance, torch.linalg.inv(x.T @ x + delta * torch.eye(3, dtype=D64))) < 1e-6
    )
    assert int(layer.num_samples_tracked) == 40 and int(layer.num_batches_tracked) == len(batches)


@pytest.mark.parametrize("batch", [1, 6])
def test_a_tiny_prior_gives_plain_least_squares(batch):
    x, f = _data()
    layer = RecursiveMetadataNorm(5, 3, forgetting=1.0, delta=1e-9, reg=0.0, dtype=D64)
    for s in _partition(40, [batch] * 40):
        layer(f[s], x[s])
    assert _rel(layer.beta, _lstsq(x, f)) < 1e-6


def test_forgetting_and_reg_equal_weighted_ridge_least_squares():
    # β_T = argmin Σ_t λ^(T−t) (‖F_t − X_tβ‖² + m_t ρ ‖β‖²) + λ^T δ ‖β‖²
    x, f = _data(n=37)
    lam, delta, rho = 0.8, 0.3, 0.05
    layer = RecursiveMetadataNorm(5, 3, forgetting=lam, delta=delta, reg=rho, dtype=D64)
    batches = _partition(37, [4, 1, 9, 2, 6, 1, 5])
    for s in batches:
        layer(f[s], x[s])
    t_last = len(batches)
    rows, targets, ridge = [], [], lam**t_last * delta
    for t, s in enumerate(batches, start=1):
        w = lam ** (t_last - t)
        rows.append(w**0.5 * x[s])
        targets.append(w**0.5 * f[s])
        ridge += w * (s.stop - s.start) * rho
    rows.append(ridge**0.5 * torch.eye(3, dtype=D64))
    targets.append(torch.zeros(3, 5, dtype=D64))
    assert _rel(layer.beta, _lstsq(torch.cat(rows), torch.cat(targets))) < 1e-6


def test_regulariser_per_sample_makes_the_estimate_independent_of_the_batch_size():
    x, f = _data()
    betas = []
    for batch in (1, 8, 40):
        layer = RecursiveMetadataNorm(5, 3, forgetting=1.0, reg=0.1, dtype=D64)
        for s in _partition(40, [batch] * 40):
            layer(f[s], x[s])
        betas.append(layer.beta)
    assert _rel(betas[0], betas[2]) < 1e-9 and _rel(betas[1], betas[2]) < 1e-9


def test_output_training_and_eval_and_gradients():
    x, f = _data()
    mask = torch.tensor([0.0, 1.0, 1.0], dtype=D64)
    layer = RecursiveMetadataNorm(5, 3, keep=[0], dtype=D64)
    layer(f[:20], x[:20])
    feats = f[20:30].clone().requires_grad_(True)
    out = layer(feats, x[20:30])
    # training: the residual with the β updated by this very batch
    torch.testing.assert_close(out, f[20:30] - (x[20:30] * mask) @ layer.beta, rtol=0, atol=1e-12)
    w = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, feats, w)
    torch.testing.assert_close(grad, w)  # no gradient through β by default
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    out_eval = layer(f[30:], x[30:])
    torch.testing.assert_close(out_eval, f[30:] - (x[30:] * mask) @ state["beta"])
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, state[k])  # evaluation changes nothing


def test_grad_through_beta_matches_autograd_of_the_update():
    x, f = _data()
    layer = RecursiveMetadataNorm(5, 3, keep=[0], forgetting=0.9, grad_through_beta=True, dtype=D64)
    layer(f[:10], x[:10])
    p0, b0 = layer.covariance.clone(), layer.beta.clone()
    rows, mask = x[10:16], torch.tensor([0.0, 1.0, 1.0], dtype=D64)
    feats = f[10:16].clone().requires_grad_(True)
    out = layer(feats, rows)
    m = rows.T @ rows + 6 * 1e-4 * torch.eye(3, dtype=D64)
    p_new = torch.linalg.inv(torch.linalg.inv(p0 / 0.9) + m)
    ref = feats - (rows * mask) @ (b0 + p_new @ (rows.T @ feats - m @ b0))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    w = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad(out, feats, w)[0], torch.autograd.grad(ref, feats, w)[0]
    )


class _TwoShards:
    """A reducer that adds a second shard's statistics (recorded from a first call)."""

    def __init__(self):
        self.other, self.record, self.i = [], True, 0

    def sum(self, tensor):
        if self.record:
            self.other.append(tensor.clone())
            return tensor
        out = tensor + self.other[self.i]
        self.i += 1
        return out


def test_reducer_seam_gives_the_union_batch():
    x, f = _data()
    union = RecursiveMetadataNorm(5, 3, forgetting=0.95, dtype=D64)
    union(f[:12], x[:12])
    reducer = _TwoShards()
    shard = RecursiveMetadataNorm(5, 3, forgetting=0.95, dtype=D64)
    shard._reducer = lambda: reducer  # type: ignore[method-assign]
    shard(f[5:12], x[5:12])  # record shard 2's sums ...
    shard.reset_running_stats()
    reducer.record = False
    shard(f[:5], x[:5])  # ... then shard 1 sees the union's statistics
    torch.testing.assert_close(shard.beta, union.beta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shard.covariance, union.covariance, rtol=1e-12, atol=1e-12)
    assert int(shard.num_samples_tracked) == 12


def test_state_dict_round_trip_and_resets():
    x, f = _data()
    layer = RecursiveMetadataNorm(5, 3, keep=[0], forgetting=0.99)
    for s in _partition(40, [3] * 10):
        layer(f[s].float(), x[s].float())
    restored = RecursiveMetadataNorm(5, 3, keep=[0], forgetting=0.99)
    restored.load_state_dict(layer.state_dict())
    for a in (layer, restored):
        a(f[:4].float(), x[:4].float())
    torch.testing.assert_close(restored.beta, layer.beta)
    torch.testing.assert_close(restored.covariance, layer.covariance)
    assert layer.covariance.dtype == D64 and layer.beta.dtype == torch.float32
    layer.reset_covariance()
    torch.testing.assert_close(layer.covariance, torch.eye(3, dtype=D64) / 0.01)
    assert float(layer.beta.abs().sum()) > 0  # β kept
    layer.reset_running_stats()
    assert float(layer.beta.abs().sum()) == 0 and int(layer.num_batches_tracked) == 0
    assert "forgetting=0.99" in repr(layer)


def test_nonfinite_batch_is_skipped():
    x, f = _data()
    layer = RecursiveMetadataNorm(5, 3, dtype=D64)
    layer(f[:8], x[:8])
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = f[8:12].clone()
    bad[1, 2] = float("nan")
    layer(bad, x[8:12])
    torch.testing.assert_close(layer.beta, before["beta"])
    torch.testing.assert_close(layer.covariance, before["covariance"])
    assert int(layer.num_batches_skipped) == 1 and int(layer.num_batches_tracked) == 1


def test_low_precision_input_and_sequential_container():
    x, f = _data()
    model = MetadataSequential(torch.nn.Linear(5, 4), RecursiveMetadataNorm(4, 3, keep=[0]))
    out = model(f[:1].float(), x[:1].float())  # batch of one
    assert out.shape == (1, 4)
    layer = RecursiveMetadataNorm(5, 3)
    half = layer(f[:6].half(), x[:6].half())
    assert half.dtype == torch.float16 and torch.isfinite(half).all()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m, f, x: m(f, x[:, :2]), ValueError, r"shape \(4, 3\)"),
        (lambda m, f, x: m(f, x[:3]), ValueError, "4 rows"),
        (lambda m, f, x: m(f, x.numpy()), TypeError, "tensor"),
        (lambda m, f, x: m(f, x > 0), TypeError, "real numeric"),
        (lambda m, f, x: m(f.long(), x), TypeError, "floating-point"),
        (lambda m, f, x: m(f[:, :4], x), ValueError, "5 features"),
        (lambda m, f, x: m(f[0], x[:1]), ValueError, r"\(m, \*\)"),
        (lambda m, f, x: m(f.tolist(), x), TypeError, "tensor"),
    ],
)
def test_bad_input(call, error, match):
    x, f = _data(n=4)
    layer = RecursiveMetadataNorm(5, 3)
    with pytest.raises(error, match=match):
        call(layer, f.float(), x.float())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"forgetting": 0.0}, "forgetting"),
        ({"forgetting": 1.5}, "forgetting"),
        ({"delta": 0.0}, "delta"),
        ({"reg": -1.0}, "reg"),
        ({"keep": [0, 1, 2]}, "nothing would be removed"),
        ({"keep": [5]}, "out of range"),
        ({"num_metadata": 0}, "num_metadata"),
        ({"num_features": 0}, "num_features"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"num_features": 5, "num_metadata": 3} | kwargs
    with pytest.raises(ValueError, match=match):
        RecursiveMetadataNorm(**args)


def test_recursive_and_penalty_layers_take_the_metadata_in_scope():
    from metanorm.nn import MetadataModel, PenaltyMetadataNorm, RecursiveMetadataNorm

    g = torch.Generator().manual_seed(3)
    rows = torch.cat([torch.randn(12, 2, generator=g), torch.ones(12, 1)], 1).double()
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    for cls in (RecursiveMetadataNorm, PenaltyMetadataNorm):
        explicit, scoped = cls(4, 3).double(), cls(4, 3).double()
        want = explicit(x, rows)
        got = MetadataModel(scoped)(x, metadata=rows)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
        torch.testing.assert_close(scoped.beta, explicit.beta, atol=1e-12, rtol=0)
        with pytest.raises(TypeError, match="without metadata and none is in scope"):
            cls(4, 3).double()(x)
