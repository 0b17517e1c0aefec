"""Design coding: one-hot levels, standardisation, roles, errors."""

import numpy as np
import pandas as pd
import pytest

from metanorm.design import DesignBuilder, make_design


def test_builder_codes_categorical_and_continuous():
    data = pd.DataFrame(
        {
            "y": [0, 1, 1, 0, 1, 0],
            "site": ["b", "a", "c", "a", "b", "c"],
            "age": [20.0, 30.0, 40.0, 50.0, 60.0, 70.0],
        }
    )
    b = DesignBuilder(keep=["y"], categorical=["site"])
    d = b.fit_transform(data)
    assert d.columns == ("y", "site=b", "site=c", "age", "intercept")
    assert d.keep == (0,) and d.remove == (1, 2, 3, 4)
    m = d.matrix
    np.testing.assert_array_equal(m[:, 1], [1, 0, 0, 0, 1, 0])  # "a" is the reference level
    np.testing.assert_array_equal(m[:, 2], [0, 0, 1, 0, 0, 1])
    np.testing.assert_allclose(m[:, 3].mean(), 0, atol=1e-12)
    np.testing.assert_allclose(m[:, 3].std(), 1)
    np.testing.assert_array_equal(m[:, 0], data.y)  # the kept label is coded raw by default
    np.testing.assert_array_equal(m[:, 4], 1)
    # a kept column is standardised only when named
    named = DesignBuilder(keep=["y"], categorical=["site"], standardize=["y"])
    named = named.fit_transform(data).matrix
    np.testing.assert_allclose(named[:, 0], (data.y - data.y.mean()) / data.y.std(ddof=0))
    np.testing.assert_array_equal(named[:, 3], data.age)
    by_position = make_design(data, keep=["y"], categorical=[1], standardize=[2]).matrix
    np.testing.assert_allclose(by_position[:, 3], m[:, 3])
    np.testing.assert_array_equal(by_position[:, 0], data.y)
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
    d = make_design(
        {"g": np.array(["a", "b", "c", "a"])}, keep=["g"], categorical=["g"], keep_intercept=True
    )
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
