"""Input checks shared by the metrics: samples for dCor², labels for the accuracies and groups."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metanorm._validation import as_float_tensor, check_finite, describe

__all__ = [
    "as_labels",
    "as_sample_pair",
    "as_samples",
    "check_same_label_kind",
    "label_key",
    "label_kind",
]


def as_samples(x: Any, name: str, device: torch.device | str | None = None) -> Tensor:
    r"""Converts one variable to a float64 ``(n, p)`` tensor of samples, one row per sample.

    Args:
        x: numpy array, tensor or nested sequence of numbers.
        name: the argument's name, for error messages.
        device: where to put the result. Default: where ``x`` is (the CPU for non-tensors).

    Returns:
        A float64 tensor: a vector becomes one column, trailing dimensions are flattened.

    Raises:
        ValueError: for a scalar, zero columns, or NaN/inf values.
        TypeError: for non-numeric input.

    Shape:
        - x: (n,), (n, p) or (n, \*)
        - Output: (n, 1), (n, p) or (n, prod(\*))
    """
    t = as_float_tensor(x, name, dtype=torch.float64, device=device)
    if t.dim() == 0:
        raise ValueError(f"expected {name} of shape (n,) or (n, p), got a scalar ({describe(x)})")
    if t.dim() == 1:
        t = t.unsqueeze(1)
    elif t.dim() > 2:
        t = t.reshape(t.shape[0], -1)
    if t.shape[1] == 0:
        raise ValueError(f"expected {name} to have at least one column, got {describe(x)}")
    check_finite(t, name)
    return t


def as_sample_pair(
    x: Any, y: Any, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Checks a pair of variables observed on the same samples (see :func:`as_samples`).

    Args:
        x: the first variable.
        y: the second variable, same number of rows.
        device: where to put both. Default: the device of ``x`` when it is a tensor, else that of
            ``y`` when it is one, else the CPU.

    Returns:
        float64 tensors ``(n, p)`` and ``(n, q)`` on one device.

    Raises:
        ValueError: as :func:`as_samples`, or when the row counts differ.
    """
    if device is None:
        if isinstance(x, Tensor):
            device = x.device
        elif isinstance(y, Tensor):
            device = y.device
    a = as_samples(x, "x", device)
    b = as_samples(y, "y", a.device)
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"expected x and y to have the same number of rows (samples), "
            f"got {a.shape[0]} and {b.shape[0]}"
        )
    return a, b


def as_labels(labels: Any, name: str, n: int | None = None) -> np.ndarray:
    """Converts labels (numbers or strings) to a 1-D numpy array.

    Args:
        labels: tensor, array, pandas object or sequence; an ``(n, 1)`` column is accepted.
        name: the argument's name, for error messages.
        n: the required length. Default: any.

    Returns:
        A 1-D array; object arrays of strings become string arrays.

    Raises:
        ValueError: when not 1-D, of the wrong length, or with missing (None, NaN, inf)
            labels.
        TypeError: for complex labels, or a mix of numbers and text.
    """
    if isinstance(labels, Tensor):
        arr = labels.detach().cpu().numpy()
    elif hasattr(labels, "to_numpy"):
        arr = np.asarray(labels.to_numpy())
    else:
        arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"expected {name} to be 1-D (one label per sample), got {describe(arr)}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(
            f"expected {name} to have {n} entries (one per sample), got {arr.shape[0]}"
        )
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"expected {name} to be finite, got NaN or infinite label(s)")
    if arr.dtype.kind == "c":
        raise TypeError(f"expected real or text labels for {name}, got {describe(arr)}")
    if arr.dtype == object:
        missing = [
            i
            for i, v in enumerate(arr.tolist())
            if v is None or (isinstance(v, float) and not np.isfinite(v))
        ]
        if missing:
            raise ValueError(
                f"expected {name} without missing labels, got {len(missing)} None/NaN "
                f"label(s) (first at position {missing[0]})"
            )
        if all(isinstance(v, str) for v in arr):
            arr = arr.astype(str)
        elif len({label_kind(v) for v in arr.tolist()}) > 1:
            raise TypeError(
                f"expected {name} to be all numbers or all text, got a mix "
                f"({sorted({type(v).__name__ for v in arr.tolist()})})"
            )
    return arr


def label_kind(v: Any) -> str:
    """``"text"`` or ``"number"``: the kind of a label (a scalar) or of an array's dtype."""
    if isinstance(v, np.ndarray):
        if v.dtype.kind in "US":
            return "text"
        if v.dtype == object:
            kinds = {label_kind(x) for x in v.tolist()}
            return kinds.pop() if len(kinds) == 1 else "mixed"
        return "number"
    return "text" if isinstance(v, str | bytes | np.str_ | np.bytes_) else "number"


def check_same_label_kind(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    """Raises ``ValueError`` when one label array holds text and the other numbers.

    scikit-learn refuses such pairs too ("Labels in y_true and y_pred should be of the same
    type"): ``"1"`` and ``1`` never compare equal, so the score would silently be 0.
    """
    if len(a) == 0 or len(b) == 0:
        return
    ka, kb = label_kind(a), label_kind(b)
    if ka != kb:
        raise ValueError(
            f"expected {names[0]} and {names[1]} to hold labels of the same type, got {ka} "
            f"({describe(a)}, e.g. {a.tolist()[0]!r}) and {kb} ({describe(b)}, "
            f"e.g. {b.tolist()[0]!r})"
        )


def label_key(level: Any) -> Hashable:
    """A plain Python dict key (``int``, ``str``, ...) for a numpy label."""
    return level.item() if hasattr(level, "item") else level
