"""The Metadata Normalization layer (Lu et al., CVPR 2021)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from metanorm import glm
from metanorm.nn import functional as MF

__all__ = ["MetadataNorm"]


class MetadataNorm(nn.Module):
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
    :math:`\beta_{run} \leftarrow (1-\mu)\beta_{run} + \mu\hat\beta`. In evaluation mode
    :math:`y = F - X_{b,R}\,\beta_{run,R}`; the kept columns of the metadata are ignored then, so
    evaluation needs metadata but no labels (pass zeros in the kept columns).

    .. note::
        ``momentum=None`` gives the cumulative average of every batch seen, as in
        :class:`torch.nn.BatchNorm1d`, each batch weighted by its size (equal batches: the plain
        average). After one epoch over any partition of the training set, a short last batch
        included, it equals the full-data least-squares β.

    Args:
        num_features: D, the number of features of one sample after flattening (C·H·W for a
            conv map).
        design: the whole training set's design, ``(N, K)`` tensor or array, or a
            :class:`metanorm.glm.Design` (whose ``keep`` is then used by default). Only
            :math:`\Sigma^{-1}` and N are stored.
        keep: indices (or, with a :class:`~metanorm.glm.Design`, names) of the columns that are
            estimated but not removed. Default: ``()`` (or the design's ``keep``).
        momentum: the running-β factor, or ``None`` for a cumulative average. Default: 0.1.
        track_running_stats: keep a running β for evaluation. Without it the layer always uses
            batch estimates (and so needs labels at evaluation). Default: ``True``.
        ridge: ridge term added to :math:`X^\top X` (see :func:`metanorm.glm.glm_kernel`).
            Default: 0.
        on_nonfinite: ``"raise"`` a :class:`~metanorm.nn.NonFiniteEstimateError` when a training
            batch gives a non-finite β estimate, or ``"skip"`` its running update with a warning
            (for mixed-precision training). The running β is never polluted. Default: ``"raise"``.
        device: device of the buffers.
        dtype: dtype of the running β (the kernel is always float64). Default: float32.

    Attributes:
        kernel: :math:`\Sigma^{-1}`, float64 buffer ``(K, K)``.
        n_samples: N, float64 buffer (0-d).
        remove_mask: bool buffer ``(K,)``, true for removed columns.
        running_beta: buffer ``(K, D)``, or ``None`` without ``track_running_stats``.
        num_batches_tracked: long buffer (0-d), training batches behind the running β.
        num_samples_tracked: long buffer (0-d), training samples behind the running β.

    Shape:
        - Input: :math:`(m, *)` with :math:`\prod * = D`; any m ≥ 1 (a short last batch works).
        - Metadata: :math:`(m, K)`, the batch's design rows, built like ``design``.
        - Output: same shape and dtype as the input. float16/bfloat16 inputs are computed in
          float32.

    Examples::

        >>> import torch
        >>> from metanorm.glm import make_design
        >>> y = torch.randint(0, 2, (100,)); cf = torch.rand(100) + y
        >>> design = make_design({"y": y.numpy(), "cf": cf.numpy()}, keep=["y"])
        >>> layer = MetadataNorm(84, design)
        >>> rows = design.tensor()                 # the design rows of the samples
        >>> out = layer(torch.randn(20, 84), rows[:20])
        >>> out.shape
        torch.Size([20, 84])
        >>> _ = layer.eval(); layer(torch.randn(5, 84), rows[:5]).shape
        torch.Size([5, 84])
    """

    _version = 1
    __constants__: ClassVar[list[str]] = [
        "num_features",
        "num_metadata",
        "momentum",
        "track_running_stats",
    ]
    num_features: int
    num_metadata: int
    momentum: float | None
    kernel: Tensor
    n_samples: Tensor
    remove_mask: Tensor
    running_beta: Tensor | None
    num_batches_tracked: Tensor | None
    num_samples_tracked: Tensor | None

    def __init__(
        self,
        num_features: int,
        design: Any,
        keep: Iterable[int | str] | None = None,
        momentum: float | None = 0.1,
        *,
        track_running_stats: bool = True,
        ridge: float = 0.0,
        on_nonfinite: str = "raise",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"expected num_features to be a positive int, got {num_features!r}")
        if momentum is not None and (
            isinstance(momentum, bool)
            or not isinstance(momentum, int | float)
            or not 0.0 <= momentum <= 1.0
        ):
            raise ValueError(f"expected momentum in [0, 1] or None, got {momentum!r}")
        if on_nonfinite not in MF.NONFINITE_POLICIES:
            raise ValueError(
                f"expected on_nonfinite in {MF.NONFINITE_POLICIES}, got {on_nonfinite!r}"
            )
        columns: tuple[str, ...] | None = None
        if isinstance(design, glm.Design):
            columns = design.columns
            keep = design.keep if keep is None else keep
        kernel = glm.glm_kernel(design, ridge=ridge, columns=columns)
        k = kernel.shape[0]
        n = (design.matrix if isinstance(design, glm.Design) else design).shape[0]
        keep_idx = _resolve_keep(keep or (), k, columns)
        if len(keep_idx) == k:
            raise ValueError(f"keep lists all {k} design columns: nothing would be removed")

        self.num_features = num_features
        self.num_metadata = k
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        self.ridge = ridge
        self.on_nonfinite = on_nonfinite
        self.columns = columns
        mask = torch.ones(k, dtype=torch.bool, device=device)
        mask[list(keep_idx)] = False
        self.register_buffer("kernel", kernel.to(device))
        self.register_buffer(
            "n_samples", torch.tensor(float(n), dtype=torch.float64, device=device)
        )
        self.register_buffer("remove_mask", mask)
        if track_running_stats:
            self.register_buffer(
                "running_beta",
                torch.zeros(k, num_features, device=device, dtype=dtype or torch.float32),
            )
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
            self.register_buffer(
                "num_samples_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_beta", None)
            self.register_buffer("num_batches_tracked", None)
            self.register_buffer("num_samples_tracked", None)

    @property
    def keep(self) -> tuple[int, ...]:
        """Indices of the kept design columns."""
        return tuple((~self.remove_mask).nonzero().flatten().tolist())

    def reset_running_stats(self) -> None:
        """Zeroes the running β and the batch counter."""
        if self.running_beta is not None:
            self.running_beta.zero_()
        for counter in (self.num_batches_tracked, self.num_samples_tracked):
            if counter is not None:
                counter.zero_()

    def _check_input_dim(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"expected input to be a tensor, got {type(input).__name__}")
        if input.dim() < 2:
            raise ValueError(
                f"expected input of shape (m, *) with {self.num_features} features per sample, "
                f"got {input.dim()}D input of shape {tuple(input.shape)}"
            )
        d = math.prod(input.shape[1:])
        if d != self.num_features:
            raise ValueError(
                f"expected {self.num_features} features per sample (num_features), got "
                f"{d} from input of shape {tuple(input.shape)}"
            )

    def forward(self, input: Tensor, metadata: Tensor) -> Tensor:
        """Removes the metadata effect; see the class docstring."""
        self._check_input_dim(input)
        return MF.metadata_norm(
            input,
            metadata,
            self.kernel,
            self.n_samples,
            self.remove_mask,
            self.running_beta,
            self.num_batches_tracked,
            self.num_samples_tracked,
            self.training or self.running_beta is None,
            self.momentum,
            self.on_nonfinite,
        )

    def extra_repr(self) -> str:
        """The constructor arguments shown in ``repr``."""
        return (
            f"{self.num_features}, num_metadata={self.num_metadata}, keep={list(self.keep)}, "
            f"n_samples={int(self.n_samples)}, momentum={self.momentum}, "
            f"track_running_stats={self.track_running_stats}"
        )


def _resolve_keep(
    keep: Iterable[int | str], k: int, columns: tuple[str, ...] | None
) -> tuple[int, ...]:
    out: list[int] = []
    for c in keep:
        if isinstance(c, str):
            if columns is None or c not in columns:
                raise ValueError(
                    f"keep column {c!r} not found; "
                    + (
                        f"the design has columns {list(columns)}"
                        if columns
                        else "names need a metanorm.glm.Design; pass indices for a plain matrix"
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
