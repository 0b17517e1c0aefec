"""DesignBuilder.transform(ignore_keep=True): design rows for removal without labels."""

from __future__ import annotations

import numpy as np
import pytest

from metanorm.design import DesignBuilder


def _meta() -> dict[str, np.ndarray]:
    return {
        "y": np.array([0, 1, 1, 0, 1]),
        "site": np.array(["a", "b", "c", "a", "b"]),
        "age": np.array([30.0, 40.0, 50.0, 60.0, 45.0]),
    }


def test_kept_columns_may_be_left_out_or_are_ignored() -> None:
    b = DesignBuilder(keep=["y"], categorical=["site"]).fit(_meta())
    full = b.transform(_meta())
    assert b.keep_columns == ("y",)
    assert b.input_kinds == {"y": "continuous", "site": "categorical", "age": "continuous"}
    expected = full.matrix.copy()
    expected[:, list(full.keep)] = 0.0
    meta = _meta()
    without = b.transform({"site": meta["site"], "age": meta["age"]}, ignore_keep=True)
    np.testing.assert_array_equal(without.matrix, expected)
    assert without.columns == full.columns and without.keep == full.keep
    ignored = b.transform({**meta, "y": np.full(5, np.nan)}, ignore_keep=True)
    np.testing.assert_array_equal(ignored.matrix, expected)
    # positional arrays: full width, or the removed columns only
    arr_b = DesignBuilder(keep=[0], categorical=[1]).fit(
        np.column_stack([meta["y"], [0, 1, 2, 0, 1], meta["age"]])
    )
    np.testing.assert_array_equal(
        arr_b.transform(np.column_stack([[0, 1, 2, 0, 1], meta["age"]]), ignore_keep=True).matrix,
        arr_b.transform(
            np.column_stack([np.zeros(5), [0, 1, 2, 0, 1], meta["age"]]), ignore_keep=True
        ).matrix,
    )


def test_without_ignore_keep_the_label_is_required() -> None:
    b = DesignBuilder(keep=["y"], categorical=["site"]).fit(_meta())
    meta = _meta()
    with pytest.raises(ValueError, match="expected metadata columns"):
        b.transform({"site": meta["site"], "age": meta["age"]})
    with pytest.raises(ValueError, match=r"or \['site', 'age'\]: the kept columns \['y'\]"):
        b.transform({"age": meta["age"]}, ignore_keep=True)


def test_pandas_missing_markers_are_missing() -> None:
    pd = pytest.importorskip("pandas")
    for values in (
        pd.array(["a", None, "b"], dtype="string"),  # pd.NA
        pd.array([1, None, 3], dtype="Int64"),
        np.array(["a", np.float32("nan"), "b"], dtype=object),
    ):
        with pytest.raises(ValueError, match="1 missing"):
            DesignBuilder().fit(pd.DataFrame({"m": values}))
