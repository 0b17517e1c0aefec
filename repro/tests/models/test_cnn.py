import numpy as np
import pytest
import torch
from torch import nn

from metanorm.design import make_design
from metanorm.nn import MetadataNorm
from metanorm_repro.models import PaperCNN, create_model, list_methods, list_models


@pytest.fixture(scope="module")
def design():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (300,), generator=g)
    cf = torch.rand(300, generator=g) * 3 + 1 + 2 * y
    return make_design({"y": y.numpy(), "cf": cf.numpy()}, keep=["y"])


@pytest.mark.parametrize("norm", list_methods())
def test_shapes_every_norm(norm, design):
    torch.manual_seed(0)
    model = PaperCNN(norm, design)
    rows = design.tensor()[:6]
    logits, feats = model(torch.randn(6, 1, 32, 32), rows)
    assert logits.shape == (6, 1) and feats.shape == (6, 84)
    logits.sum().backward()
    assert model.conv1.weight.grad is not None
    model.eval()
    logits, feats = model(torch.randn(3, 1, 32, 32), rows[:3])
    assert logits.shape == (3, 1) and feats.shape == (3, 84)


def test_layers_match_the_paper(design):
    m = PaperCNN("none")
    assert (m.conv1.in_channels, m.conv1.out_channels, m.conv1.kernel_size) == (1, 16, (5, 5))
    assert (m.conv2.in_channels, m.conv2.out_channels, m.conv2.kernel_size) == (16, 32, (5, 5))
    assert (m.fc1.in_features, m.fc1.out_features) == (32 * 24 * 24, 84)
    assert (m.fc2.in_features, m.fc2.out_features) == (84, 1)


def test_norm_placement(design):
    def kinds(model):
        return [type(getattr(model, f"norm{i}")) for i in (1, 2, 3)]

    assert kinds(PaperCNN("none")) == [nn.Identity] * 3
    assert kinds(PaperCNN("batchnorm")) == [nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm1d]
    assert kinds(PaperCNN("groupnorm")) == [nn.GroupNorm] * 3
    assert kinds(PaperCNN("mdn-linear", design)) == [nn.Identity, nn.Identity, MetadataNorm]
    conv = PaperCNN("mdn-conv", design)
    assert kinds(conv) == [MetadataNorm] * 3
    assert [conv.norm1.num_features, conv.norm2.num_features, conv.norm3.num_features] == [
        16 * 28 * 28,
        32 * 24 * 24,
        84,
    ]
    assert conv.norm3.keep == (0,)  # the label column is kept, cf and the intercept removed
    bn = PaperCNN("batchnorm")
    assert [bn.norm1.num_features, bn.norm2.num_features, bn.norm3.num_features] == [16, 32, 84]


def test_mdn_linear_features_are_the_glm_residual(design):
    """Full batch in training mode: fc1 output minus the lstsq fit of [cf, 1] (y kept)."""
    torch.manual_seed(1)
    model = PaperCNN("mdn-linear", design)
    x = torch.randn(300, 1, 32, 32)
    captured = {}
    model.fc1.register_forward_hook(lambda mod, inp, out: captured.__setitem__("f", out))
    _, feats = model(x, design.tensor())
    f = captured["f"].detach().double().numpy()
    xm = design.matrix
    beta, *_ = np.linalg.lstsq(xm, f, rcond=None)
    expected = f - xm[:, 1:] @ beta[1:]
    np.testing.assert_allclose(feats.detach().double().numpy(), expected, atol=2e-4)


def test_errors(design):
    with pytest.raises(ValueError, match="norm"):
        PaperCNN("layernorm")
    with pytest.raises(ValueError, match="design"):
        PaperCNN("mdn-conv")
    model = PaperCNN("mdn-linear", design)
    with pytest.raises(ValueError, match="metadata"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="image_size"):
        PaperCNN("none", image_size=8)


def test_other_sizes_and_registry():
    m = PaperCNN("groupnorm", in_channels=3, image_size=28, num_outputs=10)
    logits, feats = m(torch.randn(2, 3, 28, 28))
    assert logits.shape == (2, 10) and feats.shape == (2, 84)
    assert "paper-cnn" in list_models()
    assert create_model("paper-cnn", norm="batchnorm").norm == "batchnorm"
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet")
