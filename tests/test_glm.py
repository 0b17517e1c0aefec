"""The GLM core: design builder, kernel, batch statistics."""

import numpy as np
import pandas as pd
import pytest
import torch

from metanorm import glm
from metanorm.glm import DesignBuilder, make_design


def test_builder_codes_categorical_and_continuous():
    data = pd.DataFrame(
        {
            "y": [0, 1, 1, 0, 1, 0],
            "site": ["b", "a", "c", "a", "b", "c"],
            "age": [20.0, 30.0, 40.0, 50.0, 60.0, 70.0],
        }
    )
    b = DesignBuilder(keep=["y"])
    d = b.fit_transform(data)
    assert d.columns == ("y", "site=b", "site=c", "age", "intercept")
    assert d.keep == (0,) and d.remove == (1, 2, 3, 4)
    m = d.matrix
    np.testing.assert_array_equal(m[:, 1], [1, 0, 0, 0, 1, 0])  # "a" is the reference level
    np.testing.assert_array_equal(m[:, 2], [0, 0, 1, 0, 0, 1])
    np.testing.assert_allclose(m[:, 3].mean(), 0, atol=1e-12)
    np.testing.assert_allclose(m[:, 3].std(), 1)
    np.testing.assert_allclose(m[:, 0], (data.y - data.y.mean()) / data.y.std(ddof=0))
    np.testing.assert_array_equal(m[:, 4], 1)
    # new rows use the training levels, mean and scale
    new = b.transform(pd.DataFrame({"y": [1], "site": ["c"], "age": [45.0]}))
    np.testing.assert_allclose(new.matrix[0, 1:4], [0, 1, (45 - 45) / np.std(data.age)])


def test_builder_without_intercept_codes_all_levels_of_first_categorical():
    d = make_design(
        {"s": np.array(["a", "b", "a"]), "t": np.array(["x", "y", "y"])},
        intercept=False,
    )
    assert d.columns == ("s=a", "s=b", "t=y")


def test_builder_plain_matrix_and_numeric_categorical():
    x = np.array([[0, 1.5], [1, 2.5], [2, 3.5], [1, 0.5]])
    d = make_design(x, categorical=[0], keep=[1], standardize=False)
    assert d.columns == ("x0=1.0", "x0=2.0", "x1", "intercept")
    assert d.keep == (2,)
    np.testing.assert_array_equal(d.matrix[:, 2], x[:, 1])


def test_keep_intercept_and_categorical_keep():
    d = make_design({"g": np.array(["a", "b", "c", "a"])}, keep=["g"], keep_intercept=True)
    assert d.keep == (0, 1, 2)


@pytest.mark.parametrize(
    ("fit", "new", "err", "match"),
    [
        ({"site": ["a", "b"]}, {"site": ["a", "z"]}, ValueError, r"level\(s\) \['z'\] not seen"),
        ({"age": [1.0, 2.0]}, {"age": [1.0, np.nan]}, ValueError, "1 missing"),
        (
            {"age": [1.0, 2.0]},
            {"aged": [1.0, 2.0]},
            ValueError,
            r"expected metadata columns \['age'\]",
        ),
    ],
)
def test_builder_transform_errors(fit, new, err, match):
    b = DesignBuilder().fit({k: np.array(v) for k, v in fit.items()})
    with pytest.raises(err, match=match):
        b.transform({k: np.array(v) for k, v in new.items()})


def test_builder_fit_errors():
    with pytest.raises(ValueError, match="'age' has 1 missing"):
        make_design({"age": np.array([1.0, np.nan, 3.0])})
    with pytest.raises(ValueError, match="keep column 'label' not found"):
        make_design({"age": np.array([1.0, 2.0])}, keep=["label"])
    with pytest.raises(ValueError, match="has 3 rows, expected 2"):
        make_design({"a": np.array([1.0, 2.0]), "b": np.array([1.0, 2.0, 3.0])})
    with pytest.raises(RuntimeError, match="not fitted"):
        DesignBuilder().transform({"a": np.array([1.0])})


def test_kernel_is_float64_inverse(rng):
    x = rng.normal(size=(50, 4)).astype(np.float32)
    k = glm.glm_kernel(x)
    assert k.dtype == torch.float64
    xd = x.astype(np.float64)
    np.testing.assert_allclose(k.numpy(), np.linalg.inv(xd.T @ xd), rtol=1e-10)


def test_kernel_names_collinear_columns(rng):
    n = 40
    site = rng.choice(["a", "b"], n)
    d = make_design({"site": site, "dup": (site == "b").astype(float), "age": rng.normal(size=n)})
    with pytest.raises(
        ValueError, match=r"columns 'site=b', 'dup', 'intercept' are \(nearly\) collinear"
    ):
        glm.glm_kernel(d)
    with pytest.raises(ValueError, match="'x' is all zeros"):
        glm.glm_kernel(np.c_[np.zeros(5), np.ones(5)], columns=["x", "one"])
    with pytest.raises(ValueError, match=r"N = 2 rows for K = 3 columns"):
        glm.glm_kernel(rng.normal(size=(2, 3)))
    k = glm.glm_kernel(d, ridge=0.5)
    np.testing.assert_allclose(
        k.numpy(), np.linalg.inv(d.matrix.T @ d.matrix + 0.5 * np.eye(4)), rtol=1e-10
    )
    with pytest.raises(ValueError, match="non-negative"):
        glm.glm_kernel(d, ridge=-1)


def test_statistics_summed_over_shards_give_one_big_batch(rng):
    x = rng.normal(size=(90, 3))
    f = rng.normal(size=(90, 5))
    xt, ft = torch.tensor(x), torch.tensor(f)
    kernel = glm.glm_kernel(x)
    whole = glm.beta_from_statistics(kernel, glm.batch_statistics(xt[:60], ft[:60]), 60, 90)
    shards = [glm.batch_statistics(xt[i : i + 20], ft[i : i + 20]) for i in (0, 20, 40)]
    summed = glm.beta_from_statistics(kernel, sum(shards), 60, 90)
    torch.testing.assert_close(summed, whole, atol=1e-12, rtol=0)
    # and a full pass is the least-squares β
    full = glm.beta_from_statistics(kernel, glm.batch_statistics(xt, ft), 90, 90)
    np.testing.assert_allclose(full.numpy(), np.linalg.lstsq(x, f, rcond=None)[0], atol=1e-12)
    np.testing.assert_allclose(glm.fit_beta(x, f).numpy(), full.numpy(), atol=1e-12)


def test_fit_beta_errors(rng):
    with pytest.raises(ValueError, match="expected features with 10 rows"):
        glm.fit_beta(rng.normal(size=(10, 2)), rng.normal(size=(9, 3)))
    with pytest.raises(ValueError, match="expected features to be finite"):
        glm.fit_beta(rng.normal(size=(10, 2)), np.full((10, 3), np.nan))
    with pytest.raises(TypeError, match="numeric"):
        glm.fit_beta(rng.normal(size=(10, 2)), np.array([["a"] * 3] * 10))
