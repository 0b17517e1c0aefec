r"""Metadata Normalization synchronised over processes (torch.distributed), as SyncBatchNorm.

MDN (Lu et al., CVPR 2021, https://arxiv.org/abs/2104.09052) estimates
:math:`\hat\beta = (N/m)\,\Sigma^{-1} X_b^\top F` from each batch. Under data parallelism every
process sees only its own share of the batch, so each would estimate β from fewer rows, and MDN
gets weaker as processes are added. The statistics are sums, so one all-reduce per direction
makes the estimate that of the union batch, exactly:

- forward: every rank r sums :math:`[X_r^\top F_r,\ m_r]` (one flat tensor) over the ranks;
  :math:`M = \sum_r m_r`, :math:`\hat\beta = (N/M)\,\Sigma^{-1}\sum_r X_r^\top F_r` (the same on
  every rank) and :math:`y_r = F_r - X_{r,R}\hat\beta_R`;
- backward: :math:`T = \sum_r X_{r,R}^\top G_r` is summed, and
  :math:`\partial L/\partial F_r = G_r - (N/M)\,X_r\,\Sigma^{-1}_{:,R}\,T`, the gradient of
  :math:`\sum_r L_r` (DDP then averages the parameter gradients by 1/W, the convention of
  :class:`torch.nn.SyncBatchNorm`; see ``docs/distributed.md``);
- the running β then moves identically on every rank, without a broadcast.

:class:`SyncMetadataNorm` is :class:`~metanorm.nn.MetadataNorm` with a process group; its only
difference is the reduce point (``MetadataNorm._reducer``), so every option of the layer carries
over. :func:`global_design_statistics` builds a layer when each rank holds only its shard of the
training design.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin

from metanorm._validation import as_2d_tensor, check_finite
from metanorm.design import Design
from metanorm.linalg import inverse_gram
from metanorm.nn._base import _MetadataNormBase, resolve_keep
from metanorm.nn._functions import StatisticsReducer
from metanorm.nn.location_scale import MetadataLocationScaleNorm
from metanorm.nn.metadata_norm import MetadataNorm
from metanorm.nn.penalty import PenaltyMetadataNorm
from metanorm.nn.recursive import RecursiveMetadataNorm
from metanorm.nn.scale import MetadataScaleNorm

__all__ = [
    "SyncMetadataLocationScaleNorm",
    "SyncMetadataNorm",
    "SyncMetadataScaleNorm",
    "SyncPenaltyMetadataNorm",
    "SyncRecursiveMetadataNorm",
    "global_design_statistics",
    "revert_sync_metadata_norm",
]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(tensor: Tensor, group: Any) -> Tensor:
    """The sum over ``group``; a functional collective (traceable by :func:`torch.compile`)."""
    from torch.distributed import _functional_collectives as funcol

    return funcol.wait_tensor(funcol.all_reduce(tensor, "sum", group))


class _ProcessGroupReducer:
    """The reduce point of the layers: an all-reduce over a process group."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the group's processes."""
        return _all_reduce_sum(tensor, self.group)


