"""The bias probe: per-module within-class dcor² and a held-out linear probe."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import metanorm as mn
from metanorm import _probe as P
from metanorm.metrics import distance_correlation_sqr


def _data(n=240, seed=0, width=6):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    cf = torch.rand(n, generator=g) * 2 + y
    design = mn.make_design({"y": y.numpy(), "cf": cf.numpy()}, keep=["y"])
    x = 0.3 * torch.randn(n, width, generator=g) + cf[:, None] * torch.linspace(0.5, 1.5, width)
    return x.float(), y, design


def _model(design, width=6, hidden=8):
    torch.manual_seed(0)
    return mn.MetadataSequential(
        nn.Linear(width, hidden), mn.MetadataNorm(hidden, design), nn.ReLU(), nn.Linear(hidden, 1)
    )


def test_records_match_hand_computed_dcor2_in_forward_order():
    x, y, design = _data()
    model = _model(design)
    rows = design.tensor()
    loader = [(x[:100], y[:100], rows[:100]), (x[100:], y[100:], rows[100:])]
    mn.nn.utils.refit_running_beta(model, loader)
    result = mn.probe(model, loader, metadata=1, label="MDN")
    assert [r.module for r in result] == ["0", "1", "2", "3"]
    assert [r.kind for r in result] == ["Linear", "MetadataNorm", "ReLU", "Linear"]
    assert result.settings["num_samples"] == 240 and result.label == "MDN"
    # the oracle: the outputs by hand, dcor² per class with the metrics function
    model.eval()
    with torch.no_grad():
        h0 = model[0](x)
        h1 = model[1](h0, rows)
    for name, h in (("0", h0), ("1", h1)):
        rec = result[name]
        assert rec.num_samples == 240 and rec.num_features == 8 and not rec.projected
        for c in (0, 1):
            sel = y == c
            want = distance_correlation_sqr(h[sel].double(), rows[sel, 1:2], unbiased=True)
            assert rec.dcor2_by_class[str(c)] == pytest.approx(float(want), rel=1e-9)
        assert rec.dcor2 == pytest.approx(np.mean(list(rec.dcor2_by_class.values())))
    # the metadata live in the Linear's output and are gone after MDN
    assert result["0"].dcor2 > 0.5 and result["0"].probe_r2 > 0.8
    assert abs(result["1"].dcor2) < 0.05 and result["1"].probe_r2 < 0.05
    df = result.to_pandas()
    assert list(df["module"]) == ["0", "1", "2", "3"] and set(df["model"]) == {"MDN"}


def test_the_ridge_penalty_is_the_brute_force_leave_one_out_choice():
    sklearn = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(3)
    n, d = 40, 50  # more features than rows: where the centring trap would bite
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = a[:, :3].sum(1, keepdim=True) + torch.randn(n, 1, generator=g, dtype=torch.float64)
    a, y = a - a.mean(0), y - y.mean(0)
    a = a / a.std(0, unbiased=False)
    scale = float((torch.linalg.svdvals(a) ** 2).sum()) / (n - 1)
    errors = []
    for rel in P.RIDGE_GRID:
        err = 0.0
        for i in range(n):  # leave one out, refitting the intercept each time (sklearn)
            keep = torch.arange(n) != i
            fit = sklearn.Ridge(alpha=rel * scale).fit(a[keep].numpy(), y[keep].numpy())
            err += float(((fit.predict(a[i : i + 1].numpy()) - y[i].numpy()) ** 2).sum())
        errors.append(err)
    best = P.RIDGE_GRID[int(np.argmin(errors))] * scale
    want = sklearn.Ridge(alpha=best, fit_intercept=False).fit(a.numpy(), y.numpy()).coef_
    got = P._ridge_loo_fit(a, y)
    np.testing.assert_allclose(got.numpy().ravel(), want.ravel(), rtol=1e-6, atol=1e-9)


def test_wide_outputs_are_projected_with_dcor2_kept():
    x, y, design = _data(n=300, width=4)
    wide = nn.Sequential(nn.Linear(4, 1500), nn.Tanh())
    loader = [(x, y, design.tensor())]
    small = mn.probe(wide, loader, metadata=[1], modules=["1"], max_features=256)
    full = mn.probe(wide, loader, metadata=[1], modules=["1"], max_features=4096)
    assert small["1"].projected and small["1"].num_features == 256
    assert not full["1"].projected and full["1"].num_features == 1500
    # distances kept to a few per cent (Johnson-Lindenstrauss): dcor² nearly unchanged
    assert small["1"].dcor2 == pytest.approx(full["1"].dcor2, rel=0.05)


def test_max_samples_reads_only_the_first_samples():
    x, y, design = _data()
    rows = design.tensor()
    loader = [(x[i : i + 50], y[i : i + 50], rows[i : i + 50]) for i in range(0, 240, 50)]
    result = mn.probe(_model(design), loader, metadata=1, max_samples=120)
    assert result.settings["num_samples"] == 120 and result["0"].num_samples == 120


def test_model_modes_are_restored_and_converted_models_work():
    x, y, design = _data()
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    model = mn.nn.convert_metadata_norm(net, design, replace=["1"])
    rows = design.tensor()
    model.train()
    model(x, metadata=rows)
    result = mn.probe(model, [(x, y, rows)], metadata=1)
    assert model.training and all(m.training for m in model.modules())
    assert "module.1" in [r.module for r in result]


def test_bad_input_is_refused_clearly():
    x, y, design = _data()
    model = _model(design)
    loader = [(x, y, design.tensor())]
    with pytest.raises(ValueError, match="unknown"):
        mn.probe(model, loader, metadata=1, modules=["nope"])
    with pytest.raises(TypeError, match="column index"):
        mn.probe(model, loader, metadata="cf")
    with pytest.raises(TypeError, match=r"\(inputs, labels, design_rows\)"):
        mn.probe(model, [(x, design.tensor())], metadata=1)
    with pytest.raises(ValueError, match="no batches"):
        mn.probe(model, [], metadata=1)
    with pytest.raises(ValueError, match="max_samples"):
        mn.probe(model, loader, metadata=1, max_samples=2)


def test_constant_metadata_within_a_class_is_nan():
    x, y, design = _data()
    rows = design.tensor().clone()
    rows[y == 0, 1] = 2.0
    result = mn.probe(_model(design), [(x, y, rows)], metadata=1)
    assert math.isnan(result["0"].dcor2_by_class["0"]) and not math.isnan(result["0"].dcor2)


def test_plot_probe_draws_several_models(tmp_path):
    pytest.importorskip("matplotlib")
    x, y, design = _data()
    loader = [(x, y, design.tensor())]
    a = mn.probe(_model(design), loader, metadata=1, label="A")
    b = mn.probe(_model(design), loader, metadata=1, label="B")
    out = mn.plot_probe([a, b], tmp_path / "probe.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# The synthetic task: 1000 training images (500 per class, drawn from a training split of 1000
# per class), 3 epochs, batch 50, Adam 2e-3; the running β then refitted on the whole training
# split (2000 images, one forward pass); probed on 500 validation images. Over seeds 0-9 (AMD
# EPYC, 1 thread; seed s for the data, the weights and the shuffling):
#   Baseline: conv1/conv2 dcor² ≥ 0.410, fc1 dcor² 0.212-0.466, fc1 probe R² ≥ 0.983
#   MDN-Conv: dcor² after each MDN layer ≤ 0.017; probe R² after them -0.038 to 0.035
# Bars: 0.05 after MDN and 0.2 for the Baseline's fc1, as asked (both met on every seed, the
# Baseline's fc1 only just: it grows with the training size; it was 0.136-0.271 with 150 images
# per class and 0.165-0.343 with 300, 3 epochs, and 0.144-0.430 with 150 per class, 6 epochs),
# the other bars the worst values less a margin of 0.05. The refit on more images is what
# brings the probe after MDN under 0.05: with β refitted on the training images themselves (150
# per class) the probe R² after MDN was 0.02-0.36, the estimation error of β leaving a small cf
# slope in each of the many columns, which a linear probe on held-out data pools (dcor² does
# not); the same training refitted on 1000 per class gave -0.027 to 0.036.
N_TRAIN, N_REFIT = 500, 1000  # per class


@pytest.fixture(scope="module")
def synthetic_models():
    from torch.utils.data import DataLoader, Subset

    from metanorm.datasets import DesignDataset
    from metanorm.experiments import RunConfig
    from metanorm.experiments.engine import evaluate, train_one_epoch
    from metanorm.experiments.runner import prepare_run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for method in ("none", "mdn-conv"):
            config = RunConfig(
                experiment="synthetic",
                method=method,
                n_per_class=N_REFIT,
                options={"n_eval_per_class": 250},
            )
            torch.manual_seed(0)
            run = prepare_run(config)
            full = DesignDataset(run.splits[0], run.rows[0])
            pick = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))
            train = Subset(full, pick[: 2 * N_TRAIN].tolist())
            loader = DataLoader(
                train, batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0)
            )
            opt = torch.optim.Adam(run.model.parameters(), lr=2e-3)
            for _ in range(3):
                train_one_epoch(run.model, loader, opt)

            def call(model, batch):
                return model(batch[0], batch[2])

            mn.nn.utils.refit_running_beta(run.model, DataLoader(full, batch_size=500), call=call)
            val = DataLoader(DesignDataset(run.splits[1], run.rows[1]), batch_size=500)
            report = evaluate(run.model, val, confounder=run.metrics[1])
            result = mn.probe(run.model, val, metadata=1, call=call, label=method)
            out[method] = (result, report)
    finally:
        torch.set_num_threads(threads)
    return out


def test_synthetic_probe_finds_cf_before_mdn_and_not_after(synthetic_models):
    base, base_report = synthetic_models["none"]
    mdn, mdn_report = synthetic_models["mdn-conv"]
    # the oracle for fc1: the experiment's own evaluation (features after the norm, before ReLU)
    for result, report in ((base, base_report), (mdn, mdn_report)):
        for c, v in report["dcor2"].items():
            assert result["norm3"].dcor2_by_class[c] == pytest.approx(v, rel=1e-6, abs=1e-9)
    assert [r.module for r in mdn] == ["conv1", "norm1", "conv2", "norm2", "fc1", "norm3", "fc2"]
    assert min(base["conv1"].dcor2, base["conv2"].dcor2) > 0.36
    assert base["norm3"].dcor2 >= 0.2
    assert base["norm3"].probe_r2 > 0.93
    for name in ("norm1", "norm2", "norm3"):
        assert mn.nn.MetadataNorm.__name__ == mdn[name].kind
        assert mdn[name].dcor2 <= 0.05, (name, mdn[name])
        assert mdn[name].probe_r2 <= 0.05, (name, mdn[name])
