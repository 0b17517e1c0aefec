"""Bias and accuracy metrics: how much metadata the features still encode, and fairness views.

Interim reference implementation (dense n×n); the blocked, memory-bounded version replaces it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from metanorm._validation import as_2d_tensor

__all__ = [
    "balanced_accuracy",
    "distance_correlation_sqr",
    "group_accuracy",
    "grouped_distance_correlation_sqr",
]


def _centred(d: torch.Tensor, unbiased: bool) -> torch.Tensor:
    n = d.shape[0]
    if not unbiased:
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()
    a = d - d.sum(0, keepdim=True) / (n - 2) - d.sum(1, keepdim=True) / (n - 2)
    a = a + d.sum() / ((n - 1) * (n - 2))
    a.fill_diagonal_(0)
    return a


def distance_correlation_sqr(x: Any, y: Any, *, unbiased: bool = False) -> float:
    """Squared distance correlation of the rows of x and y (dense interim version)."""
    a = as_2d_tensor(x, "x", dtype=torch.float64)
    b = as_2d_tensor(y, "y", dtype=torch.float64, device=a.device)
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"x and y must have the same number of rows, got {a.shape[0]} and {b.shape[0]}"
        )
    A = _centred(torch.cdist(a, a), unbiased)
    B = _centred(torch.cdist(b, b), unbiased)
    ab, aa, bb = (A * B).sum(), (A * A).sum(), (B * B).sum()
    denom = torch.sqrt(aa * bb)
    return 0.0 if float(denom) == 0 else float(ab / denom)


def grouped_distance_correlation_sqr(
    x: Any, y: Any, groups: Any, *, unbiased: bool = False
) -> dict[Any, float]:
    """dcor² within each group (e.g. each label class): ``{group: value}``."""
    g = np.asarray(groups.cpu() if isinstance(groups, torch.Tensor) else groups)
    a = as_2d_tensor(x, "x", dtype=torch.float64)
    b = as_2d_tensor(y, "y", dtype=torch.float64)
    out = {}
    for level in np.unique(g):
        sel = torch.from_numpy(g == level)
        out[level.item() if hasattr(level, "item") else level] = distance_correlation_sqr(
            a[sel.to(a.device)], b[sel.to(b.device)], unbiased=unbiased
        )
    return out


def balanced_accuracy(y_true: Any, y_pred: Any) -> float:
    """Mean over the classes of ``y_true`` of the per-class recall."""
    t = np.asarray(y_true.cpu() if isinstance(y_true, torch.Tensor) else y_true).ravel()
    p = np.asarray(y_pred.cpu() if isinstance(y_pred, torch.Tensor) else y_pred).ravel()
    return float(np.mean([np.mean(p[t == c] == c) for c in np.unique(t)]))


def group_accuracy(y_true: Any, y_pred: Any, groups: Any) -> dict[Any, float]:
    """Accuracy within each group (site, shade bin): ``{group: accuracy}``."""
    t = np.asarray(y_true.cpu() if isinstance(y_true, torch.Tensor) else y_true).ravel()
    p = np.asarray(y_pred.cpu() if isinstance(y_pred, torch.Tensor) else y_pred).ravel()
    g = np.asarray(groups.cpu() if isinstance(groups, torch.Tensor) else groups).ravel()
    return {lv.item(): float(np.mean(p[g == lv] == t[g == lv])) for lv in np.unique(g)}
