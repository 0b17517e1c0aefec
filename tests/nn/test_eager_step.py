"""MetadataNorm's eager CPU training step (cached constants, counters read once) against the
general path of the base, which every other case (GPU, compile, sync, m ≤ K) takes."""

import copy

import pytest
import torch

from metanorm.nn import MetadataNorm, NonFiniteEstimateError
from metanorm.nn._base import _MetadataNormBase

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


def _general(layer, x, rows):
    """The base's forward: every check, the general batch map and running update."""
    return _MetadataNormBase.forward(layer, x, rows)


def _steps(layer, call, batches, dtype, shape):
    """Trains ``layer`` on ``batches`` (batch sizes), returning outputs and input gradients."""
    g = torch.Generator().manual_seed(1)
    design = _design()
    outs, grads, start = [], [], 0
    for m in batches:
        x = torch.randn(m, *shape, generator=g, dtype=dtype, requires_grad=True)
        up = torch.randn(m, *shape, generator=g, dtype=dtype)
        rows = design[start : start + m]  # float64 rows: cast to float32 input inside
        start = (start + m) % (N - 64)
        out = call(layer, x, rows)
        out.backward(up)
        outs.append(out.detach())
        grads.append(x.grad)
    return outs, grads


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape", [(6,), (2, 3, 2)])
@pytest.mark.parametrize("keep", [(0,), ()])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_the_eager_step_equals_the_general_path(dtype, tol, shape, keep, momentum):
    d = 12 if len(shape) > 1 else shape[0]
    fast = MetadataNorm(d, _design(), keep=keep, momentum=momentum).to(dtype)
    slow = copy.deepcopy(fast)
    batches = [40, 40, 3, 40, 25, 40]  # a batch of m ≤ K and a short one in between
    out_f, grad_f = _steps(fast, lambda layer, x, r: layer(x, r), batches, dtype, shape)
    out_s, grad_s = _steps(slow, _general, batches, dtype, shape)
    assert fast._plans  # the eager step ran
    for a, b in zip(out_f + grad_f, out_s + grad_s, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    torch.testing.assert_close(fast.running_beta, slow.running_beta, rtol=tol, atol=tol)
    for name in ("num_batches_tracked", "num_samples_tracked", "num_batches_fallback"):
        assert int(getattr(fast, name)) == int(getattr(slow, name)), name
    assert int(fast.design_rows_seen) == int(slow.design_rows_seen) == sum(batches)
    torch.testing.assert_close(fast.design_rows_gram, slow.design_rows_gram, rtol=1e-5, atol=1e-3)


def test_counters_and_design_written_elsewhere_are_taken_up():
    """A load, a reset, a refit or an in-place write between steps changes the counters or Σ⁻¹
    behind the cached values: the next step uses the new ones, as the general path does."""
    fast = MetadataNorm(5, _design(), keep=[0])
    slow = copy.deepcopy(fast)
    g = torch.Generator().manual_seed(2)
    rows = _design()[:30].float()
    saved = None
    for step in range(8):
        x = torch.randn(30, 5, generator=g)
        for layer in (fast, slow):
            if step == 2:
                layer.num_batches_tracked.fill_(50)
                layer.num_samples_tracked.fill_(1500)
            if step == 3:
                saved = copy.deepcopy(layer.state_dict())
            if step == 5:
                layer.load_state_dict(saved)
                layer.gram_inverse.mul_(1.5)  # another Σ⁻¹: W = (N/m)Σ⁻¹ is rebuilt
            if step == 7:
                layer.reset_running_stats()
        out_f, out_s = fast(x, rows), _general(slow, x, rows)
        torch.testing.assert_close(out_f, out_s, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.running_beta, slow.running_beta, rtol=1e-5, atol=1e-6)
        assert int(fast.num_batches_tracked) == int(slow.num_batches_tracked)
        assert int(fast.num_samples_tracked) == int(slow.num_samples_tracked)
    assert int(fast.num_batches_tracked) == 1 and int(fast.num_samples_tracked) == 30


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
    layer(torch.randn(30, 5), rows)  # the cached counters are still right after a skip
    assert (int(layer.num_batches_tracked), int(layer.num_samples_tracked)) == (2, 60)
    layer.on_nonfinite = "raise"
    with pytest.raises(NonFiniteEstimateError):
        layer(bad, rows)


def test_a_subclass_that_overrides_the_general_path_keeps_it():
    class Doubled(MetadataNorm):
        def _estimate(self, features, rows, reducer):
            return 2 * super()._estimate(features, rows, reducer)

    layer, plain = Doubled(5, _design(), keep=[0]), MetadataNorm(5, _design(), keep=[0])
    x, rows = torch.randn(30, 5), _design()[:30].float()
    torch.testing.assert_close(layer(x, rows), 2 * plain(x, rows))
    assert not layer._plans and plain._plans
