"""synthetic-compare's pieces: DANN's λ ramp against its closed form, concat-input's extra
input channel, and the sweep's own plot of bAcc against dcor²."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from metanorm.datasets import DesignDataset
from metanorm.design import make_design
from metanorm_repro.experiments import RunConfig
from metanorm_repro.experiments.alternatives import DANNObjective, dann_lambda
from metanorm_repro.experiments.engine import train_one_epoch
from metanorm_repro.experiments.runner import prepare_run
from metanorm_repro.experiments.synthetic import DANN_WEIGHT, objective_settings
from metanorm_repro.models import PaperCNN


@pytest.fixture(scope="module")
def design():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    return make_design({"y": y, "cf": rng.uniform(1, 4, 200) + 2 * y}, keep=["y"])


def test_dann_lambda_is_ganins_closed_form():
    for p in (0.0, 0.05, 0.3, 0.5, 0.77, 1.0):
        expect = 2.0 / (1.0 + np.exp(-10.0 * p)) - 1.0
        assert dann_lambda(p) == pytest.approx(expect, rel=1e-12, abs=1e-15)
        assert dann_lambda(p, weight=0.3, gamma=5.0) == pytest.approx(
            0.3 * (2.0 / (1.0 + np.exp(-5.0 * p)) - 1.0), rel=1e-12, abs=1e-15
        )
    assert dann_lambda(0.0) == 0.0
    with pytest.raises(ValueError, match="progress"):
        dann_lambda(1.5)


def _adversary_grad(obj, feats, labels, rows):
    """d(head CE / m)/d(features) without the reversal: the oracle of the reversed gradient."""
    f2 = feats.detach().clone().requires_grad_(True)
    conf = rows[:, 1].contiguous()
    ce = sum(
        torch.nn.functional.cross_entropy(
            head(f2), torch.bucketize(conf, obj.edges[c]), reduction="sum"
        )
        for c, head in enumerate(obj.heads)
    )
    (ce / len(labels)).backward()
    return f2.grad


def test_dann_reversal_follows_the_ramp_step_by_step(design):
    torch.manual_seed(0)
    obj = DANNObjective(design, 6, total_steps=4).train()
    rows = design.tensor()[:32].float()
    labels = rows[:, 0].long()
    logits = torch.zeros(32, 1)
    for k in range(6):  # past total_steps the progress stays at 1
        assert obj.progress() == pytest.approx(min(k / 4, 1.0))
        feats = torch.randn(32, 6, requires_grad=True)
        obj(logits, feats, labels, rows).backward()
        lam = 2.0 / (1.0 + math.exp(-10.0 * min(k / 4, 1.0))) - 1.0
        oracle = _adversary_grad(obj, feats, labels, rows)
        torch.testing.assert_close(feats.grad, -lam * oracle, rtol=1e-5, atol=1e-8)
    assert int(obj.steps) == 6
    # evaluation calls (no gradients) do not advance the ramp
    with torch.no_grad():
        obj(logits, torch.randn(32, 6), labels, rows)
    assert int(obj.steps) == 6
    const = DANNObjective(design, 6, schedule="constant", weight=0.5)
    assert const.reverse_weight() == 0.5
    with pytest.raises(ValueError, match="total_steps"):
        DANNObjective(design, 6)(logits, torch.randn(32, 6), labels, rows)
    with pytest.raises(ValueError, match="schedule"):
        DANNObjective(design, 6, schedule="linear")


def test_the_experiment_gives_dann_its_run_length():
    config = RunConfig(
        experiment="synthetic-compare",
        method="dann-cond",
        n_per_class=25,
        epochs=2,
        batch_size=16,
        options={"n_eval_per_class": 20, "dann_weight": 0.5},
    )
    run = prepare_run(config)
    obj = run.model.objective
    assert obj.total_steps == 2 * math.ceil(50 / 16) and obj.weight == 0.5
    assert obj.schedule == "ramp"
    assert objective_settings("brnet", run.design, config) == {}
    loader = DataLoader(DesignDataset(run.splits[0], run.rows[0]), batch_size=16, shuffle=True)
    opt = torch.optim.Adam(run.model.parameters(), lr=1e-3)
    for _ in range(2):
        train_one_epoch(run.model, loader, opt)
    assert int(obj.steps) == obj.total_steps  # the ramp ends with the training
    assert obj.progress() == 1.0
    const = prepare_run(config.replace(method="dann", options={"dann_schedule": "constant"}))
    assert const.model.objective.schedule == "constant"
    assert const.model.objective.weight == DANN_WEIGHT  # the experiment's default weight


def test_concat_input_adds_a_standardised_cf_channel(design):
    torch.manual_seed(0)
    model = PaperCNN("concat-input", design).eval()
    assert model.conv1.in_channels == 2 and model.input_columns == (1,)
    assert model.fc2.in_features == 84  # not also concatenated at the classifier
    cf = design.matrix[:, 1]
    assert float(model.input_mean) == pytest.approx(cf.mean(), rel=1e-6)
    assert float(model.input_std) == pytest.approx(cf.std(), rel=1e-5)
    seen = {}
    model.conv1.register_forward_hook(lambda m, i, o: seen.update(x=i[0], out=o))
    x, rows = torch.randn(3, 1, 32, 32), design.tensor()[:3].float()
    logits, _ = model(x, rows)
    # the second input channel is (cf - mean) / std at every pixel
    z = (rows[:, 1] - float(cf.mean())) / float(cf.std())
    torch.testing.assert_close(seen["x"][:, 1], z[:, None, None].expand(3, 32, 32))
    torch.testing.assert_close(seen["x"][:, :1], x)
    out0 = seen["out"]
    # cf + 1: conv1's output moves by (1 / std) · the sum of each filter's cf weights
    other = rows.clone()
    other[:, 1] += 1.0
    moved = model(x, other)[0]
    shift = model.conv1.weight[:, 1].sum((1, 2)) / float(cf.std())
    torch.testing.assert_close(seen["out"] - out0, shift[None, :, None, None].expand_as(out0))
    assert not torch.allclose(moved, logits)
    other_y = rows.clone()
    other_y[:, 0] = 1 - other_y[:, 0]
    assert torch.equal(model(x, other_y)[0], logits)  # never the label
    with pytest.raises(ValueError, match="metadata"):
        model(x)


def test_the_report_draws_bacc_against_dcor2(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the plots extra) is not installed")
    from metanorm.cli import main

    out = tmp_path / "cmp"
    argv = ["reproduce", "synthetic-compare", "--out", str(out), "--quiet"]
    argv += ["--methods", "none", "concat-input", "--seeds", "2", "--batch-sizes", "20"]
    argv += ["--n-per-class", "20", "--n-eval-per-class", "20", "--epochs", "1"]
    assert main([*argv, "--jobs", "1", "--threads", "1"]) == 0
    png = out / "bacc_vs_dcor2.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![bacc_vs_dcor2.png](bacc_vs_dcor2.png)" in (out / "report.md").read_text()
    assert not list(out.glob(".*.tmp"))  # written atomically: no temporary file left
    # the plotted x: per run the mean over the classes of the test dcor², then over the seeds
    rows = json.loads((out / "results.json").read_text())["rows"]
    for row in rows:
        per_seed = []
        for s in (0, 1):
            final = json.loads(
                (out / "runs" / "bs20" / row["method"] / f"seed{s}" / "final.json").read_text()
            )
            per_seed.append(np.mean(list(final["test_dcor2"].values())))
        assert row["test_mean_dcor2"] == pytest.approx(np.mean(per_seed), rel=1e-9)
        assert row["test_mean_dcor2_std"] == pytest.approx(np.std(per_seed, ddof=1), rel=1e-9)
