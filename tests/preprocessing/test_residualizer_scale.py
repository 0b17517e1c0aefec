"""MetadataResidualizer(scale=True): ComBat without empirical Bayes, as a transformer.

Oracles: neuroCombat (``eb=False``, one-hot sites; the ``compare`` extra, skipped when
missing), each level's residual variance (numpy), and a large-sample recovery of a log-linear
scale effect of a continuous column.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from metanorm.preprocessing import MetadataResidualizer


def _sites(seed: int = 0, sizes=(100, 80, 120), d: int = 6):
    rng = np.random.default_rng(seed)
    site = np.repeat(np.array(["a", "b", "c"]), sizes)
    loc = {"a": 0.0, "b": 2.0, "c": -1.0}
    sd = {"a": 1.0, "b": 2.5, "c": 0.5}
    shift = np.array([loc[s] for s in site])[:, None] * rng.normal(1, 0.2, d)
    scale = np.array([sd[s] for s in site])[:, None] ** rng.uniform(0.5, 1.5, d)
    x = 3.0 + shift + scale * rng.normal(size=(len(site), d))
    return x, pd.DataFrame({"site": site})


def test_equals_neurocombat_without_empirical_bayes_up_to_an_affine_map_per_feature():
    neuro = pytest.importorskip("neuroCombat")
    x, meta = _sites()
    got = MetadataResidualizer(scale=True).fit_transform(x, metadata=meta)
    want = neuro.neuroCombat(dat=x.T, covars=meta, batch_col="site", eb=False)["data"].T
    for j in range(x.shape[1]):
        a = np.column_stack([got[:, j], np.ones(len(x))])
        coef, *_ = np.linalg.lstsq(a, want[:, j], rcond=None)
        assert coef[0] > 0
        np.testing.assert_allclose(a @ coef, want[:, j], atol=1e-9 * np.abs(want[:, j]).max())


def test_scale_is_each_sites_residual_variance_with_n_minus_one():
    x, meta = _sites(seed=1)
    res = MetadataResidualizer(scale=True).fit(x, metadata=meta)
    out = res.transform(x, metadata=meta)
    site = meta["site"].to_numpy()
    var = {s: x[site == s].var(axis=0, ddof=1) for s in "abc"}
    # site=b and site=c columns: half the log ratio of their variance to the reference's
    cols = list(res.design_columns_)
    for s in "bc":
        np.testing.assert_allclose(
            res.scale_coef_[cols.index(f"site={s}")], 0.5 * np.log(var[s] / var["a"]), atol=1e-9
        )
    # the output has every site's mean 0 and the reference site's sd
    for s in "abc":
        np.testing.assert_allclose(out[site == s].mean(axis=0), 0.0, atol=1e-9)
        np.testing.assert_allclose(out[site == s].var(axis=0, ddof=1), var["a"], rtol=1e-9)


def test_continuous_scale_effect_is_recovered_and_labels_are_not_read_at_transform():
    rng = np.random.default_rng(3)
    n = 20000
    age = rng.uniform(-1, 1, n)
    y = rng.integers(0, 2, n)
    x = (1.0 + y)[:, None] + np.exp(0.6 * age)[:, None] * rng.normal(size=(n, 3))
    meta = pd.DataFrame({"age": age, "y": y})
    res = MetadataResidualizer(keep=["y"], standardize=False, scale=True).fit(x, metadata=meta)
    # γ of age: 0.6 (its sd here about 0.012; bar 0.06)
    np.testing.assert_allclose(
        res.scale_coef_[list(res.design_columns_).index("age")], 0.6, atol=0.06
    )
    assert not res.scale_mask_[list(res.design_columns_).index("intercept")]
    out = res.transform(x, metadata=meta)
    np.testing.assert_array_equal(out, res.transform(x, metadata=meta[["age"]]))
    young, old = age < -0.5, age > 0.5
    ratio = out[old & (y == 0)].std(axis=0) / out[young & (y == 0)].std(axis=0)
    np.testing.assert_allclose(ratio, 1.0, atol=0.08)


def test_scale_refuses_sparse_input_and_a_non_bool():
    sparse = pytest.importorskip("scipy.sparse")
    x, meta = _sites()
    with pytest.raises(TypeError, match="dense X"):
        MetadataResidualizer(scale=True).fit(sparse.csr_matrix(x), metadata=meta)
    with pytest.raises(TypeError, match="scale to be a bool"):
        MetadataResidualizer(scale=1).fit(x, metadata=meta)
