"""metanorm.integrations.anndata.regress_out against closed-form least squares (and scanpy)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest

ad = pytest.importorskip("anndata")
sp = pytest.importorskip("scipy.sparse")

from metanorm.integrations.anndata import regress_out  # noqa: E402


def _adata(n: int = 300, d: int = 25, seed: int = 0, sparse: bool = False):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    cell_type = rng.choice(["T", "B", "NK"], n, p=[0.5, 0.3, 0.2])
    # library size depends on the cell type: the two are correlated
    n_counts = rng.lognormal(8 + 0.4 * (cell_type == "B"), 0.3)
    mito = rng.uniform(0, 0.08, n)
    counts = rng.poisson(
        np.exp(
            0.5
            + np.outer(np.log(n_counts) - 8, rng.uniform(0.5, 1.5, d))
            + np.outer(cell_type == "B", rng.normal(size=d))
            + np.outer(mito * 10, rng.normal(size=d))
        )
    ).astype(np.float32)
    obs = pd.DataFrame(
        {
            "n_counts": n_counts,
            "percent_mito": mito,
            "cell_type": pd.Categorical(cell_type),
            "batch": pd.Categorical(rng.integers(0, 3, n)),  # integer categories
        },
        index=[f"cell{i}" for i in range(n)],
    )
    X = sp.csr_matrix(counts) if sparse else counts
    return ad.AnnData(X, obs=obs, layers={"raw": counts.copy()})


def _oracle(adata, columns: list[str], kept: list[str]) -> np.ndarray:  # type: ignore[no-untyped-def]
    """lstsq with [columns (one-hot, reference dropped), kept (one-hot), 1]; removes all but kept."""
    parts, roles = [], []
    for c in columns + kept:
        v = adata.obs[c]
        if isinstance(v.dtype, pd.CategoricalDtype):
            block = pd.get_dummies(v, drop_first=True).to_numpy(float)
        else:
            block = v.to_numpy(float)[:, None]
        parts.append(block)
        roles += [c in kept] * block.shape[1]
    D = np.column_stack([*parts, np.ones(adata.n_obs)])
    roles.append(False)
    X = adata.layers["raw"].astype(np.float64)
    beta = np.linalg.lstsq(D, X, rcond=None)[0]
    remove = ~np.array(roles)
    return X - D[:, remove] @ beta[remove]


@pytest.mark.parametrize("sparse", [False, True])
def test_matches_lstsq_with_and_without_a_kept_column(sparse: bool) -> None:
    base = _adata(sparse=sparse)
    sd = base.layers["raw"].std(0)
    for keys, keep in (
        (["n_counts", "percent_mito"], []),
        (["n_counts", "percent_mito"], ["cell_type"]),
        (["n_counts", "batch"], ["cell_type"]),  # categorical and continuous keys together
    ):
        adata = base.copy()
        assert regress_out(adata, keys, keep=keep) is None
        out = np.asarray(adata.X)
        assert out.dtype == np.float32 and not sp.issparse(adata.X)
        ref = _oracle(base, keys, keep)
        assert (np.abs(out - ref).max(0) / sd).max() < 1e-5
    # keeping the cell type keeps its differences: they differ from the version without keep
    kept = regress_out(base, ["n_counts"], keep="cell_type", copy=True)
    lost = regress_out(base, "n_counts", copy=True)
    is_b = (base.obs.cell_type == "B").to_numpy()
    gap_kept = np.abs(kept.X[is_b].mean(0) - kept.X[~is_b].mean(0)).mean()
    gap_lost = np.abs(lost.X[is_b].mean(0) - lost.X[~is_b].mean(0)).mean()
    gap_raw = np.abs(base.layers["raw"][is_b].mean(0) - base.layers["raw"][~is_b].mean(0)).mean()
    assert gap_lost < 0.8 * gap_kept and gap_kept > 0.5 * gap_raw


def test_copy_layer_and_errors() -> None:
    adata = _adata()
    before = np.asarray(adata.X).copy()
    out = regress_out(adata, ["n_counts"], copy=True)
    np.testing.assert_array_equal(adata.X, before)  # copy=True leaves adata alone
    regress_out(adata, ["n_counts"], layer="raw")
    np.testing.assert_array_equal(adata.X, before)
    np.testing.assert_allclose(adata.layers["raw"], out.X, atol=1e-4)
    # in place on a dense float32 X: the same buffer is overwritten
    buf = adata.X
    regress_out(adata, ["n_counts"])
    assert adata.X is buf or np.shares_memory(adata.X, buf)
    with pytest.raises(ValueError, match=r"keys \['age'\] not found in adata.obs"):
        regress_out(adata, ["age"])
    with pytest.raises(ValueError, match=r"in both keys and keep"):
        regress_out(adata, ["n_counts"], keep=["n_counts"])
    with pytest.raises(ValueError, match=r"layer 'spliced' not found"):
        regress_out(adata, "n_counts", layer="spliced")
    with pytest.raises(TypeError, match=r"expected an anndata\.AnnData"):
        regress_out(np.zeros((3, 3)), "n_counts")


@pytest.mark.skipif(importlib.util.find_spec("scanpy") is None, reason="needs scanpy")
def test_agrees_with_scanpy_regress_out() -> None:
    import scanpy as sc

    adata = _adata(n=400, d=30)
    theirs = sc.pp.regress_out(adata, ["n_counts", "percent_mito"], copy=True)
    ours = regress_out(adata, ["n_counts", "percent_mito"], copy=True)
    sd = adata.X.std(0)
    assert (np.abs(ours.X - theirs.X).max(0) / sd).max() <= 1e-5
