r"""Location-scale metadata normalization: ComBat's model, per batch, inside a network.

ComBat (Johnson et al., Biostatistics 2007; Fortin et al., NeuroImage 2018) models a site effect
on each feature as a shift and a scale. :class:`MetadataLocationScaleNorm` removes both with
MDN's batch estimator (Lu et al., CVPR 2021): the metadata's location first (the batch GLM of
:class:`~metanorm.nn.MetadataNorm`), then the metadata's part of the residual's log-scale (as
:class:`~metanorm.nn.MetadataScaleNorm` does for the input's), keeping the label columns'
location and scale. ``docs/estimators.md`` describes it; ``docs/failures.md`` measures it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.nn.parameter import UninitializedBuffer

from metanorm._validation import describe
from metanorm.linalg import apply_weight, batch_weight
from metanorm.nn import functional as MF
from metanorm.nn._base import _LazyMixin, _MetadataNormBase, check_number
from metanorm.nn._functions import AllReduceSum, StatisticsReducer
from metanorm.nn.scale import scale_design

__all__ = ["LazyMetadataLocationScaleNorm", "MetadataLocationScaleNorm"]


class MetadataLocationScaleNorm(_MetadataNormBase):
    r"""Removes the metadata's location and scale effects (ComBat's model) batch by batch.

    The model, per channel c (ComBat's, with the design split into kept columns K, the labels
    and constant columns, and removed columns R):

    .. math::
        F = X_K\beta_K + X_R\beta_R + \exp(X_K\gamma_K + X_R\gamma_R)\odot\varepsilon

    whose metadata-free part is :math:`X_K\beta_K + \exp(X_K\gamma_K)\odot\varepsilon`. For a
    batch of m samples, features :math:`F` flattened to m×D (D = C·P, P the positions of a
    conv map) and design rows :math:`X_b` (m×K), with :math:`W = (N/m)\,\Sigma^{-1}` of the
    whole training design (as :class:`~metanorm.nn.MetadataNorm`):

    1. **location**, one β column per flattened feature: :math:`\hat\beta = W X_b^\top F`, the
       residual of every column's location :math:`r = F - X_b\hat\beta`;
    2. **scale**, one γ column per channel: :math:`s` = the log of the residual's spatial
       standard deviation per sample and channel,
       :math:`s_{ic} = \tfrac12\log(\mathrm{var}_p\, r_{icp} + \epsilon)`, and
       :math:`\hat\gamma = W X_b^\top (s - \bar s)` (centred on the batch mean, which changes
       only the intercept's coefficient when the design has one, as in
       :class:`~metanorm.nn.MetadataScaleNorm`);
    3. :math:`y = X_{b,C}\hat\beta_C + (F - X_{b,C}\hat\beta_C - X_{b,R}\hat\beta_R)
       \odot\exp(-X_{b,R}\hat\gamma_R)`, the factor broadcast over the positions, C the
       constant columns (the intercept: each feature's typical level and each channel's
       typical scale are kept).

    **The kept columns (labels)** are estimated in both stages (so that their location and
    scale are not taken for the metadata's) and removed in neither. By default the output
    does not read their values row by row, as :class:`~metanorm.nn.MetadataNorm`'s: the
    labels' location then stays in the residual and is divided by the metadata's scale factor
    with it, which gives ComBat's output :math:`X_K\beta_K + \exp(X_K\gamma_K)\varepsilon`
    exactly when the labels have no location effect, and otherwise leaves their effect scaled
    per site. ``use_kept_rows=True`` gives ComBat's output in every case,
    :math:`y = X_{b,K}\hat\beta_K + (F - X_b\hat\beta)\odot\exp(-X_{b,R}\hat\gamma_R)`, at the
    price ComBat pays: each row's labels enter its output, in training (a shortcut a network
    can learn) and in evaluation (pass the true labels; a test set's predictions then see
    them). With the whole design in one batch (m = N), an input that follows the model
    exactly, with :math:`\varepsilon` of spatial standard deviation 1 orthogonal to the
    design, is restored exactly. Gradients flow through :math:`\hat\beta` and
    :math:`\hat\gamma`.

    **Scale without positions.** For ``(m, C)`` input (or a single position) there is no
    spatial standard deviation: the scale of a feature is then that of its residual,
    :math:`s_{ic} = \tfrac12\log(r_{ic}^2 + \epsilon)`, regressed on the design per feature.
    If :math:`r = \exp(x\gamma)\,\varepsilon` with :math:`\varepsilon` independent of the
    design, :math:`E[s] = x\gamma + E[\log|\varepsilon|]`: the constant is absorbed by the kept
    intercept, so :math:`\hat\gamma_R` is unbiased for :math:`\gamma_R` (up to ε). This is
    ComBat's per-feature scale model (without its empirical-Bayes shrinkage).

    **Running state.** The running β (K×D) and γ (K×C), in full-data scale, are updated as
    :class:`~metanorm.nn.MetadataNorm`'s (momentum, a cumulative warm-up) and used in
    evaluation, where the kept columns' values are not read (except with ``use_kept_rows``). A
    training batch of m ≤ K uses the running state for its output (as
    :class:`~metanorm.nn.MetadataNorm` does) and is counted in ``num_batches_fallback``.
    :func:`metanorm.nn.utils.refit_running_beta` refits both in two passes over the loader:
    β by least squares on the features, then γ by least squares on the log-scale of the
    residual of the refitted β.

    Args:
        num_channels: C, the channels of the input (dimension 1).
        design: the whole training set's design, ``(N, K)`` tensor or array or a
            :class:`~metanorm.design.Design` (its ``keep`` then kept too). ``None`` builds an
            empty layer of ``num_metadata`` columns to restore with ``load_state_dict``.
        momentum: running-state momentum (``None``: the cumulative average). Default: 0.1.
        keep: columns estimated but not removed (labels); constant columns are always kept.
            Default: ``()`` (or the design's ``keep``).
        num_positions: P, the positions per channel (``H·W`` of a ``(m, C, H, W)`` map; 1 for
            ``(m, C)`` input). Default: 1.
        num_metadata: K, needed only without ``design``.
        use_kept_rows: keep the kept columns' location row by row (ComBat's exact output; the
            labels then enter the output, see above). Default: ``False``.
        eps: added to the variance (or square) before the log. Default: 1e-5.
        ridge: added to the diagonal of ``XᵀX`` before it is inverted. Default: 0.
        on_nonfinite: as for :class:`~metanorm.nn.MetadataNorm`. Default: ``"skip"``.
        device: device of the buffers.
        dtype: dtype of the running state. Default: float32.

    Attributes:
        gram_inverse: :math:`\Sigma^{-1}`, float64 ``(K, K)``.
        n_samples: N, float64 (0-d).
        remove_mask: bool ``(K,)``, true for the removed columns (neither kept nor constant).
        constant_mask: bool ``(K,)``, true for the design's constant columns.
        running_state: the running β and γ side by side, ``(K, D + C)``; ``running_beta``
            (``(K, D)``) and ``running_gamma`` (``(K, C)``) are views of it.
        num_batches_tracked, num_samples_tracked, num_batches_skipped, num_batches_fallback:
            as for :class:`~metanorm.nn.MetadataNorm`.

    Shape:
        - Input: ``(m, C, *)`` with P positions (``prod(*) = num_positions``), or ``(m, C)``
          when ``num_positions`` is 1.
        - Metadata: ``(m, K)``, the batch's design rows; omitted: the rows in scope.
        - Output: same shape and dtype as the input (low precision computed in float32).

    Examples::

        >>> import numpy as np, torch
        >>> from metanorm.design import make_design
        >>> rng = np.random.default_rng(0)
        >>> d = make_design({"y": rng.integers(0, 2, 64), "site": rng.integers(0, 3, 64)},
        ...                 categorical=["site"], keep=["y"])
        >>> layer = MetadataLocationScaleNorm(4, d, num_positions=25)
        >>> layer(torch.randn(16, 4, 5, 5), d.tensor()[:16]).shape
        torch.Size([16, 4, 5, 5])
        >>> layer.running_beta.shape, layer.running_gamma.shape
        (torch.Size([4, 100]), torch.Size([4, 4]))
    """

    _version = 1
    _falls_back = True
    _refit_passes: ClassVar[int] = 2
    __constants__: ClassVar[list[str]] = [
        "num_features",
        "num_metadata",
        "num_positions",
        "momentum",
        "eps",
    ]
    gram_inverse: Tensor
    n_samples: Tensor
    running_state: Tensor
    constant_mask: Tensor

    def __init__(
        self,
        num_channels: int,
        design: Any = None,
        momentum: float | None = 0.1,
        *,
        keep: Iterable[int | str] | None = None,
        num_positions: int = 1,
        num_metadata: int | None = None,
        use_kept_rows: bool = False,
        eps: float = 1e-5,
        ridge: float = 0.0,
        on_nonfinite: str = "skip",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if momentum is not None:
            check_number("momentum", momentum, 0.0, 1.0, open_low=False)
        if isinstance(num_positions, bool) or not isinstance(num_positions, int):
            raise ValueError(
                f"expected num_positions (P, the positions per channel) to be a positive int, "
                f"got {num_positions!r}"
            )
        if num_positions < 1 and not (self._is_lazy() and num_positions == 0):
            raise ValueError(
                f"expected num_positions (P, the positions per channel) to be a positive int, "
                f"got {num_positions!r}"
            )
        keep, columns, gram_inverse, k, n, constant = scale_design(
            design, keep, num_metadata, ridge
        )
        if not isinstance(use_kept_rows, bool):
            raise TypeError(f"expected use_kept_rows to be a bool, got {use_kept_rows!r}")
        kept = [*(keep or ()), *constant]
        super().__init__(
            num_channels, k, kept, columns=columns, on_nonfinite=on_nonfinite, device=device
        )
        self.num_positions = num_positions
        self.use_kept_rows = use_kept_rows
        constant_mask = torch.zeros(k, dtype=torch.bool, device=device)
        constant_mask[constant] = True
        self.register_buffer("constant_mask", constant_mask)
        self.momentum = momentum
        self.eps = check_number("eps", eps, 0.0, float("inf"), open_low=True)
        self.ridge = ridge
        self.has_design = design is not None
        self._refit_stage = 0
        self.register_buffer("gram_inverse", gram_inverse.to(device))
        self.register_buffer(
            "n_samples", torch.tensor(float(n), dtype=torch.float64, device=device)
        )
        self.register_buffer("running_state", self._state_tensor(device, dtype or torch.float32))

    def _state_tensor(self, device: torch.device | str | None, dtype: torch.dtype) -> Tensor:
        if self._is_lazy():
            return self._per_feature(device, dtype)  # uninitialised, shaped at the first call
        width = self.num_features * (self.num_positions + 1)
        return torch.zeros(self.num_metadata, width, device=device, dtype=dtype)

    # ---------------------------------------------------------------- state

    @property
    def num_channels(self) -> int:
        """C, the channels of the input."""
        return self.num_features

    @property
    def running_beta(self) -> Tensor:
        """The running location coefficients, ``(K, D)`` (a view of ``running_state``)."""
        return self.running_state[:, : self.num_features * self.num_positions]

    @property
    def running_gamma(self) -> Tensor:
        """The running log-scale coefficients, ``(K, C)`` (a view of ``running_state``)."""
        return self.running_state[:, self.num_features * self.num_positions :]

    def _reset_estimate(self) -> None:
        self.running_state.zero_()

    def _infer_num_features(self, input: Tensor) -> int:
        return int(input.shape[1])

    def _check_input_dim(self, input: Any) -> None:
        if not isinstance(input, Tensor) or not input.is_floating_point():
            raise TypeError(f"expected a floating-point input tensor, got {describe(input)}")
        if (
            input.dim() < 2
            or input.shape[1] != self.num_features
            or math.prod(input.shape[2:]) != self.num_positions
        ):
            raise ValueError(
                f"expected input of shape (m, {self.num_features}, *) with "
                f"{self.num_positions} positions per channel (num_channels, num_positions), "
                f"got {describe(input)}"
            )

    # ---------------------------------------------------------------- the map

    def log_scale(self, residual: Tensor) -> Tensor:
        """``s``, the log-scale per sample and channel of ``(m, C, P)`` residuals: ``(m, C)``.

        ``½·log(var + eps)`` over the P positions; for P = 1, ``½·log(r² + eps)``.
        """
        if residual.shape[2] > 1:
            var = residual.var(dim=2, unbiased=False)
        else:
            var = residual[:, :, 0].square()
        return 0.5 * torch.log(var + self.eps)

    def _normalize(self, input: Tensor, rows: Tensor, reducer: StatisticsReducer | None) -> Tensor:
        m, c = input.shape[0], self.num_features
        flat = input.reshape(m, -1)
        if self._refit_sums is not None:
            beta, gamma = self._running(flat.dtype)
            if self._refit_stage == 0:
                self._accumulate(flat.detach(), rows)
            else:
                residual = (flat - rows @ beta).reshape(m, c, -1)
                self._accumulate(self.log_scale(residual).detach(), rows)
        elif not self.training:
            beta, gamma = self._running(flat.dtype)
        else:
            beta, gamma = self._train_estimate(flat, rows, reducer)
        # the location kept exactly: constant columns, and the kept columns with use_kept_rows
        exact = ~self.remove_mask if self.use_kept_rows else self.constant_mask
        kept = (rows * exact) @ beta
        residual = flat - (rows * self.remove_mask) @ beta - kept
        factor = torch.exp(-((rows * self.remove_mask) @ gamma))
        out = kept.reshape(m, c, -1) + residual.reshape(m, c, -1) * factor[:, :, None]
        return out.reshape(input.shape)

    def _running(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        state = MF._as_dtype(self.running_state, dtype)
        split = self.num_features * self.num_positions
        return state[:, :split], state[:, split:]

    def _train_estimate(
        self, flat: Tensor, rows: Tensor, reducer: StatisticsReducer | None
    ) -> tuple[Tensor, Tensor]:
        m, c, k = flat.shape[0], self.num_features, self.num_metadata
        gram_inverse, n = self.gram_inverse, self.n_samples
        # stage 1: location, one β column per flattened feature
        if reducer is None:
            count: Tensor | int = m
            xtf = rows.T @ flat
        else:
            local = torch.cat([(rows.T @ flat).reshape(-1), flat.new_full((1,), m)])
            total = AllReduceSum.apply(local, reducer)
            xtf = total[:-1].view(k, flat.shape[1])
            count = total[-1].detach().to(torch.float64)
        weight = batch_weight(gram_inverse, n, count)
        beta = apply_weight(weight, xtf)
        # stage 2: the residual's log-scale per channel, centred on the batch mean
        s = self.log_scale((flat - rows @ beta).reshape(m, c, -1))
        if reducer is None:
            stat = rows.T @ (s - s.mean(dim=0, keepdim=True))
        else:
            local = torch.cat([(rows.T @ s).reshape(-1), s.sum(dim=0), rows.sum(dim=0)])
            total = AllReduceSum.apply(local, reducer)
            xts = total[: k * c].view(k, c)
            assert isinstance(count, Tensor)
            mean_s = total[k * c : k * c + c] / count.to(total.dtype).clamp_min(1.0)
            sum_x = total[k * c + c :]
            stat = xts - sum_x[:, None] * mean_s[None, :]
        gamma = apply_weight(weight, stat)
        estimate = torch.cat([beta.detach(), gamma.detach()], dim=1)
        finite = MF.update_running_beta(
            self.running_state,
            estimate,
            count,
            self.momentum,
            num_batches_tracked=self.num_batches_tracked,
            num_samples_tracked=self.num_samples_tracked,
            num_batches_skipped=self.num_batches_skipped,
        )
        self._report(finite, rows)
        assert self.num_batches_fallback is not None
        if isinstance(count, int):
            if m > k:
                return beta, gamma
            # m ≤ K: the output uses the running state (as MetadataNorm's)
            self.num_batches_fallback.add_(1)
            run_beta, run_gamma = self._running(flat.dtype)
            return run_beta.detach().clone(), run_gamma.detach().clone()
        small = count <= k
        self.num_batches_fallback.add_(small & (count > 0))
        run_beta, run_gamma = self._running(flat.dtype)
        return (
            torch.where(small, run_beta.detach().clone(), beta),
            torch.where(small, run_gamma.detach().clone(), gamma),
        )

    # ---------------------------------------------------------------- refit (two passes)

    def _begin_refit(self, stage: int = 0, check_design: bool = True) -> None:
        super()._begin_refit(stage, check_design)
        self._refit_stage = stage

    def _load_refit(self, xtx: Tensor, xty: Tensor, count: int) -> None:
        coef = (self.gram_inverse.to(xty.device) @ xty) * (self.n_samples.to(xty.device) / count)
        target = self.running_beta if self._refit_stage == 0 else self.running_gamma
        target.copy_(coef)

    # ---------------------------------------------------------------- checkpoints

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        _record_positions(self, destination, prefix)

    def extra_repr(self) -> str:
        """The constructor arguments shown in ``repr``."""
        return (
            f"{self.num_features}, num_metadata={self.num_metadata}, keep={list(self.keep)}, "
            f"num_positions={self.num_positions}, momentum={self.momentum}, eps={self.eps}"
            + (", use_kept_rows=True" if self.use_kept_rows else "")
        )


def _record_positions(module: MetadataLocationScaleNorm, destination: Any, prefix: str) -> None:
    """Writes ``num_positions`` beside the layer's version in a state dict's metadata."""
    metadata = getattr(destination, "_metadata", None)
    if metadata is not None and prefix[:-1] in metadata:
        metadata[prefix[:-1]]["num_positions"] = module.num_positions


class LazyMetadataLocationScaleNorm(_LazyMixin, MetadataLocationScaleNorm):
    r"""A :class:`MetadataLocationScaleNorm` whose channels and positions come from its first input.

    Args:
        design: the whole training set's design (see :class:`MetadataLocationScaleNorm`).
        **kwargs: the other arguments of :class:`MetadataLocationScaleNorm` (not
            ``num_positions``: inferred too).

    Examples::

        >>> import torch
        >>> design = torch.cat([torch.rand(40, 1), torch.ones(40, 1)], dim=1)
        >>> layer = LazyMetadataLocationScaleNorm(design)
        >>> layer(torch.randn(8, 3, 4, 4), design[:8]).shape
        torch.Size([8, 3, 4, 4])
        >>> type(layer).__name__, layer.num_channels, layer.num_positions
        ('MetadataLocationScaleNorm', 3, 16)
    """

    cls_to_become = MetadataLocationScaleNorm

    def __init__(self, design: Any, **kwargs: Any) -> None:
        super().__init__(0, design, num_positions=0, **kwargs)

    def initialize_parameters(self, input: Tensor, metadata: Tensor | None = None) -> None:
        """Sets ``num_channels`` and ``num_positions`` from the first input; shapes the state."""
        if self.has_uninitialized_params() or self.num_features == 0:
            if not isinstance(input, Tensor) or input.dim() < 2:
                raise ValueError(
                    f"expected input of shape (m, C, *) to infer num_channels from, got "
                    f"{describe(input)}"
                )
            self.num_features = int(input.shape[1])
            self.num_positions = math.prod(input.shape[2:])
            self._materialize((self.num_metadata, self.num_features * (self.num_positions + 1)))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        *args: Any,
    ) -> None:
        if self.num_features == 0 and "num_positions" in local_metadata:
            self.num_positions = int(local_metadata["num_positions"])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def _width_from_state(self, lazy: list[str]) -> None:
        """``num_channels`` from the ``(K, C·(P + 1))`` state and the recorded P positions."""
        if self.num_features != 0 or "running_state" not in lazy:
            return
        if isinstance(self.running_state, UninitializedBuffer):
            return
        width = int(self.running_state.shape[1])
        if self.num_positions < 1 or width % (self.num_positions + 1):
            raise ValueError(
                f"cannot tell num_channels from a running state of width {width} without the "
                "number of positions the checkpoint recorded: build the layer as "
                "MetadataLocationScaleNorm(num_channels, num_metadata=K, num_positions=P) to "
                "restore this checkpoint"
            )
        self.num_features = width // (self.num_positions + 1)
