r"""Recursive Metadata Normalization: recursive least squares over the batches.

Recursive MDN (R-MDN; Shah et al., ICML 2025) replaces the paper's batch estimator
(Lu et al., CVPR 2021, arXiv 2104.09052), which needs the whole training design up front, by
recursive least squares (RLS) with a forgetting factor: no precomputed :math:`\Sigma`, no N, any
batch size down to one, and a design that need not be known before the stream starts.
``docs/estimators.md`` has the maths, the choice of regulariser and measured figures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from metanorm.design import Design
from metanorm.linalg import remove_effect
from metanorm.nn._base import _columns_of, _LazyMixin, _MetadataNormBase, check_number
from metanorm.nn._functions import StatisticsReducer

__all__ = ["LazyRecursiveMetadataNorm", "RecursiveMetadataNorm"]

_check_number = check_number  # the name other modules imported


class RecursiveMetadataNorm(_MetadataNormBase):
    r"""Removes the effect of metadata with a recursive least-squares estimate of β.

    Recursive MDN (Shah et al., ICML 2025), a follow-up of
    `Metadata Normalization <https://arxiv.org/abs/2104.09052>`__. The layer keeps
    :math:`P` (K×K, float64; the inverse of the decayed information matrix) and
    :math:`\beta` (K×D). A training batch with features :math:`F` (m×D) and design rows
    :math:`X_b` (m×K) updates them by recursive least squares with forgetting factor λ:

    .. math::
        P' = P/\lambda, \qquad
        P_{new} = \bigl(P'^{-1} + X_b^\top X_b + m\,\rho\,I\bigr)^{-1}, \qquad
        \beta_{new} = \beta + P_{new}\bigl(X_b^\top (F - X_b\beta) - m\,\rho\,\beta\bigr)

    (with ρ = 0 this is the textbook gain :math:`G = P'X_b^\top(I + X_bP'X_b^\top)^{-1}`,
    :math:`P_{new} = P' - G X_b P'`, :math:`\beta_{new} = \beta + G(F - X_b\beta)`, which the layer
    uses when m < K and ρ = 0) and outputs :math:`F - X_{b,R}\,\beta_{new,R}`; in evaluation mode
    :math:`F - X_{b,R}\,\beta_R` with no update. R are the removed columns (all but ``keep``).

    In closed form, after T batches :math:`\beta = A^{-1}b` with
    :math:`A = \lambda^T\delta I + \sum_t \lambda^{T-t}(X_t^\top X_t + m_t\rho I)` and
    :math:`b = \sum_t \lambda^{T-t} X_t^\top F_t`: weighted ridge least squares, batch t weighing
    :math:`\lambda^{\text{age}}`, plus the prior :math:`P_0 = I/\delta` (a ridge term δ around
    β = 0, decayed like the data). With λ = 1 and ρ = 0 one pass over any partition of the data
    (batches of one included) gives :math:`(X^\top X + \delta I)^{-1} X^\top F`, the full-data
    least-squares β up to the prior δ. The regulariser ρ is added once per *sample* (m·ρ per
    batch), so the estimate does not depend on the batch size; adding it once per step (as the
    authors do) weighs it N/m times over an epoch, which biases small batches.

    Gradients do not flow through β (the output is :math:`F - X_{b,R}\beta_{new,R}` with
    :math:`\beta_{new}` held fixed), unless ``grad_through_beta=True``, which back-propagates
    through the update's :math:`P_{new}X_b^\top F` term.

    A step whose update is not finite (NaN/inf input, or a β beyond its dtype's range) leaves
    P and β as they were and is counted in ``num_batches_skipped``, reported at ``eval()``,
    ``state_dict()`` or a refit; P stays float64 through ``.half()``/``.to(dtype)``; kept
    columns, checkpoints and untrained layers behave as for :class:`~metanorm.nn.MetadataNorm`.

    Args:
        num_features: D, the number of features of one sample after flattening.
        num_metadata: K, the number of design columns, or a :class:`~metanorm.design.Design`
            (its number of columns, and its ``keep`` and column names are used: no other
            statistic of it enters this estimator).
        keep: indices (or, with a :class:`~metanorm.design.Design`, names) of the columns
            estimated but not removed (labels); with a design, only its own ``keep`` is allowed.
            Default: ``()`` (or the design's ``keep``).
        forgetting: λ in (0, 1], per training step. λ = 1 weighs every batch alike (a
            cumulative estimate); smaller λ forgets old batches (memory ≈ 1/(1 − λ) steps), so
            β follows features that drift while the network trains or the data shift.
            Default: 0.999.
        delta: δ > 0 of the prior :math:`P_0 = I/\delta`. Default: 0.01.
        reg: ρ ≥ 0, the ridge term per sample. Default: 1e-4.
        grad_through_beta: back-propagate through the β update. Default: ``False``.
        device: device of the buffers.
        dtype: dtype of β (P is always float64). Default: float32.

    Attributes:
        covariance: P, float64 buffer ``(K, K)``.
        beta: β, buffer ``(K, D)``.
        remove_mask: bool buffer ``(K,)``, true for removed columns.
        num_batches_tracked, num_samples_tracked, num_batches_skipped: long 0-d buffers (updates
            done, samples behind them, training batches skipped for a non-finite update).

    Shape:
        - Input: :math:`(m, *)` with :math:`\prod * = D`; any m ≥ 1.
        - Metadata: :math:`(m, K)`, the batch's design rows; omitted, the rows in scope of a
          :class:`~metanorm.nn.MetadataModel` call (or :func:`~metanorm.nn.metadata_scope`).
        - Output: same shape and dtype as the input (float16/bfloat16 computed in float32).

    Examples::

        >>> import torch
        >>> y = torch.randint(0, 2, (64,)).double(); cf = torch.rand(64) + y
        >>> rows = torch.stack([y, cf, torch.ones(64)], dim=1).float()
        >>> layer = RecursiveMetadataNorm(84, 3, keep=[0])
        >>> for i in range(64):                   # a stream, one sample at a time
        ...     out = layer(torch.randn(1, 84), rows[i : i + 1])
        >>> out.shape, int(layer.num_samples_tracked)
        (torch.Size([1, 84]), 64)
        >>> _ = layer.eval(); layer(torch.randn(5, 84), rows[:5]).shape
        torch.Size([5, 84])
        >>> layer.reset_running_stats()           # a new stage: forget everything
    """

    _version = 2
    __constants__: ClassVar[list[str]] = [
        "num_features",
        "num_metadata",
        "forgetting",
        "delta",
        "reg",
    ]
    covariance: Tensor
    beta: Tensor

    def __init__(
        self,
        num_features: int,
        num_metadata: int | Design,
        keep: Iterable[int | str] | None = None,
        forgetting: float = 0.999,
        delta: float = 0.01,
        reg: float = 1e-4,
        *,
        grad_through_beta: bool = False,
        on_nonfinite: str = "skip",
        channelwise: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        num_metadata, keep, columns = _columns_of(num_metadata, keep)
        super().__init__(
            num_features,
            num_metadata,
            keep,
            columns=columns,
            channelwise=channelwise,
            on_nonfinite=on_nonfinite,
            device=device,
        )
        self.forgetting = _check_number("forgetting", forgetting, 0.0, 1.0, open_low=True)
        self.delta = _check_number("delta", delta, 0.0, math.inf, open_low=True)
        self.reg = _check_number("reg", reg, 0.0, math.inf, open_low=False)
        self.grad_through_beta = bool(grad_through_beta)
        k = num_metadata
        self.register_buffer(
            "covariance", torch.eye(k, dtype=torch.float64, device=device) / self.delta
        )
        self.register_buffer("beta", self._per_feature(device, dtype or torch.float32))

    def reset_covariance(self) -> None:
        r"""Resets P to :math:`I/\delta` and keeps β.

        The next batches are weighed as if the old ones had been forgotten, with the current β
        as the prior's centre.
        """
        with torch.no_grad():
            self.covariance.copy_(torch.eye(self.num_metadata, dtype=torch.float64) / self.delta)

    def _reset_estimate(self) -> None:
        r"""A fresh start (a new stage): :math:`P = I/\delta` and β = 0."""
        self.reset_covariance()
        with torch.no_grad():
            self.beta.zero_()

    def reset_parameters(self) -> None:
        """Same as ``reset_running_stats()`` (the layer has no learned parameters)."""
        self.reset_running_stats()

    def _estimate(
        self, features: Tensor, rows: Tensor, reducer: StatisticsReducer | None
    ) -> Tensor:
        if self.training:
            beta = self._update(features, rows, reducer)
        else:
            beta = self.beta.to(features.dtype)
        return remove_effect(features, rows, beta, self.remove_mask)

    def _load_refit(self, xtx: Tensor, xty: Tensor, count: int) -> None:
        # one pass with λ = 1 from the prior: A = δI + ΣXᵀX + Sρ I, β = A⁻¹ ΣXᵀF
        eye = torch.eye(self.num_metadata, dtype=torch.float64, device=xtx.device)
        info = xtx + (self.delta + self.reg * count) * eye
        p = torch.linalg.inv(info)
        p = (p + p.T) / 2
        self.covariance.copy_(p)
        self.beta.copy_(p @ xty)

    def _count(self, finite: Tensor, m: Tensor) -> None:
        """Adds one step to the counters (``finite``: 0-d bool; ``m``: the step's rows)."""
        assert self.num_batches_tracked is not None and self.num_samples_tracked is not None
        assert self.num_batches_skipped is not None
        self.num_batches_tracked.add_(finite.to(torch.long))
        self.num_samples_tracked.add_((m * finite).to(torch.long))
        self.num_batches_skipped.add_((~finite).to(torch.long))

    def _update(self, features: Tensor, rows: Tensor, reducer: StatisticsReducer | None) -> Tensor:
        """One RLS step: updates the buffers; returns β_new in the features' dtype."""
        if reducer is not None and self.grad_through_beta:
            raise ValueError(
                "grad_through_beta=True is not supported across processes (the gradient would "
                "need the other processes' features); use grad_through_beta=False"
            )
        m, k = rows.shape
        x64 = rows.to(torch.float64)
        p = self.covariance.to(torch.float64) / self.forgetting
        beta = self.beta.to(torch.float64)
        xtf = rows.T @ features  # (K, D), the only product over the features
        count = torch.full((), m, dtype=torch.float64, device=rows.device)
        eye = torch.eye(k, dtype=torch.float64, device=rows.device)
        if reducer is None and m < k and self.reg == 0.0:
            # textbook gain, an m×m solve: G = P X_bᵀ (I + X_b P X_bᵀ)⁻¹
            px = p @ x64.T  # (K, m)
            s = torch.eye(m, dtype=torch.float64, device=rows.device) + x64 @ px
            gain = torch.linalg.solve(s, px.T).T  # s is symmetric
            p_new = p - gain @ px.T
            innovation = xtf.detach().to(torch.float64) - (x64.T @ x64) @ beta
        else:
            # information form, a K×K solve: P_new = (P⁻¹ + M)⁻¹ = (I + P M)⁻¹ P
            gram = x64.T @ x64
            stat = xtf.detach().to(torch.float64)
            if reducer is not None:
                count = reducer.sum(count)
                gram = reducer.sum(gram)
                stat = reducer.sum(stat)
            gram = gram + (self.reg * count) * eye
            p_new = torch.linalg.solve(eye + p @ gram, p)
            innovation = stat - gram @ beta
        p_new = (p_new + p_new.T) / 2
        beta_new = beta + p_new @ innovation
        stored = beta_new.to(self.beta.dtype)  # finite in float64 may overflow float32
        finite = torch.isfinite((stored * 0).sum() + p_new.sum())
        with torch.no_grad():
            self.covariance.copy_(torch.where(finite, p_new, self.covariance))
            self.beta.copy_(torch.where(finite, stored, self.beta))
            self._count(finite, count)
        self._report(finite, rows)
        out = beta_new.to(features.dtype)
        if self.grad_through_beta:
            # the value of beta_new, the gradient of its P_new X_bᵀ F term (straight through)
            out = out + p_new.to(features.dtype) @ (xtf - xtf.detach())
        return out

    def extra_repr(self) -> str:
        """The constructor arguments shown in ``repr``."""
        return (
            f"{self.num_features}, {self.num_metadata}, keep={list(self.keep)}, "
            f"forgetting={self.forgetting}, delta={self.delta}, reg={self.reg}"
            + (", grad_through_beta=True" if self.grad_through_beta else "")
        )


class LazyRecursiveMetadataNorm(_LazyMixin, RecursiveMetadataNorm):
    r"""A :class:`RecursiveMetadataNorm` whose ``num_features`` is inferred from its first input.

    As :class:`~metanorm.nn.LazyMetadataNorm`: β is uninitialised until the first call, which
    sets ``num_features`` and makes the module a :class:`RecursiveMetadataNorm`.

    Args:
        num_metadata: K, the number of design columns, or a :class:`~metanorm.design.Design`.
        **kwargs: the other arguments of :class:`RecursiveMetadataNorm`.

    Examples::

        >>> import torch
        >>> layer = LazyRecursiveMetadataNorm(2)
        >>> layer(torch.randn(5, 3, 2), torch.randn(5, 2)).shape
        torch.Size([5, 3, 2])
        >>> type(layer).__name__, layer.num_features
        ('RecursiveMetadataNorm', 6)
    """

    cls_to_become = RecursiveMetadataNorm

    def __init__(self, num_metadata: int | Design, **kwargs: Any) -> None:
        super().__init__(0, num_metadata, **kwargs)
