import numpy as np
import pytest
import torch

from metanorm.design import make_design
from metanorm.nn import MetadataNorm
from metanorm_repro.models.stand_in import StandInCNN, StandInCNN3d, StandInMLP


def design(n: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    cf = rng.uniform(1, 4, n) + 2 * y
    return make_design({"label": y, "cf": cf}, keep=["label"])


#: The stand-ins' methods (their base is BatchNorm).
NORMS = ("none", "batchnorm", "mdn", "mdn-all")


@pytest.mark.parametrize("norm", NORMS)
def test_cnn_shapes_and_layers(norm):
    d = design()
    torch.manual_seed(0)
    model = StandInCNN(1, 3, 16, norm, d if norm.startswith("mdn") else None, hidden=20)
    rows = d.tensor()[:8]
    logits, feats = model(torch.randn(8, 1, 16, 16), rows)
    assert logits.shape == (8, 3) and feats.shape == (8, 20)
    n_mdn = sum(isinstance(m, MetadataNorm) for m in model.modules())
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert (n_mdn, n_bn) == {"none": (0, 0), "batchnorm": (0, 3), "mdn": (1, 2), "mdn-all": (3, 0)}[
        norm
    ]
    (logits.sum() + feats.sum()).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    logits2, _ = model(torch.randn(1, 1, 16, 16), rows[:1])  # batch of one at eval
    assert logits2.shape == (1, 3)


def test_mdn_features_are_residuals_of_the_metadata():
    """With the whole training set as one batch, β̂ is the least-squares β: the returned
    features are orthogonal to the removed columns (cf, intercept) — numpy lstsq as oracle."""
    d = design(n=40)
    torch.manual_seed(1)
    model = StandInMLP(5, 2, "mdn", d, hidden=(12, 7))
    x = torch.randn(40, 5) + torch.as_tensor(d.matrix[:, 1:2], dtype=torch.float32)
    _, feats = model(x, d.tensor())
    coef, *_ = np.linalg.lstsq(d.matrix, feats.detach().double().numpy(), rcond=None)
    np.testing.assert_allclose(coef[1:], 0.0, atol=1e-4)  # cf and intercept removed
    assert np.abs(coef[0]).max() > 1e-3  # the label's part stays
    # the features are the layer output after MDN and before the ReLU: they go negative
    assert (feats < 0).any()


def test_models_need_design_for_mdn_and_metadata_at_forward():
    with pytest.raises(TypeError, match="design"):
        StandInCNN(1, 2, 16, "mdn")
    with pytest.raises(ValueError, match="norm"):
        StandInCNN(1, 2, 16, "layernorm")
    with pytest.raises(ValueError, match="num_classes"):
        StandInMLP(4, 1)
    with pytest.raises(ValueError, match="divisible by 4"):
        StandInCNN(1, 2, 18)
    with pytest.raises(ValueError, match="divisible by 8"):
        StandInCNN3d(1, 2, (8, 12, 8))
    m = StandInMLP(4, 2, "mdn", design(), hidden=(8, 6))
    with pytest.raises(ValueError, match="metadata"):
        m(torch.randn(4, 4), None)


@pytest.mark.parametrize("norm", ["batchnorm", "mdn", "mdn-all"])
def test_cnn3d(norm):
    d = design(n=16)
    model = StandInCNN3d(
        1, 2, (8, 8, 16), norm, d if norm != "batchnorm" else None, hidden=10, channels=(2, 3, 4)
    )
    logits, feats = model(torch.randn(6, 1, 8, 8, 16), d.tensor()[:6])
    assert logits.shape == (6, 2) and feats.shape == (6, 10)
    logits.sum().backward()


def test_cnn_learns_a_simple_task():
    """A sanity check that the model trains: bright vs dark images, 30 steps."""
    torch.manual_seed(0)
    y = torch.randint(0, 2, (64,))
    x = torch.rand(64, 1, 8, 8) * 0.5 + y.view(-1, 1, 1, 1) * 0.5
    model = StandInCNN(1, 2, 8, "batchnorm", channels=(4, 4), hidden=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x, None)[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert (model(x, None)[0].argmax(1) == y).float().mean() > 0.95


def test_synthetic_method_names_are_aliases():
    d = design()
    a = StandInCNN(1, 2, 8, "mdn-linear", d, channels=(2, 2), hidden=4)
    b = StandInCNN(1, 2, 8, "mdn-conv", d, channels=(2, 2), hidden=4)
    assert a.norm == "mdn" and b.norm == "mdn-all"
    assert sum(isinstance(m, MetadataNorm) for m in b.modules()) == 3
