"""The one registry of normalization methods: names, display names, layers per slot."""

import numpy as np
import pytest
import torch
from torch import nn

from metanorm.design import make_design
from metanorm.nn import MetadataNorm
from metanorm_repro.models import PaperCNN, StandInCNN
from metanorm_repro.models.norms import (
    NORM_ALIASES,
    apply_norm,
    canonical_norm,
    create_norm,
    get_norm,
    list_norms,
    norm_display_name,
    register_norm,
)


@pytest.fixture(scope="module")
def design():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    return make_design({"y": y, "cf": rng.uniform(1, 4, 50) + 2 * y}, keep=["y"])


def test_every_name_users_type_is_registered():
    assert list_norms()[:7] == [
        "none",
        "batchnorm",
        "groupnorm",
        "mdn",
        "mdn-linear",
        "mdn-all",
        "mdn-conv",
    ]
    assert {norm_display_name(n) for n in list_norms()[:7]} == {
        "Baseline",
        "BatchNorm",
        "GroupNorm",
        "MDN",
        "MDN-Linear",
        "MDN-all",
        "MDN-Conv",
    }
    for alias, name in NORM_ALIASES.items():
        assert get_norm(alias).name == name and norm_display_name(alias) == norm_display_name(name)
    assert norm_display_name("no-such-method") == "no-such-method"
    assert canonical_norm("mdn-linear") == "mdn" and canonical_norm("mdn-conv") == "mdn-all"
    assert canonical_norm("bn") == "batchnorm"
    assert [n for n in list_norms() if get_norm(n).needs_design] == [
        "mdn",
        "mdn-linear",
        "mdn-all",
        "mdn-conv",
        "rmdn",
        "rmdn-all",
        "rmdn-conv",
        "pmdn",
        "pmdn-all",
        "pmdn-conv",
        # the candidate fixes of docs/failures.md (metanorm_repro.models.interaction_norms)
        "mdn-cw",
        "mdn-poly",
        "mdn-scale",
        "mdn+brnet-cond",
        "mdn-ls",
    ]
    assert canonical_norm("rmdn-conv") == "rmdn-all" and norm_display_name("pmdn") == "PMDN"


@pytest.mark.parametrize(
    ("shape", "kind"),
    [((84,), nn.BatchNorm1d), ((16, 28, 28), nn.BatchNorm2d), ((8, 4, 4, 4), nn.BatchNorm3d)],
)
def test_layers_by_shape(shape, kind, design):
    bn = create_norm("batchnorm", shape, slot="hidden")
    assert type(bn) is kind and bn.num_features == shape[0]
    gn = create_norm("groupnorm", shape, groups=2)
    assert isinstance(gn, nn.GroupNorm) and (gn.num_groups, gn.num_channels) == (2, shape[0])
    mdn = create_norm("mdn-conv", shape, slot="hidden", design=design, momentum=None)
    assert isinstance(mdn, MetadataNorm)
    assert mdn.num_features == int(np.prod(shape)) and mdn.momentum is None
    assert isinstance(create_norm("none", shape), nn.Identity)


def test_base_fills_the_slots_a_method_leaves_alone(design):
    for name in ("mdn", "mdn-linear"):
        assert isinstance(create_norm(name, 8, slot="hidden", base="none"), nn.Identity)
        assert isinstance(create_norm(name, 8, slot="hidden", base="batchnorm"), nn.BatchNorm1d)
        assert isinstance(create_norm(name, 8, slot="features", design=design), MetadataNorm)
    for name in ("mdn-all", "mdn-conv"):
        layer = create_norm(name, 8, slot="hidden", design=design, base="batchnorm")
        assert isinstance(layer, MetadataNorm)
    with pytest.raises(ValueError, match="base"):
        create_norm("mdn", 8, slot="hidden", design=design, base="mdn-all")


def test_errors(design):
    with pytest.raises(ValueError, match="normalization method"):
        create_norm("layernorm", 8)
    with pytest.raises(ValueError, match="slot"):
        create_norm("batchnorm", 8, slot="middle")
    with pytest.raises(ValueError, match="shape"):
        create_norm("batchnorm", (0, 3))
    with pytest.raises(TypeError, match="design"):
        create_norm("mdn", 8)
    with pytest.raises(ValueError, match="already registered"):
        register_norm("none", lambda shape, **kw: nn.Identity())
    with pytest.raises(ValueError, match="already registered"):
        register_norm("bn", lambda shape, **kw: nn.Identity())
    with pytest.raises(ValueError, match="canonical"):
        register_norm("x-new", lambda shape, **kw: nn.Identity(), canonical="nope")
    layer = create_norm("mdn", 4, design=design)
    with pytest.raises(ValueError, match="metadata"):
        apply_norm(layer, torch.randn(3, 4), None)


def test_a_registered_method_reaches_every_model(design):
    name = "test-layernorm"
    if name not in list_norms():
        register_norm(
            name,
            lambda shape, **kw: nn.LayerNorm(list(shape)),
            display_name="LayerNorm",
        )
    cnn = PaperCNN(name)
    assert [type(cnn.norm1), type(cnn.norm3)] == [nn.LayerNorm, nn.LayerNorm]
    assert cnn.norm1.normalized_shape == (16, 28, 28)
    _, feats = cnn(torch.randn(2, 1, 32, 32))
    assert feats.shape == (2, 84)
    stand_in = StandInCNN(1, 2, 8, name, channels=(2, 2), hidden=4)
    assert isinstance(stand_in.fc_norm, nn.LayerNorm)
    assert norm_display_name(name) == "LayerNorm"


def test_stand_ins_accept_groupnorm():
    model = StandInCNN(1, 2, 8, "groupnorm", channels=(4, 8), hidden=8)
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 3
    logits, _ = model(torch.randn(3, 1, 8, 8), None)
    assert logits.shape == (3, 2)
