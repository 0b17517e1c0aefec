"""The table of normalization layers, and the old names of the method registry (deprecated)."""

import numpy as np
import pytest
import torch
from torch import nn

from metanorm.design import make_design
from metanorm.nn import (
    MetadataLocationScaleNorm,
    MetadataNorm,
    MetadataScaleNorm,
    PenaltyMetadataNorm,
    RecursiveMetadataNorm,
)
from metanorm_repro.models import PaperCNN, StandInCNN
from metanorm_repro.models.interaction_norms import PolynomialMetadataNorm
from metanorm_repro.models.norms import (
    NORM_LAYERS,
    apply_norm,
    create_norm,
    list_norm_layers,
    register_norm_layer,
)


@pytest.fixture(scope="module")
def design():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    return make_design({"y": y, "cf": rng.uniform(1, 4, 50) + 2 * y}, keep=["y"])


def test_the_table_holds_layers_only(design):
    assert list_norm_layers() == [
        "none",
        "batchnorm",
        "groupnorm",
        "metadatanorm",
        "recursive-metadatanorm",
        "penalty-metadatanorm",
        "channelwise-metadatanorm",
        "polynomial-metadatanorm",
        "metadata-scalenorm",
        "metadata-location-scalenorm",
    ]
    want = {
        "none": nn.Identity,
        "batchnorm": nn.BatchNorm2d,
        "groupnorm": nn.GroupNorm,
        "metadatanorm": MetadataNorm,
        "recursive-metadatanorm": RecursiveMetadataNorm,
        "penalty-metadatanorm": PenaltyMetadataNorm,
        "channelwise-metadatanorm": MetadataNorm,
        "polynomial-metadatanorm": PolynomialMetadataNorm,
        "metadata-scalenorm": MetadataScaleNorm,
        "metadata-location-scalenorm": MetadataLocationScaleNorm,
    }
    for name, cls in want.items():
        assert type(create_norm(name, (4, 3, 3), design=design)) is cls, name
    flat = create_norm("metadatanorm", (4, 3, 3), design=design)
    assert flat.num_features == 36 and not flat.channelwise
    cw = create_norm("channelwise-metadatanorm", (4, 3, 3), design=design)
    assert cw.num_features == 4 and cw.channelwise
    assert not create_norm("channelwise-metadatanorm", 6, design=design).channelwise
    assert create_norm("metadata-location-scalenorm", (4, 3, 3), design=design).num_positions == 9


@pytest.mark.parametrize(
    ("shape", "kind"),
    [((84,), nn.BatchNorm1d), ((16, 28, 28), nn.BatchNorm2d), ((8, 4, 4, 4), nn.BatchNorm3d)],
)
def test_layers_by_shape(shape, kind, design):
    bn = create_norm("batchnorm", shape)
    assert type(bn) is kind and bn.num_features == shape[0]
    gn = create_norm("groupnorm", shape, groups=2)
    assert isinstance(gn, nn.GroupNorm) and (gn.num_groups, gn.num_channels) == (2, shape[0])
    mdn = create_norm("metadatanorm", shape, design=design, momentum=None, ridge=1e-3)
    assert isinstance(mdn, MetadataNorm)
    assert mdn.num_features == int(np.prod(shape)) and mdn.momentum is None
    assert isinstance(create_norm("none", shape), nn.Identity)


def test_errors(design):
    with pytest.raises(ValueError, match="normalization layer"):
        create_norm("layernorm", 8)
    with pytest.raises(ValueError, match="shape"):
        create_norm("batchnorm", (0, 3))
    with pytest.raises(TypeError, match="design"):
        create_norm("metadatanorm", 8)
    with pytest.raises(TypeError, match="Design"):
        create_norm("polynomial-metadatanorm", 8, design=design.matrix)
    with pytest.raises(ValueError, match="already registered"):
        register_norm_layer("batchnorm", lambda shape, **kw: nn.Identity())
    with pytest.raises(ValueError, match="base"):
        register_norm_layer("base", lambda shape, **kw: nn.Identity())
    layer = create_norm("metadatanorm", 4, design=design)
    with pytest.raises(ValueError, match="metadata"):
        apply_norm(layer, torch.randn(3, 4), None)


