"""The one design coding of every experiment, and the metadata the bias metric is measured on.

Words: a split's *metadata* are its raw columns (:attr:`metanorm.datasets.DataSplit.metadata`);
its *design rows* are the coded ``(n, K)`` rows the MDN layers take, ``[y, metadata..., 1]`` with
the label ``y`` kept and the metadata and intercept removed.

Coding: the label is coded raw (its 0/1 value for two classes; one-hot with class 0 as the
reference for more) and never standardised. Categorical metadata are one-hot coded (the first
sorted level is the reference); continuous metadata are standardised with the training mean and
standard deviation when the experiment asks for it (:attr:`Experiment.standardize`). Every
builder is fitted on the training split, so the other splits are coded the same way.

Examples::

    >>> import numpy as np, torch
    >>> from metanorm.datasets import DataSplit
    >>> train = DataSplit(torch.zeros(4, 1), torch.tensor([0, 1, 0, 1]),
    ...                   {"site": np.array(["a", "b", "b", "a"])})
    >>> builder = fit_design_builder(train, ["site"], categorical=["site"])
    >>> builder.columns
    ('y', 'site=b', 'intercept')
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from metanorm.datasets import DataSplit
from metanorm.design import Design, DesignBuilder

if TYPE_CHECKING:
    from metanorm_repro.experiments.registry import Experiment

__all__ = [
    "LABEL",
    "build_designs",
    "design_columns",
    "design_data",
    "expand_columns",
    "fit_design_builder",
    "metadata_matrix",
    "metric_matrix",
    "training_design",
]

#: Name of the label column in every design.
LABEL = "y"


def expand_columns(patterns: Sequence[str], split: DataSplit) -> tuple[str, ...]:
    """Metadata column names of ``split`` for ``patterns``.

    ``"prefix*"`` expands to every column starting with ``prefix`` (sorted).

    Raises:
        ValueError: a column is missing, or a pattern matches nothing.
    """
    out: list[str] = []
    for p in patterns:
        if p.endswith("*"):
            hits = sorted(c for c in split.metadata if c.startswith(p[:-1]))
            if not hits:
                raise ValueError(
                    f"no metadata column of split {split.name!r} matches {p!r}; "
                    f"it has {sorted(split.metadata)}"
                )
            out.extend(hits)
        else:
            out.append(p)
    missing = [c for c in out if c not in split.metadata]
    if missing:
        raise ValueError(
            f"split {split.name!r} lacks metadata column(s) {missing}; "
            f"it has {sorted(split.metadata)}"
        )
    return tuple(out)


def design_data(
    split: DataSplit, columns: Sequence[str], *, labels: bool = True
) -> dict[str, np.ndarray]:
    """The label and the metadata ``columns`` of ``split``, as the design builder's input.

    Args:
        split: the split.
        columns: metadata columns of the design.
        labels: the true labels; ``False`` puts zeros in the label column (an MDN layer in eval
            mode multiplies the kept columns by nothing, so evaluation never needs labels).

    Returns:
        ``{"y": labels, column: values, ...}``.

    Raises:
        ValueError: ``split`` lacks one of ``columns``.
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
        train: the training split (levels, means and standard deviations come from it).
        columns: metadata columns of the design (after the label).
        categorical: the columns to one-hot code.
        standardize: standardise the continuous metadata columns (never the label).

    Returns:
        The fitted builder; its columns are ``y`` (or ``y=1``, ... for more than two classes),
        the coded metadata, then ``intercept``.
    """
    cat = [c for c in columns if c in categorical]
    if len(np.unique(train.labels.numpy())) > 2:
        cat.insert(0, LABEL)
    scaled = [c for c in columns if c not in cat] if standardize else False
    builder = DesignBuilder(keep=[LABEL], categorical=cat, standardize=scaled)
    return builder.fit(design_data(train, columns))


def metadata_matrix(
    split: DataSplit, train: DataSplit, columns: Sequence[str], categorical: Sequence[str] = ()
) -> np.ndarray:
    """Metadata columns of ``split`` as one float matrix, categorical ones one-hot.

    Args:
        split: the split.
        train: the training split (the levels of the categorical columns come from it).
        columns: the metadata columns.
        categorical: which of them are categorical.

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


def design_columns(experiment: Experiment, train: DataSplit) -> tuple[str, ...]:
    """The metadata columns of an experiment's design (``*`` patterns expanded on ``train``)."""
    return expand_columns(experiment.metadata_columns, train)


def build_designs(
    experiment: Experiment, splits: Sequence[DataSplit]
) -> tuple[DesignBuilder, list[torch.Tensor]]:
    """Fits the design ``[y, metadata..., 1]`` (``y`` kept) on ``splits[0]``; rows of every split.

    Args:
        experiment: the experiment (its metadata columns, categorical columns, standardisation).
        splits: the training split first, then any others.

    Returns:
        ``(builder, rows)``: the fitted builder and one float32 ``(n, K)`` tensor of design rows
        per split (with the true labels in the kept columns).
    """
    train = splits[0]
    columns = design_columns(experiment, train)
    builder = fit_design_builder(
        train, columns, categorical=experiment.categorical, standardize=experiment.standardize
    )
    rows = [builder.transform(design_data(s, columns)).tensor() for s in splits]
    return builder, rows


def training_design(experiment: Experiment, builder: DesignBuilder, train: DataSplit) -> Design:
    """The WHOLE training split's :class:`~metanorm.design.Design`, the MDN layers' argument."""
    return builder.transform(design_data(train, design_columns(experiment, train)))


def metric_matrix(experiment: Experiment, split: DataSplit, train: DataSplit) -> np.ndarray:
    """The metadata the bias metric (per-class dcor² with the features) is measured against.

    Returns:
        ``(n, p)`` float64: the confounder column(s) (``*`` patterns expanded on ``train``) as
        they are; a categorical one one-hot coded with every training level.
    """
    columns = expand_columns((experiment.confounder,), train)
    return metadata_matrix(split, train, columns, experiment.categorical)
