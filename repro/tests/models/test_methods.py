"""The table of normalization methods: names, display names, the layers of each slot."""

import numpy as np
import pytest
import torch
from torch import nn

from metanorm.design import make_design
from metanorm.nn import MetadataNorm, MetadataScaleNorm, MetadataSequential
from metanorm_repro.models import PaperCNN, StandInCNN
from metanorm_repro.models.interaction_norms import PolynomialMetadataNorm
from metanorm_repro.models.methods import (
    ALTERNATIVES,
    FAILURE_METHODS,
    FEATURE_ALTERNATIVES,
    METHOD_ALIASES,
    METHODS,
    Method,
    canonical_method,
    create_slot_norm,
    get_method,
    list_methods,
    method_display_name,
    register_method,
    resolve_method,
)
from metanorm_repro.models.norms import NORM_LAYERS, register_norm_layer


@pytest.fixture(scope="module")
def design():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    return make_design({"y": y, "cf": rng.uniform(1, 4, 50) + 2 * y}, keep=["y"])


def test_every_name_users_type_is_in_the_table():
    assert list_methods()[:7] == [
        "none",
        "batchnorm",
        "groupnorm",
        "mdn",
        "mdn-linear",
        "mdn-all",
        "mdn-conv",
    ]
    assert [method_display_name(n) for n in list_methods()[:7]] == [
        "Baseline",
        "BatchNorm",
        "GroupNorm",
        "MDN",
        "MDN-Linear",
        "MDN-all",
        "MDN-Conv",
    ]
    assert all(name == m.name for name, m in METHODS.items())
    assert METHOD_ALIASES == {"baseline": "none", "bn": "batchnorm", "gn": "groupnorm"}
    for alias, name in METHOD_ALIASES.items():
        assert resolve_method(alias) == name and get_method(alias) is METHODS[name]
        assert method_display_name(alias) == method_display_name(name)
    assert method_display_name("no-such-method") == "no-such-method"
    assert canonical_method("mdn-linear") == "mdn" and canonical_method("mdn-conv") == "mdn-all"
    assert canonical_method("bn") == "batchnorm" and canonical_method("mdn") == "mdn"
    assert [n for n in list_methods() if get_method(n).needs_design] == [
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
        *FAILURE_METHODS,
        "mdn-ls",
    ]
    assert canonical_method("rmdn-conv") == "rmdn-all" and method_display_name("pmdn") == "PMDN"
    assert set(FEATURE_ALTERNATIVES) == set(ALTERNATIVES) - {"concat-input"}
    assert [m for m in ALTERNATIVES if not METHODS[m].input_metadata] == list(FEATURE_ALTERNATIVES)
    # every layer a method names is in the table of layers
    for m in METHODS.values():
        assert {*m.hidden, m.features} <= {*NORM_LAYERS, "base"}, m.name


def test_the_slots_of_each_kind_of_method(design):
    for name in ("mdn", "mdn-linear"):
        assert isinstance(create_slot_norm(name, 8, slot="hidden", base="none"), nn.Identity)
        layer = create_slot_norm(name, 8, slot="hidden", base="batchnorm")
        assert isinstance(layer, nn.BatchNorm1d)
        assert isinstance(create_slot_norm(name, 8, slot="features", design=design), MetadataNorm)
    for name in ("mdn-all", "mdn-conv"):
        layer = create_slot_norm(name, 8, slot="hidden", design=design, base="batchnorm")
        assert isinstance(layer, MetadataNorm)
    scale = create_slot_norm("mdn-scale", (4, 5, 5), slot="hidden", design=design, base="bn")
    assert isinstance(scale, MetadataSequential)
    assert [type(m) for m in scale] == [MetadataScaleNorm, nn.BatchNorm2d]
    cw = create_slot_norm("mdn-cw", (4, 5, 5), slot="hidden", design=design)
    assert cw.channelwise and cw.num_features == 4
    poly = create_slot_norm("mdn-poly", 6, slot="features", design=design)
    assert isinstance(poly, PolynomialMetadataNorm)
    assert isinstance(create_slot_norm("concat", 6, slot="features"), nn.Identity)
    with pytest.raises(ValueError, match="base"):
        create_slot_norm("mdn", 8, slot="hidden", design=design, base="mdn-all")
    with pytest.raises(ValueError, match="slot"):
        create_slot_norm("batchnorm", 8, slot="middle")
    with pytest.raises(ValueError, match="normalization method"):
        create_slot_norm("layernorm", 8)
    with pytest.raises(TypeError, match="design"):
        create_slot_norm("mdn", 8)


def test_register_method_checks_its_record():
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("none", "Baseline"))
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("bn", "BatchNorm"))
    with pytest.raises(ValueError, match="canonical"):
        register_method(Method("x-new", "X", canonical="nope"))
    with pytest.raises(ValueError, match="features layer"):
        register_method(Method("x-new", "X", features="layernorm"))
    with pytest.raises(TypeError, match="Method"):
        register_method("x-new")  # type: ignore[arg-type]
    assert "x-new" not in METHODS


def test_a_registered_method_reaches_every_model():
    register_norm_layer("test-layernorm", lambda shape, **kw: nn.LayerNorm(list(shape)))
    register_method(Method("test-ln", "LayerNorm", ("test-layernorm",), "test-layernorm"))
    try:
        cnn = PaperCNN("test-ln")
        assert [type(cnn.norm1), type(cnn.norm3)] == [nn.LayerNorm, nn.LayerNorm]
        assert cnn.norm1.normalized_shape == (16, 28, 28)
        _, feats = cnn(torch.randn(2, 1, 32, 32))
        assert feats.shape == (2, 84)
        stand_in = StandInCNN(1, 2, 8, "test-ln", channels=(2, 2), hidden=4)
        assert isinstance(stand_in.fc_norm, nn.LayerNorm)
        assert method_display_name("test-ln") == "LayerNorm"
    finally:
        del METHODS["test-ln"], NORM_LAYERS["test-layernorm"]


def test_stand_ins_accept_groupnorm():
    model = StandInCNN(1, 2, 8, "groupnorm", channels=(4, 8), hidden=8)
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 3
    logits, _ = model(torch.randn(3, 1, 8, 8), None)
    assert logits.shape == (3, 2)


def test_no_import_adds_a_method():
    """The tables are literal: importing the harness's experiments adds no method or layer."""
    import subprocess
    import sys

    code = (
        "from metanorm_repro.models import methods, norms\n"
        "before = (list(methods.METHODS), list(norms.NORM_LAYERS))\n"
        "import metanorm_repro.experiments.synthetic, metanorm_repro.experiments.real\n"
        "import metanorm_repro.experiments.failures, metanorm_repro.experiments.regression\n"
        "from metanorm_repro.experiments import plots\n"
        "assert (list(methods.METHODS), list(norms.NORM_LAYERS)) == before\n"
        "assert sorted(plots.REFERENCE_ACCURACIES) == ['synthetic', 'synthetic-compare']\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
