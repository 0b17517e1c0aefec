"""Inputs a new user passes: text and categorical metadata, codes, probabilities, small groups."""

import warnings

import dcor
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score

from metanorm.metrics import (
    balanced_accuracy,
    distance_correlation_sqr,
    distance_correlation_test,
    grouped_distance_correlation_sqr,
)


@pytest.fixture
def sites():
    rng = np.random.default_rng(0)
    site = rng.integers(0, 3, size=200)
    x = rng.normal(size=(200, 4)) + np.array([0.0, 1.0, 3.0])[site][:, None] * [1, 0, 0, 0]
    onehot = np.eye(3)[site]
    return x, site, onehot


def test_text_and_category_metadata_are_one_hot_coded(sites):
    x, site, onehot = sites
    want = dcor.u_distance_correlation_sqr(x, onehot)
    names = np.array(["siteA", "siteB", "siteC"])[site]
    for y in (names, list(names), pd.Series(names), pd.Series(names, dtype="category")):
        got = distance_correlation_sqr(x, y, unbiased=True)
        assert got == pytest.approx(want, rel=1e-9)
    # a category column with integer categories is categorical too
    cat = pd.Series(site, dtype="category")
    assert distance_correlation_sqr(x, cat, unbiased=True) == pytest.approx(want, rel=1e-9)


def test_integer_codes_warn_and_categorical_codes_them(sites):
    x, site, onehot = sites
    with pytest.warns(UserWarning, match="categorical=True"):
        as_numbers = distance_correlation_sqr(x, site, unbiased=True)
    assert as_numbers == pytest.approx(dcor.u_distance_correlation_sqr(x, site.astype(float)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        coded = distance_correlation_sqr(x, site, unbiased=True, categorical=True)
        assert distance_correlation_sqr(x, site, unbiased=True, categorical=False) == as_numbers
    assert coded == pytest.approx(dcor.u_distance_correlation_sqr(x, onehot), rel=1e-9)
    assert abs(coded - as_numbers) > 1e-3  # the reason for the warning
    # a DataFrame: a numeric column stays numeric, a text column is one-hot coded
    age = np.linspace(0, 1, 200)
    frame = pd.DataFrame({"age": age, "site": np.array(["a", "b", "c"])[site]})
    want = dcor.u_distance_correlation_sqr(x, np.column_stack([age, onehot]))
    assert distance_correlation_sqr(x, frame, unbiased=True) == pytest.approx(want, rel=1e-9)


def test_grouped_and_test_accept_text_metadata(sites):
    x, site, onehot = sites
    names = np.array(["a", "b", "c"])[site]
    cls = np.arange(200) % 2
    got = grouped_distance_correlation_sqr(x, names, cls, unbiased=True)
    for c in (0, 1):
        sel = cls == c
        want = dcor.u_distance_correlation_sqr(x[sel], onehot[sel])
        assert got[c] == pytest.approx(want, rel=1e-9)
    res = distance_correlation_test(x, names, num_permutations=19, random_state=0, unbiased=True)
    assert res.statistic == pytest.approx(dcor.u_distance_correlation_sqr(x, onehot), rel=1e-9)


def test_messages_name_the_metadata_argument():
    with pytest.raises(ValueError, match=r"y \(metadata\)"):
        distance_correlation_sqr(np.zeros((5, 2)), np.zeros(4), unbiased=False)
    with pytest.raises(TypeError, match="categorical"):
        distance_correlation_sqr(np.zeros((5, 2)), np.zeros(5), unbiased=False, categorical="yes")


def test_small_group_is_nan_with_a_warning_listing_it():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 3)), rng.normal(size=30)
    groups = np.array(["big"] * 25 + ["tiny"] * 3 + ["two"] * 2)
    with pytest.warns(UserWarning, match=r"'tiny' \(3 samples\), 'two' \(2 samples\)"):
        out = grouped_distance_correlation_sqr(x, y, groups, unbiased=True)
    assert np.isnan(out["tiny"]) and np.isnan(out["two"])
    assert out["big"] == pytest.approx(dcor.u_distance_correlation_sqr(x[:25], y[:25]), rel=1e-9)


def test_balanced_accuracy_refuses_probabilities_accepts_integral_floats():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, size=50)
    p = rng.random(50)
    with pytest.raises(ValueError, match="y_pred to hold class labels"):
        balanced_accuracy(y, p)
    with pytest.raises(ValueError, match="continuous"):
        balanced_accuracy_score(y, p)  # scikit-learn refuses them too
    hard = (p > 0.5).astype(np.float32)
    assert balanced_accuracy(y, hard) == pytest.approx(balanced_accuracy_score(y, hard))


def test_accumulating_metric_refuses_text_metadata():
    from metanorm.metrics import DistanceCorrelationSqr

    metric = DistanceCorrelationSqr(unbiased=True)
    with pytest.raises(TypeError, match="one-hot code them with the same levels"):
        metric.update(np.zeros((4, 2)), ["a", "b", "a", "c"])
