"""The real-data experiments through the engine: ``metanorm reproduce NAME`` end to end."""

import csv
import json
from pathlib import Path

import dcor
import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from metanorm.cli import main
from metanorm.datasets import DataSplit
from metanorm.datasets.paper import load_hvu
from metanorm.datasets.sources import FASHION_MNIST_DIR
from metanorm.experiments import RunConfig, get_experiment, list_experiments
from metanorm.experiments.runner import build_designs, metric_matrix
from metanorm.models import StandInMLP, create_model

HAVE_FASHION = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()


def _split(name, labels, **metadata):
    n = len(labels)
    return DataSplit(
        images=torch.zeros(n, 1, 4, 4),
        labels=torch.as_tensor(labels),
        metadata={k: np.asarray(v) for k, v in metadata.items()},
        name=name,
    )


def test_real_experiments_registered():
    names = set(list_experiments())
    assert {"shaded-fashion-mnist", "two-site-digits", "gs-ppb", "hvu", "multisite-mri"} <= names
    assert "synthetic" in names
    # the stand-in models are part of metanorm.models and its factory
    model = create_model("stand-in-mlp", in_features=5, num_classes=3, norm="none")
    assert isinstance(model, StandInMLP)
    logits, feats = model(torch.randn(4, 5))
    assert logits.shape == (4, 3) and feats.shape == (4, 128)


def test_one_design_coding_label_raw_metadata_standardised():
    # multisite-mri: site and sex one-hot, age standardised, the 0/1 label raw (never scaled)
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 10)
    site = np.array(["a", "b", "c", "b"] * 5)
    age = rng.uniform(20, 80, 20)
    sex = np.array(["f", "m"] * 5 + ["m", "f"] * 5)
    train = _split("train", y, site=site, age=age, sex=sex)
    test = _split("test", y[:8], site=site[:8], age=age[:8], sex=sex[:8])
    exp = get_experiment("multisite-mri")
    builder, (rows, test_rows) = build_designs(exp, (train, test))
    assert builder.columns == ("y", "site=b", "site=c", "age", "sex=m", "intercept")
    np.testing.assert_array_equal(rows[:, 0].numpy(), y)  # the label as it is
    z = (age - age.mean()) / age.std()
    np.testing.assert_allclose(rows[:, 3].numpy(), z, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rows[:, 1].numpy(), site == "b")
    np.testing.assert_allclose(test_rows[:, 3].numpy(), z[:8], rtol=1e-5, atol=1e-6)
    # the metric: the site one-hot with every training level (no reference dropped)
    m = metric_matrix(exp, test, train)
    np.testing.assert_array_equal(m, np.stack([site[:8] == v for v in "abc"], 1).astype(float))
    # three classes: the label one-hot (class 0 the reference), still 0/1
    y3 = np.arange(20) % 3
    _, (rows3,) = build_designs(exp, (_split("train", y3, site=site, age=age, sex=sex),))
    np.testing.assert_array_equal(rows3[:, :2].numpy(), np.stack([y3 == 1, y3 == 2], 1))


