"""Restoring a layer without its design, the lazy layer, and checkpoints of 0.1.0.dev0."""

from pathlib import Path

import pytest
import torch

from metanorm.nn import LazyMetadataNorm, MetadataNorm

FIXTURE = Path(__file__).parent / "data" / "metadata_norm_v1.pt"


def _design(n=80):
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (n, 1), generator=g).double()
    return torch.cat([y, torch.randn(n, 1, generator=g, dtype=torch.float64), torch.ones(n, 1)], 1)


def _trained(design, d=6):
    layer = MetadataNorm(d, design, keep=[0], dtype=torch.float64)
    feats = torch.randn(len(design), d, dtype=torch.float64) + design[:, 1:2]
    for i in range(0, len(design), 20):
        layer(feats[i : i + 20], design[i : i + 20])
    return layer.eval()


def test_empty_layer_restores_from_state_dict():
    design = _design()
    trained = _trained(design)
    empty = MetadataNorm(6, num_metadata=3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"built without a design.*load_state_dict"):
        empty(torch.randn(4, 6, dtype=torch.float64), design[:4])
    assert empty.load_state_dict(trained.state_dict()) is not None
    empty.eval()
    probe = torch.randn(9, 6, dtype=torch.float64)
    torch.testing.assert_close(empty(probe, design[:9]), trained(probe, design[:9]), atol=0, rtol=0)
    assert empty.keep == (0,) and int(empty.n_samples) == 80
    # training goes on from the restored state exactly as from the original
    trained.train()
    empty.train()
    torch.testing.assert_close(empty(probe, design[:9]), trained(probe, design[:9]))
    torch.testing.assert_close(empty.running_beta, trained.running_beta)


def test_empty_layer_refuses_a_checkpoint_of_another_shape():
    trained = _trained(_design())
    with pytest.raises(RuntimeError, match="size mismatch for gram_inverse"):
        MetadataNorm(6, num_metadata=4, dtype=torch.float64).load_state_dict(trained.state_dict())


def test_checkpoint_of_version_1_loads():
    """A checkpoint written by metanorm 0.1.0.dev0 (`kernel`, no skipped-batch counter)."""
    saved = torch.load(FIXTURE, weights_only=True)
    state = saved["state_dict"]
    assert "kernel" in state and state._metadata[""]["version"] == 1
    layer = MetadataNorm(
        saved["num_features"], num_metadata=saved["num_metadata"], dtype=torch.float64
    )
    layer.load_state_dict(state)
    layer.eval()
    out = layer(saved["probe"], saved["rows"])
    torch.testing.assert_close(out, saved["expected"], atol=1e-12, rtol=0)
    assert layer.keep == tuple(saved["keep"]) and int(layer.num_batches_skipped) == 0
    assert set(layer.state_dict()) >= {"gram_inverse", "num_batches_skipped"}
    assert layer.state_dict()._metadata[""]["version"] == MetadataNorm._version


def test_lazy_layer_infers_num_features_and_becomes_metadata_norm():
    design = _design().float()
    layer = LazyMetadataNorm(design, keep=[0])
    assert layer.has_uninitialized_params()
    out = layer(torch.randn(16, 3, 2, 2), design[:16])
    assert out.shape == (16, 3, 2, 2)
    assert type(layer) is MetadataNorm and layer.num_features == 12
    assert layer.running_beta.shape == (3, 12) and int(layer.num_batches_tracked) == 1
    # the same result as a layer built with num_features from the start
    eager = MetadataNorm(12, design, keep=[0])
    x = torch.randn(16, 12)
    torch.testing.assert_close(layer(x, design[:16]), eager(x, design[:16]))


def test_lazy_layer_loads_a_state_dict_before_its_first_call():
    design = _design().float()
    trained = MetadataNorm(12, design, keep=[0])
    trained(torch.randn(20, 12), design[:20])
    lazy = LazyMetadataNorm(design, keep=[0])
    lazy.load_state_dict(trained.state_dict())
    assert not lazy.has_uninitialized_params()
    torch.testing.assert_close(lazy.running_beta, trained.running_beta)


def test_lazy_layer_errors():
    design = _design().float()
    layer = LazyMetadataNorm(design, keep=())
    with pytest.raises(ValueError, match="expected input of shape"):
        layer(torch.randn(5), design[:5])
    with pytest.raises(ValueError, match="expected design="):
        LazyMetadataNorm(None)
