"""Balanced accuracy and accuracy per metadata group."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np

from metanorm.metrics._inputs import as_labels, check_same_label_kind, label_key

__all__ = ["balanced_accuracy", "group_accuracy"]

#: Per class or group: (number of samples, number predicted correctly).
Counts = dict[Hashable, tuple[int, int]]


def _pair_labels(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t = as_labels(y_true, "y_true")
    p = as_labels(y_pred, "y_pred")
    if t.shape[0] != p.shape[0]:
        raise ValueError(
            f"expected y_true and y_pred to have the same length, got {t.shape[0]} and {p.shape[0]}"
        )
    check_same_label_kind(t, p, ("y_true", "y_pred"))
    for arr, name in ((t, "y_true"), (p, "y_pred")):
        _check_integral(arr, name)
    return t, p


def _check_integral(arr: np.ndarray, name: str) -> None:
    """Refuses float labels that are not whole numbers (scores or probabilities, not classes)."""
    if arr.dtype.kind != "f" or arr.size == 0:
        return
    frac = arr != np.round(arr)
    if frac.any():
        i = int(np.argmax(frac))
        raise ValueError(
            f"expected {name} to hold class labels, got non-integral values ({int(frac.sum())} "
            f"of {arr.size}, e.g. {arr[i]!r} at position {i}); for scores or probabilities pass "
            "the predicted classes, e.g. probs.argmax(1) or (p > 0.5).long()"
        )


def _hit_counts(key: np.ndarray, hit: np.ndarray) -> Counts:
    levels, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    hits = np.bincount(inverse.reshape(-1), weights=hit, minlength=len(levels))
    return {label_key(lv): (int(c), int(h)) for lv, c, h in zip(levels, counts, hits, strict=True)}


def class_counts(y_true: Any, y_pred: Any) -> Counts:
    """Per class of ``y_true``: (number of samples, number predicted correctly).

    Args:
        y_true: true labels, one per sample.
        y_pred: predicted labels, same length.

    Returns:
        ``{class: (count, hits)}``; sums over batches give the counts of the whole.
    """
    t, p = _pair_labels(y_true, y_pred)
    return _hit_counts(t, t == p)


def group_counts(y_true: Any, y_pred: Any, groups: Any) -> Counts:
    """Per group: (number of samples, number predicted correctly).

    Args:
        y_true: true labels, one per sample.
        y_pred: predicted labels, same length.
        groups: group of each sample, same length.

    Returns:
        ``{group: (count, hits)}``.
    """
    t, p = _pair_labels(y_true, y_pred)
    g = as_labels(groups, "groups", t.shape[0])
    return _hit_counts(g, t == p)


def balanced_accuracy_from_counts(counts: Counts, adjusted: bool = False) -> float:
    """Balanced accuracy from :func:`class_counts` (see :func:`balanced_accuracy`).

    Raises:
        ValueError: when ``counts`` is empty.
    """
    if not counts:
        raise ValueError("expected at least one sample to compute balanced accuracy, got none")
    recalls = [h / c for c, h in counts.values()]
    score = float(np.mean(recalls))
    if adjusted:
        chance = 1.0 / len(recalls)
        score = (score - chance) / (1.0 - chance) if chance < 1.0 else 0.0
    return score


def balanced_accuracy(y_true: Any, y_pred: Any, *, adjusted: bool = False) -> float:
    """Balanced accuracy: the mean over the classes of ``y_true`` of the per-class recall.

    Equals ``sklearn.metrics.balanced_accuracy_score``: classes that appear only in ``y_pred``
    do not count as classes (they only lower the recall of the true classes they were predicted
    for); a class never predicted has recall 0.

    Args:
        y_true: true labels, one per sample (numbers or strings; array, tensor or sequence).
        y_pred: predicted labels, same length.
        adjusted: rescale so that chance is 0 and perfect is 1, as scikit-learn's
            ``adjusted=True``. Default: ``False``.

    Returns:
        A float in [0, 1] (``adjusted=False``).

    Raises:
        ValueError: on empty input, a length mismatch, labels that are not 1-D, missing labels,
            non-integral float labels (probabilities or scores instead of classes; integral
            floats such as ``(p > 0.5).float()`` are fine), or text labels on one side and
            numbers on the other (as scikit-learn).

    Shape:
        - y_true: (n,) or (n, 1)
        - y_pred: (n,) or (n, 1)

    Examples::

        >>> from metanorm.metrics import balanced_accuracy
        >>> balanced_accuracy([0, 0, 0, 1], [0, 0, 1, 1])
        0.8333333333333333
    """
    return balanced_accuracy_from_counts(class_counts(y_true, y_pred), adjusted)


def group_accuracy(y_true: Any, y_pred: Any, groups: Any) -> dict[Any, float]:
    """Accuracy within each metadata group (per site, per shade bin): ``{group: accuracy}``.

    Args:
        y_true: true labels, one per sample.
        y_pred: predicted labels, same length.
        groups: group of each sample (numbers or strings), same length.

    Returns:
        ``{group: accuracy}`` with plain Python keys, in sorted order of the groups.

    Raises:
        ValueError: on a length mismatch or labels that are not 1-D.

    Shape:
        - y_true, y_pred, groups: (n,) or (n, 1)

    Examples::

        >>> from metanorm.metrics import group_accuracy
        >>> group_accuracy([1, 1, 0, 0], [1, 0, 0, 0], ["a", "a", "b", "b"])
        {'a': 0.5, 'b': 1.0}
    """
    return {g: h / c for g, (c, h) in group_counts(y_true, y_pred, groups).items()}
