"""The design builder's typing rules: no column type is guessed silently."""

import warnings

import numpy as np
import pandas as pd
import pytest

from metanorm.design import DesignBuilder, make_design


def test_category_dtype_with_integer_categories_is_one_hot_coded() -> None:
    # was: the integers came out of the categorical as numbers, one continuous column
    site = pd.Series(pd.Categorical([1, 2, 3, 1, 2, 3, 1, 2]))
    df = pd.DataFrame({"site": site, "age": np.linspace(20, 60, 8)})
    d = make_design(df)
    assert d.columns == ("site=2", "site=3", "age", "intercept")
    np.testing.assert_array_equal(d.matrix[:, 0], (site == 2).astype(float))
    # also when categorical= is given and does not list it, and in a mapping of Series
    assert make_design(df, categorical=[]).columns == d.columns
    assert make_design({"site": site}).columns == ("site=2", "site=3", "intercept")
    # float categories too; new rows are matched on the category values
    b = DesignBuilder().fit(pd.DataFrame({"s": pd.Categorical([0.5, 1.5, 0.5, 1.5])}))
    assert b.columns == ("s=1.5", "intercept")
    np.testing.assert_array_equal(b.transform({"s": np.array([1.5, 0.5])}).matrix[:, 0], [1, 0])


def test_identifier_column_is_refused_unless_named() -> None:
    n = 60
    df = pd.DataFrame(
        {
            "subject_id": [f"sub-{i // 2:03d}" for i in range(n)],  # 30 levels, two visits each
            "site": np.repeat(["a", "b", "c"], n // 3),
            "y": np.arange(n) % 2,
        }
    )
    with pytest.raises(ValueError, match=r"'subject_id' has 30 distinct values in 60 rows") as e:
        make_design(df, keep=["y"])
    assert "categorical=" in str(e.value) and "identifier" in str(e.value)
    # more than 50 levels: refused whatever N
    big = pd.DataFrame({"code": [f"c{i % 51}" for i in range(1000)]})
    with pytest.raises(ValueError, match=r"'code' has 51 distinct values in 1000 rows"):
        make_design(big)
    assert len(make_design(big, categorical=["code"]).columns) == 51
    # named: accepted (the user says it is a factor)
    d = make_design(df, keep=["y"], categorical=["subject_id", "site"])
    assert len(d.columns) == 1 + 29 + 2 + 1
    # the limit: more than 50, or two rows or fewer per level; 29 levels in 60 rows pass
    ok = pd.DataFrame({"g": [f"g{i % 29}" for i in range(60)]})
    assert len(make_design(ok).columns) == 29
    with pytest.raises(ValueError, match="'g' has 30 distinct"):
        make_design(pd.DataFrame({"g": [f"g{i % 30}" for i in range(60)]}))


def test_integer_codes_warn_once_and_categorical_silences() -> None:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "site": rng.integers(0, 3, 40),  # 3 codes: suspicious
            "scanner": rng.integers(1, 6, 40),  # 5 codes: suspicious
            "y": rng.integers(0, 2, 40),  # binary: fine
            "count": rng.integers(0, 1000, 40),  # many values: a count, fine
        }
    )
    with pytest.warns(UserWarning, match=r"\['site', 'scanner'\].*categorical=") as rec:
        d = make_design(df, keep=["y"])
    assert len([w for w in rec if issubclass(w.category, UserWarning)]) == 1
    assert d.columns == ("site", "scanner", "y", "count", "intercept")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = make_design(df, keep=["y"], categorical=["site", "scanner"])
        make_design(df, keep=["y"], categorical=[])  # all continuous, on purpose
    assert d.columns[:6] == ("site=1", "site=2", "scanner=2", "scanner=3", "scanner=4", "scanner=5")
    # integers in an object column are integers too
    with pytest.warns(UserWarning, match=r"\['s'\]"):
        make_design({"s": np.array([0, 1, 2, 0, 1, 2], dtype=object)})


def test_numbers_written_as_text_are_refused_by_name() -> None:
    df = pd.DataFrame({"site": ["007", "012", "007", "031"], "age": [30.0, 40, 50, 60]})
    with pytest.raises(ValueError, match=r"'site' holds numbers written as text") as e:
        make_design(df)
    assert "pd.to_numeric" in str(e.value) and "categorical=" in str(e.value)
    # as codes: the zero padding survives
    d = make_design(df, categorical=["site"])
    assert d.columns == ("site=012", "site=031", "age", "intercept")
    # with categorical= given and the column not in it: a TypeError that says the same
    ages = pd.DataFrame({"age": ["30", "40", "50"], "site": ["a", "b", "a"]})
    with pytest.raises(TypeError, match=r"'age' is not numeric.*pd.to_numeric"):
        make_design(ages, categorical=["site"])


def test_a_metadata_column_named_intercept_is_refused() -> None:
    df = pd.DataFrame({"intercept": [1.0, 2.0, 3.0], "age": [3.0, 1.0, 2.0]})
    with pytest.raises(ValueError, match=r"named 'intercept'.*rename it"):
        make_design(df)
    # without the builder's intercept the name is free
    assert make_design(df, intercept=False).columns == ("intercept", "age")


def test_handle_unknown_is_validated() -> None:
    with pytest.raises(
        ValueError, match=r"handle_unknown to be one of \('error', 'mean', 'ignore'\)"
    ):
        DesignBuilder(handle_unknown="infrequent_if_exist")
