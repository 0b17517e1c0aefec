"""MetadataResidualizer: agreement with numpy and the layer, degenerate designs, several columns."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.exceptions import NotFittedError

from metanorm.nn import MetadataNorm
from metanorm.preprocessing import MetadataResidualizer


def _data(n: int = 120, d: int = 6, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """Features with a label effect, a site effect and an age effect; site and label correlated."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    site = np.where(rng.random(n) < 0.3 + 0.4 * y, "b", np.where(rng.random(n) < 0.5, "a", "c"))
    age = rng.normal(50, 12, n)
    F = (
        rng.normal(size=(n, d))
        + np.outer(y, rng.normal(size=d)) * 2
        + np.outer(site == "b", rng.normal(size=d)) * 3
        + np.outer(site == "c", rng.normal(size=d))
        + np.outer(age, rng.normal(size=d)) * 0.05
        + 10
    )
    return F, pd.DataFrame({"y": y, "site": site, "age": age})


def _z(v: pd.Series) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return (v - v.mean()) / v.std()


def _lstsq_oracle(F: np.ndarray, X: np.ndarray, remove: list[int]) -> np.ndarray:
    beta = np.linalg.lstsq(X, F, rcond=None)[0]
    return F - X[:, remove] @ beta[remove]


def test_matches_numpy_lstsq_with_kept_label() -> None:
    F, meta = _data()
    res = MetadataResidualizer(keep=["y"]).fit(F, metadata=meta)
    assert res.design_columns_ == ("y", "site=b", "site=c", "age", "intercept")
    np.testing.assert_array_equal(res.remove_mask_, [False, True, True, True, True])
    # an independent design: raw one-hot and raw age (the output does not depend on how the
    # removed columns are coded); the kept label is raw, as standardize=True leaves kept columns
    # (its coding decides how the constant is shared between the kept part and the intercept)
    X = np.column_stack(
        [meta.y, meta.site == "b", meta.site == "c", meta.age, np.ones(len(meta))]
    ).astype(float)
    expected = _lstsq_oracle(F, X, [1, 2, 3, 4])
    np.testing.assert_allclose(res.transform(F, metadata=meta), expected, atol=1e-9)
    # raw 0/1 label: the kept part is beta_y * y, so rows labelled 0 keep only their residual
    beta = np.linalg.lstsq(X, F, rcond=None)[0]
    np.testing.assert_allclose(expected - (F - X @ beta), np.outer(meta.y, beta[0]), atol=1e-9)
    assert res.design_builder_.transform(meta).matrix[:, 0].tolist() == meta.y.tolist()
    # listing the kept label in standardize centres it: its kept part has zero training mean
    res_z = MetadataResidualizer(keep=["y"], standardize=["y", "age"]).fit(F, metadata=meta)
    X_z = np.column_stack([_z(meta.y), *X[:, 1:].T])
    expected_z = _lstsq_oracle(F, X_z, [1, 2, 3, 4])
    np.testing.assert_allclose(res_z.transform(F, metadata=meta), expected_z, atol=1e-9)
    beta_z = np.linalg.lstsq(X_z, F, rcond=None)[0]
    np.testing.assert_allclose((expected_z - (F - X_z @ beta_z)).mean(0), 0, atol=1e-9)
    # test rows without labels: the kept column may be left out, or passed and ignored
    out_no_label = res.transform(F[:10], metadata=meta[["site", "age"]].iloc[:10])
    garbage = meta.iloc[:10].assign(y=np.nan)
    np.testing.assert_allclose(out_no_label, expected[:10], atol=1e-9)
    np.testing.assert_allclose(res.transform(F[:10], metadata=garbage), expected[:10], atol=1e-9)
    # a plain array: by position, with or without the kept column
    arr = np.column_stack([meta.site.map({"a": 0, "b": 1, "c": 2}), meta.age])
    res_arr = MetadataResidualizer(categorical=[0]).fit(F, metadata=arr)
    X2 = np.column_stack([meta.site == "b", meta.site == "c", meta.age, np.ones(len(meta))])
    np.testing.assert_allclose(
        res_arr.transform(F, metadata=arr),
        _lstsq_oracle(F, X2.astype(float), [0, 1, 2, 3]),
        atol=1e-9,
    )


