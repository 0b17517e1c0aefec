"""The estimator experiments: the batch-size sweep's spec, the continual runner, their data."""

import json

import numpy as np
import pytest
import torch

from metanorm.linalg import inverse_gram
from metanorm.nn import MetadataNorm, PenaltyMetadataNorm, RecursiveMetadataNorm
from metanorm_repro.datasets.shifting import make_shifted_synthetic, make_shifting_stages
from metanorm_repro.experiments import RunConfig, get_experiment, prepare_run, run_experiment
from metanorm_repro.experiments import estimators as E


@pytest.mark.parametrize(
    ("association", "ranges"),
    [(1.0, [(1, 4), (3, 6)]), (0.0, [(2, 5), (2, 5)]), (-1.0, [(3, 6), (1, 4)])],
)
def test_shifted_confounder_ranges(association, ranges):
    s = make_shifted_synthetic(300, association=association, random_state=0)
    y, cf, mf = s.labels.numpy(), s.metadata["cf"], s.metadata["mf"]
    for c, (lo, hi) in enumerate(ranges):
        assert lo <= cf[y == c].min() and cf[y == c].max() <= hi
        assert cf[y == c].min() < lo + 0.1 and cf[y == c].max() > hi - 0.1
    assert mf[y == 0].max() <= 4 and mf[y == 1].min() >= 3  # the main effect is the paper's
    stages = make_shifting_stages(3, associations=(1.0, -0.5), seed=1, n_per_class_eval=2)
    assert [(len(t), len(v), t.name) for t, v in stages] == [(6, 4, "train1"), (6, 4, "train2")]
    assert not np.allclose(stages[0][0].metadata["cf"], stages[1][0].metadata["cf"])
    with pytest.raises(ValueError, match="association in"):
        make_shifted_synthetic(3, association=1.5, random_state=0)


def test_batch_sweep_spec_builds_each_estimator_with_its_options(tmp_path):
    exp = get_experiment("synthetic-batch")
    assert exp.defaults["batch_sizes"] == [200, 64, 16, 4]
    assert exp.defaults["methods"] == ["none", "mdn-linear", "rmdn", "pmdn"]
    opts = {"n_eval_per_class": 4, "forgetting": 0.9, "pmdn_lr": 0.05}
    cfg = RunConfig(experiment="synthetic-batch", n_per_class=4, options=opts)
    rmdn = prepare_run(cfg.replace(method="rmdn-conv")).model
    layers = [m for m in rmdn.modules() if isinstance(m, RecursiveMetadataNorm)]
    assert len(layers) == 3 and {m.forgetting for m in layers} == {0.9}
    assert layers[-1].keep == (0,) and layers[-1].num_metadata == 3
    pmdn = prepare_run(cfg.replace(method="pmdn")).model
    assert isinstance(pmdn.norm3, PenaltyMetadataNorm) and pmdn.norm3.lr == 0.05
    # one real (tiny) run at batch 4, through the runner, into the sweep's layout
    out = tmp_path / "runs" / "bs4" / "rmdn" / "seed0"
    result = run_experiment(cfg.replace(method="rmdn", batch_size=4, epochs=2), out, progress=False)
    assert 0.0 <= result["final"]["test_balanced_accuracy"] <= 1.0
    table = E.epoch_dcor_table(tmp_path)
    assert "| 4 | R-MDN | 0 |" in table and "epoch 2" in table
    assert f"{result['final']['test_balanced_accuracy']:.3f} |" in table


def _row(method, bs, d0, d1):
    return {"method": method, "batch_size": bs, "val_dcor2_0": d0, "val_dcor2_1": d1}


def test_batch_checks():
    rows = [
        _row("none", 200, 0.4, 0.3),
        _row("none", 4, 0.1, 0.3),
        _row("mdn-linear", 200, 0.01, 0.02),
        _row("mdn-linear", 4, 0.2, 0.1),
        _row("rmdn", 200, 0.01, 0.02),
        _row("rmdn", 4, 0.01, 0.08),
    ]
    got = {c.name: c.passed for c in E._batch_checks(rows)}
    assert got == {
        "Baseline bs=200: val dcor² ≥ 0.2 in every class": True,
        "Baseline bs=4: val dcor² ≥ 0.2 in every class": False,
        "R-MDN bs=200: val dcor² ≤ 0.05 in every class": True,
        "R-MDN bs=4: val dcor² ≤ 0.05 in every class": False,
        "MDN weakens as batches shrink: max val dcor² at bs=4 > at bs=200": True,
        "R-MDN bs=4: max val dcor² < MDN's": True,
    }


def test_continual_runner_and_report(tmp_path, capsys):
    code = E.main(
        [
            "continual",
            "--out",
            str(tmp_path),
            "--methods",
            "none",
            "mdn-linear",
            "rmdn",
            "--associations",
            "1",
            "-1",
            "--n-per-class",
            "4",
            "--n-eval-per-class",
            "4",
            "--epochs-per-stage",
            "1",
            "--batch-size",
            "4",
            "--rmdn-reset",
            "covariance",
            "--quiet",
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["methods"]) == ["none", "mdn-linear", "rmdn"]
    for r in results["methods"].values():
        b = np.asarray(r["bacc"])
        assert b.shape == (2, 2) and ((b >= 0) & (b <= 1)).all()
        assert sorted(r["dcor2"]) == ["0", "1"]
        assert np.asarray(r["dcor2"]["0"]).shape == (2, 2)
    report = (tmp_path / "report.md").read_text()
    assert "a = 1, -1" in report and "## R-MDN" in report and "within class 1" in report
    assert "## MDN-Linear" in capsys.readouterr().out
    with pytest.raises(ValueError, match="rmdn_reset"):
        E.run_continual(None, rmdn_reset="sometimes")


def test_mdn_gets_each_stage_design():
    rows = torch.tensor([[0.0, 1.0, 1.0], [1.0, 3.0, 1.0], [0.0, 2.0, 1.0], [1.0, 5.0, 1.0]])
    model = torch.nn.Sequential(MetadataNorm(2, rows[:3] * 2, keep=[0]))
    E._set_design(model, rows)
    torch.testing.assert_close(model[0].gram_inverse, inverse_gram(rows))
    assert float(model[0].n_samples) == 4
