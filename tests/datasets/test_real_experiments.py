import numpy as np
import pytest
from test_paper_loaders import (
    needs_nibabel,
    needs_pil,
    write_hvu,
    write_mri,
    write_ppb,
)
from test_stand_in_images import needs_fashion, needs_two_sites

from metanorm.datasets.experiments import REAL_EXPERIMENTS, real_experiment
from metanorm.linalg import fit_beta


def check_models(exp, norms=("none", "batchnorm", "mdn")):
    rows = exp.design_rows("train")
    x = exp.splits["train"].images[:6]
    for norm in norms:
        model = exp.make_model(norm)
        logits, feats = model(x, rows[:6])
        assert logits.shape == (6, exp.num_classes) and feats.dim() == 2
        model.eval()
        test_rows = exp.design_rows(exp.eval_splits[0], labels=False)
        logits, _ = model(exp.splits[exp.eval_splits[0]].images[:3], test_rows[:3])
        assert logits.shape == (3, exp.num_classes)


@needs_fashion
def test_shaded_experiment_design_and_metric():
    exp = real_experiment("shaded-fashion-mnist", n_train=100, n_val=50, n_test=50, seed=0)
    assert exp.eval_splits == ("test", "test_reversed")
    d = exp.design("train")
    assert d.columns == ("y", "shade", "intercept") and d.keep == (0,)
    np.testing.assert_array_equal(d.matrix[:, 0], exp.splits["train"].labels.numpy())
    # the shade column is standardised with the TRAINING mean/sd, at test too
    shade_tr = exp.splits["train"].metadata["shade"]
    shade_te = exp.splits["test"].metadata["shade"]
    np.testing.assert_allclose(
        exp.design("test").matrix[:, 1], (shade_te - shade_tr.mean()) / shade_tr.std()
    )
    assert (exp.design("test", labels=False).matrix[:, 0] == 0).all()
    np.testing.assert_array_equal(exp.metric_matrix("test")[:, 0], shade_te)
    np.testing.assert_array_equal(exp.groups("test"), exp.splits["test"].metadata["shade_bin"])
    check_models(exp, ("batchnorm", "mdn", "mdn-all"))
    # MDN stores the whole training design: Σ⁻¹ of the 100 training rows
    mdn = next(m for m in exp.make_model("mdn").modules() if hasattr(m, "kernel"))
    np.testing.assert_allclose(
        mdn.kernel.numpy(), np.linalg.inv(d.matrix.T @ d.matrix), rtol=1e-8, atol=1e-10
    )
    assert float(mdn.n_samples) == 100
    cum = next(m for m in exp.make_model("mdn", momentum=None).modules() if hasattr(m, "kernel"))
    assert cum.momentum is None
    # the full-data β of the design reproduces numpy's least squares (shared GLM core)
    f = np.random.default_rng(0).normal(size=(100, 3))
    np.testing.assert_allclose(
        fit_beta(d, f).numpy(), np.linalg.lstsq(d.matrix, f, rcond=None)[0], atol=1e-10
    )


@needs_two_sites
def test_two_site_experiment_multiclass():
    exp = real_experiment("two-site-digits", classes=(1, 4, 7, 9), test_per_cell=20)
    assert exp.num_classes == 4
    cols = exp.design("train").columns
    # multiclass label one-hot (kept), site one-hot with a reference level (removed)
    assert cols == ("y=1", "y=2", "y=3", "site=1", "intercept")
    assert exp.design("train").keep == (0, 1, 2)
    m = exp.metric_matrix("test")
    assert m.shape == (160, 2) and (m.sum(1) == 1).all()
    check_models(exp)


@needs_pil
@pytest.mark.parametrize("skin_type", ["categorical", "ordinal"])
def test_gs_ppb_experiment(tmp_path, skin_type):
    write_ppb(tmp_path, n=48)
    exp = real_experiment("gs-ppb", tmp_path, skin_type=skin_type, image_size=16)
    cols = exp.design("train").columns
    if skin_type == "categorical":
        assert cols == ("y", *[f"skin_type={k}" for k in range(2, 7)], "intercept")
        assert exp.metric_matrix("test").shape[1] == 6
    else:
        assert cols == ("y", "skin_type", "intercept")
    check_models(exp)


def test_hvu_experiment(tmp_path):
    write_hvu(tmp_path, n=60)
    exp = real_experiment("hvu", tmp_path, min_scene_count=3)
    assert exp.num_classes == 3
    assert exp.design_columns == tuple(
        f"scene={t}" for t in ("beach", "kitchen", "outdoor", "snow")
    )
    # multi-hot scenes are plain 0/1 columns; beach+kitchen+snow = 1 for every clip, so with an
    # intercept the design would be singular: the builder must detect that
    with pytest.raises(ValueError, match="collinear"):
        exp.make_model("mdn")
    exp2 = real_experiment("hvu", tmp_path, min_scene_count=3)
    exp2.design_columns = ("scene=beach", "scene=outdoor", "scene=snow")
    exp2.metric_columns = exp2.design_columns
    check_models(exp2)


@needs_nibabel
def test_mri_experiment(tmp_path):
    write_mri(tmp_path, n=30)
    exp = real_experiment("multisite-mri", tmp_path, volume_shape=(8, 8, 8))
    assert exp.design("train").columns == (
        "y",
        "site=siteB",
        "site=siteC",
        "age",
        "sex=M",
        "intercept",
    )
    check_models(exp)
    with pytest.raises(ValueError, match="covariates"):
        real_experiment("multisite-mri", tmp_path, covariates=("scanner",))


def test_registry_errors(tmp_path):
    assert set(REAL_EXPERIMENTS) == {
        "shaded-fashion-mnist",
        "shaded-mnist",
        "two-site-digits",
        "gs-ppb",
        "hvu",
        "multisite-mri",
    }
    with pytest.raises(ValueError, match="unknown real experiment"):
        real_experiment("ppb")
    with pytest.raises(ValueError, match="needs the data folder"):
        real_experiment("hvu")
    with pytest.raises(FileNotFoundError, match="HVU folder not found"):
        real_experiment("hvu", tmp_path / "missing")
