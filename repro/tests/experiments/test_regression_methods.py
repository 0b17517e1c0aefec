"""The regression runner's methods: MDN and the alternatives to MDN on a tiny synthetic task."""

import json

import numpy as np
import pytest
import torch

from metanorm.design import Design
from metanorm_repro.experiments import get_study
from metanorm_repro.experiments import regression as R
from metanorm_repro.experiments.alternatives import pearson_r2


# The bars below hold on the mean over 3 seeds (the fixture's), set from ten such means (first seeds
# 0, 3, ..., 27; AMD EPYC, 1 thread), the worst of them plus a margin of 0.05:
#   mdn/none dcor²        0.447 0.349 0.288 0.384 0.391 0.395 0.391 0.350 0.294 0.384 (bar < 0.5)
#   mdn MSE / mf bound    0.950 0.940 1.159 0.991 1.024 0.989 0.992 1.075 1.235 0.961 (bar > 0.85)
#   concat MSE / mf bound 0.623 0.641 0.688 0.843 0.694 0.692 0.635 0.692 0.615 0.656 (bar < 0.9)
#   brnet-cond/none dcor² 0.574 0.576 0.509 0.551 0.547 0.628 0.526 0.548 0.678 0.527 (bar < 0.73)
#   lowest test R² of any method: 0.344 at worst (bar > 0.2)
# One seed is not enough for these claims: over seeds 0-9 alone mdn/none reached 0.475, the mdn
# MSE ratio 0.765, concat's MSE ratio 1.2, and marginal BR-Net's dcor² ratio 1.08 (so marginal
# BR-Net's claim is not made here: see test_alternatives.py for a deterministic one).
@pytest.fixture(scope="module")
def tiny_run():
    # the models are tiny: one thread is fastest, and deterministic
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield R.run_synthetic_regression(
            n_train=400, n_test=300, epochs=30, batch_sizes=(100,), seeds=3, bins=3, seed=0
        )
    finally:
        torch.set_num_threads(n)


def test_every_method_trains_and_is_reported(tiny_run):
    rows = {r["method"]: r for r in tiny_run["rows"]}
    assert list(rows) == get_study("regression-synthetic").settings["methods"]
    for r in tiny_run["runs"]:
        assert np.isfinite(r["test_mse"]) and np.isfinite(r["dcor2_bins"]).all()
        assert r["epoch_time_s"] > 0 and r["batch_size"] == 100 and r["seed"] in (0, 1, 2)
    for r in rows.values():  # no method is worse than predicting the training mean
        assert r["test_r2"] > 0.2, r
    text = R.regression_report(tiny_run)
    assert "| BR-Net-cond | 100 |" in text and "±" in text and "0.111" in text


def test_mdn_removes_cf_and_lands_near_the_cf_free_bound(tiny_run):
    rows = {r["method"]: r for r in tiny_run["rows"]}
    b = tiny_run["bounds"]
    assert rows["mdn"]["dcor2"] < 0.5 * rows["none"]["dcor2"]
    # a model of mf alone cannot beat the cf-free bound (up to test-set noise)
    assert rows["mdn"]["test_mse"] > 0.85 * b["mse_mf"]


def test_concat_uses_the_metadata(tiny_run):
    rows = {r["method"]: r for r in tiny_run["rows"]}
    # given cf exactly, concat beats the cf-free bound (0.200; the confounded bound is 0.111)
    assert rows["concat"]["test_mse"] < 0.9 * tiny_run["bounds"]["mse_mf"]


def test_concat_prediction_depends_on_the_cf_column():
    torch.manual_seed(0)
    rows = torch.tensor([[0.0, 1.0, 1.0], [0.0, -1.0, 1.0]])
    model = R._build_model("concat", 4, 8, rows, ["cf"], np.array([0, 1]))
    x = torch.randn(1, 4).expand(2, 4)
    pred, h = model(x, rows)
    torch.testing.assert_close(h[0], h[1])  # same input, same features
    w = model.fc2.weight[0, -1]  # the cf input's weight: the prediction moves by 2 w
    torch.testing.assert_close(pred[0] - pred[1], 2 * w)


def test_brnet_lowers_the_within_bin_dependence_on_cf(tiny_run):
    rows = {r["method"]: r for r in tiny_run["rows"]}
    assert rows["brnet-cond"]["dcor2"] < 0.73 * rows["none"]["dcor2"]


