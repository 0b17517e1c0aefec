"""MetadataResidualizer without copies, on sparse input, and without silent traps."""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from metanorm.preprocessing import MetadataResidualizer


def _counts(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """float32 features with a large mean (counts-like), two continuous covariates, a batch."""
    rng = np.random.default_rng(seed)
    meta = pd.DataFrame(
        {
            "n_counts": rng.lognormal(8, 0.5, n),
            "percent_mito": rng.uniform(0, 0.1, n),
            "batch": pd.Categorical(rng.integers(0, 4, n)),
        }
    )
    X = (
        50
        + rng.normal(size=(n, d))
        + np.outer(np.log(meta.n_counts), rng.normal(size=d))
        + np.outer(meta.percent_mito * 30, rng.normal(size=d))
        + rng.normal(size=(4, d))[meta.batch.cat.codes]
    ).astype(np.float32)
    return X, meta


def _lstsq(X: np.ndarray, design: np.ndarray, remove: np.ndarray) -> np.ndarray:
    beta = np.linalg.lstsq(design, X.astype(np.float64), rcond=None)[0]
    return X.astype(np.float64) - design[:, remove] @ beta[remove]


def test_float32_agrees_with_float64_lstsq_and_stays_float32() -> None:
    X, meta = _counts(3000, 40)
    res = MetadataResidualizer()
    out = res.fit_transform(X, metadata=meta)
    assert out.dtype == np.float32 and out.shape == X.shape
    design = res.design_builder_.transform(meta).matrix
    ref = _lstsq(X, design, res.remove_mask_)
    sd = X.astype(np.float64).std(0)
    # β from float64 products: the only float32 rounding is the output's (mean/sd ≈ 50 here)
    assert (np.abs(out - ref).max(0) / sd).max() <= 1e-5
    np.testing.assert_allclose(res.transform(X, metadata=meta), out, rtol=0, atol=1e-5)
    # the same β as from a float64 copy of X
    np.testing.assert_allclose(
        MetadataResidualizer().fit(X.astype(np.float64), metadata=meta).coef_,
        res.coef_,
        rtol=1e-10,
        atol=1e-10 * np.abs(res.coef_).max(),
    )


def test_memory_beyond_input_and_output_is_small() -> None:
    X, meta = _counts(20000, 200)  # 16 MB of float32
    res = MetadataResidualizer(columns=["n_counts", "percent_mito"])
    res.fit_transform(X[:100], metadata=meta[:100])  # imports and caches first
    tracemalloc.start()
    try:
        out = res.fit_transform(X, metadata=meta)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        res.transform(X, metadata=meta)
        _, peak_transform = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (peak - out.nbytes) <= 0.5 * X.nbytes, (peak - out.nbytes) / X.nbytes
    assert (peak_transform - before - out.nbytes) <= 0.5 * X.nbytes
    # in place: no output allocation at all
    Xc = X.copy()
    tracemalloc.start()
    try:
        same = MetadataResidualizer(copy=False).fit_transform(Xc, metadata=meta)
        _, peak_inplace = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert same is Xc and peak_inplace <= 0.5 * X.nbytes
    np.testing.assert_allclose(
        Xc, MetadataResidualizer().fit_transform(X, metadata=meta), atol=1e-4
    )


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_sparse_input_gives_the_dense_result(fmt: str) -> None:
    rng = np.random.default_rng(1)
    dense = rng.poisson(0.3, size=(400, 30)).astype(np.float64)
    meta = pd.DataFrame({"depth": rng.normal(size=400), "batch": rng.choice(["a", "b"], 400)})
    X = sp.random_array((400, 30), density=0.0, format=fmt) + sp.csr_array(dense)
    X = X.asformat(fmt)
    res = MetadataResidualizer(keep_intercept=True)
    out = res.fit_transform(X, metadata=meta)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(
        out,
        MetadataResidualizer(keep_intercept=True).fit_transform(dense, metadata=meta),
        atol=1e-12,
    )
    np.testing.assert_allclose(res.transform(X, metadata=meta), out, atol=1e-12)
    # float32 sparse stays float32
    out32 = MetadataResidualizer().fit_transform(X.astype(np.float32), metadata=meta)
    assert out32.dtype == np.float32
    bad = X.astype(np.float64).tocsr()
    bad.data[3] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        MetadataResidualizer().fit(bad, metadata=meta)


def test_non_finite_features_are_named_without_a_copy() -> None:
    X, meta = _counts(500, 10)
    X[123, 4] = np.nan
    for kw in ({}, {"intercept": False}):
        with pytest.raises(ValueError, match=r"got nan in X at row 123, column 4"):
            MetadataResidualizer(**kw).fit(X, metadata=meta)
    X[123, 4] = 0
    res = MetadataResidualizer().fit(X, metadata=meta)
    X[7, 2] = np.inf
    with pytest.raises(ValueError, match=r"got inf in X at row 7, column 2"):
        res.transform(X, metadata=meta)


def test_category_dtype_with_integer_categories_removes_each_batch() -> None:
    # was: the integer categories were one continuous column; per-batch offsets remained
    X, meta = _counts(800, 12)
    out = MetadataResidualizer().fit_transform(X, metadata=meta)
    assert any(
        c.startswith("batch=") for c in MetadataResidualizer().fit(X, metadata=meta).design_columns_
    )
    offsets = pd.DataFrame(out).groupby(meta.batch.to_numpy()).mean().abs().to_numpy().max()
    assert offsets < 1e-4


def test_columns_select_and_a_whole_table_warns_once() -> None:
    X, meta = _counts(300, 5)
    table = meta.assign(
        cell_type=np.repeat(["t", "b", "nk"], 100), donor=np.repeat(["d1", "d2"], 150)
    )
    with pytest.warns(
        UserWarning, match=r"every one of the 5 metadata columns \['n_counts'"
    ) as rec:
        MetadataResidualizer(keep=["cell_type"]).fit(X, metadata=table)
    assert len([w for w in rec if "every one" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = MetadataResidualizer(columns=["n_counts", "percent_mito"], keep=["cell_type"])
        out = res.fit_transform(X, metadata=table)
        # at transform the kept column may be absent, other columns are ignored
        np.testing.assert_allclose(
            res.transform(X, metadata=table.drop(columns="cell_type")), out, atol=1e-4
        )
    assert res.design_columns_ == (
        "n_counts",
        "percent_mito",
        "cell_type=nk",
        "cell_type=t",
        "intercept",
    )
    with pytest.raises(ValueError, match=r"columns entry 'age' not found"):
        MetadataResidualizer(columns=["age"]).fit(X, metadata=table)
    # positions, on an array
    arr = table[["n_counts", "percent_mito"]].to_numpy()
    by_pos = MetadataResidualizer(columns=[0, 1]).fit_transform(
        X, metadata=np.column_stack([arr, arr[:, :1] * 0 + 3])
    )
    np.testing.assert_allclose(
        by_pos, MetadataResidualizer().fit_transform(X, metadata=arr), atol=1e-4
    )


def test_pandas_indexes_are_aligned_or_refused() -> None:
    X, meta = _counts(200, 6)
    Xdf = pd.DataFrame(X, index=[f"cell{i}" for i in range(200)])
    meta.index = Xdf.index
    ref = MetadataResidualizer().fit_transform(Xdf, metadata=meta)
    shuffled = meta.sample(frac=1.0, random_state=0)
    np.testing.assert_allclose(
        MetadataResidualizer().fit_transform(Xdf, metadata=shuffled), ref, atol=1e-5
    )
    res = MetadataResidualizer().fit(Xdf, metadata=shuffled)
    np.testing.assert_allclose(res.transform(Xdf, metadata=shuffled), ref, atol=1e-5)
    with pytest.raises(ValueError, match=r"indexes differ in fit.*cell0"):
        MetadataResidualizer().fit(Xdf, metadata=meta.reset_index(drop=True))
    with pytest.raises(ValueError, match=r"indexes differ in transform"):
        res.transform(Xdf, metadata=meta.set_axis(meta.index + "_x"))


def test_a_metadata_column_named_intercept_is_refused() -> None:
    X, meta = _counts(100, 3)
    with pytest.raises(ValueError, match=r"named 'intercept'.*rename it"):
        MetadataResidualizer().fit(X, metadata=meta.rename(columns={"n_counts": "intercept"}))