class _SyncMixin(_MetadataNormBase):
    """The process group of a synchronised layer; the reduce point in training."""

    process_group: Any

    def _reducer(self) -> StatisticsReducer | None:
        """An all-reduce over the process group in training; None in one process or in eval."""
        if not self.training or not _distributed():
            return None
        group = dist.group.WORLD if self.process_group is None else self.process_group
        if dist.get_world_size(group) == 1:
            return None
        return _ProcessGroupReducer(group)

    @classmethod
    def convert_sync_metadata_norm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Swaps every MDN layer for its synchronised class (see :class:`SyncMetadataNorm`)."""
        return _convert(module, process_group)


class SyncMetadataNorm(_SyncMixin, MetadataNorm):
    r"""A :class:`~metanorm.nn.MetadataNorm` whose batch estimate spans every process.

    In training, each process's batch statistics are summed over ``process_group`` before the
    estimate, so every process gets the β̂ of the union batch (M rows in all) and removes it from
    its own rows, and the backward pass sums the gradient statistic the same way: outputs, input
    gradients and the running β are those of one process holding the union batch. Two
    all-reduces per layer and training step (K·D + 1 values forward, K·D backward); the
    functional collectives are used, so nothing is read on the host and the layer compiles.

    - Batch sizes may differ between processes (exact); a process with an empty batch still
      joins the collectives and returns its empty input; a union batch of M = 0 returns the
      input and changes no buffer. A union batch of M ≤ K uses the running β (as
      :class:`MetadataNorm` does for m ≤ K), decided on the device.
    - Every process must call the layer in training (as with :class:`torch.nn.SyncBatchNorm`),
      and use its output in the loss it back-propagates.
    - A non-finite estimate on one process is non-finite on all (the statistics are summed), so
      ``on_nonfinite`` acts the same on every process.
    - A wrong feature or design width raises on the process that has it, before any collective
      (the others then wait until the process group's timeout).
    - Evaluation uses the running β and no collective (validating on one process alone is
      fine). Without ``track_running_stats``, evaluation uses the local batch only.
    - Without an initialised :mod:`torch.distributed`, or in a group of one process, it is
      exactly a :class:`MetadataNorm`.

    Args:
        num_features, design, keep, momentum: as for :class:`MetadataNorm`.
        process_group: the processes to synchronise over. Default: ``None``, the whole world
            (the default group at call time).
        **kwargs: every other keyword argument of :class:`MetadataNorm` (``num_metadata``,
            ``track_running_stats``, ``ridge``, ``on_nonfinite``, ``device``, ``dtype``, ...).

    Shape:
        As :class:`MetadataNorm`; in training the local batch may be empty (m = 0).

    Examples::

        >>> import torch
        >>> design = torch.cat([torch.randn(100, 1), torch.ones(100, 1)], dim=1)
        >>> layer = SyncMetadataNorm(8, design, keep=())   # one process: a plain MetadataNorm
        >>> layer(torch.randn(10, 8), design[:10]).shape
        torch.Size([10, 8])
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), MetadataNorm(8, design, keep=()))
        >>> model = SyncMetadataNorm.convert_sync_metadata_norm(model)
        >>> type(model[1]).__name__
        'SyncMetadataNorm'
        >>> type(revert_sync_metadata_norm(model)[1]).__name__
        'MetadataNorm'
    """

    process_group: Any

    def __init__(
        self,
        num_features: int,
        design: Any = None,
        keep: Iterable[int | str] | None = None,
        momentum: float | None = 0.1,
        *,
        process_group: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, design, keep, momentum, **kwargs)
        self.process_group = process_group

    @classmethod
    def convert_sync_metadata_norm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Swaps every MDN layer in ``module`` for its synchronised class.

        As :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`: children are replaced in
        place, and the (possibly new) root is returned. Each layer becomes the synchronised
        class of its estimator (:class:`MetadataNorm` → :class:`SyncMetadataNorm`,
        :class:`~metanorm.nn.RecursiveMetadataNorm` → :class:`SyncRecursiveMetadataNorm`,
        :class:`~metanorm.nn.PenaltyMetadataNorm` → :class:`SyncPenaltyMetadataNorm`,
        :class:`~metanorm.nn.MetadataScaleNorm` → :class:`SyncMetadataScaleNorm`,
        :class:`~metanorm.nn.MetadataLocationScaleNorm` →
        :class:`SyncMetadataLocationScaleNorm`), whichever
        class this is called on, sharing its buffers (the same tensors) and every attribute;
        hooks carry over. Layers that are synced already are left as they are.

        Args:
            module: a model, or a single layer.
            process_group: the group the layers synchronise over. Default: the whole world.

        Returns:
            ``module`` with its MDN layers synced (a new object if ``module`` itself is one).

        Raises:
            ValueError: a lazy layer has not run yet (its β has no shape).
            TypeError: a subclass of an MDN layer that has no synchronised class (its
                behaviour would be dropped).
        """
        return _convert(module, process_group)

    @classmethod
    def from_design_statistics(
        cls,
        num_features: int,
        gram: Tensor,
        n_samples: int | float | Tensor,
        keep: Iterable[int | str] | None = None,
        momentum: float | None = 0.1,
        *,
        columns: Iterable[str] | None = None,
        ridge: float = 0.0,
        process_group: Any = None,
        **kwargs: Any,
    ) -> SyncMetadataNorm:
        r"""Builds the layer from :math:`X^\top X` and N instead of the whole design.

        For sharded metadata: each process holds the design rows of its shard only, and
        :func:`global_design_statistics` sums :math:`X_r^\top X_r` and :math:`N_r`. The layer is
        the one ``SyncMetadataNorm(num_features, whole_design, ...)`` builds:
        :math:`\Sigma^{-1}` follows :func:`metanorm.linalg.inverse_gram` (the same ridge, the
        same refusal of a singular or ill-conditioned :math:`\Sigma`, naming the columns).

        Args:
            num_features: D, as for :class:`MetadataNorm`.
            gram: :math:`X^\top X`, ``(K, K)`` (symmetric positive semi-definite: a matrix
                that is not symmetric, or has a negative eigenvalue beyond rounding, is refused
                with a message saying so).
            n_samples: N, the number of design rows behind ``gram``.
            keep: kept columns, indices (or names, with ``columns``). Default: none.
            momentum: as for :class:`MetadataNorm`.
            columns: the K column names (for ``keep`` by name and for error messages).
            ridge: as for :class:`MetadataNorm`.
            process_group: as for :class:`SyncMetadataNorm`.
            **kwargs: further keyword arguments of :class:`MetadataNorm` (not ``design`` or
                ``num_metadata``).

        Examples::

            >>> import torch
            >>> x = torch.cat([torch.randn(50, 1), torch.ones(50, 1)], dim=1)
            >>> gram, n = global_design_statistics(x)   # one process: this process's rows
            >>> layer = SyncMetadataNorm.from_design_statistics(8, gram, n)
            >>> torch.allclose(layer.gram_inverse, SyncMetadataNorm(8, x, keep=()).gram_inverse)
            True
        """
        if not isinstance(gram, Tensor) or gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
            raise ValueError(f"expected gram (XᵀX) to be a (K, K) tensor, got {gram!r:.80}")
        n = float(n_samples)
        if not n >= 1:
            raise ValueError(f"expected n_samples >= 1 (the rows behind gram), got {n_samples!r}")
        names = None if columns is None else tuple(columns)
        k = gram.shape[0]
        check_finite(gram.to(torch.float64), "gram")
        _check_gram(gram, names)
        gram_inverse = inverse_gram(_square_root(gram), ridge=ridge, columns=names)
        keep_idx = resolve_keep(keep or (), k, names)
        if len(keep_idx) == k:
            raise ValueError(f"keep lists all {k} design columns: nothing would be removed")
        layer = cls(
            num_features,
            None,
            None,
            momentum,
            num_metadata=k,
            ridge=ridge,
            process_group=process_group,
            **kwargs,
        )
        with torch.no_grad():
            layer.gram_inverse.copy_(gram_inverse)
            layer.n_samples.fill_(n)
            layer.remove_mask[list(keep_idx)] = False
        layer.columns = names
        layer.has_design = True
        return layer