def _objective_design(n=40):
    t = np.linspace(-1.0, 1.0, n)
    cf = t + 0.3 * np.cos(7.0 * t)
    bins = (t > 0).astype(float)
    d = Design(np.column_stack([bins, cf, np.ones(n)]), ("bin", "cf", "intercept"), keep=(0,))
    return d, torch.as_tensor(d.matrix, dtype=torch.float32), torch.as_tensor(bins).long()


def test_groupdro_objective_weights_the_group_mses():
    d, rows, bins = _objective_design()
    obj = R.RegressionObjective("groupdro", d, features=3, step_size=0.5)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(40, generator=g), torch.randn(40, generator=g)
    loss = obj(pred, torch.randn(40, 3), target, bins, rows)
    # oracle: groups bin × cf quartile, q ∝ exp(η · group MSE) from uniform, Σ q_g MSE_g
    cf = d.matrix[:, 1]
    edges = np.quantile(cf, [0.25, 0.5, 0.75])
    group = bins.numpy() * 4 + np.searchsorted(edges, cf, side="left")
    se = ((pred - target) ** 2).numpy().astype(np.float64)
    mse = np.array([se[group == k].mean() if (group == k).any() else 0.0 for k in range(8)])
    present = np.array([(group == k).any() for k in range(8)])
    q = np.exp(0.5 * mse * present)
    q /= q.sum()
    want = (q * present * mse).sum() / (q * present).sum()
    assert float(loss) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(obj.inner.q.numpy(), q, rtol=1e-5)


def test_brnet_objective_is_the_mse_plus_cancelling_r2_terms_with_an_adversarial_gradient():
    d, rows, bins = _objective_design()
    torch.manual_seed(0)
    obj = R.RegressionObjective("brnet", d, features=3)
    feats = torch.randn(40, 3, requires_grad=True)
    pred, target = torch.zeros(40), torch.randn(40)
    loss = obj(pred, feats, target, bins, rows)
    # the predictor maximises r², the encoder minimises it: equal values, opposite signs
    assert float(loss.detach()) == pytest.approx(float(((pred - target) ** 2).mean()), abs=1e-5)
    loss.backward()
    # the features' gradient is the encoder's: it lowers r² of cf and the frozen predictor
    c = (rows[:, 1] - obj.inner.mean) / obj.inner.std
    with torch.no_grad():
        p = obj.inner.predictor(feats)[:, 0]
    eps = 1e-2
    with torch.no_grad():
        p2 = obj.inner.predictor(feats - eps * feats.grad)[:, 0]
    assert float(pearson_r2(c, p2)) < float(pearson_r2(c, p))
    assert all(q.grad is not None for q in obj.inner.predictor.parameters())


def test_methods_are_the_registry_names():
    assert R._check_methods(["baseline", "mdn-linear", "dann-cond"]) == [
        "none",
        "mdn-linear",
        "dann-cond",
    ]
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['mdn-all'\].*expected among"):
        R._check_methods(["mdn-all"])
    with pytest.raises(ValueError, match="normalization method"):
        R._check_methods(["nope"])
    with pytest.raises(ValueError, match="objective"):
        R.RegressionObjective("concat", _objective_design()[0], features=3)


def test_cli_writes_the_report_the_results_and_the_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (metanorm[plots])")
    argv = ["synthetic", "--out", str(tmp_path), "--n-train", "200", "--n-test", "150"]
    argv += ["--epochs", "3"]
    argv += ["--seeds", "2", "--batch-sizes", "50", "25", "--methods", "none", "groupdro"]
    assert R.main(argv) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert len(r["runs"]) == 2 * 2 * 2 and [row["seeds"] for row in r["rows"]] == [2] * 4
    row = r["rows"][0]
    mses = [x["test_mse"] for x in r["runs"] if x["method"] == "none" and x["batch_size"] == 50]
    assert row["test_mse"] == pytest.approx(np.mean(mses))
    assert row["test_mse_std"] == pytest.approx(np.std(mses, ddof=1))
    report = (tmp_path / "report.md").read_text()
    assert "| GroupDRO | 25 |" in report and "r2_vs_dcor2.png" in report
    assert (tmp_path / "r2_vs_dcor2.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        R.main(["synthetic", "--methods", "mdn-all"])
