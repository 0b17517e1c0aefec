"""Shared input checks: samples for dCor², labels for the accuracies and groups."""

import numpy as np
import pandas as pd
import pytest
import torch

from metanorm.metrics._inputs import as_labels, as_sample_pair, as_samples, label_key


def test_as_samples_shapes_and_dtype():
    assert as_samples([1, 2, 3], "x").shape == (3, 1)
    t = as_samples(np.zeros((4, 2, 3, 3), dtype=np.float32), "x")
    assert t.shape == (4, 18) and t.dtype == torch.float64
    with pytest.raises(ValueError, match="scalar"):
        as_samples(torch.tensor(1.0), "x")
    with pytest.raises(ValueError, match="at least one column"):
        as_samples(np.zeros((3, 0)), "x")
    with pytest.raises(ValueError, match="finite"):
        as_samples([1.0, np.inf], "x")
    with pytest.raises(TypeError, match="numeric"):
        as_samples(np.array(["a", "b"]), "x")


def test_as_sample_pair_device_and_rows():
    a, b = as_sample_pair(np.zeros(5), torch.zeros(5, 2))
    assert a.device == b.device and a.shape == (5, 1) and b.shape == (5, 2)
    with pytest.raises(ValueError, match="same number of rows"):
        as_sample_pair(np.zeros(5), np.zeros(4))


def test_as_labels():
    assert as_labels(torch.tensor([1, 0]), "y").tolist() == [1, 0]
    assert as_labels(pd.Series(["a", "b"]), "y").dtype.kind == "U"
    assert as_labels(np.array([[1], [2]]), "y").tolist() == [1, 2]
    assert as_labels(np.array(["a", "b"], dtype=object), "y").dtype.kind == "U"
    with pytest.raises(ValueError, match="1-D"):
        as_labels(np.zeros((2, 2)), "y")
    with pytest.raises(ValueError, match="3 entries"):
        as_labels([0, 1], "groups", 3)
    with pytest.raises(ValueError, match="finite"):
        as_labels([0.0, np.nan], "groups")


def test_label_key_is_a_plain_python_value():
    keys = [label_key(v) for v in np.array([3, 4])]
    assert keys == [3, 4] and all(type(k) is int for k in keys)
    assert type(label_key(np.array(["s"])[0])) is str
    assert label_key("plain") == "plain"
