"""Bad input a new user might pass: each gets a clear ValueError/TypeError, never a wrong result.

One test per problem of issue 15 (what came before the fix is in each test's comment).
"""

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from metanorm.design import Design, DesignBuilder, make_design
from metanorm.linalg import fit_beta, inverse_gram
from metanorm.metrics import (
    balanced_accuracy,
    distance_correlation_sqr,
    group_accuracy,
    grouped_distance_correlation_sqr,
)
from metanorm.preprocessing import MetadataResidualizer


@pytest.mark.parametrize("dtype", [object, str])
def test_numeric_looking_column_with_a_few_strings(dtype):
    # was: silently one-hot coded (one column per distinct age)
    age = np.array([31, 45, "?", 52, "NA", 38, 61, 45], dtype=object).astype(dtype)
    with pytest.raises(ValueError, match=r"column 'age' looks numeric.*\['\?', 'NA'\]"):
        make_design({"age": age})
    # an explicit categorical is the user's choice: one column per level but the reference
    d = make_design({"age": age}, categorical=["age"])
    assert len(d.columns) == len(set(age.tolist())) - 1 + 1
    # numbers written as text are refused by name (codes or quantities: the user says which)
    with pytest.raises(ValueError, match=r"'site' holds numbers written as text.*pd.to_numeric"):
        make_design({"site": np.array(["1", "2", "1", "3"])})
    assert make_design({"site": np.array(["1", "2", "1", "3"])}, categorical=["site"]).columns == (
        "site=2",
        "site=3",
        "intercept",
    )
    # numbers in an object array are numbers (as scikit-learn reads them): one column
    ages = np.array([31, 45, 52.5, 38], dtype=object)
    d = make_design({"age": ages}, standardize=False)
    assert d.columns == ("age", "intercept")
    np.testing.assert_array_equal(d.matrix[:, 0], [31.0, 45.0, 52.5, 38.0])


def test_design_as_list_of_lists():
    rows = [[1.0, 2.0], [3.0, 5.0], [2.0, 1.0], [1.0, 1.0]]
    # was: AttributeError ('list' object has no attribute 'ndim')
    d = Design(rows, ("a", "b"))
    assert d.matrix.dtype == np.float64 and d.shape == (4, 2)
    with pytest.raises(TypeError, match="numeric design matrix"):
        Design([["a", "b"]], ("a", "b"))
    with pytest.raises(ValueError, match="2 columns"):
        Design([[1.0, 2.0, 3.0]], ("a", "b"))
    # the linear algebra and the design builder take nested lists too
    x = np.asarray(rows)
    np.testing.assert_allclose(inverse_gram(rows).numpy(), np.linalg.inv(x.T @ x), rtol=1e-10)
    assert make_design(rows).shape == (4, 3)


def test_zero_row_design():
    # was: only numpy's "Mean of empty slice" warnings, then NaN scales
    with pytest.raises(ValueError, match="at least one row"):
        make_design(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="at least one row"):
        DesignBuilder().fit({"a": np.zeros(0)})
    with pytest.raises(ValueError, match="at least one row"):
        inverse_gram(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="0 sample"):  # scikit-learn's check, in fit
        MetadataResidualizer().fit(np.zeros((0, 3)), metadata=np.zeros((0, 1)))


@pytest.mark.parametrize("scale", [1e160, 1e200, 1e300])
def test_design_with_huge_values(scale):
    x = np.array([[1.0, 1.0], [2.0, 1.0], [4.0, 1.0]])
    x[:, 0] *= scale
    # was: an IndexError (amax of an empty selection) or _LinAlgError from eigh
    with pytest.raises(ValueError, match=r"too large.*column 0 reaches"):
        inverse_gram(x)
    with pytest.raises(ValueError, match="too large"):
        fit_beta(x, np.ones((3, 1)))
    # standardising (the builder's default) is the cure the message names
    d = make_design({"v": x[:, 0]})
    assert np.isfinite(inverse_gram(d).numpy()).all()


def test_big_but_representable_values_still_work():
    # 1e100² = 1e200 fits in float64: the closed form still matches least squares
    x = np.array([[1e100, 1.0], [2e100, 1.0], [4e100, 1.0]])
    f = np.array([[1.0], [2.0], [5.0]])
    beta = fit_beta(x, f).numpy()
    ref = torch.linalg.lstsq(torch.tensor(x / [1e100, 1.0]), torch.tensor(f)).solution.numpy()
    np.testing.assert_allclose(beta * [[1e100], [1.0]], ref, rtol=1e-8)


def test_metadata_on_the_meta_device():
    meta = torch.zeros(6, 2, device="meta")
    # was: NotImplementedError ("Cannot copy out of meta tensor") / RuntimeError from .item()
    with pytest.raises(ValueError, match="meta device"):
        make_design(meta)
    with pytest.raises(ValueError, match="meta device"):
        make_design({"a": torch.zeros(6, device="meta")})
    with pytest.raises(ValueError, match="meta device"):
        inverse_gram(meta)
    with pytest.raises(ValueError, match="meta device"):
        distance_correlation_sqr(torch.randn(6, 2), meta)


def test_grouped_dcor_with_none_labels():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 2)), rng.normal(size=10)
    # was: TypeError "'<' not supported between instances of 'NoneType' and 'NoneType'"
    with pytest.raises(ValueError, match=r"groups without missing labels, got 5 None/NaN"):
        grouped_distance_correlation_sqr(x, y, np.array([None] * 5 + [1] * 5, dtype=object))
    with pytest.raises(ValueError, match="missing labels"):
        grouped_distance_correlation_sqr(x, y, ["a"] * 9 + [None])
    with pytest.raises(TypeError, match="all numbers or all text"):
        grouped_distance_correlation_sqr(x, y, np.array(["a"] * 5 + [1] * 5, dtype=object))


def test_balanced_accuracy_text_against_numbers():
    # was: 0.0 where scikit-learn raises
    with pytest.raises(ValueError):
        balanced_accuracy_score(np.array(["0", "1", "0", "1"]), np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"same type, got text .* and number"):
        balanced_accuracy(np.array(["0", "1", "0", "1"]), np.array([0, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"same type, got number .* and text"):
        balanced_accuracy([0, 1, 0, 1], ["0", "1", "0", "1"])
    with pytest.raises(ValueError, match="same type"):
        group_accuracy([0, 1], ["0", "1"], ["a", "b"])
    with pytest.raises(ValueError, match="missing labels"):
        balanced_accuracy([0, None, 1], [0, 1, 1])
    # same kinds still agree with scikit-learn
    t, p = ["a", "b", "b", "c"], ["a", "b", "c", "c"]
    assert balanced_accuracy(t, p) == pytest.approx(balanced_accuracy_score(t, p))
    assert balanced_accuracy([True, False, True], [True, True, True]) == pytest.approx(
        balanced_accuracy_score([True, False, True], [True, True, True])
    )
