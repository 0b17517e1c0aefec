"""Accumulating metrics for evaluation loops: ``update`` per batch, ``compute``, ``reset``.

``compute()`` over batches equals the matching function (:mod:`metanorm.metrics.dcor`,
:mod:`metanorm.metrics.accuracy`) on the concatenated batches.

Distance correlation does not decompose into per-batch sums, so :class:`DistanceCorrelationSqr`
keeps the batches it is given (detached, on their device, checked and converted to float64) and
computes the blocked estimate once in ``compute()``. The accuracy metrics keep counts only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from metanorm.metrics._distance import DEFAULT_MAX_MEMORY
from metanorm.metrics._inputs import as_labels, as_sample_pair
from metanorm.metrics.accuracy import (
    Counts,
    balanced_accuracy_from_counts,
    class_counts,
    group_counts,
)
from metanorm.metrics.dcor import dcor_of_samples, grouped_distance_correlation_sqr

__all__ = [
    "BalancedAccuracy",
    "DistanceCorrelationSqr",
    "GroupAccuracy",
    "GroupedDistanceCorrelationSqr",
]


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


def _merge(total: Counts, new: Counts) -> None:
    for key, (c, h) in new.items():
        c0, h0 = total.get(key, (0, 0))
        total[key] = (c0 + c, h0 + h)


class DistanceCorrelationSqr:
    r"""Squared distance correlation accumulated over batches.

    ``update(x, y)`` stores a batch of features and metadata; ``compute()`` returns
    :func:`~metanorm.metrics.distance_correlation_sqr` of all rows seen since the last
    ``reset()``. Use it to measure a layer's features over a whole validation set.

    Args:
        unbiased: the bias-corrected estimator (needs more than 3 rows in total).
            Default: ``False``.
        block_size: rows per tile in ``compute()``. Default: chosen from ``max_memory``.
        max_memory: tile memory budget in bytes. Default: 256 MiB.
        device: where ``compute()`` runs. Default: the device of the first batch.

    Shape:
        - x: (m,), (m, p) or (m, \*) per batch (flattened per sample; same p every batch)
        - y: (m,) or (m, q) per batch

    Examples::

        >>> import torch
        >>> from metanorm.metrics import DistanceCorrelationSqr
        >>> metric = DistanceCorrelationSqr(unbiased=True)
        >>> for _ in range(4):
        ...     y = torch.rand(50)
        ...     metric.update(torch.stack([y, torch.rand(50)], 1), y)
        >>> metric.compute() > 0.3
        True
        >>> metric.reset()
    """

    def __init__(
        self,
        *,
        unbiased: bool = False,
        block_size: int | None = None,
        max_memory: int = DEFAULT_MAX_MEMORY,
        device: torch.device | str | None = None,
    ) -> None:
        self.unbiased = unbiased
        self.block_size = block_size
        self.max_memory = max_memory
        self.device = device
        self._x: list[Tensor] = []
        self._y: list[Tensor] = []

    @property
    def num_samples(self) -> int:
        """Rows accumulated since the last reset."""
        return sum(t.shape[0] for t in self._x)

    def _check_batch(self, a: Tensor, b: Tensor) -> None:
        if self._x and (a.shape[1] != self._x[0].shape[1] or b.shape[1] != self._y[0].shape[1]):
            raise ValueError(
                f"expected every batch to have {self._x[0].shape[1]} feature and "
                f"{self._y[0].shape[1]} metadata column(s), got {a.shape[1]} and {b.shape[1]}"
            )

    def update(self, x: Any, y: Any) -> None:
        """Adds a batch: ``x`` (m, p) features and ``y`` (m, q) metadata of the same m samples."""
        a, b = as_sample_pair(_detach(x), _detach(y), self.device)
        self._check_batch(a, b)
        self._x.append(a)
        self._y.append(b)

    def compute(self) -> float:
        """dCor² of all accumulated rows."""
        if not self._x:
            raise ValueError("expected at least one update() before compute(), got none")
        return dcor_of_samples(
            torch.cat(self._x),
            torch.cat(self._y),
            unbiased=self.unbiased,
            block_size=self.block_size,
            max_memory=self.max_memory,
        )

    def reset(self) -> None:
        """Forgets all accumulated batches."""
        self._x.clear()
        self._y.clear()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(unbiased={self.unbiased}, num_samples={self.num_samples})"


class GroupedDistanceCorrelationSqr(DistanceCorrelationSqr):
    r"""dCor² within each group (e.g. each label class), accumulated over batches.

    ``update(x, y, groups)``; ``compute()`` returns
    :func:`~metanorm.metrics.grouped_distance_correlation_sqr` of all rows seen:
    ``{group: value}``. The paper's bias metric is this with the class labels as groups and
    ``unbiased=True``.

    Args:
        unbiased: the bias-corrected estimator (each group needs more than 3 rows).
            Default: ``False``.
        block_size: rows per tile. Default: chosen from ``max_memory``.
        max_memory: tile memory budget in bytes. Default: 256 MiB.
        device: where ``compute()`` runs. Default: the device of the first batch.

    Examples::

        >>> import torch
        >>> from metanorm.metrics import GroupedDistanceCorrelationSqr
        >>> metric = GroupedDistanceCorrelationSqr(unbiased=True)
        >>> y = torch.arange(40) % 2
        >>> metric.update(torch.randn(40, 3), torch.rand(40), y)
        >>> sorted(metric.compute())
        [0, 1]
    """

    def __init__(
        self,
        *,
        unbiased: bool = False,
        block_size: int | None = None,
        max_memory: int = DEFAULT_MAX_MEMORY,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            unbiased=unbiased, block_size=block_size, max_memory=max_memory, device=device
        )
        self._groups: list[Any] = []

    def update(self, x: Any, y: Any, groups: Any) -> None:  # type: ignore[override]
        """Adds a batch with one group label per row."""
        a, b = as_sample_pair(_detach(x), _detach(y), self.device)
        self._check_batch(a, b)
        g = as_labels(groups, "groups", a.shape[0])
        self._x.append(a)
        self._y.append(b)
        self._groups.append(g)

    def compute(self) -> dict[Any, float]:  # type: ignore[override]
        """``{group: dCor²}`` over all accumulated rows."""
        if not self._x:
            raise ValueError("expected at least one update() before compute(), got none")
        return grouped_distance_correlation_sqr(
            torch.cat(self._x),
            torch.cat(self._y),
            np.concatenate(self._groups),
            unbiased=self.unbiased,
            block_size=self.block_size,
            max_memory=self.max_memory,
        )

    def reset(self) -> None:
        """Forgets all accumulated batches."""
        super().reset()
        self._groups.clear()


class BalancedAccuracy:
    """Balanced accuracy accumulated over batches (counts per true class only).

    ``compute()`` equals :func:`~metanorm.metrics.balanced_accuracy` (and scikit-learn's
    ``balanced_accuracy_score``) on the concatenated batches.

    Args:
        adjusted: chance-adjusted score, as scikit-learn's ``adjusted=True``. Default: ``False``.

    Examples::

        >>> from metanorm.metrics import BalancedAccuracy
        >>> metric = BalancedAccuracy()
        >>> metric.update([0, 0], [0, 1])
        >>> metric.update([1, 1], [1, 1])
        >>> metric.compute()
        0.75
    """

    def __init__(self, *, adjusted: bool = False) -> None:
        self.adjusted = adjusted
        self.counts: Counts = {}

    def update(self, y_true: Any, y_pred: Any) -> None:
        """Adds a batch of true and predicted labels."""
        _merge(self.counts, class_counts(y_true, y_pred))

    def compute(self) -> float:
        """The balanced accuracy of everything seen since the last reset."""
        return balanced_accuracy_from_counts(self.counts, self.adjusted)

    def reset(self) -> None:
        """Forgets the counts."""
        self.counts = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(adjusted={self.adjusted}, classes={len(self.counts)})"


class GroupAccuracy:
    """Accuracy per metadata group accumulated over batches (counts per group only).

    Examples::

        >>> from metanorm.metrics import GroupAccuracy
        >>> metric = GroupAccuracy()
        >>> metric.update([1, 0], [1, 1], ["site A", "site B"])
        >>> metric.update([1], [1], ["site B"])
        >>> metric.compute()
        {'site A': 1.0, 'site B': 0.5}
    """

    def __init__(self) -> None:
        self.counts: Counts = {}

    def update(self, y_true: Any, y_pred: Any, groups: Any) -> None:
        """Adds a batch of true labels, predicted labels and groups."""
        _merge(self.counts, group_counts(y_true, y_pred, groups))

    def compute(self) -> dict[Any, float]:
        """``{group: accuracy}`` over everything seen, in sorted order of the groups."""
        if not self.counts:
            raise ValueError("expected at least one update() before compute(), got none")
        try:
            keys = sorted(self.counts)  # type: ignore[type-var]
        except TypeError:
            keys = list(self.counts)
        return {k: self.counts[k][1] / self.counts[k][0] for k in keys}

    def reset(self) -> None:
        """Forgets the counts."""
        self.counts = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(groups={len(self.counts)})"
