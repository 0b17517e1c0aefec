"""Accumulating metrics for evaluation loops: ``update`` per batch, ``compute``, ``reset``.

``compute()`` over batches equals the matching function (:mod:`metanorm.metrics.dcor`,
:mod:`metanorm.metrics.accuracy`) on the concatenated batches.

Distance correlation does not decompose into per-batch sums, so :class:`DistanceCorrelationSqr`
keeps the batches it is given (detached, on their device, checked and converted to float64) and
computes the blocked estimate once in ``compute()``. The accuracy metrics keep counts only.

Under :mod:`torch.distributed` (initialised, world size above 1) ``compute()`` gathers what it
needs from every rank of ``process_group`` first, as torchmetrics' ``dist_reduce_fx`` does, so
each rank returns the value of one process over all the data: the count dictionaries are summed
over the union of the labels the ranks have seen, and dCor² gathers the rows (ranks may hold
different numbers), then shares the work: each rank computes 1/W of the distance tiles (or of
the projections, ``method="projection"``) and one all-reduce adds up the partial sums. The local
state is left as it was. ``compute()`` is then a collective: every rank of the group must call
it. ``sync_on_compute=False`` turns this off.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from metanorm.metrics._distance import DEFAULT_MAX_MEMORY
from metanorm.metrics._inputs import _columns, _is_text_or_category, as_labels, as_sample_pair
from metanorm.metrics.accuracy import (
    Counts,
    balanced_accuracy_from_counts,
    class_counts,
    group_counts,
)
from metanorm.metrics.dcor import (
    Share,
    check_method,
    dcor_of_samples,
    grouped_of_samples,
    projection_dcor,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "BalancedAccuracy",
    "DistanceCorrelationSqr",
    "GroupAccuracy",
    "GroupedDistanceCorrelationSqr",
]


def _detach(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


def _numeric_metadata(y: Any) -> Any:
    """Refuses text or categorical metadata: one-hot codes per batch would not line up."""
    if _is_text_or_category(y) or any(_is_text_or_category(c) for c in (_columns(y) or [])):
        raise TypeError(
            "expected y (metadata) to be numeric in an accumulating metric: text or categorical "
            "columns would be one-hot coded batch by batch, with levels that differ between "
            "batches; one-hot code them with the same levels for every batch first (or call "
            "distance_correlation_sqr on the whole data, which codes them)"
        )
    return _detach(y)


def _merge(total: Counts, new: Counts) -> None:
    for key, (c, h) in new.items():
        c0, h0 = total.get(key, (0, 0))
        total[key] = (c0 + c, h0 + h)


def _syncing(enabled: bool, group: ProcessGroup | None) -> bool:
    """Whether ``compute()`` gathers: enabled, torch.distributed initialised, group of 2 or more.

    (A process outside ``group`` gets world size -1 and computes over its own data.)
    """
    if not enabled or not dist.is_available() or not dist.is_initialized():
        return False
    return dist.get_world_size(group) > 1


def _comm_device(group: ProcessGroup | None, preferred: torch.device) -> torch.device:
    """Where tensors for a collective on ``group`` must live (the CPU for gloo and MPI)."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    if preferred.type != "cpu":
        return preferred
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return preferred