def revert_sync_metadata_norm(module: nn.Module) -> nn.Module:
    """Swaps every synchronised MDN layer in ``module`` back for its plain class.

    The inverse of :meth:`SyncMetadataNorm.convert_sync_metadata_norm` (for a checkpoint, or for
    evaluation in one process): each layer keeps its buffers (the same tensors) and attributes.

    Returns:
        ``module`` with its synced layers replaced (a new object if ``module`` itself is one).

    Examples::

        >>> import torch
        >>> from metanorm.nn import MetadataNorm, SyncMetadataNorm
        >>> design = torch.cat([torch.randn(30, 1), torch.ones(30, 1)], 1)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), MetadataNorm(4, design, keep=()))
        >>> synced = SyncMetadataNorm.convert_sync_metadata_norm(model)
        >>> type(synced[1]).__name__, type(revert_sync_metadata_norm(synced)[1]).__name__
        ('SyncMetadataNorm', 'MetadataNorm')
    """
    if isinstance(module, _SyncMixin):
        plain = _with_class(module, _PLAIN[type(module)])
        del plain.process_group
        return plain
    for name, child in module.named_children():
        reverted = revert_sync_metadata_norm(child)
        if reverted is not child:
            module.add_module(name, reverted)
    return module


def global_design_statistics(
    design: Any, *, process_group: Any = None, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    r"""Sums :math:`X_r^\top X_r` and :math:`N_r` of each process's shard of the design.

    When each process holds only its shard's design rows, the layer's :math:`\Sigma = X^\top X`
    and N are these sums (one all-reduce). Build the layer with
    :meth:`SyncMetadataNorm.from_design_statistics`. Every process of the group must call it;
    without an initialised :mod:`torch.distributed` it returns the local sums. The widths K are
    compared first (one more small all-reduce), so a shard of another width raises a
    ``ValueError`` on every process instead of a failed collective.

    Args:
        design: this process's design rows, ``(N_r, K)`` tensor, array or
            :class:`metanorm.design.Design` (``N_r`` may be 0).
        process_group: the group to sum over. Default: the whole world.
        device: where to compute. Default: the design's device, or the current CUDA device when
            the group's backend is NCCL.

    Returns:
        ``(gram, n_samples)``: float64 ``(K, K)`` :math:`\sum_r X_r^\top X_r` and float64 0-d
        :math:`\sum_r N_r`.

    Examples::

        >>> import torch
        >>> x = torch.tensor([[1.0, 2.0], [1.0, 3.0], [1.0, 5.0]])
        >>> gram, n = global_design_statistics(x)
        >>> gram
        tensor([[ 3., 10.],
                [10., 38.]], dtype=torch.float64)
        >>> int(n)
        3
    """
    if isinstance(design, Design):
        design = design.matrix
    if device is None and _distributed():
        group = dist.group.WORLD if process_group is None else process_group
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
    x = as_2d_tensor(design, "design", dtype=torch.float64)
    if device is not None:
        x = x.to(device)
    check_finite(x, "design")
    gram = x.T @ x
    n = torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device)
    if not _distributed():
        return gram, n
    group = dist.group.WORLD if process_group is None else process_group
    k = x.shape[1]
    widths = torch.tensor([k, -k], dtype=torch.float64, device=x.device)
    dist.all_reduce(widths, op=dist.ReduceOp.MAX, group=group)
    if widths[0] != k or -widths[1] != k:
        raise ValueError(
            f"expected design shards of one width K on every process, got K = {k} here and "
            f"K from {int(-widths[1])} to {int(widths[0])} over the group"
        )
    packed = torch.cat([gram.reshape(-1), n.reshape(1)])
    dist.all_reduce(packed, group=group)
    return packed[:-1].reshape(k, k), packed[-1]


