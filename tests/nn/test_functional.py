"""The functional and its stages: the hand-written backward against autograd, the running update."""

import pytest
import torch

from metanorm import linalg
from metanorm.nn import MetadataNorm
from metanorm.nn import functional as MF


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, dtype=torch.float64, generator=g)
    x[:, 2] = 1.0
    gram_inverse = linalg.inverse_gram(x)
    mask = torch.tensor([False, True, True])
    return x, gram_inverse, mask, g


def _plain_autograd(f, rows, gram_inverse, n, mask):
    """The paper's equations in plain autograd: the oracle for the hand-written backward."""
    beta = (n / f.shape[0]) * gram_inverse @ rows.T @ f
    return f - (rows * mask) @ beta, beta


def test_gradcheck_and_gradgradcheck(setup):
    x, gram_inverse, mask, g = setup
    feats = torch.randn(9, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    rows = x[:9]

    def f(t):
        return MF.metadata_norm(t, rows, gram_inverse, 60, mask, training=True, momentum=0.1)

    assert torch.autograd.gradcheck(f, (feats,))
    assert torch.autograd.gradgradcheck(f, (feats,))


def test_matches_plain_autograd_and_closed_form_gradient(setup):
    x, gram_inverse, mask, g = setup
    feats = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    rows = x[:9]
    out, beta, count = MF.batch_residual(feats, rows, gram_inverse, 60, mask)
    ref_out, ref_beta = _plain_autograd(feats, rows, gram_inverse, 60, mask)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(beta, ref_beta.detach(), atol=1e-12, rtol=0)
    assert float(count) == 9 and not beta.requires_grad
    w = torch.randn(9, 5, dtype=torch.float64, generator=g)
    (g1,) = torch.autograd.grad(out, feats, w)
    (g2,) = torch.autograd.grad(ref_out, feats, w)
    torch.testing.assert_close(g1, g2, atol=1e-12, rtol=0)
    # the closed form of the gradient: G − X_b S Mᵀ G with S = (N/m) Σ⁻¹, M the removed columns
    s = gram_inverse * 60 / 9
    expected = w - rows @ s @ (rows * mask.double()).T @ w
    torch.testing.assert_close(g1, expected, atol=1e-12, rtol=0)


def test_float32_matches_float64(setup):
    x, gram_inverse, mask, g = setup
    feats = torch.randn(40, 300, dtype=torch.float64, generator=g)
    ref, _ = _plain_autograd(feats, x[:40], gram_inverse, 60, mask)
    out, _, _ = MF.batch_residual(feats.float(), x[:40].float(), gram_inverse, 60, mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("count_kind", ["tensor", "int"])  # summed (synced) or host batch size
def test_update_running_beta_factors_and_nonfinite(setup, count_kind):
    running = torch.zeros(3, 2, dtype=torch.float64)
    tracked, samples, skipped = torch.tensor(0), torch.tensor(0), torch.tensor(0)
    counters = {
        "num_batches_tracked": tracked,
        "num_samples_tracked": samples,
        "num_batches_skipped": skipped,
    }

    def expected_factor(m, momentum=0.1):
        """The documented rule, from the counters before the update."""
        s, b = int(samples), int(tracked)
        mean = s / b if b else 0.0
        return min(1.0, max(m / (s + m), momentum * m / max(mean, 1.0)))

    b1, b2 = torch.ones(3, 2, dtype=torch.float64), 4 * torch.ones(3, 2, dtype=torch.float64)
    if count_kind == "tensor":
        size = lambda m: torch.tensor(float(m), dtype=torch.float64)  # noqa: E731
    else:
        size = int
    MF.update_running_beta(running, b1, size(10), 0.1, **counters)
    torch.testing.assert_close(running, b1)  # first factor 1: no bias towards zero
    MF.update_running_beta(running, b2, size(30), 0.1, **counters)  # cumulative: 30/40
    torch.testing.assert_close(running, b1 + 0.75 * (b2 - b1))
    bad = b2.clone()
    bad[0, 0] = float("nan")
    finite = MF.update_running_beta(running, bad, size(10), 0.1, **counters)
    assert not bool(finite)
    torch.testing.assert_close(running, b1 + 0.75 * (b2 - b1))
    assert (int(tracked), int(samples), int(skipped)) == (2, 40, 1)
    # past the warm-up the factor is the momentum for a batch of the mean size, and in
    # proportion to its size for a smaller one (a short last batch)
    for _ in range(30):
        MF.update_running_beta(running, b2, size(20), 0.1, **counters)
    for m in (20, 2, 60):
        before, factor = running.clone(), expected_factor(m)
        MF.update_running_beta(running, b1 * m, size(m), 0.1, **counters)
        torch.testing.assert_close(running, before + factor * (b1 * m - before))
    assert expected_factor(2) < 0.02 < 0.09 < expected_factor(20) <= 0.1
    # no counter: a plain exponential average
    plain = torch.zeros(3, 2, dtype=torch.float64)
    MF.update_running_beta(plain, b1, size(10), 0.1)
    torch.testing.assert_close(plain, 0.1 * b1)


def test_layer_in_a_model_trains(setup):
    x, _, _, g = setup
    layer = MetadataNorm(4, x.float(), keep=[0])
    lin = torch.nn.Linear(6, 4)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    inp = torch.randn(60, 6, generator=g)
    before = lin.weight.detach().clone()
    out = layer(lin(inp[:20]), x[:20].float())
    out.pow(2).mean().backward()
    opt.step()
    assert not torch.equal(before, lin.weight)
    assert int(layer.num_batches_tracked) == 1


class _OtherShard:
    """A reducer that adds a second shard's sums: two processes simulated in one.

    The training map sums [XᵀF, m] (one flat tensor) in the forward pass, then the backward
    statistic Aᵀ G, in that order.
    """

    def __init__(self, rows, feats, grad, mask):
        self.parts = [
            torch.cat([(rows.T @ feats).reshape(-1), torch.tensor([float(len(rows))])]),
            (rows * mask).T @ grad,
        ]
        self.calls = 0

    def sum(self, tensor):
        part = self.parts[self.calls]
        self.calls += 1
        return tensor + part


def test_reducer_seam_gives_the_union_batch(setup):
    """The reduce point (stage 2) in both directions: a shard with the other shard's sums added
    gets the union batch's output rows, input gradient rows and β̂."""
    x, gram_inverse, mask, g = setup
    feats = torch.randn(20, 4, dtype=torch.float64, generator=g, requires_grad=True)
    grad = torch.randn(20, 4, dtype=torch.float64, generator=g)
    out, beta, _ = MF.batch_residual(feats, x[:20], gram_inverse, 60, mask)
    (want_grad,) = torch.autograd.grad(out, feats, grad)
    shard = feats[:7].detach().clone().requires_grad_()
    other = _OtherShard(x[7:20], feats[7:20].detach(), grad[7:20], mask)
    out_a, beta_a, count = MF.batch_residual(shard, x[:7], gram_inverse, 60, mask, reducer=other)
    (grad_a,) = torch.autograd.grad(out_a, shard, grad[:7])
    assert other.calls == 2 and float(count) == 20
    torch.testing.assert_close(beta_a, beta, atol=1e-12, rtol=0)
    torch.testing.assert_close(out_a, out[:7], atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_a, want_grad[:7], atol=1e-12, rtol=0)


def test_the_policies_of_earlier_versions_still_apply_with_a_deprecation_warning(setup):
    """metadata_norm(..., num_samples_tracked=..., on_nonfinite=...) as earlier versions took it:
    the module's result, with a DeprecationWarning."""
    x, gram_inverse, mask, g = setup
    feats = torch.randn(20, 4, dtype=torch.float64, generator=g)
    layer = MetadataNorm(4, x, keep=[0], momentum=None, dtype=torch.float64)
    running = torch.zeros(3, 4, dtype=torch.float64)
    counters = {name: torch.tensor(0) for name in ("num_batches_tracked", "num_samples_tracked")}
    for i in range(0, 20, 10):
        with pytest.warns(DeprecationWarning, match="no longer applies the module's policies"):
            out = MF.metadata_norm(
                feats[i : i + 10],
                x[i : i + 10],
                layer.gram_inverse,
                60,
                layer.remove_mask,
                running,
                True,
                None,
                on_nonfinite="skip",
                **counters,
            )
        torch.testing.assert_close(out, layer(feats[i : i + 10], x[i : i + 10]))
    torch.testing.assert_close(running, layer.running_beta)
    with pytest.raises(TypeError, match="expected training to be a bool"):
        MF.metadata_norm(feats, x[:20], gram_inverse, 60, mask, running, torch.tensor(0))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_the_cpu_update_and_the_device_update_agree(momentum):
    """Eager CPU tensors take the update that reads its scalars; a GPU or torch.compile takes the
    one that reads nothing. Both follow the same rule, a non-finite batch included."""
    g = torch.Generator().manual_seed(0)
    states = []
    for update in (MF._fold_on_cpu, "device"):
        running = torch.zeros(3, 4, dtype=torch.float64)
        counters = [torch.tensor(0), torch.tensor(0), torch.tensor(0)]
        g.manual_seed(0)
        for step, m in enumerate((10, 30, 20, 20, 5, 60)):
            beta = torch.randn(3, 4, generator=g, dtype=torch.float64)
            if step == 3:
                beta[1, 2] = float("nan")
            if update == "device":
                finite = torch.isfinite(beta.sum())
                MF._update_one_process(running, beta, finite, m, momentum, *counters)
            else:
                finite = update(running, beta, m, momentum, *counters)
            assert bool(finite) == (step != 3)
        states.append((running, [int(c) for c in counters]))
    torch.testing.assert_close(states[0][0], states[1][0], atol=1e-12, rtol=0)
    assert states[0][1] == states[1][1] == [5, 125, 1]


@pytest.mark.parametrize("momentum", [0.0, 0.1, 1.0, None])
@pytest.mark.parametrize("with_batches", [True, False])
def test_the_device_update_follows_the_rule_written_out(momentum, with_batches):
    """The update that reads nothing (GPU, torch.compile) against the factor rule in Python
    floats: min(1, max(μ·m·B/S, m/(S + m))), with B and S from before the batch (μ·m/S
    without a batch counter: max(μ, m/(S + m))), batch sizes that vary, counters that start
    at zero."""
    g = torch.Generator().manual_seed(3)
    running = torch.zeros(2, 3, dtype=torch.float64)
    expected = running.clone()
    tracked = torch.tensor(0) if with_batches else None
    samples = torch.tensor(0)
    batches, seen = 0, 0
    for m in (10, 30, 5, 60, 20, 1):
        beta = torch.randn(2, 3, generator=g, dtype=torch.float64)
        total = beta.sum()
        MF._update_one_process(
            running, beta, (total - total) == 0, m, momentum, tracked, samples, None
        )
        factor = m / (seen + m)
        if momentum is not None:
            if with_batches:
                factor = max(factor, min(1.0, momentum * m * batches / max(seen, 1)))
            else:
                factor = max(factor, momentum)
        expected += factor * (beta - expected)
        batches, seen = batches + 1, seen + m
        torch.testing.assert_close(running, expected, rtol=1e-12, atol=1e-12)
    assert int(samples) == seen and (tracked is None or int(tracked) == batches)