def _gather_objects(obj: Any, group: ProcessGroup | None) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _gather_rows(
    x: Tensor | None, y: Tensor | None, group: ProcessGroup | None, device: torch.device
) -> tuple[list[Tensor], list[Tensor]]:
    """All-gathers (n_r, p) and (n_r, q) float64 rows of uneven n_r from every rank, in rank order.

    Sizes go first, then the rows padded to the largest n_r (one all_gather of [x | y]), which are
    trimmed again. A rank without rows passes ``None``.
    """
    comm = _comm_device(group, device)
    world = dist.get_world_size(group)
    shape = [0, 0, 0] if x is None or y is None else [x.shape[0], x.shape[1], y.shape[1]]
    sizes = [torch.zeros(3, dtype=torch.long, device=comm) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(shape, dtype=torch.long, device=comm), group=group)
    shapes = [tuple(int(v) for v in s.tolist()) for s in sizes]
    widths = {(p, q) for n, p, q in shapes if n > 0}
    if not widths:
        raise ValueError("expected at least one update() before compute() on some rank, got none")
    if len(widths) > 1:
        raise ValueError(
            "expected every rank to have the same feature and metadata columns, got "
            + ", ".join(f"rank {r}: {p} and {q}" for r, (n, p, q) in enumerate(shapes) if n > 0)
        )
    ((p, q),) = widths
    longest = max(n for n, _, _ in shapes)
    padded = torch.zeros(longest, p + q, dtype=torch.float64, device=comm)
    if x is not None and y is not None and x.shape[0] > 0:
        padded[: x.shape[0], :p] = x.to(comm)
        padded[: x.shape[0], p:] = y.to(comm)
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    rows = [o[:n].to(device) for o, (n, _, _) in zip(out, shapes, strict=True)]
    return [r[:, :p] for r in rows], [r[:, p:] for r in rows]


def _share(group: ProcessGroup | None, device: torch.device) -> Share:
    """This rank's share of the work and an in-place all-reduce (sum) on ``device`` tensors."""
    comm = _comm_device(group, device)

    def all_reduce(t: Tensor) -> None:
        c = t.to(comm)
        dist.all_reduce(c, op=dist.ReduceOp.SUM, group=group)
        if c is not t:
            t.copy_(c)

    return dist.get_rank(group), dist.get_world_size(group), all_reduce


def _sorted_keys(keys: list[Hashable]) -> list[Hashable]:
    try:
        return sorted(keys)  # type: ignore[type-var]
    except TypeError:
        return keys


def _all_reduce_counts(counts: Counts, group: ProcessGroup | None) -> Counts:
    """Sums ``{label: (count, hits)}`` over the ranks; labels seen by any rank are kept."""
    union: dict[Hashable, None] = {}
    for keys in _gather_objects(list(counts), group):
        union.update(dict.fromkeys(keys))
    keys = _sorted_keys(list(union))
    comm = _comm_device(group, torch.device("cpu"))
    table = torch.tensor(
        [counts.get(k, (0, 0)) for k in keys], dtype=torch.long, device=comm
    ).reshape(len(keys), 2)
    dist.all_reduce(table, op=dist.ReduceOp.SUM, group=group)
    return {k: (int(c), int(h)) for k, (c, h) in zip(keys, table.tolist(), strict=True)}


