"""Input checks shared by the metrics: samples for dCor², labels for the accuracies and groups."""

from __future__ import annotations

import warnings
from collections.abc import Hashable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metanorm._validation import as_float_tensor, check_finite, describe

__all__ = [
    "FEW_INTEGER_LEVELS",
    "as_labels",
    "as_metadata",
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
    x: Any,
    y: Any,
    device: torch.device | str | None = None,
    *,
    categorical: bool | None = None,
    names: tuple[str, str] = ("x (features)", "y (metadata)"),
) -> tuple[Tensor, Tensor]:
    """Checks a pair of variables observed on the same samples (see :func:`as_samples`).

    Args:
        x: the first variable (features).
        y: the second variable (metadata), same number of rows; text and categorical columns are
            one-hot coded (see :func:`as_metadata`).
        device: where to put both. Default: the device of ``x`` when it is a tensor, else that of
            ``y`` when it is one, else the CPU.
        categorical: see :func:`as_metadata`.
        names: the two arguments as error messages name them.

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
    a = as_samples(x, names[0], device)
    b = as_metadata(y, names[1], a.device, categorical=categorical)
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"expected {names[0]} and {names[1]} to have the same number of rows (samples), "
            f"got {a.shape[0]} and {b.shape[0]}"
        )
    return a, b


#: Integer-valued metadata columns with this many distinct values (inclusive) look like codes.
FEW_INTEGER_LEVELS = (3, 10)


def _is_text_or_category(arr: Any) -> bool:
    dtype = getattr(arr, "dtype", None)
    if dtype is not None and str(dtype) == "category":
        return True
    if isinstance(arr, Tensor):
        return False
    if hasattr(arr, "to_numpy"):
        arr = arr.to_numpy()
    arr = np.asarray(arr) if not isinstance(arr, np.ndarray) else arr
    if isinstance(arr, np.ndarray):
        if arr.dtype.kind in "US":
            return True
        if arr.dtype == object:
            return any(isinstance(v, str | bytes) for v in arr.reshape(-1).tolist())
    return False


def _one_hot(column: Any, name: str) -> np.ndarray:
    """One-hot codes one column of labels, one indicator per level (all levels kept)."""
    labels = as_labels(column, name)
    _, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(-1)
    return np.eye(int(inverse.max()) + 1 if inverse.size else 1)[inverse]


def _columns(y: Any) -> list[Any] | None:
    """The columns of a 2-D table (DataFrame, array, list of rows), or None for one column."""
    if hasattr(y, "columns") and hasattr(y, "iloc"):  # a pandas DataFrame
        return [y.iloc[:, j] for j in range(y.shape[1])]
    if isinstance(y, np.ndarray) and y.ndim == 2 and y.shape[1] > 1:
        return [y[:, j] for j in range(y.shape[1])]
    return None


def as_metadata(
    y: Any,
    name: str = "y (metadata)",
    device: torch.device | str | None = None,
    *,
    categorical: bool | None = None,
) -> Tensor:
    r"""Converts metadata to float64 samples ``(n, q)``, one-hot coding categorical columns.

    Text columns and pandas ``category`` columns are categorical: each becomes one indicator
    column per level (all levels kept, so every two distinct levels are at the same distance).
    Numbers stay numbers unless ``categorical=True``: integer site codes 0, 1, 2 as numbers say
    that site 2 is twice as far from site 0 as site 1 is, which changes dCor².

    Args:
        y: tensor, array, pandas Series/DataFrame or sequence; ``(n,)`` or ``(n, q)``.
        name: the argument as error messages name it.
        device: where to put the result.
        categorical: ``True`` one-hot codes every column (numeric codes included); ``False``
            takes numbers as numbers, quietly; ``None`` (default) codes text and ``category``
            columns and warns when a numeric column holds 3 to 10 distinct integers (a code?).

    Returns:
        A float64 tensor ``(n, q)`` (``q`` counts the indicator columns).

    Raises:
        ValueError, TypeError: as :func:`as_samples` for numeric input, or
            :func:`as_labels` for text.

    Examples::

        >>> as_metadata(["a", "b", "a"])
        tensor([[1., 0.],
                [0., 1.],
                [1., 0.]], dtype=torch.float64)
    """
    if categorical is not None and not isinstance(categorical, bool):
        raise TypeError(f"expected categorical to be True, False or None, got {categorical!r}")
    if isinstance(y, Tensor) and categorical is not True:
        t = as_samples(y, name, device)
        if categorical is None:
            _warn_if_codes(t, name)
        return t
    cols = _columns(y)
    if cols is None:
        if categorical or _is_text_or_category(y):
            coded = _one_hot(y.cpu() if isinstance(y, Tensor) else y, name)
            return torch.from_numpy(coded).to(device=device, dtype=torch.float64)
        t = as_samples(y, name, device)
        if categorical is None:
            _warn_if_codes(t, name)
        return t
    parts = []
    for j, col in enumerate(cols):
        label = f"{name}, column {j}"
        if categorical or _is_text_or_category(col):
            parts.append(torch.from_numpy(_one_hot(col, label)))
        else:
            parts.append(as_samples(col, label))
    t = torch.cat([p.to(torch.float64) for p in parts], 1).to(device)
    if categorical is None:
        _warn_if_codes(t, name)
    return t


def _warn_if_codes(t: Tensor, name: str) -> None:
    """Warns about numeric columns that look like integer codes of a few categories."""
    if t.shape[0] < 30 or t.shape[1] > 8:
        return
    lo, hi = FEW_INTEGER_LEVELS
    suspects = []
    for j in range(t.shape[1]):
        col = t[:, j]
        if not bool((col == col.round()).all()):
            continue
        _, counts = torch.unique(col, return_counts=True)
        # codes of sites or scanners: a few values, each shared by several samples
        if lo <= counts.numel() <= hi and int(counts.min()) >= 3:
            suspects.append(f"column {j} ({counts.numel()} distinct integers)")
    if suspects:
        warnings.warn(
            f"{name}: {', '.join(suspects)} taken as numbers; if these are codes of categories "
            "(sites, scanners), pass categorical=True to one-hot code them, which changes dCor²; "
            "categorical=False silences this warning",
            UserWarning,
            stacklevel=4,
        )


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