def test_user_data_experiment_without_data_names_the_layout(tmp_path, capsys):
    assert main(["reproduce", "gs-ppb", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--data PATH" in err and "metadata.csv" in err and "images/<filename>" in err
    assert not (tmp_path / "o").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["reproduce", "hvu", "--data", str(empty), "--out", str(tmp_path / "o")])
    assert code == 2 and "annotations.csv" in capsys.readouterr().err


SCENES = ("beach", "kitchen", "snow")


def _write_hvu(root: Path, n: int = 120, d: int = 8) -> None:
    """HVU in the documented layout: annotations.csv + features.npy + features_clips.txt."""
    rng = np.random.default_rng(1)
    root.mkdir()
    feats = rng.normal(size=(n, d)).astype(np.float32)
    rows = []
    for i in range(n):
        action = ("diving", "skiing", "cooking")[i % 3]
        feats[i, i % 3] += 3.0  # the action is learnable from the features
        # not every clip has a main scene: else the three would add up to the intercept
        scenes = ([SCENES[(i // 3) % 3]] if i % 5 else []) + (["outdoor"] if i % 4 == 0 else [])
        rows.append([f"clip{i}", action, "|".join(scenes)])
    with (root / "annotations.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["clip_id", "action_tags", "scene_tags"])
        w.writerows(rows)
    np.save(root / "features.npy", feats)
    (root / "features_clips.txt").write_text("\n".join(f"clip{i}" for i in range(n)) + "\n")


def test_hvu_reproduce_end_to_end(tmp_path):
    data, out = tmp_path / "hvu", tmp_path / "out"
    _write_hvu(data)
    argv = ["reproduce", "hvu", "--data", str(data), "--out", str(out), "--epochs", "2"]
    assert main([*argv, "--quiet", "--no-plots", "--batch-sizes", "16"]) == 0
    report = (out / "report.md").read_text()
    assert "| MDN | 16 |" in report and "| BatchNorm | 16 |" in report
    cfg = json.loads((out / "runs/bs16/mdn/seed0/config.json").read_text())
    scenes = [f"scene={s}" for s in sorted((*SCENES, "outdoor"))]
    # three actions: the label one-hot (kept), then the multi-hot scene tags, then the intercept
    assert cfg["design"]["columns"] == ["y=1", "y=2", *scenes, "intercept"]
    assert cfg["design"]["keep"] == ["y=1", "y=2"]
    assert cfg["model"]["class"] == "StandInMLP"
    final = json.loads((out / "runs/bs16/mdn/seed0/final.json").read_text())
    z = np.load(out / "runs/bs16/mdn/seed0/test_features.npz")
    test = load_hvu(data, seed=0)["test"]
    np.testing.assert_array_equal(z["metric"], np.stack([test.metadata[s] for s in scenes], 1))
    # dcor² per class against the scene matrix, and bAcc, from independent implementations
    ckpt = torch.load(out / "runs/bs16/mdn/seed0/checkpoint.pt", weights_only=True)
    assert ckpt["design_columns"] == cfg["design"]["columns"]
    for c, v in final["test_dcor2"].items():
        sel = z["labels"] == int(c)
        want = dcor.u_distance_correlation_sqr(
            z["features"][sel].astype(np.float64), z["metric"][sel]
        )
        assert v == pytest.approx(want, abs=1e-5)
    assert set(final["eval_splits"]) == {"test"}
    assert final["eval_splits"]["test"]["balanced_accuracy"] == final["test_balanced_accuracy"]
    assert final["test_group_accuracy"] == {}  # no groups for a tag matrix
    summary = json.loads((out / "summary.json").read_text())
    assert {r["method"] for r in summary["rows"]} == {"batchnorm", "mdn"}
    # the reported bAcc, recomputed with scikit-learn from the checkpoint's model
    config = RunConfig.from_dict(ckpt["config"])
    exp = get_experiment("hvu")
    splits = exp.make_splits(config)
    builder, rows = build_designs(exp, splits)
    meta = {k: splits[0].metadata[k] for k in scenes}
    design = builder.transform({"y": splits[0].labels.numpy()} | meta)
    model = exp.make_model("mdn", design, config)
    model.load_state_dict(ckpt["model"])
    model.eval()
    with torch.no_grad():
        logits, _ = model(splits[2].images, rows[2])
    want = balanced_accuracy_score(splits[2].labels.numpy(), logits.argmax(1).numpy())
    assert final["test_balanced_accuracy"] == pytest.approx(want, abs=1e-12)


@pytest.mark.skipif(
    not HAVE_FASHION, reason="Fashion-MNIST absent: apt-get install -y dataset-fashion-mnist"
)
def test_shaded_fashion_mnist_reproduce_end_to_end(tmp_path):
    out = tmp_path / "out"
    argv = ["reproduce", "shaded-fashion-mnist", "--out", str(out), "--epochs", "1"]
    argv += ["--n-per-class", "100", "--n-eval-per-class", "50", "--quiet", "--no-plots"]
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    assert "test_reversed bAcc" in report and "| MDN | 128 | test_reversed |" in report
    for method in ("batchnorm", "mdn"):
        run = out / "runs/bs128" / method / "seed0"
        final = json.loads((run / "final.json").read_text())
        cfg = json.loads((run / "config.json").read_text())
        assert cfg["sizes"] == {"train": 200, "val": 100, "test": 100, "test_reversed": 100}
        assert cfg["design"] == {"columns": ["y", "shade", "intercept"], "keep": ["y"]}
        assert list(final["eval_splits"]) == ["test", "test_reversed"]
        for name, ev in final["eval_splits"].items():
            assert set(ev["dcor2"]) == {"0", "1"}
            groups = ev["group_accuracy"]
            bins = {"[1,2)", "[2,3)", "[3,4)", "[4,5)", "[5,6]"}
            assert set(groups) <= bins and len(groups) >= 4, name
            assert 0.0 <= ev["balanced_accuracy"] <= 1.0
        # the first test split is also the top-level test result
        assert final["test_balanced_accuracy"] == final["eval_splits"]["test"]["balanced_accuracy"]
        z = np.load(run / "test_features.npz")
        want = dcor.u_distance_correlation_sqr(
            z["features"][z["labels"] == 1].astype(np.float64), z["metric"][z["labels"] == 1]
        )
        assert final["test_dcor2"]["1"] == pytest.approx(want, abs=1e-5)
