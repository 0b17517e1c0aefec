"""Input checks shared by the whole package.

Every public entry point turns user input into a tensor or an array here, so the error messages
read the same everywhere: what was expected, and what came.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["as_2d_tensor", "as_float_tensor", "check_finite", "describe"]


def describe(x: Any) -> str:
    """A short description of ``x`` for error messages (type, shape and dtype)."""
    if isinstance(x, torch.Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} and dtype {x.dtype}"
    return f"{type(x).__name__}"


def as_float_tensor(
    x: Any,
    name: str,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Converts a tensor, an array or a nested sequence of numbers to a floating tensor.

    Tensors keep their device and, when floating and ``dtype`` is None, their dtype.

    Raises:
        TypeError: if ``x`` is not numeric.
        ValueError: if ``x`` is a tensor on the ``meta`` device (it holds no values).
    """
    if isinstance(x, torch.Tensor):
        if x.device.type == "meta":
            raise ValueError(
                f"expected {name} on a device that holds data (cpu, cuda, ...), got a "
                f"{describe(x)} on the meta device"
            )
        t = x
    elif isinstance(x, np.ndarray | Sequence) and not isinstance(x, str | bytes):
        arr = np.asarray(x)
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
        ):
            raise TypeError(f"expected {name} to be numeric, got {describe(arr)}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    elif hasattr(x, "to_numpy"):  # pandas objects, without importing pandas
        return as_float_tensor(x.to_numpy(), name, dtype=dtype, device=device)
    else:
        raise TypeError(f"expected {name} to be a tensor or an array, got {describe(x)}")
    if t.is_complex():
        raise TypeError(f"expected {name} to be real, got {describe(t)}")
    if dtype is None and not t.is_floating_point():
        dtype = torch.get_default_dtype()
    if dtype is not None or device is not None:
        t = t.to(device=device, dtype=dtype)
    return t


def as_2d_tensor(
    x: Any,
    name: str,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Like :func:`as_float_tensor`, and promotes a vector to a column; rejects other ranks."""
    t = as_float_tensor(x, name, dtype=dtype, device=device)
    if t.dim() == 1:
        t = t.unsqueeze(1)
    if t.dim() != 2:
        raise ValueError(f"expected {name} to be 1-D or 2-D, got {describe(t)}")
    return t


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raises ``ValueError`` naming how many entries of ``t`` are NaN or infinite."""
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"expected {name} to be finite, got {bad} NaN or infinite value(s) in a {describe(t)}"
        )
