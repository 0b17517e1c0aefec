"""convert_metadata_norm against the same network written by hand with mdn(h, metadata) calls."""

import copy

import pytest
import torch
from torch import nn

from metanorm.nn import (
    LazyMetadataNorm,
    MetadataModel,
    MetadataNorm,
    convert_metadata_norm,
    metadata_scope,
)


def _design(n=120):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n, 1), generator=g).double()
    site = torch.randint(0, 2, (n, 1), generator=g).double()
    return torch.cat(
        [y, site, torch.randn(n, 1, generator=g, dtype=torch.double) + y, torch.ones(n, 1)], 1
    )


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class _Net(nn.Module):
    """A ResNet-like network whose forward takes no metadata."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn, self.relu = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.layer1 = nn.Sequential(_Block(4), _Block(4))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.bn_fc, self.fc2 = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)

    def forward(self, x):
        h = self.layer1(self.relu(self.bn(self.stem(x))))
        h = torch.flatten(self.pool(h), 1)
        return self.fc2(self.relu(self.bn_fc(self.fc1(h))))


class _Hand(nn.Module):
    """The converted network written by hand: explicit mdn(h, metadata) calls."""

    def __init__(self, net, design, **opts):
        super().__init__()
        self.net = net
        self.mdn_bn2 = MetadataNorm(4 * 8 * 8, design, **opts)
        self.mdn_pool = MetadataNorm(4, design, **opts)
        self.mdn_fc = MetadataNorm(6, design, **opts)

    def forward(self, x, rows):
        n, b = self.net, self.net.layer1[1]
        h = n.layer1[0](n.relu(n.bn(n.stem(x))))
        out = b.relu(b.bn1(b.conv1(h)))
        h = b.relu(self.mdn_bn2(b.conv2(out), rows) + h)
        h = torch.flatten(self.mdn_pool(n.pool(h), rows), 1)
        return n.fc2(n.relu(self.mdn_fc(n.fc1(h), rows)))


OPTS = {"keep": [0], "momentum": 0.1, "dtype": torch.float64}


def _models():
    design = _design()
    torch.manual_seed(0)
    net = _Net().double()
    hand = _Hand(copy.deepcopy(net), design, **OPTS)
    model = convert_metadata_norm(
        net, design, replace=["layer1.1.bn2", nn.BatchNorm1d], after=["pool"], **OPTS
    )
    return design, model, hand


def test_converted_equals_hand_written_train_and_eval():
    design, model, hand = _models()
    assert isinstance(model, MetadataModel) and model.module.bn_fc.__class__ is LazyMetadataNorm
    x = torch.randn(len(design), 1, 8, 8, dtype=torch.double)
    opt_m = torch.optim.SGD(model.parameters(), lr=0.05)
    for step, i in enumerate(range(0, len(x), 40)):
        xb, rb = x[i : i + 40], design[i : i + 40]
        out, expected = model(xb, metadata=rb), hand(xb, rb)
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
        g = torch.randn_like(out)
        out.backward(g)
        expected.backward(g)
        hand_params = dict(hand.net.named_parameters())
        for name, p in model.module.named_parameters():
            torch.testing.assert_close(p.grad, hand_params[name].grad, atol=1e-12, rtol=0)
        if step == 0:  # the lazy layers are sized now: the optimiser gets every parameter
            opt_m = torch.optim.SGD(model.parameters(), lr=0.05)
        opt_h = torch.optim.SGD(hand.parameters(), lr=0.05)
        opt_m.step()
        opt_h.step()
        opt_m.zero_grad()
        hand.zero_grad()
    pairs = [
        (model.module.layer1[1].bn2, hand.mdn_bn2),
        (model.inserted["pool"], hand.mdn_pool),
        (model.module.bn_fc, hand.mdn_fc),
    ]
    for converted, written in pairs:
        assert type(converted) is MetadataNorm
        assert converted.num_features == written.num_features
        assert int(converted.num_batches_tracked) == 3
        torch.testing.assert_close(converted.running_beta, written.running_beta, atol=1e-12, rtol=0)
    model.eval()
    hand.eval()
    torch.testing.assert_close(model(x, metadata=design), hand(x, design), atol=1e-12, rtol=0)


def test_errors_name_close_modules_and_types():
    design = _design()
    net = _Net()
    with pytest.raises(ValueError, match=r"replace='layer1.1.bn3'.*close names: 'layer1.1.bn[12]'"):
        convert_metadata_norm(net, design, replace=["layer1.1.bn3"])
    with pytest.raises(ValueError, match=r"after='pol'.*close names: 'pool'"):
        convert_metadata_norm(net, design, after=["pol"])
    with pytest.raises(
        ValueError,
        match=r"replace=BatchNorm3d: no module of that type.*"
        r"close types: BatchNorm[12]d",
    ):
        convert_metadata_norm(net, design, replace=[nn.BatchNorm3d])
    with pytest.raises(ValueError, match=r"no module of that name.*see"):
        convert_metadata_norm(net, design, replace=["zzzzzz"])
    with pytest.raises(ValueError, match="whole model"):
        convert_metadata_norm(net, design, replace=[""])
    with pytest.raises(TypeError, match=r"module names .* or module types"):
        convert_metadata_norm(net, design, replace=[3])
    with pytest.raises(ValueError, match="nothing to convert"):
        convert_metadata_norm(net, design)
    assert all(not isinstance(m, MetadataNorm) for m in net.modules())  # nothing changed


def test_metadata_missing_or_wrong_rows():
    design, model, _ = _models()
    x = torch.randn(8, 1, 8, 8, dtype=torch.double)
    with pytest.raises(TypeError, match=r"none is in scope.*model\(x, metadata=rows\)"):
        model.module(x)
    with pytest.raises(TypeError, match="metadata"):
        model(x)
    with pytest.raises(ValueError, match="one design row per sample"):
        model(x, metadata=design[:6])
    # the model's modules called through another wrapper: the inserted layer is not there
    with pytest.raises(TypeError, match="inserted after 'pool' is not in the MetadataModel"):
        MetadataModel(model.module)(x, metadata=design[:8])
    with pytest.raises(TypeError, match="inserted after 'pool'"), metadata_scope(design[:8]):
        model.module(x)


def test_replace_by_type_every_instance_and_shared_modules_stay_shared():
    design = _design()
    net = _Net()
    shared = nn.BatchNorm2d(4)
    net.layer1[0].bn1 = net.layer1[1].bn1 = shared
    model = convert_metadata_norm(net, design, replace=nn.BatchNorm2d, after="layer1.0", keep=())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert net.layer1[0].bn1 is net.layer1[1].bn1
    assert sum(isinstance(m, MetadataNorm) for m in model.modules()) == 5  # 6 slots, 1 shared
    # a replaced container takes its children with it
    net2 = _Net()
    convert_metadata_norm(net2, design, replace=["layer1", "layer1.0.bn1"], keep=())
    assert isinstance(net2.layer1, MetadataNorm)
    out = model(torch.randn(6, 1, 8, 8), metadata=design[:6].float())
    assert out.shape == (6, 2) and model.inserted["layer1-0"].num_features == 4 * 8 * 8
    # converting further: another layer after the head
    convert_metadata_norm(model, design, after=["fc2"], keep=())
    assert set(model.inserted) == {"layer1-0", "fc2"}
    with pytest.raises(ValueError, match="already inserted"):
        convert_metadata_norm(model, design, after=["fc2"])


def test_converted_model_restores_from_state_dict():
    design, model, _ = _models()
    x = torch.randn(40, 1, 8, 8, dtype=torch.double)
    model(x, metadata=design[:40])
    model.eval()
    expected = model(x, metadata=design[:40])
    torch.manual_seed(5)
    fresh = convert_metadata_norm(
        _Net().double(), design, replace=["layer1.1.bn2", nn.BatchNorm1d], after=["pool"], **OPTS
    )
    fresh.load_state_dict(model.state_dict())  # into lazy layers, before their first call
    fresh.eval()
    torch.testing.assert_close(fresh(x, metadata=design[:40]), expected, atol=0, rtol=0)
    assert fresh.inserted["pool"].num_features == 4
