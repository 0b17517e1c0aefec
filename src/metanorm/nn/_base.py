r"""The base of every MDN layer (the role of ``torch.nn.modules.batchnorm._NormBase``).

:class:`_MetadataNormBase` holds what the estimators share: the number of design columns and the
kept → removed mask, the counters, the input and design-row checks, the metadata in scope,
channel-wise pooling, the dtype and autocast policy, the non-finite policy, the process-group
hook (``_reducer``), ``reset_running_stats``, versioned ``state_dict`` migrations, the refit
protocol of :func:`metanorm.nn.utils.refit_running_beta`, and the warning when most training
batches were too small for their own estimate. A layer says how it estimates β from a batch and
folds it into its state (``_estimate``), and how a refit over a data set sets that state
(``_load_refit``).

Reliability hooks, each in its own method: ``_apply`` keeps the float64 design statistics
through casts, ``_warn_skipped`` and ``_warn_untrained`` report at ``eval()``/``state_dict()``/
refit/load what a forward pass cannot report without a host sync, and
``_check_loaded_state``/``_check_loaded_design`` refuse a checkpoint that is corrupt or belongs
to another design.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from metanorm._validation import describe
from metanorm.design import Design
from metanorm.nn import functional as MF
from metanorm.nn import scope as _scope
from metanorm.nn._functions import StatisticsReducer

__all__: list[str] = []

_COUNTERS = ("num_batches_tracked", "num_samples_tracked", "num_batches_skipped")
#: The counter of training batches whose output fell back to the running β (m ≤ K).
_FALLBACK = "num_batches_fallback"
#: Buffers a cast of the module (``.half()``, ``.to(dtype)``) leaves in their dtype: Σ⁻¹, N and
#: the recursive layer's P, float64 statistics that a lower precision would corrupt.
_PINNED_DTYPE = ("gram_inverse", "n_samples", "covariance")
#: The buffers that say which design a layer belongs to (compared when a checkpoint is loaded).
_DESIGN_BUFFERS = ("gram_inverse", "n_samples", "remove_mask")
#: Relative tolerance of the Gram Σ/N comparison at load (bits differ across machines).
GRAM_RTOL = 1e-9
#: Design sanity: the relative gap between the training rows' and the design's second moments
#: above which the layer warns (refit: raises), and the rows per column needed before checking.
DESIGN_GAP_TOLERANCE = 0.25
DESIGN_CHECK_ROWS_PER_COLUMN = 10


def check_number(name: str, value: Any, low: float, high: float, *, open_low: bool) -> float:
    """``value`` as a float in ``(low, high]`` (``open_low``) or ``[low, high]``."""
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise ValueError(f"expected {name} in {bracket}{low}, {high}], got {value!r}")
    return float(value)


def check_num_features(input: Tensor, num_features: int) -> int:
    """Raises ``ValueError`` unless ``input`` is ``(m, *)`` with ``num_features`` per sample.

    Returns:
        D, the number of features of one sample.
    """
    if input.dim() < 2:
        raise ValueError(
            f"expected input of shape (m, *) with {num_features} features per sample, "
            f"got {input.dim()}D input of shape {tuple(input.shape)}"
        )
    d = math.prod(input.shape[1:])
    if d != num_features:
        raise ValueError(
            f"expected {num_features} features per sample (num_features), got "
            f"{d} from input of shape {tuple(input.shape)}"
        )
    return d


def _check_positive_int(name: str, value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected {name} ({what}) to be a positive int, got {value!r}")
    return value


def resolve_keep(
    keep: Iterable[int | str], k: int, columns: tuple[str, ...] | None
) -> tuple[int, ...]:
    """Column indices of ``keep`` (indices, or names of ``columns``), sorted, validated."""
    if isinstance(keep, str):
        keep = (keep,)  # one column name
    out: list[int] = []
    for c in keep:
        if isinstance(c, str):
            if columns is None or c not in columns:
                raise ValueError(
                    f"keep column {c!r} not found; "
                    + (
                        f"the design has columns {list(columns)}"
                        if columns
                        else "names need a metanorm.design.Design; pass indices for a plain matrix"
                    )
                )
            out.append(columns.index(c))
        elif isinstance(c, int) and not isinstance(c, bool):
            if not -k <= c < k:
                raise ValueError(f"keep index {c} out of range for a design of {k} columns")
            out.append(c % k)
        else:
            raise TypeError(f"expected keep entries to be ints or column names, got {c!r}")
    return tuple(sorted(set(out)))


def _check_keep(
    design: Any, keep: Iterable[int | str] | None
) -> tuple[Iterable[int | str], tuple[str, ...] | None]:
    """The kept columns and column names of a layer built from ``design`` with ``keep=``.

    A :class:`~metanorm.design.Design` carries its columns' roles: its ``keep`` is used, and a
    ``keep=`` that names other columns is a ``ValueError`` (naming both). A plain matrix has no
    roles: without ``keep=`` no column is kept, with a ``FutureWarning`` (an explicit ``keep=()``
    silences it); a later release will require ``keep=`` there.
    """
    if isinstance(design, Design):
        k, columns = design.shape[1], design.columns
        if keep is not None:
            given = resolve_keep(keep, k, columns)
            if given != tuple(sorted(design.keep)):
                raise ValueError(
                    f"keep={_names(given, columns)} contradicts the design's own keep="
                    f"{_names(design.keep, columns)}: a Design carries its columns' roles; drop "
                    "keep= (the design's is used) or build the design with the columns to keep, "
                    "e.g. make_design(data, keep=[...])"
                )
        return design.keep, columns
    if design is not None and keep is None:
        warnings.warn(
            "a design given as a plain matrix has no column roles, so no column is kept: a "
            "label among its columns would be removed with the metadata. Pass the "
            "metanorm.design.Design itself (its keep is used), or keep= explicitly (keep=() for "
            "none); a plain matrix without keep= will be an error in a future release",
            FutureWarning,
            stacklevel=_caller_level(),
        )
    return keep or (), None


def _columns_of(
    num_metadata: int | Design, keep: Iterable[int | str] | None
) -> tuple[int, Iterable[int | str] | None, tuple[str, ...] | None]:
    """K, the kept columns and the names of a layer given ``num_metadata`` (K or a Design)."""
    if isinstance(keep, str | bytes):
        raise TypeError(f"expected keep to be a sequence of column indices, got {keep!r}")
    if isinstance(num_metadata, Design):  # K, the roles and the names from the design
        keep, columns = _check_keep(num_metadata, keep)
        return num_metadata.shape[1], keep, columns
    return num_metadata, keep, None


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside ``metanorm.nn`` (the user's call)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(
        ("metanorm.nn", "torch.nn.modules")
    ):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


def _names(indices: Iterable[int], columns: tuple[str, ...] | None) -> list[Any]:
    return [columns[i] if columns is not None else i for i in indices]


class _MetadataNormBase(nn.Module):
    """Shared by every MDN estimator; see the module docstring."""

    takes_metadata: ClassVar[bool] = True
    #: whether a training batch of m ≤ K falls back to the running β (the batch estimators)
    _falls_back: ClassVar[bool] = False
    #: passes over the loader a refit takes (a two-stage estimate: 2); see ``_begin_refit``
    _refit_passes: ClassVar[int] = 1
    num_features: int
    num_metadata: int
    channelwise: bool
    on_nonfinite: str
    remove_mask: Tensor
    num_batches_tracked: Tensor | None
    num_samples_tracked: Tensor | None
    num_batches_skipped: Tensor | None
    num_batches_fallback: Tensor | None

    def __init__(
        self,
        num_features: int,
        num_metadata: int,
        keep: Iterable[int | str] | None = (),
        *,
        columns: tuple[str, ...] | None = None,
        channelwise: bool = False,
        on_nonfinite: str = "skip",
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not (self._is_lazy() and num_features == 0):
            _check_positive_int("num_features", num_features, "D, the features per sample")
        _check_positive_int("num_metadata", num_metadata, "K, the design's columns")
        if on_nonfinite not in MF.NONFINITE_POLICIES:
            raise ValueError(
                f"expected on_nonfinite in {MF.NONFINITE_POLICIES}, got {on_nonfinite!r}"
            )
        if not isinstance(channelwise, bool):
            raise TypeError(f"expected channelwise to be a bool, got {channelwise!r}")
        keep_idx = resolve_keep(keep or (), num_metadata, columns)
        if len(keep_idx) == num_metadata:
            raise ValueError(
                f"keep lists all {num_metadata} design columns: nothing would be removed"
            )
        self.num_features = num_features
        self.num_metadata = num_metadata
        self.channelwise = channelwise
        self.on_nonfinite = on_nonfinite
        self.track_running_stats = track_running_stats
        self.columns = columns
        mask = torch.ones(num_metadata, dtype=torch.bool, device=device)
        mask[list(keep_idx)] = False
        self.register_buffer("remove_mask", mask)
        for name in (*_COUNTERS, _FALLBACK):
            value = torch.tensor(0, dtype=torch.long, device=device)
            self.register_buffer(name, value if track_running_stats else None)
        self._refit_sums: list[Any] | None = None
        self._fallback_seen = (0, 0)
        self._skipped_reported = 0

    # ---------------------------------------------------------------- construction helpers

    @classmethod
    def _is_lazy(cls) -> bool:
        return issubclass(cls, LazyModuleMixin)

    def _per_feature(
        self,
        device: torch.device | str | None,
        dtype: torch.dtype,
        *,
        parameter: bool = False,
    ) -> Tensor:
        """A zero ``(K, D)`` tensor (uninitialised in a lazy layer, shaped at the first call)."""
        if self._is_lazy():
            if parameter:
                return UninitializedParameter(  # type: ignore[call-arg]
                    requires_grad=False, device=device, dtype=dtype
                )
            return UninitializedBuffer(device=device, dtype=dtype)  # type: ignore[call-arg]
        tensor = torch.zeros(self.num_metadata, self.num_features, device=device, dtype=dtype)
        return nn.Parameter(tensor, requires_grad=False) if parameter else tensor

    # ---------------------------------------------------------------- state

    @property
    def keep(self) -> tuple[int, ...]:
        """Indices of the kept design columns."""
        return tuple((~self.remove_mask).nonzero().flatten().tolist())

    def _reset_estimate(self) -> None:
        """Resets the estimator's own state (β and what it needs)."""

    def reset_running_stats(self) -> None:
        """Resets the estimate (see the layer) and zeroes the counters."""
        self._reset_estimate()
        for name in (*_COUNTERS, _FALLBACK):
            counter = getattr(self, name)
            if counter is not None:
                counter.zero_()
        self._fallback_seen = (0, 0)
        self._skipped_reported = 0
        self._reset_design_sanity()

    def _reset_design_sanity(self) -> None:
        for name in ("design_rows_gram", "design_rows_seen"):
            tensor = getattr(self, name, None)
            if tensor is not None:
                tensor.zero_()

    def _reducer(self) -> StatisticsReducer | None:
        """Where the batch statistics of several processes meet (None: this process only)."""
        return None

    def _ready(self) -> None:
        """Raises if the layer cannot run: built without a design, not restored, training."""
        if self.training and not getattr(self, "has_design", True):
            raise RuntimeError(
                f"this {type(self).__name__} was built without a design (num_metadata="
                f"{self.num_metadata}): restore it with load_state_dict, or build it with "
                "design= (the whole training design)"
            )

    # ---------------------------------------------------------------- checks

    def _check_input_dim(self, input: Any) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"expected input to be a tensor, got {describe(input)}")
        if not input.is_floating_point():
            raise TypeError(f"expected a floating-point input, got {describe(input)}")
        if self.channelwise:
            if input.dim() < 2 or input.shape[1] != self.num_features:
                raise ValueError(
                    f"expected input of shape (m, C, *) with C = {self.num_features} channels "
                    f"(num_features of a channel-wise layer), got {describe(input)}"
                )
            return
        if input.dim() != 2 or input.shape[1] != self.num_features:  # (m, D) passes at once
            check_num_features(input, self.num_features)

    # ---------------------------------------------------------------- forward

    def forward(self, input: Tensor, metadata: Tensor | None = None) -> Tensor:
        """Removes the metadata effect; see the class docstring.

        Args:
            input: the features, ``(m, *)`` (channel-wise: ``(m, C, *)``).
            metadata: the batch's design rows ``(m, K)``. ``None`` (or omitted): the rows in
                scope (see :class:`metanorm.nn.MetadataModel`).
        """
        self._ready()
        self._check_input_dim(input)
        if metadata is None:
            metadata = _scope.metadata_for(self, input)
        reducer = self._reducer() if self.training else None
        m, k = input.shape[0], self.num_metadata
        if m == 0 and reducer is None:
            raise ValueError(f"expected input of shape (m, *) with m >= 1, got {describe(input)}")
        MF.check_metadata(metadata, m, k)
        in_dtype = input.dtype
        dtype = torch.float32 if in_dtype in MF._LOW_PRECISION else in_dtype
        rows = metadata if metadata.dim() == 2 else metadata.reshape(m, k)
        on_cpu = input.is_cpu
        same_device = (on_cpu and rows.is_cpu) or rows.device == input.device
        if not same_device or rows.dtype != dtype:
            rows = rows.to(device=input.device, dtype=dtype)
        if rows.requires_grad:
            self._refuse_grad_rows()
            rows = rows.detach()
        features = input if in_dtype == dtype else input.to(dtype)
        # a CPU input's device is not read (building a device object is a fixed cost)
        device_type = "cpu" if on_cpu else input.device.type
        if torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                out = self._train_or_eval(features, rows, reducer)
        else:  # no context to enter: a fixed cost of every step saved
            out = self._train_or_eval(features, rows, reducer)
        return out if out.dtype == in_dtype else out.to(in_dtype)

    def _train_or_eval(
        self, input: Tensor, rows: Tensor, reducer: StatisticsReducer | None
    ) -> Tensor:
        if self.training and self._refit_sums is None:
            self._accumulate_design_sanity(rows)
        return self._normalize(input, rows, reducer)

    def _normalize(self, input: Tensor, rows: Tensor, reducer: StatisticsReducer | None) -> Tensor:
        """The layer's map on ``(m, *)`` input in the compute dtype: flattens or pools."""
        m = input.shape[0]
        if self.channelwise:
            # one β column per channel: regress the spatial means, subtract at every position
            pooled = input.mean(dim=tuple(range(2, input.dim()))) if input.dim() > 2 else input
            shift = self._dispatch(pooled, rows, reducer) - pooled
            return input + shift.reshape(shift.shape + (1,) * (input.dim() - 2))
        flat = input if input.dim() == 2 else input.reshape(m, math.prod(input.shape[1:]))
        out = self._dispatch(flat, rows, reducer)
        return out if input.dim() == 2 else out.reshape(input.shape)

    def _dispatch(
        self, features: Tensor, rows: Tensor, reducer: StatisticsReducer | None
    ) -> Tensor:
        if self._refit_sums is not None:
            self._accumulate(self._refit_target(features), rows)
            was = self.training
            self.training = False
            try:
                return self._estimate(features, rows, None)
            finally:
                self.training = was
        return self._estimate(features, rows, reducer)

    def _estimate(
        self, features: Tensor, rows: Tensor, reducer: StatisticsReducer | None
    ) -> Tensor:
        """The layer's output for ``(m, D)`` features (training: also updates the state)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- non-finite batches

    def _report(self, finite: Tensor | bool, rows: Tensor) -> None:
        if self.on_nonfinite != "skip":
            MF.report_nonfinite(finite, rows, self.on_nonfinite)

    # ---------------------------------------------------------------- m ≤ K

    def train(self, mode: bool = True) -> _MetadataNormBase:
        """Sets the training mode; leaving training reports skipped and fallen-back batches.

        Switching to evaluation reads the counters (no forward pass has to): it warns once per
        new count of skipped non-finite batches, when most batches fell back to the running β,
        and when the layer never trained.
        """
        if not mode and self.training:
            self._check_fallback()
            self._warn_skipped()
            self._warn_untrained()
            self._warn_design_mismatch()
        return super().train(mode)

    def _check_fallback(self) -> None:
        """Warns once if most training batches since the last check used the running β."""
        tracked, fallback = self.num_batches_tracked, self.num_batches_fallback
        if not self._falls_back or tracked is None or fallback is None:
            return
        if tracked.device.type == "meta":
            return
        now = (int(tracked), int(fallback))  # read at eval(), not in the forward pass
        before = self._fallback_seen
        self._fallback_seen = now
        batches, fell_back = now[0] - before[0], now[1] - before[1]
        if batches > 0 and 2 * fell_back > batches and not getattr(self, "_fallback_warned", 0):
            self._fallback_warned = 1
            warnings.warn(
                f"{type(self).__name__}: {fell_back} of the last {batches} training batches had "
                f"no more rows than the design has columns (m <= K = {self.num_metadata}); their "
                "outputs used the running β instead of their own estimate (their estimates "
                "still entered it). Remedies: synchronise the layer over processes "
                "(SyncMetadataNorm), the recursive estimator (RecursiveMetadataNorm), or "
                "channel-wise β over larger batches",
                UserWarning,
                stacklevel=3,
            )

    # ---------------------------------------------------------------- design sanity

    def _init_design_sanity(
        self, device: torch.device | str | None, dtype: torch.dtype | None = None
    ) -> None:
        """Registers the training rows' ΣX_bᵀX_b and row count (device buffers, not saved).

        The sum is kept in the layer's dtype (float32 by default; it follows casts), the rows'
        compute dtype, so that each training step adds to it with one in-place product; a check
        with a tolerance of 0.25 needs no more digits.
        """
        k = self.num_metadata
        zeros = torch.zeros(k, k, dtype=dtype or torch.float32, device=device)
        self.register_buffer("design_rows_gram", zeros, persistent=False)
        # a long counter: adding a Python int to a 0-d float64 buffer is lost under torch.compile
        self.register_buffer(
            "design_rows_seen", torch.zeros((), dtype=torch.long, device=device), persistent=False
        )
        self._design_warned = False

    def _accumulate_design_sanity(self, rows: Tensor) -> None:
        """Adds a training batch's X_bᵀX_b and m (one K×K product on the device, no sync).

        The rows never require a gradient here (they are detached, or refused, before), so
        nothing is recorded for autograd.
        """
        buffers = self._buffers
        gram = buffers.get("design_rows_gram")
        seen = buffers.get("design_rows_seen")
        if gram is None or seen is None or rows.is_meta:
            return
        if gram.dtype == rows.dtype:
            gram.addmm_(rows.mT, rows)  # one operation (an mm and an add_ are two)
        else:  # a cast of the module to another dtype than the input's
            gram.add_(torch.mm(rows.mT, rows))
        seen.add_(rows.shape[0])

    def _design_gap(self, gram: Tensor, rows: float) -> tuple[float, float, list[Any]] | None:
        r"""How far the rows seen are from the layer's design, or ``None`` if not checkable.

        The gap is :math:`\lVert S^{-1/2}(G/M - \Sigma/N)S^{-1/2}\rVert_F /
        \lVert S^{-1/2}(\Sigma/N)S^{-1/2}\rVert_F`, with G/M the rows' mean outer product,
        :math:`\Sigma/N` the design's and S the diagonal of :math:`\Sigma/N` (each column scaled
        by its root mean square in the design, so that units do not matter). Returns the gap,
        the tolerance (0.25 plus three times the sampling noise :math:`\sqrt{1/N + 1/M}`) and
        the columns that differ most.
        """
        gram_inverse = getattr(self, "gram_inverse", None)
        n_samples = getattr(self, "n_samples", None)
        k = self.num_metadata
        if gram_inverse is None or n_samples is None or gram_inverse.device.type == "meta":
            return None
        n = float(n_samples)
        if n <= 0 or rows < DESIGN_CHECK_ROWS_PER_COLUMN * k:
            return None
        eye = torch.eye(k, dtype=torch.float64)
        sigma = torch.linalg.inv(gram_inverse.detach().double().cpu())
        sigma = sigma - float(getattr(self, "ridge", 0.0)) * eye
        reference = sigma / n
        scale = reference.diagonal().clamp_min(torch.finfo(torch.float64).tiny).rsqrt()
        outer = scale[:, None] * scale[None, :]
        diff = (gram.detach().double().cpu() / rows - reference) * outer
        gap = float(diff.norm() / (reference * outer).norm())
        tolerance = DESIGN_GAP_TOLERANCE + 3.0 * math.sqrt(1.0 / n + 1.0 / rows)
        per_column = diff.norm(dim=0)
        order = per_column.argsort(descending=True).tolist()
        worst = [j for j in order[:3] if per_column[j] >= 0.5 * per_column[order[0]]]
        return gap, tolerance, _names(worst, self.columns)

    def _design_message(self, gap: float, tolerance: float, worst: list[Any], rows: int) -> str:
        return (
            f"{type(self).__name__}: the design rows it was given do not describe the layer's "
            f"design: over {rows} rows, their mean outer product differs from the design's "
            f"XᵀX/N by a relative gap of {gap:.2f} (more than {tolerance:.2f}, what sampling "
            f"explains); the columns that differ most: {worst}. Σ⁻¹ and N come from the design "
            "the layer was built with: build it from the design of the data it is trained on "
            "(a representative subsample is fine), in the same column order and coding"
        )

    def _warn_design_mismatch(self) -> None:
        """At ``eval()``: warns once if the training rows seen do not match the design."""
        gram = getattr(self, "design_rows_gram", None)
        seen = getattr(self, "design_rows_seen", None)
        if gram is None or seen is None or getattr(self, "_design_warned", False):
            return
        if seen.device.type == "meta":
            return
        rows = float(seen)  # read at eval(), not in the forward pass
        found = self._design_gap(gram, rows)
        if found is not None and found[0] > found[1]:
            self._design_warned = True
            warnings.warn(self._design_message(*found, int(rows)), UserWarning, stacklevel=3)

    def _check_refit_rows(self, xtx: Tensor, count: int) -> None:
        """At a refit: raises if the refit's rows do not match the design."""
        found = self._design_gap(xtx, float(count))
        if found is not None and found[0] > found[1]:
            raise ValueError(
                self._design_message(*found, count)
                + "; refit_running_beta(..., check_design=False) skips this check"
            )

    # ---------------------------------------------------------------- refit

    def _refittable(self) -> bool:
        return True

    def _infer_num_features(self, input: Tensor) -> int:
        """``num_features`` of a lazy layer from its first input."""
        return input.shape[1] if self.channelwise else math.prod(input.shape[1:])

    def _refit_target(self, features: Tensor) -> Tensor:
        """What the refit regresses on the design rows (the features by default)."""
        return features

    def _begin_refit(self, stage: int = 0, check_design: bool = True) -> None:
        """Starts refit pass ``stage`` (0, ..., ``_refit_passes`` - 1)."""
        self._check_fallback()
        self._warn_skipped()
        self._refit_sums = [None, None, 0, 0]
        self._refit_check_design = check_design

    def _accumulate(self, target: Tensor, rows: Tensor) -> None:
        sums = self._refit_sums
        assert sums is not None
        x = rows.to(torch.float64)
        xtx, xty = x.T @ x, x.T @ target.to(torch.float64)
        sums[0] = xtx if sums[0] is None else sums[0] + xtx
        sums[1] = xty if sums[1] is None else sums[1] + xty
        sums[2] += rows.shape[0]
        sums[3] += 1

    def _end_refit(self, process_group: Any = None) -> bool:
        """Sets the state from the sums (all-reduced under torch.distributed); False if none."""
        sums, self._refit_sums = self._refit_sums, None
        if sums is None:
            return False
        xtx, xty, count, batches = sums
        if dist.is_available() and dist.is_initialized():
            group = process_group or getattr(self, "process_group", None) or dist.group.WORLD
            if dist.get_world_size(group) > 1:
                k = self.num_metadata
                d = -1 if xty is None else xty.shape[1]
                # the widest shard (an empty one has none) and the most batches of a rank (one
                # step of the union is a batch on every rank)
                most = torch.tensor([d, batches], dtype=torch.float64)
                dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
                width = int(most[0])
                device = self.remove_mask.device
                if xtx is None:
                    xtx = torch.zeros(k, k, dtype=torch.float64, device=device)
                    xty = torch.zeros(k, width, dtype=torch.float64, device=device)
                packed = torch.cat(
                    [
                        xtx.reshape(-1),
                        xty.reshape(-1),
                        torch.tensor([count], dtype=torch.float64, device=xtx.device),
                    ]
                )
                dist.all_reduce(packed, group=group)
                xtx = packed[: k * k].view(k, k)
                xty = packed[k * k : -1].view(k, width)
                count, batches = int(packed[-1]), int(most[1])
        if xty is None or count == 0:
            return False
        if getattr(self, "_refit_check_design", True):
            self._check_refit_rows(xtx, count)
        with torch.no_grad():
            self._load_refit(xtx, xty, count)
            for name, value in (
                ("num_batches_tracked", batches),
                ("num_samples_tracked", count),
                ("num_batches_skipped", 0),
                (_FALLBACK, 0),
            ):
                counter = getattr(self, name)
                if counter is not None:
                    counter.fill_(value)
        self._fallback_seen = (batches, 0)
        self._skipped_reported = 0
        return True

    def _load_refit(self, xtx: Tensor, xty: Tensor, count: int) -> None:
        """Sets the estimate from ΣXᵀX, ΣXᵀY (float64) and the number of rows."""
        raise NotImplementedError

    # ---------------------------------------------------------------- checkpoints

    def _migrate(self, state_dict: dict[str, Any], prefix: str, version: int) -> None:
        """Renames a checkpoint's keys of an earlier ``_version`` (the layer's own)."""

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        version = local_metadata.get("version") or 1
        # a Σ⁻¹ under an older name, cast by the migration below (old formats held float32)
        legacy_inverse = prefix + "gram_inverse" not in state_dict
        if version < self._version:
            self._migrate(state_dict, prefix, version)
            for name in (*_COUNTERS, _FALLBACK):
                counter = getattr(self, name, None)
                if counter is not None and prefix + name not in state_dict:
                    state_dict[prefix + name] = torch.zeros_like(counter)
        own_design = self._has_own_design()
        self._check_loaded_state(state_dict, prefix)
        if own_design:
            self._check_loaded_design(state_dict, prefix, local_metadata, legacy_inverse)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._after_load(state_dict, prefix, local_metadata, own_design)

    # ---------------------------------------------------------------- reliability: casts

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """``Module._apply`` that keeps Σ⁻¹, N and P in their dtype (float64) through casts.

        ``.half()``, ``.float()``, ``.double()`` and ``.to(dtype)`` cast every floating buffer;
        Σ⁻¹ in float16 loses its digits and N > 65504 becomes inf (as torchmetrics' ``Metric``
        does for its states, the cast is undone for them: they only move device). The sum of the
        training rows' XᵀX (the design check) goes no lower than float32. The running β
        (and the penalty layer's β and moments) follow the cast, as BatchNorm's running
        statistics do; the layer computes in float32 at least whatever their dtype.
        """
        pinned = {id(t) for name in _PINNED_DTYPE if (t := self._buffers.get(name)) is not None}
        gram = self._buffers.get("design_rows_gram")
        if not pinned and gram is None:
            return super()._apply(fn, recurse)

        def keep_dtype(tensor: Tensor) -> Tensor:
            out = fn(tensor)
            if not isinstance(out, Tensor) or out.dtype == tensor.dtype:
                return out
            if id(tensor) in pinned:
                out = tensor.to(device=out.device)
            elif tensor is gram and out.dtype in (torch.float16, torch.bfloat16):
                # the design-sanity sum of the rows (computed in float32 at least) keeps 24 bits
                out = out.to(torch.float32)
            return out

        return super()._apply(keep_dtype, recurse)

    # ---------------------------------------------------------------- reliability: reports

    def _layer_name(self, prefix: str = "") -> str:
        name = prefix.rstrip(".")
        what = f"{type(self).__name__}({self.num_features} features, K = {self.num_metadata})"
        return f"{what} at {name!r}" if name else what

    @staticmethod
    def _readable(tensor: Tensor | None) -> bool:
        """Whether a counter can be read (not absent, lazy or on the meta device)."""
        return (
            tensor is not None
            and not isinstance(tensor, UninitializedBuffer)
            and tensor.device.type != "meta"
        )

    def _warn_skipped(self, prefix: str = "") -> None:
        """Warns once per new count of training batches skipped for a non-finite estimate.

        Called where reading a counter costs nothing (``eval()``, ``state_dict()``, a refit),
        never in the forward pass.
        """
        skipped = self.num_batches_skipped
        if not self._readable(skipped):
            return
        assert skipped is not None
        count = int(skipped)
        reported = getattr(self, "_skipped_reported", 0)
        self._skipped_reported = count
        if count > reported:
            warnings.warn(
                f"{self._layer_name(prefix)}: {count} training batch(es) skipped so far "
                f"({count - reported} new): their β estimate was not finite (NaN or infinite "
                "features or metadata, or an overflow in low precision). The layer's state "
                "kept its previous value; those batches' outputs were NaN/inf where the bad "
                "values entered (as BatchNorm's). Check the data, or pass "
                "on_nonfinite='raise' to stop at the first such batch",
                RuntimeWarning,
                stacklevel=4,
            )

    def _never_trained(self) -> bool:
        """Whether the layer's evaluation state is its initial one (no batch, zero β)."""
        if self._is_lazy() and any(
            isinstance(t, UninitializedBuffer | UninitializedParameter)
            for t in (*self._buffers.values(), *self._parameters.values())
        ):
            return True
        tracked = self.num_batches_tracked
        if not self._readable(tracked) or int(tracked) != 0:  # type: ignore[arg-type]
            return False
        for name in ("running_beta", "beta"):
            state = getattr(self, name, None)
            if isinstance(state, Tensor):
                return self._readable(state) and not bool(state.detach().any())
        return False

    def _warn_untrained(self, prefix: str = "") -> None:
        """Warns once if the layer is put to evaluation (or loaded) without ever training."""
        if getattr(self, "_untrained_warned", False) or not self._never_trained():
            return
        self._untrained_warned = True
        warnings.warn(
            f"{self._layer_name(prefix)} is used for evaluation but never trained: no training "
            "batch reached it and its β is zero, so it returns its input unchanged. Train it, "
            "restore it with load_state_dict, or refit it with "
            "metanorm.nn.utils.refit_running_beta before evaluating",
            UserWarning,
            stacklevel=4,
        )

    def _refuse_grad_rows(self) -> None:
        """Raises for design rows that require a gradient (none would reach them)."""
        if torch.is_grad_enabled():
            raise ValueError(
                f"expected design rows without requires_grad, got metadata with "
                f"requires_grad=True: {type(self).__name__} treats the metadata as data and "
                "back-propagates to the features only, so the rows would get no gradient. "
                "Pass metadata.detach()"
            )

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        """Saves the state; records the design's column names; reports skipped batches."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)
        if self.columns is not None and metadata is not None and prefix[:-1] in metadata:
            metadata[prefix[:-1]]["columns"] = list(self.columns)
        self._warn_skipped(prefix)

    # ---------------------------------------------------------------- reliability: checkpoints

    def _has_own_design(self) -> bool:
        """Whether the layer was built on a design (not one taken from a checkpoint)."""
        return bool(getattr(self, "has_design", False)) and not getattr(
            self, "_design_from_checkpoint", False
        )

    def _check_loaded_state(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Refuses a checkpoint whose floating state (β, Σ⁻¹, P, moments) is not finite."""
        for name in (*self._parameters, *self._buffers):
            value = state_dict.get(prefix + name)
            if (
                isinstance(value, Tensor)
                and value.is_floating_point()
                and value.device.type != "meta"
                and not isinstance(value, UninitializedBuffer | UninitializedParameter)
            ):
                bad = int((~torch.isfinite(value)).sum())
                if bad:
                    raise ValueError(
                        f"refusing to load {prefix}{name} into {self._layer_name(prefix)}: the "
                        f"checkpoint's value holds {bad} NaN or infinite entr"
                        f"{'y' if bad == 1 else 'ies'} (a corrupt or diverged state). Load an "
                        "earlier checkpoint, or drop the entry to keep this layer's value"
                    )

    def _check_loaded_design(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        legacy_inverse: bool = False,
    ) -> None:
        r"""Refuses a checkpoint of another design: column names, N, mask, and Σ/N.

        Names (when both sides have them), N and the removed mask compare exactly; the Gram
        Σ/N (from Σ⁻¹, in float64) to a relative :data:`GRAM_RTOL` of its diagonal scale
        (:math:`|\Delta_{ij}| \le \text{rtol}\sqrt{G_{ii}G_{jj}}`), as bits differ across
        machines and thread counts; a Σ⁻¹ saved in a lower precision (an old format) is
        compared to that precision (float32 for a Σ⁻¹ under an older name, which the migration
        casts).
        """
        here = f"this layer's ({self._layer_name(prefix)})"

        def refuse(what: str, theirs: Any, ours: Any) -> None:
            raise ValueError(
                f"the checkpoint was saved by a layer built on another design: {what} differ "
                f"(checkpoint: {theirs}; {here}: {ours}). Loading it would change what the "
                "layer removes. For transfer learning, build the layer with num_metadata= (no "
                "design) to take the checkpoint's design, or drop the design buffers "
                f"({', '.join(prefix + b for b in _DESIGN_BUFFERS)}) from the state dict and "
                "load with strict=False to keep this layer's design"
            )

        theirs = local_metadata.get("columns")
        if theirs is not None and self.columns is not None and tuple(theirs) != self.columns:
            refuse("the column names", list(theirs), list(self.columns))
        inv_key, n_key, mask_key = (prefix + b for b in _DESIGN_BUFFERS)
        n_ours = float(self.n_samples)  # type: ignore[arg-type]
        if isinstance(state_dict.get(n_key), Tensor):
            n_theirs = float(state_dict[n_key])
            if n_theirs != n_ours:
                refuse("the number of design rows N", f"{n_theirs:g}", f"{n_ours:g}")
        mask = state_dict.get(mask_key)
        if (
            isinstance(mask, Tensor)
            and mask.shape == self.remove_mask.shape
            and not torch.equal(mask.cpu().bool(), self.remove_mask.cpu())
        ):
            keep_theirs = (~mask.cpu().bool()).nonzero().flatten().tolist()
            refuse("the kept columns", keep_theirs, list(self.keep))
        inverse = state_dict.get(inv_key)
        ours_inv: Tensor = self.gram_inverse  # type: ignore[assignment]
        if not isinstance(inverse, Tensor) or inverse.shape != ours_inv.shape or n_ours <= 0:
            return
        n = float(state_dict[n_key]) if isinstance(state_dict.get(n_key), Tensor) else n_ours
        try:
            g_theirs = torch.linalg.inv(inverse.detach().cpu().to(torch.float64)) / n
        except RuntimeError:
            refuse("the Gram matrices", "a singular Σ⁻¹", "an invertible one")
        g_ours = torch.linalg.inv(ours_inv.detach().cpu().to(torch.float64)) / n_ours
        scale = torch.diagonal(g_ours).abs().sqrt()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        error = float(((g_theirs - g_ours).abs() / (scale[:, None] * scale[None, :])).max())
        rtol = GRAM_RTOL
        saved = torch.float32 if legacy_inverse else inverse.dtype
        if saved != torch.float64:
            cond = float(torch.linalg.cond(g_ours / (scale[:, None] * scale[None, :])))
            rtol = max(rtol, 10 * torch.finfo(saved).eps * cond)
        if not error <= rtol:
            refuse(
                f"the Gram matrices Σ/N (largest scaled difference {error:.3g}, tolerance "
                f"{rtol:.3g})",
                "its Σ/N",
                "the Σ/N of this layer's design",
            )

    def _after_load(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        own_design: bool,
    ) -> None:
        """After a load: adopts the checkpoint's design and its names, warns if it never trained.

        A layer built without a design (``num_metadata=``) has one once the checkpoint gave it
        Σ⁻¹ and N, so it can go on training.
        """
        if hasattr(self, "has_design") and all(
            prefix + name in state_dict for name in ("gram_inverse", "n_samples")
        ):
            self.has_design = True
        if not own_design and isinstance(state_dict.get(prefix + "gram_inverse"), Tensor):
            self._design_from_checkpoint = True
            if self.columns is None and local_metadata.get("columns") is not None:
                self.columns = tuple(local_metadata["columns"])
        skipped = self.num_batches_skipped
        if self._readable(skipped):
            self._skipped_reported = int(skipped)  # type: ignore[arg-type]
        if any(
            key.startswith(prefix) and key[len(prefix) :] in ("running_beta", "beta")
            for key in state_dict
        ):
            self._untrained_warned = False
            self._warn_untrained(prefix)