class DistanceCorrelationSqr:
    r"""Squared distance correlation accumulated over batches.

    ``update(x, y)`` stores a batch of features and metadata; ``compute()`` returns
    :func:`~metanorm.metrics.distance_correlation_sqr` of all rows seen since the last
    ``reset()``. Use it to measure a layer's features over a whole validation set.

    Args:
        unbiased: the bias-corrected estimator (needs more than 3 rows in total).
            Default: ``False``; pass it explicitly.
        method: ``"exact"`` (or ``"auto"``) or ``"projection"``, as
            :func:`~metanorm.metrics.distance_correlation_sqr`. Default: ``"exact"``.
        num_projections: directions for ``method="projection"``. Default: 100.
        seed: seed of the directions. Default: 0.
        block_size: rows per tile in ``compute()``. Default: chosen from ``max_memory``.
        max_memory: tile memory budget in bytes. Default: 256 MiB.
        device: where ``compute()`` runs. Default: the device of the first batch.
        sync_on_compute: when :mod:`torch.distributed` is initialised, ``compute()`` gathers the
            rows of every rank of ``process_group``, computes 1/W of the tiles (or projections)
            on each rank, adds the partial sums and returns the value over all rows (a
            collective: call it on every rank). Default: ``True``.
        process_group: the ranks to gather from. Default: the default (whole world) group.

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
        method: str = "exact",
        num_projections: int | None = None,
        seed: int | None = None,
        block_size: int | None = None,
        max_memory: int = DEFAULT_MAX_MEMORY,
        device: torch.device | str | None = None,
        sync_on_compute: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        self.method, self.num_projections = check_method(method, num_projections, seed)
        self.seed = seed or 0
        self.unbiased = unbiased
        self.block_size = block_size
        self.max_memory = max_memory
        self.device = device
        self.sync_on_compute = sync_on_compute
        self.process_group = process_group
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
        a, b = as_sample_pair(_detach(x), _numeric_metadata(y), self.device)
        self._check_batch(a, b)
        self._x.append(a)
        self._y.append(b)

    def _compute_device(self) -> torch.device:
        if self._x:
            return self._x[0].device
        return torch.device("cpu") if self.device is None else torch.device(self.device)

    def _all_rows(self) -> tuple[Tensor, Tensor]:
        """The accumulated rows, of every rank when syncing applies."""
        if not _syncing(self.sync_on_compute, self.process_group):
            if not self._x:
                raise ValueError("expected at least one update() before compute(), got none")
            return torch.cat(self._x), torch.cat(self._y)
        x = torch.cat(self._x) if self._x else None
        y = torch.cat(self._y) if self._y else None
        xs, ys = _gather_rows(x, y, self.process_group, self._compute_device())
        return torch.cat(xs), torch.cat(ys)

    def _work_share(self, device: torch.device) -> Share | None:
        if not _syncing(self.sync_on_compute, self.process_group):
            return None
        return _share(self.process_group, device)

    def compute(self) -> float:
        """dCor² of all accumulated rows (of all ranks, see ``sync_on_compute``)."""
        x, y = self._all_rows()
        share = self._work_share(x.device)
        if self.method == "projection":
            return projection_dcor(
                x,
                y,
                unbiased=self.unbiased,
                num_projections=self.num_projections,
                seed=self.seed,
                share=share,
            )
        value = dcor_of_samples(
            x,
            y,
            unbiased=self.unbiased,
            block_size=self.block_size,
            max_memory=self.max_memory,
            share=share,
        )
        return value

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
        unbiased: the bias-corrected estimator (a group of 3 rows or fewer gets NaN, with a
            warning). Default: ``False``; pass it explicitly.
        method: as :class:`DistanceCorrelationSqr`. Default: ``"exact"``.
        num_projections: as :class:`DistanceCorrelationSqr`. Default: 100.
        seed: as :class:`DistanceCorrelationSqr`. Default: 0.
        block_size: rows per tile. Default: chosen from ``max_memory``.
        max_memory: tile memory budget in bytes. Default: 256 MiB.
        device: where ``compute()`` runs. Default: the device of the first batch.
        sync_on_compute: when :mod:`torch.distributed` is initialised, ``compute()`` gathers the
            rows and groups of every rank of ``process_group`` and returns the values over all of
            them (a collective: call it on every rank). Default: ``True``.
        process_group: the ranks to gather from. Default: the default (whole world) group.

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
        method: str = "exact",
        num_projections: int | None = None,
        seed: int | None = None,
        block_size: int | None = None,
        max_memory: int = DEFAULT_MAX_MEMORY,
        device: torch.device | str | None = None,
        sync_on_compute: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(
            unbiased=unbiased,
            method=method,
            num_projections=num_projections,
            seed=seed,
            block_size=block_size,
            max_memory=max_memory,
            device=device,
            sync_on_compute=sync_on_compute,
            process_group=process_group,
        )
        self._groups: list[Any] = []

    def update(self, x: Any, y: Any, groups: Any) -> None:  # type: ignore[override]
        """Adds a batch with one group label per row."""
        a, b = as_sample_pair(_detach(x), _numeric_metadata(y), self.device)
        self._check_batch(a, b)
        g = as_labels(groups, "groups", a.shape[0])
        self._x.append(a)
        self._y.append(b)
        self._groups.append(g)

    def compute(self) -> dict[Any, float]:  # type: ignore[override]
        """``{group: dCor²}`` over all accumulated rows (of all ranks, see ``sync_on_compute``)."""
        x, y = self._all_rows()
        if not _syncing(self.sync_on_compute, self.process_group):
            groups = np.concatenate(self._groups)
        else:
            local = np.concatenate(self._groups) if self._groups else None
            parts = _gather_objects(local, self.process_group)
            groups = np.concatenate([g for g in parts if g is not None])
        return grouped_of_samples(
            x,
            y,
            groups,
            unbiased=self.unbiased,
            method=self.method,
            num_projections=self.num_projections,
            seed=self.seed,
            block_size=self.block_size,
            max_memory=self.max_memory,
            share=self._work_share(x.device),
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
        sync_on_compute: when :mod:`torch.distributed` is initialised, ``compute()`` sums the
            counts of every rank of ``process_group`` (over the union of the classes the ranks
            have seen; a collective: call it on every rank). Default: ``True``.
        process_group: the ranks to sum over. Default: the default (whole world) group.

    Examples::

        >>> from metanorm.metrics import BalancedAccuracy
        >>> metric = BalancedAccuracy()
        >>> metric.update([0, 0], [0, 1])
        >>> metric.update([1, 1], [1, 1])
        >>> metric.compute()
        0.75
    """

    def __init__(
        self,
        *,
        adjusted: bool = False,
        sync_on_compute: bool = True,
        process_group: ProcessGroup | None = None,
    ) -> None:
        self.adjusted = adjusted
        self.sync_on_compute = sync_on_compute
        self.process_group = process_group
        self.counts: Counts = {}

    def update(self, y_true: Any, y_pred: Any) -> None:
        """Adds a batch of true and predicted labels."""
        _merge(self.counts, class_counts(y_true, y_pred))

    def compute(self) -> float:
        """The balanced accuracy of everything seen since the last reset (on all ranks)."""
        return balanced_accuracy_from_counts(self._all_counts(), self.adjusted)

    def _all_counts(self) -> Counts:
        if not _syncing(self.sync_on_compute, self.process_group):
            return self.counts
        return _all_reduce_counts(self.counts, self.process_group)

    def reset(self) -> None:
        """Forgets the counts."""
        self.counts = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(adjusted={self.adjusted}, classes={len(self.counts)})"


