"""refit_running_beta: each running β becomes the full-data least-squares β of its eval features."""

import numpy as np
import pytest
import torch
from torch import nn

from metanorm.nn import MetadataNorm, MetadataSequential
from metanorm.nn.utils import refit_running_beta


def _setup(n=90):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n, 1), generator=g).double()
    design = torch.cat(
        [y, torch.randn(n, 1, generator=g, dtype=torch.float64), torch.ones(n, 1)], 1
    )
    x = torch.randn(n, 5, generator=g, dtype=torch.float64) + design[:, 1:2]
    torch.manual_seed(0)
    model = MetadataSequential(
        nn.Linear(5, 6),
        MetadataNorm(6, design, keep=[0], momentum=0.3),
        nn.ReLU(),
        nn.BatchNorm1d(6),
        nn.Dropout(0.5),
        nn.Linear(6, 4),
        MetadataNorm(4, design, keep=[0], momentum=0.3),
    ).double()
    model(x[:30], design[:30])  # stale running state, to be replaced
    loader = [(x[i : i + 7], y[i : i + 7], design[i : i + 7]) for i in range(0, n, 7)]
    return model, x, design, loader


def _eval_inputs(model, x, design):
    seen = {}
    hooks = [
        model[i].register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0]))
        for i in (1, 6)
    ]
    model.eval()
    with torch.no_grad():
        model(x, design)
    for h in hooks:
        h.remove()
    return seen


def test_layer_by_layer_refit_is_least_squares_of_eval_features():
    model, x, design, loader = _setup()
    model.train()
    model[4].eval()  # a module the user had in eval mode stays so
    bn_mean = model[3].running_mean.clone()
    assert refit_running_beta(model, loader) == 2
    assert model.training and model[1].training and not model[4].training
    assert model[1].momentum == 0.3 and model[6].momentum == 0.3
    torch.testing.assert_close(model[3].running_mean, bn_mean, atol=0, rtol=0)  # BN untouched
    seen = _eval_inputs(model, x, design)
    for i in (1, 6):
        want = np.linalg.lstsq(design.numpy(), seen[i].numpy(), rcond=None)[0]
        np.testing.assert_allclose(model[i].running_beta.numpy(), want, atol=1e-10)
        assert int(model[i].num_samples_tracked) == len(x)


def test_single_pass_and_custom_call():
    model, x, design, loader = _setup()
    calls = []

    def call(mdl, batch):
        calls.append(len(batch[0]))
        mdl(batch[0], batch[2])

    assert refit_running_beta(model, loader, call=call, layer_by_layer=False) == 2
    assert sum(calls) == 7 + len(x)  # the order-finding batch, then one pass for both layers
    seen = _eval_inputs(model, x, design)
    want = np.linalg.lstsq(design.numpy(), seen[1].numpy(), rcond=None)[0]
    np.testing.assert_allclose(model[1].running_beta.numpy(), want, atol=1e-10)


def test_no_mdn_layer_and_bad_batches():
    model, x, _, _ = _setup()
    assert refit_running_beta(nn.Linear(2, 2), [(torch.randn(3, 2), torch.randn(3, 1))]) == 0
    before = model[1].momentum
    with pytest.raises(
        TypeError, match=r"expected each batch to be a tuple \(input, ..., design_rows\)"
    ):
        refit_running_beta(model, [x])
    assert model[1].momentum == before  # restored after a failure too


class _Reordered(nn.Module):
    """Declares its MDN layers in the reverse of the order its forward calls them."""

    def __init__(self, design):
        super().__init__()
        self.late = MetadataNorm(4, design, keep=[0])
        self.unused = MetadataNorm(6, design, keep=[0])
        self.early = MetadataNorm(6, design, keep=[0])
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 4)

    def forward(self, x, rows=None):  # rows=None: the layers take the metadata in scope
        return self.late(self.fc2(torch.relu(self.early(self.fc1(x), rows))), rows)


def test_layers_refitted_in_forward_order_and_uncalled_layers_untouched():
    from metanorm.nn import MetadataModel

    _, x, design, loader = _setup()
    torch.manual_seed(1)
    net = _Reordered(design).double()
    net(x[:30], design[:30])
    net.unused.running_beta.fill_(0.5)
    unused = {k: v.clone() for k, v in net.unused.state_dict().items()}
    # through a MetadataModel: the default call passes metadata= (a plain call would fail)
    assert refit_running_beta(MetadataModel(net), loader) == 2
    for key, value in net.unused.state_dict().items():
        torch.testing.assert_close(value, unused[key], atol=0, rtol=0)
    net.eval()
    with torch.no_grad():
        h1 = net.fc1(x)
        h2 = net.fc2(torch.relu(net.early(h1, design)))
    for layer, feats in ((net.early, h1), (net.late, h2)):
        want = np.linalg.lstsq(design.numpy(), feats.numpy(), rcond=None)[0]
        np.testing.assert_allclose(layer.running_beta.numpy(), want, atol=1e-10)


def test_empty_loader_refits_nothing():
    model, _, _, _ = _setup()
    before = model[1].running_beta.clone()
    assert refit_running_beta(model, []) == 0
    torch.testing.assert_close(model[1].running_beta, before, atol=0, rtol=0)


def test_refit_names_the_expected_batch_structure_and_call():
    design = torch.cat([torch.randn(40, 2), torch.ones(40, 1)], dim=1)
    model = MetadataSequential(torch.nn.Linear(3, 5), MetadataNorm(5, design, keep=()))
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,)).float()
    before = model[1].running_beta.clone()
    # (x, rows, y): the rows are not last
    with pytest.raises(ValueError, match=r"last element .* design rows, \(m, K\) with K = 3") as e:
        refit_running_beta(model, [(x, design, y)])
    assert "call=" in str(e.value) and "shape (40,)" in str(e.value)
    # the labels as a column are not the rows either
    with pytest.raises(ValueError, match=r"rows last.*call="):
        refit_running_beta(model, [(x, design, y[:, None])])
    # a dict batch
    with pytest.raises(TypeError, match=r"tuple \(input, \.\.\., design_rows\).*got dict.*call="):
        refit_running_beta(model, [{"x": x, "rows": design}])
    torch.testing.assert_close(model[1].running_beta, before)  # nothing changed
    # with call= both work
    assert refit_running_beta(model, [(x, design, y)], call=lambda m, b: m(b[0], b[1])) == 1