def test_a_registered_layer_is_built_by_name():
    register_norm_layer("test-layernorm", lambda shape, **kw: nn.LayerNorm(list(shape)))
    try:
        layer = create_norm("test-layernorm", (4, 2))
        assert isinstance(layer, nn.LayerNorm) and layer.normalized_shape == (4, 2)
    finally:
        del NORM_LAYERS["test-layernorm"]


def test_the_old_names_still_work_with_a_deprecation_warning(design):
    from metanorm_repro import models
    from metanorm_repro.experiments import synthetic
    from metanorm_repro.models import methods, norms

    with pytest.warns(DeprecationWarning, match="methods.get_method"):
        spec = norms.get_norm("bn")
    assert (spec.name, spec.display_name, spec.canonical) == ("batchnorm", "BatchNorm", "batchnorm")
    with pytest.warns(DeprecationWarning):
        assert norms.get_norm("mdn-linear").canonical == "mdn"
    with pytest.warns(DeprecationWarning):
        assert norms.NORM_ALIASES == {"baseline": "none", "bn": "batchnorm", "gn": "groupnorm"}
    with pytest.warns(DeprecationWarning):
        assert norms.list_norms() == methods.list_methods()
    with pytest.warns(DeprecationWarning):
        assert norms.canonical_norm("mdn-conv") == "mdn-all"
    with pytest.warns(DeprecationWarning):
        assert norms.norm_display_name("none") == "Baseline"
    with pytest.warns(DeprecationWarning):
        assert norms.ALTERNATIVES == methods.ALTERNATIVES
    with pytest.warns(DeprecationWarning):
        assert norms.FEATURE_ALTERNATIVES == methods.FEATURE_ALTERNATIVES
    with pytest.warns(DeprecationWarning):
        assert models.list_norms() == methods.list_methods()
    with pytest.warns(DeprecationWarning):
        assert models.norm_display_name("mdn-conv") == "MDN-Conv"
    with pytest.warns(DeprecationWarning, match="deprecated"):
        assert synthetic.METHODS == ("none", "batchnorm", "groupnorm", "mdn-linear", "mdn-conv")
    with pytest.warns(DeprecationWarning):
        assert synthetic.COMPARE_METHODS[0] == "none" and len(synthetic.COMPARE_METHODS) == 10
    with pytest.raises(AttributeError):
        norms.no_such_name  # noqa: B018
    # create_norm with a method name: the slot's layer, as before
    with pytest.warns(DeprecationWarning, match="create_slot_norm"):
        assert isinstance(create_norm("mdn", 8, slot="hidden", base="none"), nn.Identity)
    with pytest.warns(DeprecationWarning):
        layer = create_norm("mdn-conv", (16, 28, 28), slot="hidden", design=design)
    assert isinstance(layer, MetadataNorm) and layer.num_features == 16 * 28 * 28
    with pytest.raises(ValueError, match="slot"):
        create_norm("batchnorm", 8, slot="middle")


def test_a_method_registered_the_old_way_reaches_every_model():
    from metanorm_repro.models import methods, norms

    name = "test-old-layernorm"
    with pytest.warns(DeprecationWarning):
        register_norm = norms.register_norm
    with pytest.raises(ValueError, match="already registered"):
        register_norm("bn", lambda shape, **kw: nn.Identity())
    with pytest.raises(ValueError, match="canonical"):
        register_norm("x-new", lambda shape, **kw: nn.Identity(), canonical="nope")
    spec = register_norm(
        name, lambda shape, slot, **kw: nn.LayerNorm(list(shape)), display_name="LayerNorm"
    )
    try:
        assert spec.name == name and spec.display_name == "LayerNorm"
        cnn = PaperCNN(name)
        assert [type(cnn.norm1), type(cnn.norm3)] == [nn.LayerNorm, nn.LayerNorm]
        assert cnn.norm1.normalized_shape == (16, 28, 28)
        _, feats = cnn(torch.randn(2, 1, 32, 32))
        assert feats.shape == (2, 84)
        stand_in = StandInCNN(1, 2, 8, name, channels=(2, 2), hidden=4)
        assert isinstance(stand_in.fc_norm, nn.LayerNorm)
        assert methods.method_display_name(name) == "LayerNorm"
    finally:
        del methods.METHODS[name]
        del NORM_LAYERS[f"{name}[hidden]"], NORM_LAYERS[f"{name}[features]"]
