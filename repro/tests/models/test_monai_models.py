"""MONAI's 3-D ResNet-18 as the volume experiments' model (``--option model=monai-resnet18``).

Tiny: 16³ volumes, widen_factor 0.125 (channels 8 … 64), nothing downloads.
"""

import ast
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from metanorm.design import Design

pytest.importorskip("monai.networks.nets", reason="MONAI not installed (metanorm[monai])")

from metanorm_repro.models.monai_models import MONAI_METHODS, MonaiResNet3d

SHAPE = (16, 16, 16)


def _design(n=24, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(float)
    site = rng.integers(0, 2, n).astype(float)
    age = rng.normal(size=n)
    m = np.column_stack([y, site, age, np.ones(n)])
    return Design(m, ("y", "site", "age", "intercept"), keep=(0,))


def _build(method, design, seed=0):
    torch.manual_seed(seed)
    return MonaiResNet3d(1, 2, SHAPE, method, design, widen_factor=0.125)


@pytest.mark.parametrize("method", ["batchnorm", "none", "mdn", "mdn-all", "concat"])
def test_each_method_builds_trains_a_step_and_keeps_the_interface(method):
    design = _design()
    model = _build(method, design)
    rows = torch.as_tensor(design.matrix, dtype=torch.float32)
    x = torch.randn(len(rows), 1, *SHAPE)
    bn3d = sum(isinstance(m, nn.BatchNorm3d) for m in model.modules())
    mdn = model.mdn_layers()
    expect_mdn = {"mdn": 1, "mdn-all": 1 + 20}.get(method, 0)  # resnet18: 20 BatchNorm3d
    assert len(mdn) == expect_mdn
    assert bn3d == (20 if method in ("batchnorm", "mdn", "concat") else 0)
    if method == "mdn-all":
        assert sum(m.channelwise for m in mdn) == 20
    assert all(int(m.num_batches_tracked) == 0 for m in mdn)  # sizing changed no statistic
    assert model.head.in_features == 64 + (2 if method == "concat" else 0)
    assert model.fc.out_features == 64  # the harness reads the features' width here
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    logits, features = model(x[:12], rows[:12])
    assert logits.shape == (12, 2) and features.shape == (12, 64)
    nn.functional.cross_entropy(logits, torch.as_tensor(design.matrix[:12, 0]).long()).backward()
    opt.step()
    assert all(int(m.num_batches_tracked) == 1 for m in mdn)


def test_mdn_features_at_eval_are_the_fc_output_minus_the_removed_part():
    design = _design()
    model = _build("mdn", design)
    rows = torch.as_tensor(design.matrix, dtype=torch.float32)
    x = torch.randn(len(rows), 1, *SHAPE)
    model.train()
    for i in range(0, 24, 8):
        model(x[i : i + 8], rows[i : i + 8])
    model.eval()
    seen = {}
    hook = model.fc.register_forward_hook(
        lambda m, a, out: seen.setdefault("fc", out), prepend=True
    )  # before the inserted MDN hook
    with torch.no_grad():
        _, features = model(x[:6], rows[:6])
    hook.remove()
    (layer,) = model.mdn_layers()
    removed = [1, 2, 3]  # site, age, intercept; the label column is kept
    want = seen["fc"] - rows[:6, removed] @ layer.running_beta[removed]
    torch.testing.assert_close(features, want, atol=1e-5, rtol=1e-5)


def test_concat_logits_depend_on_the_confounder_columns():
    design = _design()
    model = _build("concat", design).eval()
    rows = torch.as_tensor(design.matrix[:2], dtype=torch.float32)
    x = torch.randn(1, 1, *SHAPE).expand(2, -1, -1, -1, -1)
    rows[1, 1] = rows[0, 1] + 1.0  # only the site differs
    rows[1, 2] = rows[0, 2]
    with torch.no_grad():
        logits, features = model(x, rows)
    torch.testing.assert_close(features[0], features[1])
    torch.testing.assert_close(logits[1] - logits[0], model.head.weight[:, 64])


def test_bad_methods_and_missing_monai_are_clear_errors(monkeypatch):
    design = _design()
    with pytest.raises(ValueError, match="builds the methods"):
        _build("rmdn", design)
    with pytest.raises(TypeError, match="needs design"):
        _build("mdn", None)
    assert "mdn" in MONAI_METHODS and "groupdro" in MONAI_METHODS
    monkeypatch.setitem(sys.modules, "monai.networks.nets", None)
    with pytest.raises(ModuleNotFoundError, match=r"metanorm\[monai\]"):
        _build("batchnorm", design)


def test_standin_experiment_builds_the_monai_model_from_the_option():
    pytest.importorskip("nilearn", reason="nilearn not installed: no MNI152 template")
    from metanorm_repro.experiments import RunConfig, prepare_run

    opts = {"n_per_site": 4, "n_eval_per_site": 2, "volume_shape": [16, 16, 16]}
    monai = {"model": "monai-resnet18", "widen_factor": 0.125}
    run = prepare_run(RunConfig("multisite-mri-standin", method="mdn", options={**opts, **monai}))
    assert type(run.model).__name__ == "MonaiResNet3d"
    (layer,) = run.model.mdn_layers()
    want = np.linalg.inv(run.design.matrix.T @ run.design.matrix)  # Σ⁻¹ of the whole train split
    np.testing.assert_allclose(layer.gram_inverse.double().numpy(), want, rtol=1e-4, atol=1e-6)
    logits, features = run.model(run.splits[0].images[:4], run.rows[0][:4])
    assert logits.shape == (4, 2) and features.shape == (4, 64)
    with pytest.raises(ValueError, match="model"):
        prepare_run(RunConfig("multisite-mri-standin", options={**opts, "model": "vgg"}))
    with pytest.raises(ValueError, match="widen_factor"):
        prepare_run(RunConfig("multisite-mri-standin", options={**opts, "widen_factor": 0.5}))


def test_no_module_imports_monai_at_import_time():
    # MONAI is optional: only function bodies may import it (checked on the source, cheaply)
    import metanorm
    import metanorm_repro

    roots = [Path(metanorm.__file__).parent, Path(metanorm_repro.__file__).parent]
    offenders = []
    for path in (p for root in roots for p in root.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module-level statements only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n == "monai" or n.startswith("monai.") for n in names):
                offenders.append(str(path))
    assert offenders == []


def test_the_model_registry_builds_it_by_name():
    from metanorm_repro.models import create_model, list_models

    assert "monai-resnet18" in list_models()
    model = create_model(
        "monai-resnet18", in_channels=1, num_classes=3, volume_shape=SHAPE, widen_factor=0.125
    )
    assert isinstance(model, MonaiResNet3d) and model.head.out_features == 3
