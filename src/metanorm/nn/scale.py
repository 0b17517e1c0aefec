r"""Metadata scale normalization: the multiplicative analogue of MDN.

MDN (Lu et al., CVPR 2021, arXiv 2104.09052) removes the part of a layer's features that is
*linear* in the metadata. An effect of the form metadata × content (a contrast change, a
scanner's style) multiplies a conv map's channels instead. :class:`MetadataScaleNorm` regresses
the log of each channel's spatial standard deviation on the design rows with the paper's batch
estimator and divides the metadata's part of the scale out. ``docs/failures.md`` measures it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from metanorm._validation import describe
from metanorm.design import Design
from metanorm.linalg import apply_weight, batch_weight, inverse_gram
from metanorm.nn import functional as MF
from metanorm.nn._base import _check_keep, _LazyMixin, _MetadataNormBase, check_number
from metanorm.nn._functions import AllReduceSum, StatisticsReducer

__all__ = ["LazyMetadataScaleNorm", "MetadataScaleNorm"]


def _constant_columns(matrix: Tensor) -> list[int]:
    return [j for j in range(matrix.shape[1]) if bool((matrix[:, j] == matrix[0, j]).all())]


def scale_design(
    design: Any, keep: Iterable[int | str] | None, num_metadata: int | None, ridge: float
) -> tuple[Iterable[int | str], tuple[str, ...] | None, Tensor, int, int, list[int]]:
    """What a scale layer keeps of its design: ``(keep, columns, Σ⁻¹, K, N, constant columns)``.

    Without a design, an empty layer of ``num_metadata`` columns (to restore with
    ``load_state_dict``); the constant columns (the intercept) are always kept.
    """
    if design is None:
        if isinstance(num_metadata, bool) or not isinstance(num_metadata, int) or num_metadata < 1:
            raise ValueError(
                "expected design= (the whole training design, (N, K)) or num_metadata= "
                f"(K, to restore with load_state_dict), got design=None and "
                f"num_metadata={num_metadata!r}"
            )
        gram_inverse = torch.zeros(num_metadata, num_metadata, dtype=torch.float64)
        return keep or (), None, gram_inverse, num_metadata, 0, []
    keep, columns = _check_keep(design, keep)
    source = design.matrix if isinstance(design, Design) else design
    matrix = torch.as_tensor(source, dtype=torch.float64)
    gram_inverse = inverse_gram(design, ridge=ridge, columns=columns)
    k = gram_inverse.shape[0]
    if num_metadata is not None and num_metadata != k:
        raise ValueError(f"num_metadata={num_metadata!r} does not match the design's {k} columns")
    return keep, columns, gram_inverse, k, matrix.shape[0], _constant_columns(matrix)


class MetadataScaleNorm(_MetadataNormBase):
    r"""Divides out the metadata's multiplicative effect on each channel's scale.

    For a conv map :math:`F` (m×C×positions) the layer takes the per-sample, per-channel spatial
    standard deviation :math:`\sigma` (invariant to the channel's bias), regresses
    :math:`s = \log\sigma` on the design rows with the paper's batch estimator,

    .. math::
        \hat\beta = \frac{N}{m}\,\Sigma^{-1} X_b^\top (s - \bar s), \qquad
        y = F \cdot \exp\!\bigl(-X_{b,R}\,\hat\beta_R\bigr)

    (:math:`\Sigma^{-1}` of the whole training design; :math:`\bar s` the batch mean, which
    changes only the intercept's coefficient in expectation and removes most of the estimator's
    noise, as :math:`\log\sigma` is far from 0), R the removed columns other than constant ones
    (the intercept: the channel's typical scale is kept). An exactly multiplicative effect
    :math:`F = \exp(x_R\beta_R)\,G` is removed exactly. Gradients flow through
    :math:`\hat\beta`. A running β (as :class:`~metanorm.nn.MetadataNorm`'s: momentum, a
    cumulative warm-up, a batch of m ≤ K using it) is used in evaluation. For ``(m, C)`` input
    (no positions) the scale is the per-sample standard deviation over the C features.

    Args:
        num_channels: C, the channels of the input (dimension 1).
        design: the whole training set's design, ``(N, K)`` tensor or array or a
            :class:`~metanorm.design.Design` (its ``keep`` then kept too). ``None`` builds an
            empty layer of ``num_metadata`` columns to restore with ``load_state_dict``.
        momentum: running-β momentum (``None``: the cumulative average). Default: 0.1.
        keep: columns estimated but not divided out (labels); constant columns (the intercept)
            are always kept. As for :class:`~metanorm.nn.MetadataNorm`: a design's own
            ``keep`` is used (another is an error); with a plain matrix pass it explicitly.
        num_metadata: K, needed only without ``design``.
        eps: added to the variance before the log. Default: 1e-5.
        ridge: added to the diagonal of ``XᵀX`` before it is inverted. Default: 0.
        on_nonfinite: as for :class:`~metanorm.nn.MetadataNorm`. Default: ``"skip"``.
        device: device of the buffers.
        dtype: dtype of the running β. Default: float32.

    Attributes:
        gram_inverse, n_samples, remove_mask, running_beta (``(K, C)``), and the counters: as for
        :class:`~metanorm.nn.MetadataNorm`.

    Shape:
        - Input: ``(m, C, *)`` with at least one position, or ``(m, C)``; design rows ``(m, K)``.
        - Output: same shape and dtype as the input.

    Examples::

        >>> import numpy as np, torch
        >>> from metanorm.design import make_design
        >>> rng = np.random.default_rng(0)
        >>> d = make_design({"y": rng.integers(0, 2, 64), "c": rng.uniform(1, 6, 64)}, keep=["y"])
        >>> layer = MetadataScaleNorm(4, d)
        >>> layer(torch.randn(8, 4, 5, 5), d.tensor()[:8]).shape
        torch.Size([8, 4, 5, 5])
    """

    _version = 2
    _falls_back = True
    __constants__: ClassVar[list[str]] = ["num_features", "num_metadata", "momentum", "eps"]
    gram_inverse: Tensor
    n_samples: Tensor
    running_beta: Tensor

    def __init__(
        self,
        num_channels: int,
        design: Any = None,
        momentum: float | None = 0.1,
        *,
        keep: Iterable[int | str] | None = None,
        num_metadata: int | None = None,
        eps: float = 1e-5,
        ridge: float = 0.0,
        on_nonfinite: str = "skip",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if momentum is not None:
            check_number("momentum", momentum, 0.0, 1.0, open_low=False)
        keep, columns, gram_inverse, k, n, constant = scale_design(
            design, keep, num_metadata, ridge
        )
        kept = [*(keep or ()), *constant]
        super().__init__(
            num_channels,
            k,
            kept,
            columns=columns,
            on_nonfinite=on_nonfinite,
            device=device,
        )
        self.momentum = momentum
        self.eps = check_number("eps", eps, 0.0, float("inf"), open_low=True)
        self.ridge = ridge
        self.has_design = design is not None
        self.register_buffer("gram_inverse", gram_inverse.to(device))
        self.register_buffer(
            "n_samples", torch.tensor(float(n), dtype=torch.float64, device=device)
        )
        self._init_design_sanity(device, dtype)
        self.register_buffer("running_beta", self._per_feature(device, dtype or torch.float32))

    @property
    def num_channels(self) -> int:
        """C, the channels of the input."""
        return self.num_features

    def _reset_estimate(self) -> None:
        self.running_beta.zero_()

    def _infer_num_features(self, input: Tensor) -> int:
        return int(input.shape[1])

    def _check_input_dim(self, input: Any) -> None:
        if not isinstance(input, Tensor) or not input.is_floating_point():
            raise TypeError(f"expected a floating-point input tensor, got {describe(input)}")
        if input.dim() < 2 or input.shape[1] != self.num_features:
            raise ValueError(
                f"expected input of shape (m, {self.num_features}, ...), got {tuple(input.shape)}"
            )

    def log_scale(self, input: Tensor) -> Tensor:
        """``log σ`` per sample and channel, ``(m, C)`` (``(m, 1)`` for ``(m, C)`` input)."""
        if input.dim() > 2:
            var = input.flatten(2).var(dim=2, unbiased=False)
        else:
            var = input.var(dim=1, unbiased=False, keepdim=True)
        return 0.5 * torch.log(var + self.eps)

    def _normalize(self, input: Tensor, rows: Tensor, reducer: StatisticsReducer | None) -> Tensor:
        channels = input.dim() > 2
        running = self.running_beta if channels else self.running_beta[:, :1]
        if self._refit_sums is not None:
            self._accumulate(self.log_scale(input).detach(), rows)
            beta = running
        elif not self.training:
            beta = running
        else:
            beta = self._train_estimate(input, rows, reducer, running)
        shift = torch.where(self.remove_mask, rows, 0.0) @ beta.to(rows.dtype)
        factor = torch.exp(-shift)
        return input * factor.reshape(*factor.shape, *([1] * (input.dim() - 2)))

    def _train_estimate(
        self, input: Tensor, rows: Tensor, reducer: StatisticsReducer | None, running: Tensor
    ) -> Tensor:
        s = self.log_scale(input)
        m, k = rows.shape
        if reducer is None:
            # centred on the batch mean (see the class docstring)
            stat = rows.T @ (s - s.mean(dim=0, keepdim=True))
            count: Tensor | int = m
        else:
            local = torch.cat(
                [
                    (rows.T @ s).reshape(-1),
                    s.sum(dim=0),
                    rows.sum(dim=0),
                    s.new_full((1,), m),
                ]
            )
            total = AllReduceSum.apply(local, reducer)
            width = s.shape[1]
            xts = total[: k * width].view(k, width)
            mean_s = total[k * width : k * width + width] / total[-1].clamp_min(1.0)
            sum_x = total[k * width + width : -1]
            stat = xts - sum_x[:, None] * mean_s[None, :]
            count = total[-1].detach().to(torch.float64)
        beta = apply_weight(batch_weight(self.gram_inverse, self.n_samples, count), stat)
        full = beta.detach().expand(k, self.num_features)
        finite = MF.update_running_beta(
            self.running_beta,
            full,
            count,
            self.momentum,
            num_batches_tracked=self.num_batches_tracked,
            num_samples_tracked=self.num_samples_tracked,
            num_batches_skipped=self.num_batches_skipped,
        )
        self._report(finite, rows)
        if isinstance(count, int):
            if m > k:
                return beta
            assert self.num_batches_fallback is not None
            self.num_batches_fallback.add_(1)
            return running.detach().clone()
        small = count <= k
        assert self.num_batches_fallback is not None
        self.num_batches_fallback.add_(small & (count > 0))
        return torch.where(small, running.detach().clone(), beta)

    def _load_refit(self, xtx: Tensor, xty: Tensor, count: int) -> None:
        beta = (self.gram_inverse.to(xty.device) @ xty) * (self.n_samples.to(xty.device) / count)
        self.running_beta.copy_(beta.expand(self.num_metadata, self.num_features))

    def _migrate(self, state_dict: dict[str, Any], prefix: str, version: int) -> None:
        # version 1 (metanorm.models.interaction_norms): sigma_inv (float32), removed (float
        # mask), no N (taken from this layer's design)
        if prefix + "sigma_inv" in state_dict:
            sigma_inv = state_dict.pop(prefix + "sigma_inv")
            state_dict[prefix + "gram_inverse"] = sigma_inv.to(torch.float64)
        if prefix + "removed" in state_dict:
            state_dict[prefix + "remove_mask"] = state_dict.pop(prefix + "removed") > 0
        state_dict.setdefault(prefix + "n_samples", self.n_samples.clone())

    def extra_repr(self) -> str:
        """The constructor arguments shown in ``repr``."""
        return (
            f"{self.num_features}, num_metadata={self.num_metadata}, keep={list(self.keep)}, "
            f"momentum={self.momentum}, eps={self.eps}"
        )


class LazyMetadataScaleNorm(_LazyMixin, MetadataScaleNorm):
    r"""A :class:`MetadataScaleNorm` whose ``num_channels`` is inferred from its first input.

    Args:
        design: the whole training set's design (see :class:`MetadataScaleNorm`); ``None``
            (with ``num_metadata=``) builds an empty layer to restore with
            :meth:`~torch.nn.Module.load_state_dict`, which also sets ``num_channels``.
        **kwargs: the other arguments of :class:`MetadataScaleNorm`.

    Examples::

        >>> import torch
        >>> design = torch.cat([torch.rand(40, 1), torch.ones(40, 1)], dim=1)
        >>> layer = LazyMetadataScaleNorm(design, keep=())
        >>> layer(torch.randn(8, 3, 4, 4), design[:8]).shape
        torch.Size([8, 3, 4, 4])
        >>> type(layer).__name__, layer.num_channels
        ('MetadataScaleNorm', 3)
    """

    cls_to_become = MetadataScaleNorm

    def __init__(self, design: Any = None, **kwargs: Any) -> None:
        super().__init__(0, design, **kwargs)
