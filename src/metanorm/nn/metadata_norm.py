"""The Metadata Normalization layer (Lu et al., CVPR 2021) and its lazy form."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from metanorm.design import Design
from metanorm.linalg import batch_weight, inverse_gram, remove_effect
from metanorm.nn import functional as MF
from metanorm.nn._base import (  # noqa: F401 (check_num_features: its old home)
    _check_keep,
    _LazyMixin,
    _MetadataNormBase,
    check_num_features,
    resolve_keep,
)
from metanorm.nn._functions import BatchResidual, StatisticsReducer

__all__ = ["LazyMetadataNorm", "MetadataNorm"]


class MetadataNorm(_MetadataNormBase):
    r"""Removes the effect of metadata from a layer's features, batch by batch.

    Method described in `Metadata Normalization <https://arxiv.org/abs/2104.09052>`__
    (Lu, Zhao, Zhang, Pohl, Fei-Fei, Niebles, Adeli; CVPR 2021). For a batch of m samples whose
    features flatten to :math:`F` (m×D) and whose design rows are :math:`X_b` (m×K):

    .. math::
        \hat\beta = \frac{N}{m}\,\Sigma^{-1} X_b^\top F, \qquad
        y = F - X_{b,R}\,\hat\beta_{R}

    where :math:`\Sigma^{-1} = (X^\top X)^{-1}` is computed once, in float64, from the **whole**
    training design :math:`X` (N×K), and R are the removed columns (all but ``keep``). Gradients
    flow through :math:`\hat\beta`, as BatchNorm back-propagates through its batch statistics.
    ``keep`` columns (labels) are part of the estimate but are not subtracted, so that only the
    metadata's effect is removed when metadata and label are correlated.

    During training the layer keeps a running estimate of β, in full-data scale (the N/m factor
    applied), so evaluation does not depend on the batch size:
    :math:`\beta_{run} \leftarrow (1-f)\beta_{run} + f\hat\beta` with
    :math:`f = \min(1, \max(\mu\,m/\bar m,\ m/S))`, S the training samples seen so far and
    :math:`\bar m` the mean size of the earlier batches: a cumulative average over the first
    batches, an exponential average with momentum μ after them (so a short training does not
    leave :math:`\beta_{run}` biased towards its zero start), and a short batch weighs in
    proportion to its size. In evaluation mode :math:`y = F - X_{b,R}\,\beta_{run,R}`; the kept
    columns of the metadata are ignored then, so evaluation needs metadata but no labels (pass
    zeros in the kept columns). A running average of estimates taken while the weights change
    lags behind the final weights: refit it after training (or after each epoch) with
    :func:`metanorm.nn.utils.refit_running_beta` before evaluating.

    A training batch of m ≤ K samples is too small for its own estimate to residualise it: its
    output uses the running β (as in evaluation; on a fresh layer, β = 0: the input unchanged),
    because its own least-squares fit would leave a residual orthogonal to the rows' span with
    as many constraints as rows. Its estimate is still folded into the running β, weighted by
    m: with :math:`\Sigma^{-1}` of the whole design, :math:`(N/m)\Sigma^{-1}X_b^\top F` is
    unbiased for any m ≥ 1, only noisier. Such batches are counted in
    ``num_batches_fallback``; when most training batches since the last check fell back, the
    layer warns once, at :meth:`~torch.nn.Module.eval` (no host sync in the forward pass).

    **Channel-wise β** (``channelwise=True``): for large conv maps, where a K×C·H·W β is too
    big, one β column per channel is shared over the positions, as BatchNorm shares its
    statistics per channel. The layer regresses each channel's spatial mean
    :math:`\bar F` (m×C) on the metadata and subtracts the fitted effect at every position:
    :math:`y = F - X_{b,R}\,\hat\beta_R` broadcast over the positions, with
    :math:`\hat\beta = \frac{N}{m}\Sigma^{-1}X_b^\top\bar F` (K×C), the least-squares β of the
    positions pooled. ``num_features`` is then C, and the running β is K×C.

    **Metadata in scope.** Called with one argument, ``layer(h)``, the layer takes the design
    rows in scope: those of the enclosing :class:`metanorm.nn.MetadataModel` call
    (``model(x, metadata=rows)``, see :func:`metanorm.nn.convert_metadata_norm`) or
    :func:`metanorm.nn.metadata_scope` block. That lets an MDN layer sit in a model whose
    ``forward(x)`` cannot pass metadata. With none in scope it raises a ``TypeError``.

    **Non-finite values** are handled as :class:`torch.nn.BatchNorm1d` handles them: NaN in,
    NaN out. A NaN or inf feature or design row in a training batch makes that batch's estimate
    (and so its output, for every row) non-finite; the running β and the counters other than
    ``num_batches_skipped`` keep their values (see ``on_nonfinite``), and the skipped batches
    are reported by a warning naming the layer and the count at the next
    :meth:`~torch.nn.Module.eval`, :meth:`~torch.nn.Module.state_dict` or
    :func:`~metanorm.nn.utils.refit_running_beta` (where reading a counter costs no host sync
    in the forward pass). Kept columns never enter the output: NaN in them at evaluation
    (an unknown label) leaves the output finite. Design rows that require a gradient are
    refused (the layer passes gradients to the features only).

    **Casts and checkpoints.** ``.half()``, ``.to(dtype)`` and ``.double()`` leave
    :math:`\Sigma^{-1}` and N in float64 (N stays exact beyond 65504 rows); the running β
    follows the cast, as BatchNorm's running statistics do. FSDP's
    ``MixedPrecision(buffer_dtype=...)`` casts every floating buffer itself, bypassing this:
    list the MDN classes in its ``_module_classes_to_ignore`` (as it does for BatchNorm), or
    leave ``buffer_dtype`` unset. A layer built with a design refuses a state dict saved by a
    layer of another design (column names, N and the kept columns exactly, Σ/N to a relative
    1e-9), naming both; build with ``num_metadata=`` to take the checkpoint's design. A
    checkpoint holding a NaN or infinite running β or Σ⁻¹ is refused. A layer put to
    evaluation (or loaded) without ever training warns once.

    .. note::
        ``momentum=None`` gives the cumulative average of every batch seen, as in
        :class:`torch.nn.BatchNorm1d`, each batch weighted by its size. After one epoch over
        any partition of the training set, a short last batch included, it equals the
        full-data least-squares β of the features seen.

    Args:
        num_features: D, the number of features of one sample after flattening (C·H·W for a
            conv map).
        design: the whole training set's design, ``(N, K)`` tensor or array, or a
            :class:`metanorm.design.Design` (whose ``keep`` is then used by default). Only
            :math:`\Sigma^{-1}` and N are stored. ``None`` builds an empty layer of
            ``num_metadata`` columns to restore with :meth:`~torch.nn.Module.load_state_dict`.
        keep: indices (or, with a :class:`~metanorm.design.Design`, names) of the columns that
            are estimated but not removed. A :class:`~metanorm.design.Design` brings its own
            ``keep``; another one here is a ``ValueError``. With a plain matrix pass it
            explicitly (``keep=()`` for none): omitted, no column is kept, with a
            ``FutureWarning`` (an error in a later release).
        momentum: the running-β momentum μ, or ``None`` for a cumulative average. Default: 0.1.
        num_metadata: K, the number of design columns; needed only without ``design``.
        track_running_stats: keep a running β for evaluation. Without it the layer always uses
            batch estimates (and so needs labels at evaluation). Default: ``True``.
        ridge: ridge term added to :math:`X^\top X` (see :func:`metanorm.linalg.inverse_gram`).
            Default: 0.
        on_nonfinite: what a training batch whose β estimate is not finite (NaN/inf features,
            an overflow in low precision) does. The running β never takes such an estimate.
            ``"skip"``: count it in ``num_batches_skipped`` and go on (no host sync; compiles
            without graph breaks). ``"warn"``: also warn. ``"raise"``: raise a
            :class:`~metanorm.nn.NonFiniteEstimateError`. ``"warn"`` and ``"raise"`` read one
            flag on the host every training step (a device sync, and a graph break under
            :func:`torch.compile`). Default: ``"skip"``.
        channelwise: share β over the positions of a conv map: ``num_features`` is the number
            of channels C (dimension 1 of the input), the running β is ``(K, C)``. Default:
            ``False`` (one β column per flattened feature).
        device: device of the buffers.
        dtype: dtype of the running β (:math:`\Sigma^{-1}` is always float64). Default: float32.

    Attributes:
        gram_inverse: :math:`\Sigma^{-1}`, float64 buffer ``(K, K)``.
        n_samples: N, float64 buffer (0-d).
        remove_mask: bool buffer ``(K,)``, true for removed columns.
        running_beta: buffer ``(K, D)`` (``(K, C)`` channel-wise), or ``None`` without
            ``track_running_stats``.
        num_batches_tracked: long buffer (0-d), training batches behind the running β.
        num_samples_tracked: long buffer (0-d), training samples behind the running β.
        num_batches_skipped: long buffer (0-d), training batches whose estimate was not finite.
        num_batches_fallback: long buffer (0-d), training batches of m ≤ K whose output used
            the running β.

    Shape:
        - Input: :math:`(m, *)` with :math:`\prod * = D`; any m ≥ 1 (a short last batch works).
          Channel-wise: :math:`(m, C, *)`.
        - Metadata: :math:`(m, K)`, the batch's design rows, built like ``design``; omitted:
          the rows in scope.
        - Output: same shape and dtype as the input. float16/bfloat16 inputs (and inputs under
          :func:`torch.autocast`) are computed in float32.

    Examples::

        >>> import torch
        >>> from metanorm.design import make_design
        >>> y = torch.randint(0, 2, (100,)); cf = torch.rand(100) + y
        >>> design = make_design({"y": y.numpy(), "cf": cf.numpy()}, keep=["y"])
        >>> layer = MetadataNorm(84, design)
        >>> rows = design.tensor()                 # the design rows of the samples
        >>> out = layer(torch.randn(20, 84), rows[:20])
        >>> out.shape
        torch.Size([20, 84])
        >>> _ = layer.eval(); layer(torch.randn(5, 84), rows[:5]).shape
        torch.Size([5, 84])
        >>> restored = MetadataNorm(84, num_metadata=3)    # no design needed to restore
        >>> restored.load_state_dict(layer.state_dict())
        <All keys matched successfully>
        >>> conv = MetadataNorm(16, design, channelwise=True)   # β of 3 x 16, for (m, 16, H, W)
        >>> conv(torch.randn(20, 16, 32, 32), rows[:20]).shape
        torch.Size([20, 16, 32, 32])
    """

    _version = 3
    _falls_back = True
    __constants__: ClassVar[list[str]] = [
        "num_features",
        "num_metadata",
        "momentum",
        "track_running_stats",
        "channelwise",
    ]
    momentum: float | None
    gram_inverse: Tensor
    n_samples: Tensor
    running_beta: Tensor | None

    def __init__(
        self,
        num_features: int,
        design: Any = None,
        keep: Iterable[int | str] | None = None,
        momentum: float | None = 0.1,
        *,
        num_metadata: int | None = None,
        track_running_stats: bool = True,
        ridge: float = 0.0,
        on_nonfinite: str = "skip",
        channelwise: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_momentum(momentum)
        columns: tuple[str, ...] | None = None
        if design is None:
            if (
                isinstance(num_metadata, bool)
                or not isinstance(num_metadata, int)
                or num_metadata < 1
            ):
                raise ValueError(
                    "expected design= (the whole training design, (N, K)) or num_metadata= "
                    f"(K, for an empty layer to restore with load_state_dict), got "
                    f"design=None and num_metadata={num_metadata!r}"
                )
            k, n = num_metadata, 0
            gram_inverse = torch.zeros(k, k, dtype=torch.float64)
        else:
            keep, columns = _check_keep(design, keep)
            gram_inverse = inverse_gram(design, ridge=ridge, columns=columns)
            k = gram_inverse.shape[0]
            n = design.shape[0] if isinstance(design, Design) else len(design)
            if num_metadata is not None and num_metadata != k:
                raise ValueError(
                    f"num_metadata={num_metadata!r} does not match the design's {k} columns"
                )
        super().__init__(
            num_features,
            k,
            keep,
            columns=columns,
            channelwise=channelwise,
            on_nonfinite=on_nonfinite,
            track_running_stats=track_running_stats,
            device=device,
        )
        self.momentum = momentum
        self.ridge = ridge
        self.has_design = design is not None
        self.register_buffer("gram_inverse", gram_inverse.to(device))
        self.register_buffer(
            "n_samples", torch.tensor(float(n), dtype=torch.float64, device=device)
        )
        self._init_design_sanity(device, dtype)
        self.register_buffer(
            "running_beta",
            self._per_feature(device, dtype or torch.float32) if track_running_stats else None,
        )
        self._factors: dict[Any, tuple[Any, ...]] = {}

    def _reset_estimate(self) -> None:
        if self.running_beta is not None:
            self.running_beta.zero_()

    def _ready(self) -> None:
        if not self.has_design:
            raise RuntimeError(
                f"this {type(self).__name__} was built without a design (num_metadata="
                f"{self.num_metadata}): restore it with load_state_dict, or build it with "
                "design= (the whole training design)"
            )

    def _estimate(
        self, features: Tensor, rows: Tensor, reducer: StatisticsReducer | None
    ) -> Tensor:
        buffers = self._buffers  # one dict read each, not Module.__getattr__ (a fixed cost)
        running = buffers["running_beta"]
        training = self.training
        if not training and running is not None:
            mask = buffers["remove_mask"]
            assert mask is not None
            return remove_effect(features, rows, MF._as_dtype(running, features.dtype), mask)
        m, k = features.shape[0], self.num_metadata
        if reducer is not None:
            mask, fallback_count = buffers["remove_mask"], buffers["num_batches_fallback"]
            gram_inverse, n = buffers["gram_inverse"], buffers["n_samples"]
            assert mask is not None
            assert gram_inverse is not None and n is not None
            # every process runs the differentiable map, so that each joins the backward
            # collective once; whether the output uses the running β depends on the summed M
            out, beta, count = MF.batch_residual(
                features, rows, gram_inverse, n, mask, reducer=reducer
            )
            if running is not None and m <= k:  # M > K is known already when m > K
                fallback = remove_effect(features, rows, MF._as_dtype(running, out.dtype), mask)
                out = torch.where(count > k, out, fallback)
                if fallback_count is not None:
                    fallback_count.add_((count <= k) & (count > 0))
        elif running is not None and m <= k and training:
            # one process, m ≤ K: the output uses the running β (see the class docstring); the
            # unbiased, noisy estimate is still folded in below, with a factor in proportion to m
            removed, b = self._batch_rows(rows, False)
            out = remove_effect(features, removed, MF._as_dtype(running, features.dtype), None)
            beta = b.T @ features.detach()
            fallback_count = buffers["num_batches_fallback"]
            if fallback_count is not None:
                fallback_count.add_(1)
        elif (
            features.is_cpu
            and features.numel() <= _PLAIN_AUTOGRAD_MAX
            and not torch.compiler.is_compiling()
        ):
            # one process, a small CPU batch: F + (−A)·β̂ with β̂ = BᵀF as two products that
            # autograd derives (its C++ backward nodes cost microseconds less than a Python
            # Function's; -A from the factor, so no product is scaled)
            negated, b = self._batch_rows(rows, True)
            beta = torch.mm(b.t(), features)
            out = torch.addmm(features, negated, beta)
        else:
            # one process: A = X_b,R (kept columns zeroed) and B = X_b·W from one product; the
            # backward pass is one fused G − B·(AᵀG)
            removed, b = self._batch_rows(rows, False)
            out, beta = BatchResidual.apply(features, removed, b)
        if training and running is not None:
            finite = MF.fold_running_beta(
                running,
                beta,
                count if reducer is not None else m,  # one process: m, known on the host
                self.momentum,
                buffers["num_batches_tracked"],
                buffers["num_samples_tracked"],
                buffers["num_batches_skipped"],
            )
            self._report(finite, rows)
        return out

    def _batch_rows(self, rows: Tensor, negate: bool) -> tuple[Tensor, Tensor]:
        """A = X_b with the kept columns zeroed (−A if ``negate``) and B = X_b·W, W = (N/m)·Σ⁻¹.

        Both come from X_b·[±diag(mask) | W], an (m, 2K) product with a K×2K factor in the
        rows' dtype (W formed in float64, then cast; the 0/±1 diagonal copies the removed
        columns exactly). In eager mode the factor is kept per batch size, sign, dtype and
        device, and built again when Σ⁻¹, N or the mask change (their version counters) or are
        replaced; under :func:`torch.compile` it is part of the graph.
        """
        m = rows.shape[0]
        buffers = self._buffers
        gram_inverse, n = buffers["gram_inverse"], buffers["n_samples"]
        mask = buffers["remove_mask"]
        assert gram_inverse is not None and n is not None and mask is not None
        factors = self.__dict__.get("_factors")
        factor = key = versions = None
        if factors is not None and not torch.compiler.is_compiling():
            try:
                versions = (gram_inverse._version, n._version, mask._version)
            except RuntimeError:  # inference tensors keep no version counter
                versions = None
            if versions is not None:
                # a CPU tensor's device is not read (building a device object costs more than
                # the rest of the look-up)
                key = (m, negate, rows.dtype, True if rows.is_cpu else rows.device)
                hit = factors.get(key)
                if (
                    hit is not None
                    and hit[0] is gram_inverse
                    and hit[1] is n
                    and hit[2] is mask
                    and hit[3] == versions
                ):
                    factor = hit[4]
        if factor is None:
            weight = batch_weight(gram_inverse, n, m)
            selector = torch.diag(mask.to(weight.dtype))
            factor = torch.cat([-selector if negate else selector, weight], dim=1).to(rows.dtype)
            if factors is not None and key is not None:
                if len(factors) >= 8:
                    factors.clear()
                factors[key] = (gram_inverse, n, mask, versions, factor)
        # a fresh product that nothing writes to and no gradient reaches: its two halves need
        # no view tracking (unsafe_chunk: a microsecond less than chunk, of a ~40 µs step)
        removed, b = torch.mm(rows, factor).unsafe_chunk(2, 1)
        return removed, b

    def _refittable(self) -> bool:
        return self.running_beta is not None

    def _load_refit(self, xtx: Tensor, xty: Tensor, count: int) -> None:
        assert self.running_beta is not None
        beta = (self.gram_inverse.to(xty.device) @ xty) * (self.n_samples.to(xty.device) / count)
        self.running_beta.copy_(beta)

    def _migrate(self, state_dict: dict[str, Any], prefix: str, version: int) -> None:
        # 0.1.0.dev0 (version 1) called Σ⁻¹ "kernel"
        if prefix + "kernel" in state_dict:
            state_dict[prefix + "gram_inverse"] = state_dict.pop(prefix + "kernel")

    def extra_repr(self) -> str:
        """The constructor arguments shown in ``repr``."""
        return (
            f"{self.num_features}, num_metadata={self.num_metadata}, keep={list(self.keep)}, "
            f"n_samples={int(self.n_samples)}, momentum={self.momentum}, "
            f"track_running_stats={self.track_running_stats}"
            + (", channelwise=True" if self.channelwise else "")
        )


class LazyMetadataNorm(_LazyMixin, MetadataNorm):
    r"""A :class:`MetadataNorm` whose ``num_features`` is inferred from its first input.

    The running β is an uninitialised buffer until the first call, which sets ``num_features``
    to the flattened per-sample size of the input (channel-wise: its number of channels); the
    module then becomes a
    :class:`MetadataNorm` (torch's lazy-module idiom, as :class:`torch.nn.LazyBatchNorm1d`).
    Run one batch before :func:`torch.compile` or building an optimizer.

    Args:
        design: the whole training set's design (see :class:`MetadataNorm`); ``None`` (with
            ``num_metadata``) builds an empty layer to restore with
            :meth:`~torch.nn.Module.load_state_dict`, which also sets ``num_features``.
        keep, momentum, num_metadata, track_running_stats: as for :class:`MetadataNorm`.
        ridge, on_nonfinite, channelwise, device, dtype: as for :class:`MetadataNorm`.

    Examples::

        >>> import torch
        >>> design = torch.cat([torch.randn(50, 1), torch.ones(50, 1)], dim=1)
        >>> layer = LazyMetadataNorm(design, keep=())
        >>> layer(torch.randn(10, 4, 3, 3), design[:10]).shape
        torch.Size([10, 4, 3, 3])
        >>> type(layer).__name__, layer.num_features
        ('MetadataNorm', 36)
    """

    cls_to_become = MetadataNorm

    def __init__(
        self,
        design: Any = None,
        keep: Iterable[int | str] | None = None,
        momentum: float | None = 0.1,
        *,
        num_metadata: int | None = None,
        track_running_stats: bool = True,
        ridge: float = 0.0,
        on_nonfinite: str = "skip",
        channelwise: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            1,  # replaced at the first call
            design,
            keep,
            momentum,
            num_metadata=num_metadata,
            track_running_stats=track_running_stats,
            ridge=ridge,
            on_nonfinite=on_nonfinite,
            channelwise=channelwise,
            device=device,
            dtype=dtype,
        )
        self.num_features = 0


def _check_momentum(momentum: Any) -> None:
    if momentum is not None and (
        isinstance(momentum, bool)
        or not isinstance(momentum, int | float)
        or not 0.0 <= momentum <= 1.0
    ):
        raise ValueError(f"expected momentum in [0, 1] or None, got {momentum!r}")


_resolve_keep = resolve_keep  # the name other modules imported

#: Up to this many feature values, a CPU training step of one process runs its map as plain
#: autograd products (faster than the Function by a few microseconds); above it, the Function's
#: backward, one fused G − B·(AᵀG), saves a pass over the gradient (at 16,800 values, a
#: 36 → 32 µs step; at 102,400 the plain form is 20 % slower; break-even near 60,000)
_PLAIN_AUTOGRAD_MAX = 1 << 15
