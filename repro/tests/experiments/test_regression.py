"""Regression: the synthetic law's exact bounds, and tiny runs of both regression experiments."""

import json

import numpy as np
import pytest
import torch

from metanorm_repro.datasets.synthetic import gaussian_blob
from metanorm_repro.datasets.synthetic_regression import (
    RegressionLaw,
    make_synthetic_regression,
    regression_bounds,
)
from metanorm_repro.experiments import regression as R


@pytest.fixture
def one_thread():
    # the models are tiny: one thread is fastest, and far faster on a busy machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _least_squares_mse(columns, target):
    X = np.column_stack([*columns, np.ones(len(target))])
    coef = np.linalg.lstsq(X, target, rcond=None)[0]
    return float(np.mean((X @ coef - target) ** 2))


@pytest.mark.parametrize(
    "law", [RegressionLaw(), RegressionLaw(mean=0.0, sd=2.0, sd_mf=1.0, sd_cf=0.3)]
)
def test_bounds_match_monte_carlo(law):
    # the posterior mean of a Gaussian target is linear, so least squares on a large sample
    # reaches the minimal MSE; a nonlinear extra column (squares) must not improve it
    rng = np.random.default_rng(0)
    n = 400_000
    t = rng.normal(law.mean, law.sd, n)
    mf = t + rng.normal(0, law.sd_mf, n)
    cf = t + rng.normal(0, law.sd_cf, n)
    b = regression_bounds(law)
    assert np.var(t) == pytest.approx(b.mse_none, rel=0.01)
    assert _least_squares_mse([mf], t) == pytest.approx(b.mse_mf, rel=0.01)
    assert _least_squares_mse([mf, cf], t) == pytest.approx(b.mse_mf_cf, rel=0.01)
    assert _least_squares_mse([mf, cf, mf**2, cf**2, mf * cf], t) == pytest.approx(
        b.mse_mf_cf, rel=0.01
    )
    assert b.mse_mf_cf < b.mse_mf < b.mse_none


def test_generator_follows_the_law_and_draws_the_images():
    s = make_synthetic_regression(3000, random_state=1)
    t, mf, cf = s.target, s.metadata["mf"], s.metadata["cf"]
    assert t.mean() == pytest.approx(3.5, abs=0.06)
    assert np.std(mf - t) == pytest.approx(0.5, rel=0.05)
    assert np.corrcoef(mf - t, cf - t)[0, 1] == pytest.approx(0.0, abs=0.05)
    img = s.images[:, 0].numpy().astype(np.float64)
    # the blob's least-squares scale in each quadrant is mf, cf, 0 up to the pixel noise
    # (sd 0.01 / ||k|| ≈ 0.06; 5 sd allowed)
    k = gaussian_blob()

    def scale(q):
        return (q * k).sum((1, 2)) / (k**2).sum()

    np.testing.assert_allclose(scale(img[:, :16, :16]), mf, atol=0.3)
    np.testing.assert_allclose(scale(img[:, 16:, 16:]), mf, atol=0.3)
    np.testing.assert_allclose(scale(img[:, 16:, :16]), cf, atol=0.3)
    np.testing.assert_allclose(scale(img[:, :16, 16:]), 0.0, atol=0.3)
    with pytest.raises(ValueError, match="sd_cf"):
        RegressionLaw(sd_cf=0.0)
    with pytest.raises(ValueError, match="n >= 1"):
        make_synthetic_regression(0, random_state=0)


def _u_dcor2(x, y):
    """The bias-corrected dcor² from its definition (Székely & Rizzo 2014), O(n²) numpy."""

    def u_centred(z):
        z = z.reshape(len(z), -1)
        a = np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).sum(-1))
        n = len(a)
        A = (
            a
            - a.sum(0, keepdims=True) / (n - 2)
            - a.sum(1, keepdims=True) / (n - 2)
            + a.sum() / ((n - 1) * (n - 2))
        )
        np.fill_diagonal(A, 0.0)
        return A

    A, B = u_centred(x), u_centred(y)
    return (A * B).sum() / np.sqrt((A * A).sum() * (B * B).sum())


def test_binned_dcor2_matches_the_definition_per_bin():
    rng = np.random.default_rng(2)
    t = rng.normal(size=90)
    f = np.column_stack([t + rng.normal(size=90), rng.normal(size=90)])
    c = t + rng.normal(size=90)
    got = R.binned_dcor2(f, c, t, bins=3)
    order = np.argsort(t, kind="stable")
    want = [_u_dcor2(f[i], c[i]) for i in np.array_split(order, 3)]
    np.testing.assert_allclose(got, want, atol=1e-9)
    with pytest.raises(ValueError, match="samples per bin"):
        R.binned_dcor2(f[:8], c[:8], t[:8], bins=3)


def test_tiny_diabetes_run_and_cli_write_results(tmp_path, one_thread):
    pytest.importorskip("sklearn", reason="the diabetes data ship with scikit-learn")
    argv = ["diabetes", "--out", str(tmp_path), "--folds", "3", "--epochs", "40"]
    code = R.main([*argv, "--methods", "none", "mdn", "brnet-cond"])
    assert code == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert "| linear | residualizer |" in (tmp_path / "report.md").read_text()
    rows = {(row["model"], row["method"]): row for row in r["rows"]}
    assert list(rows)[2:] == [("mlp", "none"), ("mlp", "mdn"), ("mlp", "brnet-cond")]
    dc = {k: np.mean(v["dcor2_bins"]) for k, v in rows.items()}
    assert dc[("linear", "residualizer")] < 0.5 * dc[("linear", "none")]
    assert dc[("mlp", "mdn")] < dc[("mlp", "none")]
    # the residualizer keeps the target's share: the linear fit does not collapse
    assert rows[("linear", "residualizer")]["r2"] > 0.4
    assert rows[("linear", "none")]["r2"] > 0.4
    with pytest.raises(ValueError, match="task"):
        R.run_regression("nope")
