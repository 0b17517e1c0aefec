"""The stand-in models with every alternative to MDN and the candidate fixes of docs/failures.md."""

import numpy as np
import pytest
import torch

from metanorm.design import make_design
from metanorm.nn import MetadataNorm
from metanorm_repro.experiments.alternatives import BRNetObjective, attach_objective
from metanorm_repro.experiments.engine import train_one_epoch
from metanorm_repro.experiments.real import METHODS
from metanorm_repro.models.interaction_norms import (
    FAILURE_METHODS,
    MetadataScaleNorm,
    PolynomialMetadataNorm,
    squared_columns,
)
from metanorm_repro.models.methods import get_method, list_methods
from metanorm_repro.models.stand_in import StandInCNN, StandInCNN3d, StandInMLP


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models train faster on one thread (and do not contend with other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def design(n=64, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    cf = rng.uniform(1, 4, n) + 2 * y
    return make_design({"label": y, "cf": cf}, keep=["label"])


def models(d):
    """One small model of each stand-in class for a method, with its input."""
    return [
        (lambda m: StandInCNN(1, 2, 8, m, d, hidden=6, channels=(2, 3)), (1, 8, 8)),
        (lambda m: StandInMLP(5, 2, m, d, hidden=(8, 6)), (5,)),
        (lambda m: StandInCNN3d(1, 2, (8, 8, 8), m, d, hidden=6, channels=(2, 2, 2)), (1, 8, 8, 8)),
    ]


def attach(model, method, d, width, steps=100):
    """attach_objective, with DANN's λ ramp spanning ``steps`` training steps."""
    model = attach_objective(model, method, d, width)
    if hasattr(getattr(model, "objective", None), "total_steps"):
        model.objective.total_steps = steps
    return model


def test_every_registered_method_builds_trains_and_evaluates():
    """Every method of the real experiments, in the three models: forward, backward, eval at
    batch size 1; methods with an objective get it from attach_objective."""
    d = design()
    rows = d.tensor()[:6]
    assert set(METHODS) >= {"concat", "brnet", "brnet-cond", "dann", "dann-cond", "groupdro"}
    assert set(METHODS) >= set(FAILURE_METHODS) and set(FAILURE_METHODS) <= set(list_methods())
    for method in METHODS:
        for make, shape in models(d):
            torch.manual_seed(0)
            model = attach(make(method), method, d, 6)
            x = torch.randn(6, *shape)
            logits, feats = model(x, rows)
            assert logits.shape == (6, 2) and feats.shape == (6, 6)
            loss = (
                model.objective(logits, feats, d.tensor()[:6, 0].long(), rows)
                if hasattr(model, "objective")
                else logits.sum()
            )
            loss.backward()
            assert hasattr(model, "objective") == (get_method(method).objective is not None)
            model.eval()
            assert model(x[:1], rows[:1])[0].shape == (1, 2)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_concat_feeds_the_confounder_to_the_head_and_never_the_label(index):
    d = design()
    make, shape = models(d)[index]
    torch.manual_seed(0)
    model = make("concat").eval()
    assert model.concat_columns == (1,) and model.head.in_features == 6 + 1
    x, rows = torch.randn(4, *shape), d.tensor()[:4].clone()
    logits, feats = model(x, rows)
    moved = rows.clone()
    moved[:, 1] += 1.0  # cf up by one: the logits move by the head's cf weight, exactly
    logits2, feats2 = model(x, moved)
    torch.testing.assert_close(feats2, feats)  # the features (where dcor² is measured) stay
    torch.testing.assert_close(logits2 - logits, model.head.weight[:, 6].expand(4, 2))
    flipped = rows.clone()
    flipped[:, 0] = 1.0 - flipped[:, 0]  # the kept label: never an input
    torch.testing.assert_close(model(x, flipped)[0], logits)
    with pytest.raises(ValueError, match="metadata"):
        model(x, None)


@pytest.mark.skipif("concat-input" not in list_methods(), reason="concat-input not registered")
def test_concat_input_adds_constant_channels():
    d = design()
    rows = d.tensor()[:3]
    cnn = StandInCNN(1, 2, 8, "concat-input", d, hidden=6, channels=(2, 3))
    assert cnn.conv1.in_channels == 2
    x = cnn._with_input_metadata(torch.randn(3, 1, 8, 8), rows)
    torch.testing.assert_close(x[:, 1], rows[:, 1, None, None].expand(3, 8, 8))
    mlp = StandInMLP(5, 2, "concat-input", d, hidden=(8, 6))
    assert mlp.fc1.in_features == 6
    torch.testing.assert_close(mlp._with_input_metadata(torch.zeros(3, 5), rows)[:, 5], rows[:, 1])


def _confounded(n, seed):
    """Inputs where the first five features carry the label, the last five the confounder."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    cf = torch.rand(n, generator=g) * 3 + 1 + 2 * y
    x = torch.randn(n, 10, generator=g) * 0.5
    x[:, :5] += y[:, None].float()
    x[:, 5:] += cf[:, None]
    d = make_design({"y": y.numpy(), "cf": cf.numpy()}, keep=["y"])
    return x, y, d


def _train(method, x, y, d, epochs=8, seed=0):
    torch.manual_seed(seed)
    model = StandInMLP(10, 2, method, d, hidden=(16, 8))
    model = attach(model, method, d, 8)
    rows = d.tensor()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.utils.data.TensorDataset(x, y, rows)
    loader = torch.utils.data.DataLoader(
        data, batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    for _ in range(epochs):
        train_one_epoch(model, loader, opt)
    model.eval()
    with torch.no_grad():
        feats = model(x, rows)[1].numpy()
    return model, feats


# Over seeds 0-9 (data, weights and batches; AMD EPYC, 1 thread) the ratio r²(weight 1) / r²(weight
# 0) of BR-Net-cond was 0.005 0.000 0.000 0.019 0.004 0.001 0.000 0.144 0.002 0.023 (bar: the worst
# plus 0.05), and r²(weight 0) at least 0.625 (bar 0.5). Marginal BR-Net's ratio ranged 0.03-0.91
# here, too wide for a bar that says anything: test_alternatives.py tests its claim deterministically.
def test_brnet_lowers_its_predictors_r2():
    """BR-Net-cond on a stand-in: after training, its bias predictor's within-class r² with cf
    (the objective's own measure) is far below that of the same predictor trained alongside an
    encoder that is not penalised (weight 0, same seed and batches)."""
    conditional = True
    x, y, d = _confounded(400, 0)
    r2 = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = StandInMLP(10, 2, "batchnorm", None, hidden=(16, 8))
        model.objective = BRNetObjective(d, 8, conditional=conditional, weight=weight)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        data = torch.utils.data.TensorDataset(x, y, d.tensor())
        loader = torch.utils.data.DataLoader(
            data, batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0)
        )
        for _ in range(8):
            train_one_epoch(model, loader, opt)
        model.eval()
        with torch.no_grad():
            feats = model(x, d.tensor())[1]
            target = (d.tensor()[:, 1:2] - model.objective.mean) / model.objective.std
            r2[weight] = float(model.objective.r2(target, model.objective.predictor(feats), y))
    assert r2[0.0] > 0.5 and r2[1.0] < 0.2 * r2[0.0], r2


def test_mdn_plus_brnet_cond_has_both():
    d = design()
    model = attach(
        StandInCNN(1, 2, 8, "mdn+brnet-cond", d, hidden=6, channels=(2, 3)), "mdn+brnet-cond", d, 6
    )
    assert isinstance(model.fc_norm, MetadataNorm)
    assert isinstance(model.norm1, torch.nn.BatchNorm2d)
    assert isinstance(model.objective, BRNetObjective) and model.objective.conditional


def test_concat_uses_the_confounder():
    """With the label-bearing inputs removed, only concat can use cf: its accuracy on the
    training set beats chance by far, BatchNorm's on pure noise (which it partly memorises) does
    not. Over seeds 0-9 (AMD EPYC, 1 thread): concat 0.863-0.925, concat − BatchNorm 0.121-0.200;
    bars: the worst values with a margin of 0.05."""
    x, y, d = _confounded(400, 1)
    x[:, :] = torch.randn(400, 10)  # no signal in the inputs at all
    acc = {}
    for m in ("batchnorm", "concat"):
        model, _ = _train(m, x, y, d, epochs=10)
        with torch.no_grad():
            acc[m] = float((model(x, d.tensor())[0].argmax(1) == y).float().mean())
    assert acc["concat"] > 0.8 and acc["batchnorm"] < acc["concat"] - 0.07, acc


def test_scale_norm_divides_out_an_exactly_multiplicative_effect():
    """f = exp(0.3 c) · g: with the whole set as one batch, log σ of the output has no
    least-squares coefficient on c (numpy lstsq as the oracle), and the label's effect on the
    scale stays; eval with momentum 1 gives the same output."""
    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 2, n)
    c = rng.uniform(1, 6, n)
    d = make_design({"y": y, "c": c}, keep=["y"])
    g = rng.normal(size=(n, 3, 4, 4)) * (1 + 0.5 * y)[:, None, None, None]
    f = torch.as_tensor(np.exp(0.3 * c)[:, None, None, None] * g + 2.0, dtype=torch.float32)
    layer = MetadataScaleNorm(3, d, momentum=1.0)
    out = layer(f, d.tensor())

    def log_sigma(t):
        return 0.5 * np.log(t.detach().double().flatten(2).var(2, unbiased=False).numpy())

    coef_in, *_ = np.linalg.lstsq(d.matrix, log_sigma(f), rcond=None)
    coef, *_ = np.linalg.lstsq(d.matrix, log_sigma(out), rcond=None)
    assert np.all(coef_in[1] > 0.25)  # the input's scale grows with c (0.3 per unit)
    np.testing.assert_allclose(coef[1], 0.0, atol=1e-4)  # gone from the output
    np.testing.assert_allclose(coef[0], coef_in[0], atol=1e-4)  # the label's part kept
    layer.eval()
    torch.testing.assert_close(layer(f, d.tensor()), out)
    with pytest.raises(ValueError, match="design rows"):
        layer(f, d.tensor()[:, :2])


def test_polynomial_mdn_removes_the_square_of_the_confounder():
    rng = np.random.default_rng(1)
    n = 120
    y = rng.integers(0, 2, n)
    c = rng.uniform(-2, 2, n)
    site = rng.integers(0, 2, n)
    d = make_design({"y": y, "c": c, "site": site}, keep=["y"])
    assert squared_columns(d) == [1]  # the binary site equals its square
    layer = PolynomialMetadataNorm(5, d)
    assert layer.design_columns[-1] == "c^2"
    f = torch.as_tensor(rng.normal(size=(n, 5)) + (c**2)[:, None] + y[:, None], dtype=torch.float32)
    out = layer(f, d.tensor()).detach().double().numpy()
    full = np.column_stack([d.matrix, c**2])
    coef, *_ = np.linalg.lstsq(full, out, rcond=None)
    np.testing.assert_allclose(coef[1:], 0.0, atol=1e-4)  # c, site, intercept and c² removed
    plain = MetadataNorm(5, d)(f, d.tensor()).detach().double().numpy()
    assert abs(np.corrcoef(plain[:, 0], c**2)[0, 1]) > 0.5  # plain MDN leaves the square


def test_channelwise_and_scale_methods_put_their_layers_in_the_conv_slots():
    d = design()
    cw = StandInCNN(1, 2, 8, "mdn-cw", d, hidden=6, channels=(2, 3))
    assert cw.norm1.channelwise and cw.norm2.channelwise and not cw.fc_norm.channelwise
    sc = StandInCNN(1, 2, 8, "mdn-scale", d, hidden=6, channels=(2, 3))
    assert isinstance(sc.norm1[0], MetadataScaleNorm)
    assert isinstance(sc.norm1[1], torch.nn.BatchNorm2d)
    assert isinstance(sc.fc_norm, MetadataNorm)
    # the layers before a scale division lose their bias (s · W x reaches it exactly)
    assert sc.conv1.bias is None and sc.conv2.bias is None and sc.fc.bias is not None
    assert cw.conv1.bias is not None
    mlp = StandInMLP(5, 2, "mdn-scale", d, hidden=(8, 6))
    assert mlp.fc1.bias is None and isinstance(mlp.norm1[0], MetadataScaleNorm)
    vol = StandInCNN3d(1, 2, (8, 8, 8), "mdn-scale", d, hidden=6, channels=(2, 2, 2))
    assert all(conv.bias is None for conv in vol.blocks[0::2])
    with pytest.raises(TypeError, match="design"):
        StandInCNN(1, 2, 8, "mdn-scale")
    with pytest.raises(TypeError, match="design"):
        StandInMLP(5, 2, "concat")


def test_location_scale_method_puts_its_layer_in_the_conv_slots_and_trains():
    from metanorm.nn import MetadataLocationScaleNorm
    from metanorm_repro.models.interaction_norms import FAILURE_METHODS

    d = design()
    ls = StandInCNN(1, 2, 8, "mdn-ls", d, hidden=6, channels=(2, 3))
    assert isinstance(ls.norm1[0], MetadataLocationScaleNorm)
    assert isinstance(ls.norm1[1], torch.nn.BatchNorm2d) and isinstance(ls.fc_norm, MetadataNorm)
    assert ls.conv1.bias is not None  # the location stage removes a bias's metadata part
    mlp = StandInMLP(5, 2, "mdn-ls", d, hidden=(8, 6))
    assert mlp.norm1[0].num_positions == 1
    assert "mdn-ls" not in FAILURE_METHODS  # registered, not run by default
    x = torch.randn(16, 1, 8, 8)
    rows = d.tensor()[:16]
    logits = ls(x, rows)
    logits = logits[0] if isinstance(logits, tuple) else logits
    logits.sum().backward()
    assert logits.shape == (16, 2) and ls.conv1.weight.grad is not None
