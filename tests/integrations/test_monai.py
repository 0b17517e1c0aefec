"""MONAI's 3-D ResNet-18 and DenseNet121 converted to MDN: train, evaluate, save and restore.

Random 1×32³ volumes with a site design, a few steps, pretrained=False (nothing downloads).
"""

import copy

import pytest
import torch
from torch import nn

from metanorm.nn import MetadataModel, MetadataNorm, convert_metadata_norm

nets = pytest.importorskip(
    "monai.networks.nets", reason="MONAI is not installed (pip install 'metanorm[monai]')"
)

N, BATCH, SIDE = 12, 6, 32  # batch > K = 4 columns, so each step uses its own estimate


def _data():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (N,), generator=g)
    site = torch.randint(0, 3, (N,), generator=g)
    # design [label | site b | site c | 1]: the label is kept, the site effect removed
    design = torch.stack(
        [y.float(), (site == 1).float(), (site == 2).float(), torch.ones(N)], dim=1
    )
    volumes = torch.randn(N, 1, SIDE, SIDE, SIDE, generator=g) + site.view(N, 1, 1, 1, 1)
    return volumes, y, design


def _resnet18(design, seed):
    torch.manual_seed(seed)
    net = nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=2, pretrained=False)
    last_stage = [
        name
        for name, m in net.named_modules()
        if name.startswith("layer4.") and isinstance(m, nn.BatchNorm3d)
    ]
    model = convert_metadata_norm(net, design, replace=last_stage, after=["avgpool"], keep=[0])
    return model, "avgpool", len(last_stage)


def _densenet121(design, seed):
    torch.manual_seed(seed)
    net = nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, pretrained=False)
    # the last norm channel-wise (as BatchNorm), and MDN on the features before the classifier
    model = convert_metadata_norm(
        net, design, replace=["features.norm5"], keep=[0], channelwise=True
    )
    convert_metadata_norm(model, design, after=["class_layers.flatten"], keep=[0])
    return model, "class_layers-flatten", 1


@pytest.mark.parametrize("build", [_resnet18, _densenet121], ids=["resnet18", "densenet121"])
def test_monai_network_trains_evaluates_and_restores(build, tmp_path):
    volumes, y, design = _data()
    model, key, replaced = build(design, seed=0)
    assert isinstance(model, MetadataModel)
    assert sum(isinstance(m, MetadataNorm) for m in model.module.modules()) == replaced
    opt = None
    for step, i in enumerate(range(0, N, BATCH)):
        xb, yb, rb = volumes[i : i + BATCH], y[i : i + BATCH], design[i : i + BATCH]
        loss = nn.functional.cross_entropy(model(xb, metadata=rb), yb)
        if step == 0:  # lazy MDN layers are sized by the first batch
            start = copy.deepcopy(model.state_dict())
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
    layers = [m for m in model.modules() if isinstance(m, MetadataNorm)]
    assert len(layers) == replaced + 1
    for layer in layers:
        assert int(layer.num_batches_tracked) == N // BATCH
        assert torch.isfinite(layer.running_beta).all() and layer.running_beta.abs().sum() > 0
    moved = [k for k, v in model.state_dict().items() if k.endswith("weight")]
    assert any(not torch.equal(model.state_dict()[k], start[k]) for k in moved)

    # evaluation: the inserted layer subtracts X_R β_run,R from the features it follows
    model.eval()
    seen = {}
    inserted = model.inserted[key]
    hooks = [
        inserted.register_forward_pre_hook(lambda m, a: seen.setdefault("features", a[0])),
        inserted.register_forward_hook(lambda m, a, out: seen.setdefault("out", out)),
    ]
    probe, rows = volumes[:4], design[:4]
    with torch.no_grad():
        logits = model(probe, metadata=rows)
    for hook in hooks:
        hook.remove()
    features = seen["features"].reshape(4, -1)
    expected = features - rows[:, 1:] @ inserted.running_beta[1:]  # the removed columns 1..3
    torch.testing.assert_close(seen["out"].reshape(4, -1), expected, atol=1e-5, rtol=1e-5)

    # save, restore into a freshly converted network (lazy layers, other weights), same outputs
    torch.save(model.state_dict(), tmp_path / "model.pt")
    restored, *_ = build(design, seed=1)
    restored.load_state_dict(torch.load(tmp_path / "model.pt"))
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(probe, metadata=rows), logits, atol=1e-6, rtol=1e-6)
