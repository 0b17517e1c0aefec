r"""Penalty Metadata Normalization: β learned by its own least-squares loss.

PMDN (Vento et al., MICCAI 2022), a follow-up of Metadata Normalization (Lu et al., CVPR 2021,
arXiv 2104.09052): instead of a closed-form estimate from the whole training design, β is a
parameter fitted by gradient steps on the penalty :math:`\frac1m\lVert F - X_b\beta\rVert^2`,
with its own optimiser, while the network trains on :math:`F - X_{b,R}\beta_R`.
``docs/estimators.md`` has the maths and measured figures.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metanorm.design import Design
from metanorm.linalg import remove_effect
from metanorm.nn._base import _columns_of, _LazyMixin, _MetadataNormBase
from metanorm.nn._base import check_number as _check_number
from metanorm.nn._functions import StatisticsReducer
from metanorm.nn.functional import check_metadata

__all__ = [
    "OPTIMIZERS",
    "LazyPenaltyMetadataNorm",
    "PenaltyMetadataNorm",
    "penalty_parameters",
    "split_parameters",
]

#: The built-in optimisers of :class:`PenaltyMetadataNorm`'s β.
OPTIMIZERS = ("adam", "sgd")


class PenaltyMetadataNorm(_MetadataNormBase):
    r"""Removes the effect of metadata with a β fitted by its own least-squares loss.

    PMDN (Vento et al., "A Penalty Approach for Normalizing Feature Distributions to Build
    Confounder-Free Models", MICCAI 2022). β (K×D) is an :class:`~torch.nn.Parameter` fitted to
    the penalty

    .. math::
        L(\beta) = \frac1m \lVert F - X_b\beta \rVert_F^2, \qquad
        \nabla_\beta L = \frac2m X_b^\top (X_b\beta - F)

    by the layer's **own optimiser**: every training forward computes the output
    :math:`F - X_{b,R}\beta_R` with the current β, then takes one step of Adam or SGD on β with
    the gradient above (in closed form, with the features held fixed). The network is trained
    on the output by whatever optimiser trains it; no gradient of the network's loss reaches β
    and no gradient of the penalty reaches the network. So β has ``requires_grad=False`` and
    the network's optimiser, :func:`torch.nn.utils.clip_grad_norm_` and
    :class:`~torch.nn.parallel.DistributedDataParallel` leave it alone; :func:`split_parameters`
    separates it from the network's parameters all the same. On fixed features β converges to
    the least-squares β; while the network trains it follows the features with a lag set by
    ``lr``. Evaluation uses the current β, with no step. The optimiser's state is in buffers
    (``state_dict``). A step whose gradient, β or moments would not be finite (NaN/inf input,
    or a step size that diverges) is skipped and counted in ``num_batches_skipped`` (reported
    at ``eval()``/``state_dict()``): β never becomes NaN or inf.

    Args:
        num_features: D, the number of features of one sample after flattening.
        num_metadata: K, the number of design columns, or a :class:`~metanorm.design.Design`
            (its number of columns, and its ``keep`` and column names are used: no other
            statistic of it enters this estimator).
        keep: indices (or, with a :class:`~metanorm.design.Design`, names) of the columns
            estimated but not removed (labels); with a design, only its own ``keep`` is allowed.
            Default: ``()`` (or the design's ``keep``).
        lr: β's learning rate. Default: 1e-2.
        optimizer: ``"adam"`` (Adam with ``betas`` and ``eps``, bias-corrected) or ``"sgd"``
            (plain gradient steps; converges when ``lr`` < 1/λ_max(X_bᵀX_b/m)).
            Default: ``"adam"``.
        betas: Adam's (β₁, β₂). Default: (0.9, 0.999).
        eps: Adam's ε. Default: 1e-8.
        device: device of β and the buffers.
        dtype: dtype of β. Default: float32.

    Attributes:
        beta: β, parameter ``(K, D)`` (``requires_grad=False``).
        exp_avg, exp_avg_sq: Adam's moment buffers ``(K, D)`` (zeros for SGD).
        num_batches_tracked: long 0-d buffer, the optimiser steps taken (Adam's step count).

    Shape:
        - Input: :math:`(m, *)` with :math:`\prod * = D`; any m ≥ 1.
        - Metadata: :math:`(m, K)`, the batch's design rows; omitted, the rows in scope of a
          :class:`~metanorm.nn.MetadataModel` call (or :func:`~metanorm.nn.metadata_scope`).
        - Output: same shape and dtype as the input (float16/bfloat16 computed in float32).

    Examples::

        >>> import torch
        >>> y = torch.randint(0, 2, (64,)).float(); cf = torch.rand(64) + y
        >>> rows = torch.stack([y, cf, torch.ones(64)], dim=1)
        >>> layer = PenaltyMetadataNorm(84, 3, keep=[0])
        >>> out = layer(torch.randn(64, 84), rows)      # one step of β's optimiser
        >>> out.shape, int(layer.num_batches_tracked)
        (torch.Size([64, 84]), 1)
        >>> penalty = layer.penalty(torch.randn(64, 84), rows)   # L(β), for monitoring
    """

    _version = 2
    __constants__: ClassVar[list[str]] = ["num_features", "num_metadata", "lr", "optimizer"]
    beta: nn.Parameter
    exp_avg: Tensor
    exp_avg_sq: Tensor

    def __init__(
        self,
        num_features: int,
        num_metadata: int | Design,
        keep: Iterable[int | str] | None = None,
        lr: float = 1e-2,
        optimizer: str = "adam",
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
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
        self.lr = _check_number("lr", lr, 0.0, math.inf, open_low=True)
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"expected optimizer in {OPTIMIZERS}, got {optimizer!r}")
        self.optimizer = optimizer
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"expected betas to be a pair (beta1, beta2), got {betas!r}")
        b1 = _check_number("betas[0]", betas[0], 0.0, 1.0, open_low=False)
        b2 = _check_number("betas[1]", betas[1], 0.0, 1.0, open_low=False)
        if b1 >= 1.0 or b2 >= 1.0:
            raise ValueError(f"expected betas in [0, 1), got {betas!r}")
        self.betas = (b1, b2)
        self.eps = _check_number("eps", eps, 0.0, math.inf, open_low=True)
        dtype = dtype or torch.float32
        self.beta = self._per_feature(device, dtype, parameter=True)  # type: ignore[assignment]
        self.register_buffer("exp_avg", self._per_feature(device, dtype))
        self.register_buffer("exp_avg_sq", self._per_feature(device, dtype))

    def reset_running_stats(self) -> None:
        """Resets the optimiser's state (moments and step count), keeping β."""
        super().reset_running_stats()

    def _reset_estimate(self) -> None:
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()

    def reset_parameters(self) -> None:
        """β = 0 and a fresh optimiser state."""
        with torch.no_grad():
            self.beta.zero_()
        self.reset_running_stats()

    def _load_refit(self, xtx: Tensor, xty: Tensor, count: int) -> None:
        # the minimiser of the penalty over the data set: least squares
        self.beta.copy_(torch.linalg.lstsq(xtx, xty).solution)
        self._reset_estimate()

    def penalty(self, input: Tensor, metadata: Tensor) -> Tensor:
        r"""The penalty :math:`\frac1m\lVert F - X_b\beta\rVert_F^2` of a batch (no step taken).

        A 0-d tensor in the compute dtype, differentiable in ``input`` (not in β).
        """
        self._check_input_dim(input)
        check_metadata(metadata, input.shape[0], self.num_metadata)
        features = input.reshape(input.shape[0], -1)
        if features.dtype in (torch.float16, torch.bfloat16):
            features = features.float()
        rows = metadata.reshape(input.shape[0], self.num_metadata).to(features)
        resid = features - rows @ self.beta.detach().to(features.dtype)
        return resid.square().sum() / features.shape[0]

    def _estimate(
        self, features: Tensor, rows: Tensor, reducer: StatisticsReducer | None
    ) -> Tensor:
        beta = self.beta.detach().to(features.dtype)
        if self.training:
            beta = beta.clone()  # the step below changes self.beta in place
        out = remove_effect(features, rows, beta, self.remove_mask)
        if self.training:
            self._step(features.detach(), rows, reducer)
        return out

    @torch.no_grad()
    def _step(self, features: Tensor, rows: Tensor, reducer: StatisticsReducer | None) -> None:
        """One step of β's optimiser on the batch's penalty."""
        beta = self.beta.to(torch.float64)
        x64 = rows.to(torch.float64)
        gram = x64.T @ x64
        xtf = (rows.T @ features).to(torch.float64)
        count = torch.full((), rows.shape[0], dtype=torch.float64, device=rows.device)
        if reducer is not None:
            count, gram, xtf = reducer.sum(count), reducer.sum(gram), reducer.sum(xtf)
        grad = (gram @ beta - xtf) * (2.0 / count)
        finite = torch.isfinite((grad * 0).sum())
        grad = torch.where(finite, grad, torch.zeros_like(grad))
        m1 = m2 = None
        if self.optimizer == "sgd":
            new = beta - self.lr * grad
        else:
            b1, b2 = self.betas
            assert self.num_batches_tracked is not None
            step = (self.num_batches_tracked + 1).to(torch.float64)
            m1 = self.exp_avg.to(torch.float64).lerp(grad, 1 - b1)
            m2 = self.exp_avg_sq.to(torch.float64).mul(b2).addcmul(grad, grad, value=1 - b2)
            bc1 = 1 - b1**step
            bc2 = 1 - b2**step
            new = beta - self.lr * (m1 / bc1.clamp_min(1e-300)) / (
                (m2 / bc2.clamp_min(1e-300)).sqrt() + self.eps
            )
        # a step that diverges (β or a moment not finite in its dtype) is skipped and counted,
        # as a non-finite gradient is: β never leaves the finite range
        stored = new.to(self.beta.dtype)
        finite = finite & torch.isfinite((stored * 0).sum())
        if m1 is not None and m2 is not None:
            m1, m2 = m1.to(self.exp_avg.dtype), m2.to(self.exp_avg_sq.dtype)
            finite = finite & torch.isfinite((m1 * 0).sum() + (m2 * 0).sum())
            self.exp_avg.copy_(torch.where(finite, m1, self.exp_avg))
            self.exp_avg_sq.copy_(torch.where(finite, m2, self.exp_avg_sq))
        self.beta.copy_(torch.where(finite, stored, self.beta))
        assert self.num_batches_tracked is not None and self.num_samples_tracked is not None
        assert self.num_batches_skipped is not None
        self.num_batches_tracked.add_(finite.to(torch.long))
        self.num_samples_tracked.add_((count * finite).to(torch.long))
        self.num_batches_skipped.add_((~finite).to(torch.long))
        self._report(finite, rows)

    def extra_repr(self) -> str:
        """The constructor arguments shown in ``repr``."""
        return (
            f"{self.num_features}, {self.num_metadata}, keep={list(self.keep)}, lr={self.lr}, "
            f"optimizer={self.optimizer!r}"
        )


class LazyPenaltyMetadataNorm(_LazyMixin, PenaltyMetadataNorm):
    r"""A :class:`PenaltyMetadataNorm` whose ``num_features`` is inferred from its first input.

    Args:
        num_metadata: K, the number of design columns, or a :class:`~metanorm.design.Design`.
        **kwargs: the other arguments of :class:`PenaltyMetadataNorm`.

    Examples::

        >>> import torch
        >>> layer = LazyPenaltyMetadataNorm(2)
        >>> layer(torch.randn(5, 3), torch.randn(5, 2)).shape
        torch.Size([5, 3])
        >>> type(layer).__name__, tuple(layer.beta.shape)
        ('PenaltyMetadataNorm', (2, 3))
    """

    cls_to_become = PenaltyMetadataNorm

    def __init__(self, num_metadata: int | Design, **kwargs: Any) -> None:
        super().__init__(0, num_metadata, **kwargs)


def penalty_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The β of every :class:`PenaltyMetadataNorm` in ``model`` (fitted by the layers)."""
    for module in model.modules():
        if isinstance(module, PenaltyMetadataNorm):
            yield module.beta


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(network parameters, PMDN β parameters)``: give the first list to the network's optimiser.

    The two optimisers of PMDN are the network's (any :mod:`torch.optim` optimiser, on the first
    list) and each layer's built-in one (on its β, stepped in the layer's training forward).
    Since β has ``requires_grad=False``, passing ``model.parameters()`` to the network's
    optimiser is harmless too; the split keeps β out of weight decay and parameter counts.

    Examples::

        >>> from metanorm.nn import MetadataSequential, PenaltyMetadataNorm
        >>> model = MetadataSequential(torch.nn.Linear(3, 5), PenaltyMetadataNorm(5, 2))
        >>> network, betas = split_parameters(model)
        >>> len(network), len(betas)
        (2, 1)
        >>> optimizer = torch.optim.Adam(network, lr=1e-3)
    """
    betas = list(penalty_parameters(model))
    ids = {id(b) for b in betas}
    return [p for p in model.parameters() if id(p) not in ids], betas
