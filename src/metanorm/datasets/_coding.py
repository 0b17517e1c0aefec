"""The one design coding of every experiment, and the metadata matrix of the bias metric.

Used by the engine (:func:`metanorm.experiments.runner.build_designs`) and by
:class:`metanorm.datasets.experiments.RealExperiment`, so a split's design rows are the same
whichever builds them.

Coding: ``[y, metadata..., 1]`` with the label ``y`` kept. The label is coded raw (its 0/1 value
for two classes; one-hot with class 0 as the reference for more) and never standardised: MDN's
batch estimate (N/m)·Σ⁻¹·X_bᵀF is not invariant to shifting the kept label column against the
removed intercept, and issue 4 measured a standardised label letting MDN-Conv's validation bAcc
drift on the synthetic experiment while the raw coding stayed stable. Categorical metadata are
one-hot coded (first sorted level the reference); continuous metadata may be standardised with
the training mean and sd, which only mixes a removed column with the removed intercept and
leaves the residual unchanged (up to rounding).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from metanorm.datasets._base import DataSplit
from metanorm.design import DesignBuilder

__all__ = ["LABEL", "design_data", "fit_design_builder", "metric_matrix"]

#: Name of the label column in every design.
LABEL = "y"


def design_data(
    split: DataSplit, columns: Sequence[str], *, labels: bool = True
) -> dict[str, np.ndarray]:
    """The label and the ``columns`` of ``split`` (missing columns: a ``ValueError``).

    Args:
        split: the split.
        columns: metadata columns of the design.
        labels: the true labels; ``False`` puts zeros in the label column (an MDN layer in eval
            mode multiplies the kept columns by nothing, so evaluation never needs labels).
    """
    missing = [c for c in columns if c not in split.metadata]
    if missing:
        raise ValueError(
            f"split {split.name!r} lacks metadata column(s) {missing}; "
            f"it has {sorted(split.metadata)}"
        )
    y = split.labels.numpy() if labels else np.zeros(len(split), dtype=np.int64)
    data = {LABEL: y}
    data.update({c: np.asarray(split.metadata[c]) for c in columns})
    return data


def fit_design_builder(
    train: DataSplit,
    columns: Sequence[str],
    *,
    categorical: Sequence[str] = (),
    standardize: bool = False,
) -> DesignBuilder:
    """A :class:`~metanorm.design.DesignBuilder` fitted on ``train`` with the coding above.

    Args:
        train: the training split (levels, means and sds come from it).
        columns: metadata columns of the design (after the label).
        categorical: the columns to one-hot code.
        standardize: standardise the continuous metadata columns (never the label).
    """
    cat = [c for c in columns if c in categorical]
    if len(np.unique(train.labels.numpy())) > 2:
        cat.insert(0, LABEL)
    scaled = [c for c in columns if c not in cat] if standardize else False
    builder = DesignBuilder(keep=[LABEL], categorical=cat, standardize=scaled)
    return builder.fit(design_data(train, columns))


def metric_matrix(
    split: DataSplit, train: DataSplit, columns: Sequence[str], categorical: Sequence[str] = ()
) -> np.ndarray:
    """The metadata the bias metric (per-class dcor² with the features) is measured against.

    Returns:
        ``(n, p)`` float64: continuous columns as they are; categorical ones one-hot coded with
        every level of ``train`` (no reference dropped).
    """
    cols: list[np.ndarray] = []
    for c in columns:
        if c not in split.metadata:
            raise ValueError(f"split {split.name!r} lacks metadata column {c!r}")
        v = np.asarray(split.metadata[c])
        if c in categorical:
            levels = sorted(set(np.asarray(train.metadata[c]).tolist()), key=str)
            cols.extend((v == lv).astype(np.float64) for lv in levels)
        else:
            cols.append(v.astype(np.float64))
    if not cols:
        raise ValueError("expected at least one metadata column for the metric, got none")
    return np.stack(cols, axis=1)