class SyncRecursiveMetadataNorm(_SyncMixin, RecursiveMetadataNorm):
    r"""A :class:`~metanorm.nn.RecursiveMetadataNorm` whose update spans every process.

    In training, :math:`X_b^\top X_b`, :math:`X_b^\top F` and m are summed over
    ``process_group`` before the RLS step, so every process takes the step of the union batch
    and its state stays identical on all processes. ``grad_through_beta=True`` is refused.

    Args:
        num_features, num_metadata, keep: as for :class:`~metanorm.nn.RecursiveMetadataNorm`.
        process_group: the processes to synchronise over. Default: the whole world.
        **kwargs: the other arguments of :class:`~metanorm.nn.RecursiveMetadataNorm`.
    """

    def __init__(
        self,
        num_features: int,
        num_metadata: int | Design,
        keep: Iterable[int | str] | None = None,
        *,
        process_group: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, num_metadata, keep, **kwargs)
        self.process_group = process_group


class SyncPenaltyMetadataNorm(_SyncMixin, PenaltyMetadataNorm):
    r"""A :class:`~metanorm.nn.PenaltyMetadataNorm` whose optimiser step spans every process.

    In training, the penalty's gradient statistics (:math:`X_b^\top X_b`, :math:`X_b^\top F`,
    m) are summed over ``process_group``, so every process takes the same step on β.

    Args:
        num_features, num_metadata, keep: as for :class:`~metanorm.nn.PenaltyMetadataNorm`.
        process_group: the processes to synchronise over. Default: the whole world.
        **kwargs: the other arguments of :class:`~metanorm.nn.PenaltyMetadataNorm`.
    """

    def __init__(
        self,
        num_features: int,
        num_metadata: int | Design,
        keep: Iterable[int | str] | None = None,
        *,
        process_group: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, num_metadata, keep, **kwargs)
        self.process_group = process_group


class SyncMetadataScaleNorm(_SyncMixin, MetadataScaleNorm):
    r"""A :class:`~metanorm.nn.MetadataScaleNorm` whose estimate is that of the union batch.

    Args:
        num_channels, design: as for :class:`~metanorm.nn.MetadataScaleNorm`.
        process_group: the processes to synchronise over. Default: the whole world.
        **kwargs: the other arguments of :class:`~metanorm.nn.MetadataScaleNorm`.
    """

    def __init__(
        self, num_channels: int, design: Any = None, *, process_group: Any = None, **kwargs: Any
    ) -> None:
        super().__init__(num_channels, design, **kwargs)
        self.process_group = process_group


class SyncMetadataLocationScaleNorm(_SyncMixin, MetadataLocationScaleNorm):
    r"""A :class:`~metanorm.nn.MetadataLocationScaleNorm` whose estimates are the union batch's.

    β and γ are estimated from the statistics summed over the processes (two collectives per
    direction: the location's, then the residual log-scale's).

    Args:
        num_channels, design: as for :class:`~metanorm.nn.MetadataLocationScaleNorm`.
        process_group: the processes to synchronise over. Default: the whole world.
        **kwargs: the other arguments of :class:`~metanorm.nn.MetadataLocationScaleNorm`.
    """

    def __init__(
        self, num_channels: int, design: Any = None, *, process_group: Any = None, **kwargs: Any
    ) -> None:
        super().__init__(num_channels, design, **kwargs)
        self.process_group = process_group


