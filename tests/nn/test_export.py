"""An evaluation-mode model with MDN layers exports (torch.export, ONNX) and equals eager.

The design rows are a second input of the exported program. Every estimator is in the model:
the batch GLM (flattened and channel-wise), the scale layer, the location-scale layer, RLS and
the penalty layer.
"""

import pytest
import torch
from torch import nn

from metanorm.nn import (
    MetadataLocationScaleNorm,
    MetadataNorm,
    MetadataScaleNorm,
    MetadataSequential,
    PenaltyMetadataNorm,
    RecursiveMetadataNorm,
)

N, K = 80, 3


def _design():
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 2, (N, 1), generator=g).float()
    return torch.cat([y, torch.rand(N, 1, generator=g) * 2 + y, torch.ones(N, 1)], 1)


def _model():
    torch.manual_seed(0)
    design = _design()
    model = MetadataSequential(
        nn.Conv2d(1, 4, 3, padding=1),
        MetadataScaleNorm(4, design, keep=[0]),
        MetadataLocationScaleNorm(4, design, keep=[0], num_positions=36),
        MetadataNorm(4, design, keep=[0], channelwise=True),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 16),
        MetadataNorm(16, design, keep=[0]),
        RecursiveMetadataNorm(16, K, keep=[0]),
        PenaltyMetadataNorm(16, K, keep=[0], lr=0.1),
        nn.ReLU(),
        nn.Linear(16, 1),
    )
    for step in range(4):  # non-trivial running estimates
        rows = design[step * 20 : (step + 1) * 20]
        model(torch.randn(20, 1, 6, 6) + rows[:, 1, None, None, None], rows)
    return model.eval(), design


def test_torch_export_equals_eager():
    model, design = _model()
    x, rows = torch.randn(7, 1, 6, 6), design[:7]
    program = torch.export.export(model, (x, rows))
    want = model(x, rows)
    torch.testing.assert_close(program.module()(x, rows), want, rtol=1e-5, atol=1e-6)
    other = torch.randn(7, 1, 6, 6)  # another batch of the same shape
    torch.testing.assert_close(
        program.module()(other, design[7:14]), model(other, design[7:14]), rtol=1e-5, atol=1e-6
    )


def test_onnx_export_runs_in_onnxruntime_and_equals_eager(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, design = _model()
    x, rows = torch.randn(7, 1, 6, 6), design[:7]
    path = tmp_path / "mdn.onnx"
    torch.onnx.export(model, (x, rows), str(path), input_names=["x", "metadata"], dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for xs, rs in ((x, rows), (torch.randn(7, 1, 6, 6), design[7:14])):
        (got,) = session.run(None, {"x": xs.numpy(), "metadata": rs.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), model(xs, rs), rtol=1e-5, atol=1e-5)
