"""Checkpoints written by metanorm 0.1 (before the layers shared one base) still load.

``data/checkpoints_v0.pt`` was written by ``data/make_checkpoints_v0.py`` with that code: each
entry holds a trained layer's ``state_dict``, a probe batch and the layer's evaluation output on
it. Each is restored here into a layer built without the design and must give the same output.
"""

from pathlib import Path

import pytest
import torch
from torch import nn

from metanorm.design import Design
from metanorm.nn import (
    MetadataNorm,
    MetadataScaleNorm,
    PenaltyMetadataNorm,
    RecursiveMetadataNorm,
    SyncMetadataNorm,
    convert_metadata_norm,
)

SAVED = torch.load(Path(__file__).parent / "data" / "checkpoints_v0.pt", weights_only=True)


def _design() -> Design:
    matrix = SAVED["design_matrix"].numpy()
    return Design(matrix, tuple(SAVED["design_columns"]), keep=(0,))


def _restore(name: str) -> nn.Module:
    entry = SAVED[name]
    init = dict(entry["init"])
    if name.startswith(("metadata_norm", "sync")):
        cls = SyncMetadataNorm if name.startswith("sync") else MetadataNorm
        if init.pop("dtype", None) == "float64":
            init["dtype"] = torch.float64
        layer: nn.Module = cls(init.pop("num_features"), **init)
    elif name == "recursive":
        layer = RecursiveMetadataNorm(**init)
    elif name == "penalty":
        layer = PenaltyMetadataNorm(**init)
    elif name == "scale":  # written by the harness's layer (then in the harness's models)
        layer = MetadataScaleNorm(init["num_channels"], _design())
    else:
        raise AssertionError(name)
    layer.load_state_dict(entry["state_dict"])
    return layer


LAYERS = [
    "metadata_norm",
    "metadata_norm_channelwise",
    "metadata_norm_cumulative",
    "sync_metadata_norm",
    "recursive",
    "penalty",
    "scale",
]  # "polynomial", the harness's layer, is restored in repro/tests/models/test_polynomial_checkpoint.py


@pytest.mark.parametrize("name", LAYERS)
def test_saved_layer_restores_and_evaluates_as_it_did(name):
    entry = SAVED[name]
    layer = _restore(name).eval()
    with torch.no_grad():
        out = layer(entry["probe"], entry["rows"])
    torch.testing.assert_close(out, entry["expected_eval"], rtol=1e-6, atol=1e-6)


def test_saved_converted_model_restores_without_its_first_batch():
    entry = SAVED["converted_model"]
    design = _design()
    net = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    model = convert_metadata_norm(net, design, replace=[nn.BatchNorm1d], after=["2"])
    model.load_state_dict(entry["state_dict"])
    model.eval()
    with torch.no_grad():
        out = model(entry["probe"], metadata=entry["rows"])
    torch.testing.assert_close(out, entry["expected_eval"], rtol=1e-6, atol=1e-6)