class _LazyMixin(LazyModuleMixin, _MetadataNormBase):
    """Infers ``num_features`` at the first call and materialises the ``(K, D)`` state."""

    def reset_running_stats(self) -> None:
        """Resets the estimate and the counters (once the state is materialised)."""
        if not self.has_uninitialized_params():
            super().reset_running_stats()

    def initialize_parameters(self, input: Tensor, metadata: Tensor | None = None) -> None:
        """Sets ``num_features`` from the first input and materialises the ``(K, D)`` state."""
        if self.has_uninitialized_params() or self.num_features == 0:
            if not isinstance(input, Tensor) or input.dim() < 2:
                raise ValueError(
                    "expected input of shape (m, *) to infer num_features from, got "
                    f"{describe(input)}"
                )
            self.num_features = self._infer_num_features(input)
            self._materialize((self.num_metadata, self.num_features))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        lazy = [
            name
            for name, tensor in (*self._buffers.items(), *self._parameters.items())
            if isinstance(tensor, UninitializedBuffer | UninitializedParameter)
        ]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._width_from_state(lazy)

    def _width_from_state(self, lazy: list[str]) -> None:
        """Sets ``num_features`` from the ``(K, D)`` state a checkpoint materialised."""
        if self.num_features != 0:
            return
        for name in lazy:
            tensor = getattr(self, name, None)
            if isinstance(tensor, Tensor) and not isinstance(
                tensor, UninitializedBuffer | UninitializedParameter
            ):
                self.num_features = int(tensor.shape[1])
                return

    def _materialize(self, shape: tuple[int, ...]) -> None:
        with torch.no_grad():
            for tensor in (*self.buffers(recurse=False), *self.parameters(recurse=False)):
                if isinstance(tensor, UninitializedBuffer | UninitializedParameter):
                    tensor.materialize(shape)
                    tensor.zero_()
