"""Stateless form of Metadata Normalization.

See :class:`metanorm.nn.MetadataNorm` for the maths and the arguments. The functional holds no
state: it updates the ``running_beta`` buffer it is given, in place, as ``F.batch_norm`` does.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from metanorm import glm
from metanorm._validation import describe

__all__ = ["NonFiniteEstimateError", "metadata_norm"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
NONFINITE_POLICIES = ("raise", "skip")


class NonFiniteEstimateError(ValueError):
    """A training batch gave a NaN or infinite β estimate (NaN/inf features, fp16 overflow)."""


def check_metadata(
    metadata: Tensor, batch_size: int, num_columns: int, *, finite: bool = True
) -> None:
    """Raises ``ValueError``/``TypeError`` unless metadata is a finite ``(m, K)`` tensor.

    With ``finite=False`` only the type and shape are checked (the caller checks finiteness).
    """
    if not isinstance(metadata, Tensor):
        raise TypeError(
            f"expected metadata to be a tensor of shape ({batch_size}, {num_columns}), "
            f"got {describe(metadata)}"
        )
    if metadata.dim() == 1 and num_columns == 1:
        metadata = metadata.unsqueeze(1)
    if metadata.dim() != 2 or metadata.shape[1] != num_columns:
        raise ValueError(
            f"expected metadata of shape ({batch_size}, {num_columns}) (one design row of K = "
            f"{num_columns} columns per sample), got {describe(metadata)}"
        )
    if metadata.shape[0] != batch_size:
        raise ValueError(
            f"expected metadata with {batch_size} rows (the batch size of the input), "
            f"got {metadata.shape[0]}"
        )
    if metadata.is_complex() or metadata.dtype == torch.bool:
        raise TypeError(f"expected real numeric metadata, got {describe(metadata)}")
    if finite:
        check_finite_metadata(metadata)


def check_finite_metadata(metadata: Tensor) -> None:
    """Raises ``ValueError`` if a floating ``metadata`` tensor holds NaN or infinite values."""
    if metadata.is_floating_point() and not bool(torch.isfinite(metadata).all()):
        bad = int((~torch.isfinite(metadata)).sum())
        raise ValueError(f"expected finite metadata, got {bad} NaN or infinite value(s)")


def metadata_norm(
    input: Tensor,
    metadata: Tensor,
    kernel: Tensor,
    n_samples: int | float | Tensor,
    remove_mask: Tensor,
    running_beta: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    num_samples_tracked: Tensor | None = None,
    training: bool = True,
    momentum: float | None = 0.1,
    on_nonfinite: str = "raise",
) -> Tensor:
    r"""Regresses the removed design columns out of ``input``.

    See :class:`~metanorm.nn.MetadataNorm` for details.

    Args:
        input: features ``(m, *)``; flattened per sample to ``(m, D)``.
        metadata: design rows ``(m, K)`` for this batch.
        kernel: :math:`\Sigma^{-1}` of the full training design, ``(K, K)``.
        n_samples: N, the number of training rows behind ``kernel``.
        remove_mask: ``(K,)`` bool, true for the columns whose effect is removed.
        running_beta: ``(K, D)`` buffer in full-data scale, updated in place when ``training``.
        num_batches_tracked: long 0-d buffer counting the updates of ``running_beta``,
            incremented in place with each one.
        num_samples_tracked: long 0-d buffer counting the samples behind those updates,
            incremented in place by m with each one (needed when ``momentum`` is None).
        training: estimate β from the batch (and update ``running_beta``); otherwise use
            ``running_beta``.
        momentum: the factor of the running update
            ``running_beta ← (1 − momentum)·running_beta + momentum·β̂``, or None for the
            cumulative average weighted by batch size (factor ``m / num_samples_tracked``), which
            after one epoch over any partition of the training set equals the full-data β.
        on_nonfinite: ``"raise"`` (default) or ``"skip"``: what to do when a training batch gives
            a non-finite β̂. Either way ``running_beta`` keeps its previous value.

    Returns:
        A tensor of ``input``'s shape and dtype.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"expected input to be a tensor, got {describe(input)}")
    if not input.is_floating_point():
        raise TypeError(f"expected a floating-point input, got {describe(input)}")
    if input.dim() < 1 or input.shape[0] == 0:
        raise ValueError(f"expected input of shape (m, *) with m >= 1, got {describe(input)}")
    m = input.shape[0]
    k = kernel.shape[0]
    # training with a running β checks finiteness once, on β and the metadata together (below)
    tracked = training and running_beta is not None
    check_metadata(metadata, m, k, finite=not tracked)
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"expected on_nonfinite in {NONFINITE_POLICIES}, got {on_nonfinite!r}")
    if tracked and momentum is None and num_samples_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_samples_tracked")

    # the conversions below are skipped when they would be no-ops (each costs a few µs per call)
    compute_dtype = torch.float32 if input.dtype in _LOW_PRECISION else input.dtype
    features = input
    if features.dim() != 2:
        features = features.reshape(m, -1)
    if features.dtype != compute_dtype:
        features = features.to(compute_dtype)
    rows = metadata if metadata.dim() == 2 else metadata.reshape(m, k)
    if rows.dtype != compute_dtype or rows.device != features.device:
        rows = rows.to(device=features.device, dtype=compute_dtype)
    mask = remove_mask if remove_mask.device == rows.device else remove_mask.to(rows.device)

    if training:
        if running_beta is None:
            out, beta = glm.batch_residual(features, rows, kernel, float(n_samples), mask)
        else:
            # one float64 sum of β and the metadata instead of elementwise tests; non-finite
            # metadata are told apart from non-finite features only when it is not finite
            out, beta, total = glm.batch_residual_checked(
                features, rows, kernel, float(n_samples), mask
            )
            with torch.no_grad():
                if math.isfinite(total):
                    if num_batches_tracked is not None:
                        num_batches_tracked.add_(1)
                    if num_samples_tracked is not None:
                        num_samples_tracked.add_(m)
                    if momentum is None and num_samples_tracked is not None:
                        factor = m / float(num_samples_tracked)
                    else:
                        factor = float(momentum or 0.0)
                    running_beta.lerp_(beta.to(running_beta.dtype), factor)
                else:
                    check_finite_metadata(rows)
                    msg = (
                        "the batch's β estimate is not finite (NaN or infinite features, or an "
                        "overflow in low precision); the running β keeps its previous value"
                    )
                    if on_nonfinite == "raise":
                        raise NonFiniteEstimateError(
                            msg + ". Pass on_nonfinite='skip' to warn and go on instead"
                        )
                    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    else:
        if running_beta is None:
            raise RuntimeError(
                "evaluation needs a running β: build the layer with track_running_stats=True, "
                "or keep it in training mode"
            )
        out = glm.remove_effect(features, rows, running_beta.to(compute_dtype), mask)
    if out.shape != input.shape:
        out = out.reshape(input.shape)
    return out if out.dtype == input.dtype else out.to(input.dtype)
