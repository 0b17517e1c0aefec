"""A PolynomialMetadataNorm checkpoint written by metanorm 0.1 still loads and evaluates as it did.

The fixture is the library's (``tests/nn/data/checkpoints_v0.pt``, written by
``tests/nn/data/make_checkpoints_v0.py``); the layer is the harness's.
"""

from pathlib import Path

import torch

from metanorm.design import Design
from metanorm_repro.models.interaction_norms import PolynomialMetadataNorm

FIXTURE = Path(__file__).resolve().parents[3] / "tests" / "nn" / "data" / "checkpoints_v0.pt"


def test_saved_polynomial_layer_restores_and_evaluates_as_it_did():
    saved = torch.load(FIXTURE, weights_only=True)
    design = Design(saved["design_matrix"].numpy(), tuple(saved["design_columns"]), keep=(0,))
    entry = saved["polynomial"]
    layer = PolynomialMetadataNorm(entry["init"]["num_features"], design)
    layer.load_state_dict(entry["state_dict"])
    layer.eval()
    with torch.no_grad():
        out = layer(entry["probe"], entry["rows"])
    torch.testing.assert_close(out, entry["expected_eval"], rtol=1e-6, atol=1e-6)
