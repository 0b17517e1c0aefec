"""The training path's hand-written backward against autograd on the same maths."""

import pytest
import torch

from metanorm import glm
from metanorm.nn import MetadataNorm
from metanorm.nn import functional as MF


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, dtype=torch.float64, generator=g)
    x[:, 2] = 1.0
    kernel = glm.glm_kernel(x)
    mask = torch.tensor([False, True, True])
    return x, kernel, mask, g


def test_gradcheck(setup):
    x, kernel, mask, g = setup
    feats = torch.randn(9, 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    rows = x[:9]

    def f(t):
        return MF.metadata_norm(t, rows, kernel, 60, mask, training=True, momentum=0.1)

    assert torch.autograd.gradcheck(f, (feats,))
    assert torch.autograd.gradgradcheck(f, (feats,))


def test_matches_plain_autograd_and_running_beta(setup):
    x, kernel, mask, g = setup
    feats = torch.randn(9, 5, dtype=torch.float64, generator=g, requires_grad=True)
    rows = x[:9]
    rows_grad = rows.clone().requires_grad_(True)  # forces the plain autograd path
    rb1, rb2 = torch.zeros(3, 5, dtype=torch.float64), torch.zeros(3, 5, dtype=torch.float64)
    n1, n2 = torch.tensor(0), torch.tensor(0)
    o1 = MF.metadata_norm(feats, rows, kernel, 60, mask, rb1, n1, training=True, momentum=0.1)
    o2 = MF.metadata_norm(feats, rows_grad, kernel, 60, mask, rb2, n2, training=True, momentum=0.1)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(rb1, rb2)
    assert int(n1) == int(n2) == 1
    w = torch.randn(9, 5, dtype=torch.float64, generator=g)
    (g1,) = torch.autograd.grad(o1, feats, w)
    (g2,) = torch.autograd.grad(o2, feats, w)
    torch.testing.assert_close(g1, g2)
    # the closed form of the gradient: G − X_b S Mᵀ G with S = (N/m) Σ⁻¹, M the removed columns
    s = kernel * 60 / 9
    expected = w - rows @ s @ (rows * mask.double()).T @ w
    torch.testing.assert_close(g1, expected)


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
