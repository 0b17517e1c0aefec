"""Balanced and per-group accuracy against scikit-learn."""

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score

from metanorm.metrics import balanced_accuracy, group_accuracy


@pytest.mark.parametrize("adjusted", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_balanced_accuracy_matches_sklearn(seed, adjusted):
    rng = np.random.default_rng(seed)
    n, k = rng.integers(5, 200), rng.integers(2, 6)
    y_true = rng.integers(0, k, size=n)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, k, size=n))
    ref = balanced_accuracy_score(y_true, y_pred, adjusted=adjusted)
    assert balanced_accuracy(y_true, y_pred, adjusted=adjusted) == pytest.approx(ref, abs=1e-15)
    t = torch.from_numpy(y_true)
    assert balanced_accuracy(t, torch.from_numpy(y_pred), adjusted=adjusted) == pytest.approx(ref)


def test_class_missing_from_predictions():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 1, 0, 1]  # class 2 never predicted: recall 0
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(
        balanced_accuracy_score(y_true, y_pred)
    )
    assert balanced_accuracy(y_true, y_pred) == pytest.approx((1 + 0.5 + 0) / 3)


def test_predicted_class_missing_from_truth():
    y_true = [0, 0, 1, 1]
    y_pred = [0, 3, 1, 1]  # 3 is not a class: it only lowers the recall of class 0
    with pytest.warns(UserWarning):
        ref = balanced_accuracy_score(y_true, y_pred)
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(ref) == pytest.approx(0.75)


def test_string_labels_and_column_vectors():
    y_true = np.array(["cat", "dog", "dog", "cat", "bird"])
    y_pred = np.array(["cat", "dog", "cat", "cat", "dog"])
    ref = balanced_accuracy_score(y_true, y_pred)
    assert balanced_accuracy(list(y_true), list(y_pred)) == pytest.approx(ref)
    assert balanced_accuracy(y_true[:, None], y_pred[:, None]) == pytest.approx(ref)


def test_balanced_accuracy_errors():
    with pytest.raises(ValueError, match="same length"):
        balanced_accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="at least one sample"):
        balanced_accuracy([], [])
    with pytest.raises(ValueError, match="1-D"):
        balanced_accuracy(np.zeros((3, 2)), np.zeros((3, 2)))


def test_group_accuracy_equals_per_subset_accuracy():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, size=300)
    y_pred = np.where(rng.random(300) < 0.7, y_true, 1 - y_true)
    sites = np.array(["s1", "s2", "s3"])[rng.integers(0, 3, size=300)]
    out = group_accuracy(y_true, y_pred, sites)
    assert list(out) == ["s1", "s2", "s3"]
    for g, v in out.items():
        sel = sites == g
        assert v == pytest.approx(accuracy_score(y_true[sel], y_pred[sel]))
    shade = torch.from_numpy(rng.integers(1, 7, size=300))
    out = group_accuracy(torch.from_numpy(y_true), y_pred, shade)
    assert set(out) <= set(range(1, 7)) and all(isinstance(k, int) for k in out)
    for g, v in out.items():
        sel = shade.numpy() == g
        assert v == pytest.approx(accuracy_score(y_true[sel], y_pred[sel]))


def test_group_accuracy_errors():
    with pytest.raises(ValueError, match="3 entries"):
        group_accuracy([0, 1, 1], [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="finite"):
        group_accuracy([0, 1], [0, 1], [0.0, np.nan])
