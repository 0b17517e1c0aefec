"""PenaltyMetadataNorm: its β against least squares on fixed features, state, errors."""

import pytest
import torch

from metanorm.nn import MetadataSequential, PenaltyMetadataNorm, split_parameters

D64 = torch.float64


def _data(n=60, k=3, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, dtype=D64, generator=g)
    x[:, -1] = 1.0
    f = x @ torch.randn(k, d, dtype=D64, generator=g) + torch.randn(n, d, dtype=D64, generator=g)
    return x, f


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _ls(x, f):
    return torch.linalg.lstsq(x, f, driver="gelsd").solution


def test_sgd_full_batch_converges_to_least_squares():
    x, f = _data()
    lr = 0.5 / float(torch.linalg.eigvalsh(x.T @ x / 60).max())
    layer = PenaltyMetadataNorm(4, 3, lr=lr, optimizer="sgd", dtype=D64)
    for _ in range(400):
        layer(f, x)
    assert _rel(layer.beta, _ls(x, f)) < 1e-6


def test_adam_minibatches_converge_to_least_squares():
    x, f = _data()
    layer = PenaltyMetadataNorm(4, 3, lr=0.05, dtype=D64)
    g = torch.Generator().manual_seed(1)
    for epoch in range(300):
        if epoch == 200:
            layer.lr = 0.002  # a smaller step for the last epochs (a schedule)
        for idx in torch.randperm(60, generator=g).split(15):
            layer(f[idx], x[idx])
    assert _rel(layer.beta, _ls(x, f)) < 1e-2
    assert int(layer.num_batches_tracked) == 1200


def test_one_adam_step_matches_torch_adam():
    x, f = _data()
    layer = PenaltyMetadataNorm(4, 3, lr=0.01, dtype=D64)
    ref = torch.zeros(3, 4, dtype=D64, requires_grad=True)
    opt = torch.optim.Adam([ref], lr=0.01)
    for i in range(5):
        s = slice(10 * i, 10 * i + 10)
        layer(f[s], x[s])
        opt.zero_grad()
        ((f[s] - x[s] @ ref).square().sum() / 10).backward()
        opt.step()
    torch.testing.assert_close(layer.beta, ref.detach(), rtol=1e-10, atol=1e-12)


def test_output_uses_beta_before_the_step_and_no_gradient_reaches_beta():
    x, f = _data()
    layer = PenaltyMetadataNorm(4, 3, keep=[0], dtype=D64)
    layer(f[:20], x[:20])
    beta = layer.beta.detach().clone()
    feats = f[20:30].clone().requires_grad_(True)
    out = layer(feats, x[20:30])
    mask = torch.tensor([0.0, 1.0, 1.0], dtype=D64)
    torch.testing.assert_close(out, f[20:30] - (x[20:30] * mask) @ beta, rtol=0, atol=1e-12)
    assert not torch.equal(layer.beta, beta)  # stepped after the output
    w = torch.randn_like(out)
    out.backward(w)
    torch.testing.assert_close(feats.grad, w)
    assert layer.beta.grad is None and not layer.beta.requires_grad
    penalty = layer.penalty(f, x)
    expected = (f - x @ layer.beta).square().sum() / 60
    torch.testing.assert_close(penalty, expected)
    layer.eval()
    before = layer.beta.clone()
    layer(f[:5], x[:5])
    torch.testing.assert_close(layer.beta, before)  # no step in evaluation


def test_split_parameters_and_network_optimizer_leave_beta_alone():
    x, f = _data()
    model = MetadataSequential(torch.nn.Linear(4, 4).double(), PenaltyMetadataNorm(4, 3, dtype=D64))
    network, betas = split_parameters(model)
    assert len(network) == 2 and len(betas) == 1 and betas[0] is model[1].beta
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    out = model(f[:10], x[:10])
    stepped = model[1].beta.clone()
    out.square().sum().backward()
    opt.step()
    torch.testing.assert_close(model[1].beta, stepped)  # only the layer's own optimiser moves β


class _TwoShards:
    def __init__(self):
        self.other, self.record, self.i = [], True, 0

    def sum(self, tensor):
        if self.record:
            self.other.append(tensor.clone())
            return tensor
        out = tensor + self.other[self.i]
        self.i += 1
        return out


def test_reducer_seam_gives_the_union_batch_step():
    x, f = _data()
    union = PenaltyMetadataNorm(4, 3, dtype=D64)
    union(f[:12], x[:12])
    reducer = _TwoShards()
    shard = PenaltyMetadataNorm(4, 3, dtype=D64)
    shard._reducer = lambda: reducer  # type: ignore[method-assign]
    shard(f[4:12], x[4:12])
    shard.reset_parameters()
    reducer.record = False
    shard(f[:4], x[:4])
    torch.testing.assert_close(shard.beta, union.beta, rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip_continues_the_same_optimiser():
    x, f = _data()
    layer = PenaltyMetadataNorm(4, 3, keep=[0])
    for i in range(4):
        layer(f[10 * i : 10 * i + 10].float(), x[10 * i : 10 * i + 10].float())
    restored = PenaltyMetadataNorm(4, 3, keep=[0])
    restored.load_state_dict(layer.state_dict())
    assert set(layer.state_dict()) >= {"beta", "exp_avg", "exp_avg_sq", "num_batches_tracked"}
    for model in (layer, restored):
        model(f[40:50].float(), x[40:50].float())
    torch.testing.assert_close(restored.beta, layer.beta)
    layer.reset_parameters()
    assert float(layer.beta.abs().sum()) == 0 and int(layer.num_batches_tracked) == 0


def test_nonfinite_batch_is_skipped():
    x, f = _data()
    layer = PenaltyMetadataNorm(4, 3, dtype=D64)
    layer(f[:8], x[:8])
    beta = layer.beta.clone()
    bad = f[8:12].clone()
    bad[0, 0] = float("inf")
    layer(bad, x[8:12])
    torch.testing.assert_close(layer.beta, beta)
    assert int(layer.num_batches_skipped) == 1 and int(layer.num_batches_tracked) == 1
    assert torch.isfinite(layer.exp_avg).all()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda m, f, x: m(f, x[:, :2]), ValueError, r"shape \(4, 3\)"),
        (lambda m, f, x: m(f, x[:2]), ValueError, "4 rows"),
        (lambda m, f, x: m(f, x.numpy()), TypeError, "tensor"),
        (lambda m, f, x: m(f.int(), x), TypeError, "floating-point"),
        (lambda m, f, x: m(f[:, :3], x), ValueError, "4 features"),
    ],
)
def test_bad_input(call, error, match):
    x, f = _data(n=4)
    with pytest.raises(error, match=match):
        call(PenaltyMetadataNorm(4, 3), f.float(), x.float())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "lr"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"betas": (0.9,)}, "pair"),
        ({"eps": 0.0}, "eps"),
        ({"keep": [0, 1, 2]}, "nothing would be removed"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PenaltyMetadataNorm(4, 3, **kwargs)
