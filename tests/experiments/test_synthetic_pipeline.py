import csv
import json

import numpy as np
import pytest
import torch

from metanorm.cli import main
from metanorm.experiments import (
    RunConfig,
    evaluate,
    get_experiment,
    list_experiments,
    run_experiment,
    run_sweep,
    summarize,
    train_one_epoch,
)
from metanorm.experiments.synthetic import cf_bins
from metanorm.models import PaperCNN

TINY = ["--n-per-class", "40", "--epochs", "2", "--batch-sizes", "30", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The whole command on a tiny configuration (80 training images; 30 does not divide 80)."""
    out = tmp_path_factory.mktemp("sweep") / "synthetic"
    rc = main(
        ["reproduce", "synthetic", "--out", str(out), "--methods", "baseline", "mdn-conv", *TINY]
    )
    assert rc == 0
    return out


def test_sweep_writes_every_file(sweep):
    for name in (
        "report.md",
        "summary.json",
        "summary.csv",
        "dcor2_per_epoch.png",
        "val_bacc_per_epoch.png",
        "features_pca.png",
    ):
        assert (sweep / name).is_file(), name
    assert (sweep / "features_pca.png").read_bytes()[:4] == b"\x89PNG"
    for method in ("none", "mdn-conv"):
        run = sweep / "runs" / "bs30" / method / "seed0"
        for name in (
            "config.json",
            "epochs.csv",
            "final.json",
            "checkpoint.pt",
            "test_features.npz",
        ):
            assert (run / name).is_file(), (method, name)
        assert not list(run.glob(".*tmp"))  # no temporary files left behind


def test_run_folder_contents_are_sane(sweep):
    run = sweep / "runs" / "bs30" / "mdn-conv" / "seed0"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["method"] == "mdn-conv" and cfg["config"]["batch_size"] == 30
    assert cfg["design"] == {"columns": ["y", "cf", "intercept"], "keep": ["y"]}
    assert cfg["sizes"] == {"train": 80, "val": 80, "test": 80}
    assert cfg["batches_per_epoch"] == 3  # 30 + 30 + 20
    with open(run / "epochs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # the default cosine schedule: lr, then lr·(1 + cos(π/2))/2 = lr/2
    assert cfg["config"]["lr_schedule"] == "cosine"
    lr = cfg["config"]["lr"]
    assert [float(r["lr"]) for r in rows] == pytest.approx([lr, lr / 2])
    for r in rows:
        assert float(r["train_loss"]) > 0 and float(r["epoch_time_s"]) > 0
        assert 0 <= float(r["val_balanced_accuracy"]) <= 1
        assert -0.2 <= float(r["val_dcor2_0"]) <= 1 and -0.2 <= float(r["val_dcor2_1"]) <= 1
    final = json.loads((run / "final.json").read_text())
    assert 0 <= final["test_balanced_accuracy"] <= 1
    assert set(final["test_recall"]) == {"0", "1"} and set(final["test_dcor2"]) == {"0", "1"}
    assert final["test_balanced_accuracy"] == pytest.approx(
        np.mean(list(final["test_recall"].values()))
    )
    assert set(final["test_group_accuracy"]) <= {"[1,2)", "[2,3)", "[3,4)", "[4,5)", "[5,6]"}
    assert final["val_dcor2"]["0"] == pytest.approx(float(rows[-1]["val_dcor2_0"]))
    # the checkpoint restores the model, MDN buffers included
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["design_columns"] == ["y", "cf", "intercept"]
    design = torch.zeros(80, 3)
    design[:, 2] = 1
    design[:40, 0] = 1
    design[:, 1] = torch.linspace(-1, 1, 80)
    model = PaperCNN("mdn-conv", design)
    model.load_state_dict(ckpt["model"])
    # the default refit: after the last epoch each running β comes from one pass over the
    # 80 training images (one batch of at most 500)
    assert cfg["config"]["refit_running_beta"] is True
    assert int(model.norm3.num_batches_tracked) == 1
    assert int(model.norm3.num_samples_tracked) == 80
    with np.load(run / "test_features.npz") as z:
        assert z["features"].shape == (80, 84) and z["labels"].shape == (80,)
        assert z["confounder"].shape == (80,)


def test_report_contents(sweep):
    text = (sweep / "report.md").read_text()
    assert "| Baseline | 30 |" in text and "| MDN-Conv | 30 |" in text
    assert "The authors' figures" in text and "0.944" in text
    assert "## Checks" in text and "MDN-Conv bs=30: epoch time" in text
    assert "![features_pca.png](features_pca.png)" in text
    summary = json.loads((sweep / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["none"]["time_ratio"] == pytest.approx(1.0)
    hist = {}
    for m in ("none", "mdn-conv"):
        with open(sweep / f"runs/bs30/{m}/seed0/epochs.csv") as f:
            hist[m] = np.array([float(r["epoch_time_s"]) for r in csv.DictReader(f)])
    # the paired ratio: median over epochs of (method's epoch e) / (baseline's epoch e)
    assert rows["mdn-conv"]["time_ratio"] == pytest.approx(
        np.median(hist["mdn-conv"] / hist["none"])
    )
    final = json.loads((sweep / "runs/bs30/none/seed0/final.json").read_text())
    assert rows["none"]["test_bacc"] == pytest.approx(final["test_balanced_accuracy"])


def test_refuses_to_overwrite(sweep, capsys):
    before = (sweep / "report.md").read_bytes()
    rc = main(["reproduce", "synthetic", "--out", str(sweep), "--methods", "baseline", *TINY])
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (sweep / "report.md").read_bytes() == before


def test_run_experiment_overwrite(tmp_path):
    cfg = RunConfig(method="mdn-linear", batch_size=7, epochs=1, n_per_class=10, threads=1)
    out = tmp_path / "run"
    res = run_experiment(cfg, out, progress=False)
    assert len(res["history"]) == 1 and (out / "final.json").is_file()
    with pytest.raises(FileExistsError, match="overwrite"):
        run_experiment(cfg, out, progress=False)
    res2 = run_experiment(cfg.replace(epochs=2), out, overwrite=True, progress=False)
    assert len(res2["history"]) == 2
    # same seed, same configuration: the same numbers
    res3 = run_experiment(cfg, tmp_path / "again", progress=False)
    assert res3["final"]["test_balanced_accuracy"] == res["final"]["test_balanced_accuracy"]
    assert res3["history"][0]["train_loss"] == pytest.approx(res["history"][0]["train_loss"])


def test_summarize_mean_and_std_over_seeds():
    def result(seed, bacc, d0, method="none", t=1.0):
        return {
            "final": {
                "method": method,
                "batch_size": 64,
                "seed": seed,
                "test_balanced_accuracy": bacc,
                "val_dcor2": {"0": d0, "1": d0},
                "test_dcor2": {"0": d0, "1": d0},
                "test_recall": {"0": bacc, "1": bacc},
                "test_group_accuracy": {},
                "epoch_time_s_median": t,
            }
        }

    rows = summarize(
        [
            result(0, 0.9, 0.3),
            result(1, 0.8, 0.1, t=2.0),
            result(0, 0.8, 0.0, "mdn-conv", 1.5),
            result(1, 0.8, 0.0, "mdn-conv", 5.0),
        ]
    )
    base = next(r for r in rows if r["method"] == "none")
    assert base["seeds"] == 2
    assert base["test_bacc"] == pytest.approx(0.85)
    assert base["test_bacc_std"] == pytest.approx(np.std([0.9, 0.8], ddof=1))
    assert base["val_dcor2_0"] == pytest.approx(0.2)
    mdn = next(r for r in rows if r["method"] == "mdn-conv")
    assert mdn["time_ratio"] == pytest.approx((1.5 / 1.0 + 5.0 / 2.0) / 2)  # paired, per seed


def test_engine_functions_and_registry():
    exp = get_experiment("synthetic")
    assert "synthetic" in list_experiments()
    assert exp.confounder == "cf" and exp.metadata_columns == ("cf",)
    cfg = RunConfig(n_per_class=12, seed=3)
    train, val, _ = exp.make_splits(cfg)
    from torch.utils.data import DataLoader

    from metanorm.datasets import DesignDataset
    from metanorm.experiments.coding import build_designs

    _, (rows, vrows, _) = build_designs(exp, (train, val, val))
    model = exp.make_model("mdn-linear", rows.numpy(), cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stats = train_one_epoch(model, DataLoader(DesignDataset(train, rows), batch_size=5), opt)
    assert stats["samples"] == 24 and stats["loss"] > 0 and stats["time_s"] > 0
    ev = evaluate(
        model,
        DataLoader(DesignDataset(val, vrows), batch_size=100),
        confounder=val.metadata["cf"],
        groups=cf_bins(val),
    )
    assert set(ev) == {"loss", "accuracy", "balanced_accuracy", "recall", "dcor2", "group_accuracy"}
    with pytest.raises(ValueError, match="confounder"):
        evaluate(model, DataLoader(DesignDataset(val, vrows)), confounder=np.zeros(3))


def test_bad_configurations(tmp_path, capsys):
    with pytest.raises(ValueError, match="batch_size"):
        RunConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        RunConfig(lr=-1.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        RunConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="unknown experiment"):
        get_experiment("nope")
    with pytest.raises(ValueError, match="methods"):
        run_experiment(RunConfig(method="dropout"), tmp_path / "x")
    assert main(["reproduce", "synthetic", "--out", str(tmp_path / "y"), "--methods", "foo"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    assert main(["reproduce", "nope", "--out", str(tmp_path / "z")]) == 2


def test_sweep_in_two_processes(tmp_path):
    base = RunConfig(epochs=1, n_per_class=10, threads=1)
    results = run_sweep(
        base,
        tmp_path / "s",
        methods=["none", "mdn-linear"],
        batch_sizes=[8, 6],
        progress=False,
        jobs=2,
    )
    assert [(r["final"]["batch_size"], r["final"]["method"]) for r in results] == [
        (8, "none"),
        (8, "mdn-linear"),
        (6, "none"),
        (6, "mdn-linear"),
    ]
    for r in results:
        assert (
            tmp_path
            / "s"
            / "runs"
            / f"bs{r['final']['batch_size']}"
            / r["final"]["method"]
            / "seed0"
            / "final.json"
        ).is_file()
    with pytest.raises(ValueError, match="jobs"):
        run_sweep(base, tmp_path / "t", jobs=0)


def test_epoch_lr_schedules():
    import math

    from metanorm.experiments.engine import epoch_lr

    assert [epoch_lr(0.1, "constant", e, 3) for e in range(3)] == [0.1] * 3
    got = [epoch_lr(0.1, "cosine", e, 5) for e in range(5)]
    want = [0.05 * (1 + math.cos(math.pi * e / 5)) for e in range(5)]
    assert got == pytest.approx(want) and got[0] == 0.1 and got == sorted(got, reverse=True)
    with pytest.raises(ValueError, match="epoch"):
        epoch_lr(0.1, "cosine", 5, 5)
    with pytest.raises(ValueError, match="schedule"):
        epoch_lr(0.1, "linear", 0, 5)


def test_refit_running_beta_matches_least_squares_layer_by_layer():
    """Each refitted β is the full-data least-squares fit of the features that layer sees in eval
    mode (the earlier layers already refitted), whatever the batch order."""
    from metanorm.datasets.synthetic import make_synthetic_splits
    from metanorm.experiments.coding import build_designs
    from metanorm.nn.utils import refit_running_beta

    exp = get_experiment("synthetic")
    splits = make_synthetic_splits(30, seed=3)
    _, rows = build_designs(exp, splits)
    torch.manual_seed(0)
    model = PaperCNN("mdn-conv", rows[0], momentum=0.3).double()
    model.train()
    x = splits[0].images.double()
    model(x[:20], rows[0][:20].double())  # some stale running state to be replaced
    d = rows[0].double()
    y = splits[0].labels
    loader = [(x[i : i + 7], y[i : i + 7], d[i : i + 7]) for i in range(0, len(x), 7)]  # sorted
    assert refit_running_beta(model, loader) == 3
    assert model.training and model.norm1.momentum == 0.3
    inputs = {}
    hooks = [
        getattr(model, name).register_forward_pre_hook(
            lambda mod, args, name=name: inputs.__setitem__(name, args[0].flatten(1))
        )
        for name in ("norm1", "norm2", "norm3")
    ]
    model.eval()
    with torch.no_grad():
        model(x, d)
    for h in hooks:
        h.remove()
    design = d.numpy()
    for name in ("norm1", "norm2", "norm3"):
        feats = inputs[name].numpy()
        want = np.linalg.lstsq(design, feats, rcond=None)[0]
        got = getattr(model, name).running_beta.double().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    assert refit_running_beta(torch.nn.Linear(2, 2), loader) == 0
