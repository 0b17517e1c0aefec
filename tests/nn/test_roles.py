"""Column roles travel with the design; restoring converted models and lazy layers without it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from metanorm.design import make_design
from metanorm.nn import (
    LazyMetadataNorm,
    LazyMetadataScaleNorm,
    MetadataNorm,
    MetadataScaleNorm,
    PenaltyMetadataNorm,
    RecursiveMetadataNorm,
    SyncMetadataNorm,
    SyncMetadataScaleNorm,
    SyncPenaltyMetadataNorm,
    SyncRecursiveMetadataNorm,
    convert_metadata_norm,
)


def _design(n: int = 60):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n)
    return make_design({"y": y, "age": rng.uniform(20, 80, n) + 5 * y}, keep=["y"])


BATCH = {
    "MetadataNorm": lambda d, **kw: MetadataNorm(3, d, **kw),
    "SyncMetadataNorm": lambda d, **kw: SyncMetadataNorm(3, d, **kw),
    "LazyMetadataNorm": lambda d, **kw: LazyMetadataNorm(d, **kw),
    "MetadataScaleNorm": lambda d, **kw: MetadataScaleNorm(3, d, **kw),
    "SyncMetadataScaleNorm": lambda d, **kw: SyncMetadataScaleNorm(3, d, **kw),
    "LazyMetadataScaleNorm": lambda d, **kw: LazyMetadataScaleNorm(d, **kw),
}
ONLINE = {
    "RecursiveMetadataNorm": lambda d, **kw: RecursiveMetadataNorm(3, d, **kw),
    "PenaltyMetadataNorm": lambda d, **kw: PenaltyMetadataNorm(3, d, **kw),
    "SyncRecursiveMetadataNorm": lambda d, **kw: SyncRecursiveMetadataNorm(3, d, **kw),
    "SyncPenaltyMetadataNorm": lambda d, **kw: SyncPenaltyMetadataNorm(3, d, **kw),
}


@pytest.mark.parametrize("name", [*BATCH, *ONLINE])
def test_a_design_gives_its_roles_and_a_contradicting_keep_is_an_error(name):
    build = {**BATCH, **ONLINE}[name]
    design = _design()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = build(design)
        assert 0 in layer.keep and 1 not in layer.keep  # the label is kept, age is removed
        assert build(design, keep=["y"]).keep == layer.keep  # the design's own keep: allowed
    with pytest.raises(
        ValueError, match=r"keep=\['age'\] contradicts the design's own keep=\['y'\]"
    ):
        build(design, keep=["age"])
    with pytest.raises(ValueError, match=r"keep=\[\] contradicts .* keep=\['y'\]"):
        build(design, keep=())


@pytest.mark.parametrize("name", list(BATCH))
def test_a_plain_matrix_without_keep_warns_and_keep_silences_it(name):
    build = BATCH[name]
    matrix = _design().tensor(dtype=torch.float64)
    with pytest.warns(FutureWarning, match=r"plain matrix has no column roles.*keep=\(\)") as rec:
        layer = build(matrix)
    assert rec[0].filename == __file__  # points at the caller, not at metanorm
    assert 0 not in layer.keep
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert 0 in build(matrix, keep=[0]).keep
        build(matrix, keep=())
        build(None, num_metadata=3) if "Lazy" not in name else None  # restoring: no roles needed


def test_convert_keeps_the_roles_and_warns_for_a_plain_matrix():
    design = _design()
    for layer in (MetadataNorm, RecursiveMetadataNorm, PenaltyMetadataNorm, MetadataScaleNorm):
        net = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = convert_metadata_norm(net, design, replace=[nn.BatchNorm2d], layer=layer)
        assert 0 in model.module[1].keep and 1 not in model.module[1].keep
        with pytest.warns(FutureWarning, match="plain matrix"):
            convert_metadata_norm(
                nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3)),
                design.tensor(),
                replace=[nn.BatchNorm2d],
                layer=layer,
            )


@pytest.mark.parametrize("layer", [MetadataNorm, MetadataScaleNorm, RecursiveMetadataNorm])
def test_a_converted_model_restores_without_the_design(layer):
    design = _design()
    rows = design.tensor()

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten())

    x = torch.randn(20, 1, 2, 2)
    model = convert_metadata_norm(net(), design, replace=[nn.BatchNorm2d], layer=layer)
    for i in range(0, 60, 20):
        model(torch.randn(20, 1, 2, 2), metadata=rows[i : i + 20])
    model.eval()
    want = model(x, metadata=rows[:20])
    restored = convert_metadata_norm(
        net(), None, replace=[nn.BatchNorm2d], layer=layer, num_metadata=3
    )
    restored.load_state_dict(model.state_dict())
    restored.eval()
    assert repr(restored.module[1]).startswith(f"{restored.module[1].__class__.__name__}(")
    width = 3 if layer is MetadataScaleNorm else 12  # channels, or flattened C·H·W
    assert f"({width}, " in repr(restored.module[1])  # its real width, before any call
    assert restored.module[1].num_features == width
    torch.testing.assert_close(restored(x, metadata=rows[:20]), want, atol=0, rtol=0)
    assert restored.module[1].keep == model.module[1].keep  # the roles come with the checkpoint


def test_a_lazy_layer_restores_without_the_design_and_shows_its_width():
    design = _design()
    layer = LazyMetadataNorm(design)
    layer(torch.randn(8, 5), design.tensor()[:8])
    empty = LazyMetadataNorm(num_metadata=3)
    assert "LazyMetadataNorm(0," in repr(empty)
    empty.load_state_dict(layer.state_dict())
    assert repr(empty).startswith("LazyMetadataNorm(5, num_metadata=3, keep=[0], n_samples=60")
    layer.eval()
    empty.eval()
    x = torch.randn(4, 5)
    torch.testing.assert_close(empty(x, design.tensor()[:4]), layer(x, design.tensor()[:4]))
    assert type(empty) is MetadataNorm