class GroupAccuracy:
    """Accuracy per metadata group accumulated over batches (counts per group only).

    Args:
        sync_on_compute: when :mod:`torch.distributed` is initialised, ``compute()`` sums the
            counts of every rank of ``process_group`` (over the union of the groups the ranks
            have seen; a collective: call it on every rank). Default: ``True``.
        process_group: the ranks to sum over. Default: the default (whole world) group.

    Examples::

        >>> from metanorm.metrics import GroupAccuracy
        >>> metric = GroupAccuracy()
        >>> metric.update([1, 0], [1, 1], ["site A", "site B"])
        >>> metric.update([1], [1], ["site B"])
        >>> metric.compute()
        {'site A': 1.0, 'site B': 0.5}
    """

    def __init__(
        self, *, sync_on_compute: bool = True, process_group: ProcessGroup | None = None
    ) -> None:
        self.sync_on_compute = sync_on_compute
        self.process_group = process_group
        self.counts: Counts = {}

    def update(self, y_true: Any, y_pred: Any, groups: Any) -> None:
        """Adds a batch of true labels, predicted labels and groups."""
        _merge(self.counts, group_counts(y_true, y_pred, groups))

    def compute(self) -> dict[Any, float]:
        """``{group: accuracy}`` over everything seen (on all ranks), groups in sorted order."""
        counts = self.counts
        if _syncing(self.sync_on_compute, self.process_group):
            counts = _all_reduce_counts(counts, self.process_group)
        if not counts:
            raise ValueError("expected at least one update() before compute(), got none")
        return {k: counts[k][1] / counts[k][0] for k in _sorted_keys(list(counts))}

    def reset(self) -> None:
        """Forgets the counts."""
        self.counts = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(groups={len(self.counts)})"