_SYNCED: dict[type, type] = {
    MetadataNorm: SyncMetadataNorm,
    RecursiveMetadataNorm: SyncRecursiveMetadataNorm,
    PenaltyMetadataNorm: SyncPenaltyMetadataNorm,
    MetadataScaleNorm: SyncMetadataScaleNorm,
    MetadataLocationScaleNorm: SyncMetadataLocationScaleNorm,
}
_PLAIN: dict[type, type] = {synced: plain for plain, synced in _SYNCED.items()}


def _convert(module: nn.Module, process_group: Any) -> nn.Module:
    if isinstance(module, _MetadataNormBase) and not isinstance(module, _SyncMixin):
        if isinstance(module, LazyModuleMixin):
            raise ValueError(
                f"expected an initialised MDN layer, got a {type(module).__name__} that has not "
                "run yet: run one batch through the model before converting it"
            )
        synced_cls = _SYNCED.get(type(module))
        if synced_cls is None:
            raise TypeError(
                "expected MDN layers with a synchronised class ("
                + ", ".join(c.__name__ for c in _SYNCED)
                + f"), got a {type(module).__name__} (a subclass this conversion would turn "
                "into a plain synced layer)"
            )
        synced = _with_class(module, synced_cls)
        synced.process_group = process_group
        return synced
    for name, child in module.named_children():
        converted = _convert(child, process_group)
        if converted is not child:
            module.add_module(name, converted)
    return module


#: Relative tolerance of the symmetry and semi-definiteness checks of a Gram (rounding of sums
#: over processes and of float32 statistics stays far below it).
_GRAM_TOL = 1e-6


def _check_gram(gram: Tensor, names: tuple[str, ...] | None) -> None:
    r"""Raises ``ValueError`` unless ``gram`` is symmetric positive semi-definite (to rounding).

    :math:`X^\top X` is both by construction: a matrix that is not was not built as one (a
    transposed or partial sum, another statistic), and is refused rather than symmetrised or
    reported as collinear columns.
    """
    g = gram.detach().to(torch.float64)
    k = g.shape[0]
    label = [f"column {j}" for j in range(k)] if names is None else [repr(c) for c in names]
    top = float(g.abs().max())
    if top == 0:
        return  # all zeros: inverse_gram names the zero columns
    asym = (g - g.T).abs()
    worst = float(asym.max())
    if worst > _GRAM_TOL * top:
        i, j = divmod(int(asym.argmax()), k)
        raise ValueError(
            f"expected gram to be symmetric (XᵀX), got entries ({i}, {j}) = "
            f"{float(g[i, j]):.6g} and ({j}, {i}) = {float(g[j, i]):.6g} ({label[i]}, "
            f"{label[j]}): a Gram matrix summed from design rows is symmetric; check how it "
            "was built (global_design_statistics builds it)"
        )
    evals, evecs = torch.linalg.eigh((g + g.T) / 2)
    lowest = float(evals[0])
    if lowest < -_GRAM_TOL * float(evals[-1]):
        weight = evecs[:, 0].abs()
        involved = (weight > 0.1 * float(weight.max())).nonzero().flatten().tolist()
        raise ValueError(
            f"expected gram to be positive semi-definite (XᵀX), got an indefinite matrix: its "
            f"smallest eigenvalue is {lowest:.6g} (largest {float(evals[-1]):.6g}), along "
            f"{', '.join(label[j] for j in involved)}. No design has such a Gram: it is not "
            "a sum of XᵀX over design rows (a difference of sums, or another statistic?)"
        )


def _square_root(gram: Tensor) -> Tensor:
    r"""A (K, K) matrix R with :math:`R^\top R` = ``gram`` (a design inverse_gram can take)."""
    g = gram.detach().to(torch.float64)
    g = (g + g.T) / 2
    evals, evecs = torch.linalg.eigh(g)
    return evals.clamp_min(0).sqrt()[:, None] * evecs.T


def _with_class(module: nn.Module, cls: type[nn.Module]) -> Any:
    """A module of class ``cls`` sharing ``module``'s tensors and attributes.

    The instance dictionary is copied with fresh containers (parameters, buffers, submodules,
    hooks) holding the same objects, so later changes to one module's containers do not reach
    the other, while their tensors are shared.
    """
    new = cls.__new__(cls)
    state = {}
    for key, value in module.__dict__.items():
        state[key] = copy.copy(value) if isinstance(value, dict | set | list) else value
    new.__dict__.update(state)
    return new
