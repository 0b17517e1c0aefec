"""MetadataNorm's training step (one path on every device) against the paper's formula in
float64 autograd and against least squares; its cached factor X_b·[diag(mask) | W] against a
cold layer after every kind of change to Σ⁻¹, N, the mask and the counters."""

import copy

import numpy as np
import pytest
import torch

from metanorm.nn import MetadataNorm, NonFiniteEstimateError

N, K = 300, 4


def _design(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat(
        [
            torch.randint(0, 2, (N, 1), generator=g).double(),
            torch.randn(N, K - 2, generator=g, dtype=torch.float64),
            torch.ones(N, 1, dtype=torch.float64),
        ],
        1,
    )


def _formula_step(f, rows, keep, running, seen, momentum, design):
    """The paper's map in float64 autograd and the running update's rule, written out."""
    x = rows.double()
    gram_inverse = torch.linalg.inv(design.T @ design)
    m = f.shape[0]
    beta = (N / m) * gram_inverse @ (x.T @ f)
    removed = x.clone()
    removed[:, list(keep)] = 0
    # m ≤ K: the output uses the running β, the estimate still enters it
    out = f - removed @ (beta if m > K else running)
    batches, samples = seen
    factor = m / (samples + m)
    if momentum is not None:
        factor = max(factor, min(1.0, momentum * m / max(samples, 1) * batches))
    running = running + factor * (beta.detach() - running)
    return out, running, (batches + 1, samples + m)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape", [(6,), (2, 3, 2), (4, 48, 48)])  # the last one: the large-output
# form of x − a·b on the CPU (K addcmul passes, K ≤ 4)
@pytest.mark.parametrize("keep", [(0,), ()])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_the_training_step_follows_the_formula(dtype, tol, shape, keep, momentum):
    """Outputs, input gradients, the running β and the counters over batches of several sizes
    (one of m ≤ K, a short one) equal the paper's formula in float64 autograd."""
    d = int(np.prod(shape))
    design = _design()
    layer = MetadataNorm(d, design, keep=keep, momentum=momentum).to(dtype)
    g = torch.Generator().manual_seed(1)
    running = torch.zeros(K, d, dtype=torch.float64)
    seen, start = (0, 0), 0
    gram = torch.zeros(K, K, dtype=torch.float64)
    for m in [40, 40, 3, 40, 25, 40]:
        x = torch.randn(m, *shape, generator=g, dtype=dtype, requires_grad=True)
        up = torch.randn(m, *shape, generator=g, dtype=dtype)
        rows = design[start : start + m]  # float64 rows: cast to the input's dtype inside
        start = (start + m) % (N - 64)
        gram += rows.T @ rows
        out = layer(x, rows)
        out.backward(up)
        f = x.detach().double().reshape(m, d).requires_grad_()
        expected, running, seen = _formula_step(f, rows, keep, running, seen, momentum, design)
        expected.backward(up.double().reshape(m, d))
        torch.testing.assert_close(out.double().reshape(m, d), expected, rtol=tol, atol=tol)
        torch.testing.assert_close(x.grad.double().reshape(m, d), f.grad, rtol=tol, atol=tol)
        torch.testing.assert_close(layer.running_beta.double(), running, rtol=tol, atol=tol)
    assert (int(layer.num_batches_tracked), int(layer.num_samples_tracked)) == seen
    assert int(layer.num_batches_fallback) == 1
    assert int(layer.design_rows_seen) == seen[1]
    torch.testing.assert_close(layer.design_rows_gram.double(), gram, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_epoch_of_cumulative_steps_is_least_squares(dtype):
    """momentum=None over one epoch (a short last batch included): the running β is the
    least-squares β of all the features on the design (numpy's lstsq), and a full batch's
    output its residual."""
    design = _design(3)
    g = torch.Generator().manual_seed(4)
    features = torch.randn(N, 7, generator=g, dtype=torch.float64) + design[:, 1:2] * 2.0
    layer = MetadataNorm(7, design, keep=[0], momentum=None).to(dtype)
    for start in range(0, N, 64):  # 4 batches of 64 and one of 44
        layer(features[start : start + 64].to(dtype), design[start : start + 64])
    beta = np.linalg.lstsq(design.numpy(), features.numpy(), rcond=None)[0]
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(layer.running_beta.double().numpy(), beta, rtol=tol, atol=tol)
    out = MetadataNorm(7, design, keep=[0]).to(dtype)(features.to(dtype), design)
    removed = design.numpy().copy()
    removed[:, 0] = 0
    residual = features.numpy() - removed @ beta
    np.testing.assert_allclose(out.double().numpy(), residual, rtol=tol, atol=tol)


def _cold(layer):
    """A copy of ``layer`` with nothing cached: it builds its factor from its buffers."""
    cold = copy.deepcopy(layer)
    cold._factors.clear()
    return cold


def test_what_is_written_to_the_design_or_the_counters_is_taken_up():
    """An in-place write, a load, a reset, a cast or a replaced buffer between steps: the next
    step equals that of a layer that caches nothing (same bits)."""
    layer = MetadataNorm(5, _design(), keep=[0])
    g = torch.Generator().manual_seed(2)
    rows = _design()[:30]
    saved = None
    for step in range(11):
        x = torch.randn(30, 5, generator=g, dtype=layer.running_beta.dtype)
        if step == 2:
            layer.num_batches_tracked.fill_(50)
            layer.num_samples_tracked.fill_(1500)
        if step == 3:
            saved = copy.deepcopy(layer.state_dict())
        if step == 4:
            layer.load_state_dict(saved)  # copies into Σ⁻¹, N and the mask: versions move
        if step == 5:
            layer.gram_inverse.mul_(1.5)  # another Σ⁻¹ in place: W = (N/m)Σ⁻¹ is rebuilt
        if step == 6:
            layer.n_samples.fill_(600.0)
        if step == 7:
            layer.remove_mask.fill_(True)  # no column kept from now on
        if step == 8:
            layer.double()  # the factor is kept per dtype
            x = x.double()
        if step == 9:
            # a replaced buffer, its version counter at the old one's value
            new = layer.gram_inverse.clone() * 2
            while new._version < layer.gram_inverse._version:
                new.mul_(1.0)
            layer.gram_inverse = new
        if step == 10:
            layer.reset_running_stats()
        cold = _cold(layer)
        out, expected = layer(x, rows), cold(x, rows)
        assert torch.equal(out, expected), step
        assert torch.equal(layer.running_beta, cold.running_beta), step
        for name in ("num_batches_tracked", "num_samples_tracked"):
            assert int(getattr(layer, name)) == int(getattr(cold, name)), (step, name)
    assert int(layer.num_batches_tracked) == 1 and int(layer.num_samples_tracked) == 30


def test_a_nonfinite_batch_is_skipped_and_reported():
    layer = MetadataNorm(5, _design(), keep=[0])
    rows = _design()[:30].float()
    layer(torch.randn(30, 5), rows)
    before = layer.running_beta.clone()
    bad = torch.randn(30, 5)
    bad[3, 1] = float("nan")
    out = layer(bad, rows)
    assert torch.isnan(out[:, 1]).all() and torch.isfinite(out[:, [0, 2, 3, 4]]).all()
    assert torch.equal(layer.running_beta, before)
    assert (int(layer.num_batches_tracked), int(layer.num_batches_skipped)) == (1, 1)
    layer(torch.randn(30, 5), rows)
    assert (int(layer.num_batches_tracked), int(layer.num_samples_tracked)) == (2, 60)
    layer.on_nonfinite = "raise"
    with pytest.raises(NonFiniteEstimateError):
        layer(bad, rows)


def test_inference_tensors_and_the_meta_device_cache_nothing():
    """Buffers made under inference mode keep no version counter: the layer builds its factor
    every step instead of caching it."""
    with torch.inference_mode():
        layer = MetadataNorm(5, _design(), keep=[0], track_running_stats=False)
    x, rows = torch.randn(30, 5), _design()[:30]
    with torch.inference_mode():
        out = layer(x, rows)
    assert not layer._factors
    torch.testing.assert_close(out, MetadataNorm(5, _design(), keep=[0])(x, rows))


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize(
    ("m", "d", "k", "contiguous"),
    [(200, 6144, 3, True), (64, 1030, 5, True), (40, 2048, 8, False), (30, 4096, 16, True)],
)
def test_the_statistics_product_at_any_thread_count(threads, count, m, d, k, contiguous):
    """aᵀ·x as a batch of column blocks (several threads, K ≤ 8, a contiguous x whose width
    the thread count divides) or one product: the float64 product either way."""
    from metanorm.linalg import transpose_product

    threads(count)
    g = torch.Generator().manual_seed(m + d + k)
    a = torch.randn(m, k, generator=g, dtype=torch.float64)
    x = torch.randn(m, d, generator=g, dtype=torch.float64)
    if not contiguous:
        x = torch.randn(d, m, generator=g, dtype=torch.float64).t()
    out = transpose_product(a, x)
    assert out.shape == (k, d) and out.is_contiguous()
    torch.testing.assert_close(out, a.T @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("count", [2, 3])
def test_a_large_step_does_not_depend_on_the_thread_count(threads, count):
    """A step above the plain-autograd size (the Function, its statistics split over the
    threads) gives the one-thread step's output, input gradient and running β (float64)."""
    design = _design()
    results = []
    for n in (1, count):
        threads(n)
        layer = MetadataNorm(3 * 4096, design, keep=[0]).double()
        g = torch.Generator().manual_seed(5)
        x = torch.randn(40, 3, 64, 64, generator=g, dtype=torch.float64, requires_grad=True)
        out = layer(x, design[:40])
        out.backward(torch.randn(out.shape, generator=g, dtype=torch.float64))
        results.append((out.detach(), x.grad, layer.running_beta.clone()))
    for one, many in zip(*results, strict=True):
        torch.testing.assert_close(many, one, rtol=1e-12, atol=1e-12)