def test_keep_intercept_keeps_the_mean_and_dtype_is_preserved() -> None:
    F, meta = _data()
    removed = MetadataResidualizer(keep="y").fit_transform(F, metadata=meta)
    kept = MetadataResidualizer(keep="y", keep_intercept=True).fit_transform(F, metadata=meta)
    np.testing.assert_allclose(
        kept - removed, np.broadcast_to(kept.mean(0) - removed.mean(0), F.shape), atol=1e-9
    )
    # no kept column, intercept removed: the output is centred
    centred = MetadataResidualizer().fit_transform(F, metadata=meta[["site", "age"]])
    np.testing.assert_allclose(centred.mean(0), 0, atol=1e-9)
    out32 = MetadataResidualizer().fit_transform(F.astype(np.float32), metadata=meta)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(
        out32, MetadataResidualizer().fit_transform(F, metadata=meta), atol=1e-4
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_agrees_with_the_layer_after_one_epoch(dtype: torch.dtype) -> None:
    """Eval-mode MetadataNorm with momentum=None after one epoch == the residualizer."""
    F, meta = _data(n=120)
    res = MetadataResidualizer(keep=["y"]).fit(F, metadata=meta)
    design = res.design_builder_.transform(meta)
    layer = MetadataNorm(F.shape[1], design, momentum=None, dtype=dtype)
    rows = design.tensor(dtype)
    feats = torch.as_tensor(F, dtype=dtype)
    perm = torch.randperm(120, generator=torch.Generator().manual_seed(0))
    layer.train()
    for idx in perm.split(20):  # one epoch over a partition, six equal batches
        layer(feats[idx], rows[idx])
    layer.eval()
    F_test, meta_test = _data(n=40, seed=1)
    test_rows = res.design_builder_.transform(meta_test, ignore_keep=True).tensor(dtype)
    with torch.no_grad():
        out_layer = layer(torch.as_tensor(F_test, dtype=dtype), test_rows).double().numpy()
    out_res = res.transform(F_test, metadata=meta_test[["site", "age"]])
    # relative to the features' scale (about 10): 1e-5 in float32, far tighter in float64
    tol = 1e-5 * np.abs(F_test).max() if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(out_layer, out_res, atol=tol)
    np.testing.assert_allclose(layer.running_beta.double().numpy(), res.coef_, atol=tol)


def test_several_columns_with_different_scales_are_all_removed() -> None:
    rng = np.random.default_rng(3)
    n = 500
    meta = pd.DataFrame(
        {
            "dose": rng.normal(1000.0, 300.0, n),  # large mean and scale
            "temp": rng.normal(-3.0, 0.05, n),  # small scale, negative mean
            "site": rng.choice(["x", "y", "z"], n),
        }
    )
    F = (
        np.outer(meta.dose, [0.01, -0.02, 0.0])
        + np.outer(meta.temp, [20.0, 0.0, -40.0])
        + np.outer(meta.site == "z", [1.0, 2.0, 3.0])
        + rng.normal(size=(n, 3))
    )
    out = MetadataResidualizer().fit_transform(F, metadata=meta)
    numeric = np.column_stack([meta.dose, meta.temp, meta.site == "y", meta.site == "z"])
    corr = np.corrcoef(np.column_stack([out, numeric]).T)[:3, 3:]
    assert np.abs(corr).max() < 1e-10
    before = np.corrcoef(np.column_stack([F, numeric]).T)[:3, 3:]
    assert np.abs(before).max() > 0.5

    # What a single grand mean for all sensitive columns does (fairlearn's CorrelationRemover
    # before it centred per column; 0.10.0 did this): correlation stays.
    S = numeric[:, :2]
    beta = np.linalg.lstsq(S - S.mean(), F, rcond=None)[0]
    grand = F - (S - S.mean()) @ beta
    assert np.abs(np.corrcoef(np.column_stack([grand, S]).T)[:3, 3:]).max() > 0.1


def test_equals_fairlearn_correlation_remover_up_to_the_mean() -> None:
    """Continuous metadata, nothing kept: ours == CorrelationRemover − training mean."""
    fl = pytest.importorskip("fairlearn.preprocessing")
    rng = np.random.default_rng(4)
    n = 300
    S = np.column_stack([rng.normal(5, 2, n), rng.normal(-100, 30, n)])
    F = S @ rng.normal(size=(2, 4)) + rng.normal(size=(n, 4)) + 7
    cr = fl.CorrelationRemover(sensitive_feature_ids=[4, 5]).fit(np.hstack([F, S]))
    theirs = cr.transform(np.hstack([F, S]))
    ours = MetadataResidualizer().fit(F, metadata=S)
    np.testing.assert_allclose(ours.transform(F, metadata=S), theirs - F.mean(0), atol=1e-8)
    with_mean = MetadataResidualizer(keep_intercept=True).fit(F, metadata=S)
    np.testing.assert_allclose(with_mean.transform(F, metadata=S), theirs, atol=1e-8)


# -- degenerate designs -----------------------------------------------------------------------


def test_site_with_one_sample_warns_and_is_exact() -> None:
    F, meta = _data()
    meta = meta.copy()
    meta.loc[7, "site"] = "lonely"
    with pytest.warns(UserWarning, match=r"'site' has level\(s\) \['lonely'\] with a single"):
        res = MetadataResidualizer(keep=["y"]).fit(F, metadata=meta)
    out = res.transform(F, metadata=meta)
    assert np.isfinite(out).all()
    X = np.column_stack(
        [
            meta.y,
            meta.site == "b",
            meta.site == "c",
            meta.site == "lonely",
            meta.age,
            np.ones(len(meta)),
        ]
    ).astype(float)
    np.testing.assert_allclose(out, _lstsq_oracle(F, X, [1, 2, 3, 4, 5]), atol=1e-8)
    # the lonely row is fitted exactly: only its kept (label) part is left
    beta = np.linalg.lstsq(X, F, rcond=None)[0]
    np.testing.assert_allclose(out[7], X[7, 0] * beta[0], atol=1e-8)


def test_constant_feature_gives_zero_not_nan() -> None:
    F, meta = _data()
    F[:, 2] = 4.2
    out = MetadataResidualizer(keep=["y"]).fit_transform(F, metadata=meta)
    np.testing.assert_allclose(out[:, 2], 0.0, atol=1e-10)
    kept = MetadataResidualizer(keep=["y"], keep_intercept=True).fit_transform(F, metadata=meta)
    np.testing.assert_allclose(kept[:, 2], 4.2, atol=1e-10)
    # a constant metadata column is collinear with the intercept: a clear error
    with pytest.raises(ValueError, match="'age' is all zeros"):
        MetadataResidualizer().fit(F, metadata=meta.assign(age=3.0))


def test_covariate_confounded_with_site_errors_or_uses_ridge() -> None:
    F, meta = _data()
    meta = meta.assign(scanner_b=(meta.site == "b").astype(float) * 2.0 + 1.0)
    with pytest.raises(ValueError, match=r"collinear") as info:
        MetadataResidualizer().fit(F, metadata=meta)
    assert "'site=b'" in str(info.value) and "'scanner_b'" in str(info.value)
    assert "ridge" in str(info.value)
    lam = 1e-3
    res = MetadataResidualizer(ridge=lam, standardize=False).fit(F, metadata=meta)
    out = res.transform(F, metadata=meta)
    assert np.isfinite(out).all()
    X = res.design_builder_.transform(meta).matrix
    beta = np.linalg.solve(X.T @ X + lam * np.eye(X.shape[1]), X.T @ F)
    np.testing.assert_allclose(out, F - X @ beta, atol=1e-8)
    # a label fully confounded with a site cannot be kept apart from it either
    with pytest.raises(ValueError, match="collinear"):
        MetadataResidualizer(keep=["y"]).fit(
            F, metadata=meta.assign(site=meta.y.map({0: "a", 1: "b"}))
        )


def test_unseen_category_at_transform_is_a_clear_error() -> None:
    F, meta = _data()
    res = MetadataResidualizer(keep=["y"]).fit(F, metadata=meta)
    new = meta.iloc[:5].assign(site=["a", "b", "new_site", "c", "a"])
    with pytest.raises(ValueError, match=r"level\(s\) \['new_site'\] not seen at fit"):
        res.transform(F[:5], metadata=new)


@pytest.mark.parametrize("where", ["fit", "transform"])
def test_nan_in_metadata_is_a_clear_error(where: str) -> None:
    F, meta = _data()
    bad = meta.copy()
    bad.loc[3, "age"] = np.nan
    bad_site = meta.copy().astype({"site": object})
    bad_site.loc[4, "site"] = None
    bad_na = meta.astype({"site": "string"})
    bad_na.loc[5, "site"] = pd.NA
    res = MetadataResidualizer(keep=["y"])
    if where == "fit":
        for m in (bad, bad_site, bad_na):
            with pytest.raises(ValueError, match="missing"):
                res.fit(F, metadata=m)
        with pytest.raises(ValueError, match="'y' has 1 missing"):  # a kept label too
            res.fit(F, metadata=meta.assign(y=np.where(np.arange(len(meta)) == 0, np.nan, 1.0)))
    else:
        res.fit(F, metadata=meta)
        for m in (bad, bad_site, bad_na):
            with pytest.raises(ValueError, match="missing"):
                res.transform(F, metadata=m)


def test_missing_or_mismatched_metadata_never_pass_x_through() -> None:
    F, meta = _data()
    with pytest.raises(ValueError, match="needs metadata"):
        MetadataResidualizer().fit(F)
    res = MetadataResidualizer(keep=["y"]).fit(F, metadata=meta)
    with pytest.raises(ValueError, match="needs metadata"):
        res.transform(F)
    with pytest.raises(ValueError, match="expected metadata with 120 rows"):
        res.transform(F, metadata=meta.iloc[:10])
    with pytest.raises(ValueError, match="expected metadata columns"):
        res.transform(F, metadata=meta[["age", "site"]])
    with pytest.raises(NotFittedError):
        MetadataResidualizer().transform(F, metadata=meta)
    with pytest.raises(ValueError, match="nothing would be removed"):
        MetadataResidualizer(keep=["y", "site", "age"], keep_intercept=True).fit(F, metadata=meta)
    with pytest.raises(ValueError, match="ridge"):
        MetadataResidualizer(ridge=-1).fit(F, metadata=meta)
    for bad in (1, 0, 1.5):
        with pytest.raises(TypeError, match="standardize"):
            MetadataResidualizer(standardize=bad).fit(F, metadata=meta)
    with pytest.raises(ValueError, match="standardize column 'label' not found"):
        MetadataResidualizer(standardize=["label"]).fit(F, metadata=meta)
    with pytest.raises(ValueError, match="needs intercept=True"):
        MetadataResidualizer(intercept=False, keep_intercept=True).fit(F, metadata=meta)
    with pytest.raises(ValueError, match="keep column 'label' not found"):
        MetadataResidualizer(keep=["label"]).fit(F, metadata=meta)
    with pytest.raises(ValueError, match="n_samples = 2"):
        MetadataResidualizer().fit(F[:2], metadata=meta.iloc[:2])
    with pytest.raises(ValueError, match="NaN"):
        MetadataResidualizer().fit(np.where(F > 12, np.nan, F), metadata=meta)


def test_pandas_output_and_feature_names() -> None:
    F, meta = _data()
    meta = meta.set_axis(meta.index + 100)
    Fdf = pd.DataFrame(F, columns=[f"g{j}" for j in range(F.shape[1])], index=meta.index)
    res = MetadataResidualizer(keep=["y"]).set_output(transform="pandas")
    out = res.fit_transform(Fdf, metadata=meta)
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == list(Fdf.columns)
    assert (out.index == Fdf.index).all()
    np.testing.assert_array_equal(res.get_feature_names_out(), Fdf.columns)
    np.testing.assert_array_equal(res.feature_names_in_, Fdf.columns)
    assert res.n_metadata_in_ == 3
    assert list(res.metadata_names_in_) == ["y", "site", "age"]
    assert res.coef_.shape == (5, F.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out2 = res.transform(Fdf, metadata=meta[["site", "age"]])
    np.testing.assert_allclose(out2.to_numpy(), out.to_numpy())
