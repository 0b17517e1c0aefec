r"""Stateless form of Metadata Normalization, as ``torch.nn.functional.batch_norm`` is of BatchNorm.

See :class:`metanorm.nn.MetadataNorm` for the maths. :func:`metadata_norm` decides nothing: it
computes the batch estimate and residual in training (and folds the estimate into
``running_beta`` with the factor it is given), or subtracts ``running_beta`` in evaluation. The
policies (the running-average factor from the counters, a batch of m ≤ K, non-finite batches,
which process group) are the module's. The algebra is :mod:`metanorm.linalg`'s and the autograd
Functions are in ``metanorm.nn._functions``. Nothing here waits for a device: on a GPU and
under :func:`torch.compile` no value is read on the host, so the layer compiles with
``fullgraph=True`` and can be captured in a CUDA graph; only the running update of CPU tensors
in eager mode reads its scalars, which are in host memory already.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from metanorm._validation import describe
from metanorm.linalg import batch_weight, remove_effect, weighted_rows
from metanorm.nn._functions import (
    BatchResidual,
    StatisticsReducer,
    SyncBatchResidual,
    autocast_off,
)

__all__ = [
    "NONFINITE_POLICIES",
    "NonFiniteEstimateError",
    "StatisticsReducer",
    "batch_residual",
    "check_metadata",
    "metadata_norm",
    "update_running_beta",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

#: What a training step does with a non-finite β estimate (the running β keeps its value in all).
NONFINITE_POLICIES = ("skip", "warn", "raise")


class NonFiniteEstimateError(ValueError):
    """A training batch gave a NaN or infinite β estimate (NaN/inf features, fp16 overflow)."""


def check_metadata(metadata: Any, batch_size: int, num_columns: int) -> None:
    """Raises ``ValueError``/``TypeError`` unless ``metadata`` is a real ``(m, K)`` tensor.

    Only the type and shape are checked (reading values would cost a host sync); a non-finite
    design row gives a non-finite estimate, which the running β never takes
    (see ``on_nonfinite``).

    Examples::

        >>> import torch
        >>> check_metadata(torch.zeros(4, 3), batch_size=4, num_columns=3)
        >>> check_metadata(torch.zeros(5, 3), batch_size=4, num_columns=3)
        Traceback (most recent call last):
            ...
        ValueError: expected metadata with 4 rows (the batch size of the input), got 5
    """
    if not isinstance(metadata, Tensor):
        raise TypeError(
            f"expected metadata (design rows) to be a tensor of shape ({batch_size}, "
            f"{num_columns}), got {describe(metadata)}"
        )
    if metadata.is_complex() or metadata.dtype == torch.bool:
        raise TypeError(f"expected real numeric design rows, got {describe(metadata)}")
    if metadata.is_meta:
        raise ValueError(
            "expected design rows on a device that holds data (cpu, cuda, ...), got "
            f"{describe(metadata)} on the meta device"
        )
    if metadata.dim() == 1 and num_columns == 1:
        metadata = metadata.unsqueeze(1)
    if metadata.dim() != 2 or metadata.shape[1] != num_columns:
        raise ValueError(
            f"expected metadata of shape ({batch_size}, {num_columns}) (design rows: one row of "
            f"K = {num_columns} columns per sample), got {describe(metadata)}"
        )
    if metadata.shape[0] != batch_size:
        raise ValueError(
            f"expected metadata with {batch_size} rows (the batch size of the input), "
            f"got {metadata.shape[0]}"
        )


def _check_finite_metadata(metadata: Tensor) -> None:
    """Raises ``ValueError`` if ``metadata`` holds NaN or infinite values (a host sync)."""
    finite = torch.isfinite(metadata)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"expected finite metadata, got {bad} NaN or infinite value(s)")


def _as_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)``, skipping the call when it is a no-op (it costs microseconds)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


_autocast_off = autocast_off


def batch_residual(
    features: Tensor,
    rows: Tensor,
    gram_inverse: Tensor,
    n_samples: Tensor | float,
    remove_mask: Tensor,
    *,
    reducer: StatisticsReducer | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""MDN's training map: the batch estimate and the residual, differentiable in the features.

    :math:`\hat\beta = B^\top F` with :math:`B = X_b W`, :math:`W = (N/m)\,\Sigma^{-1}` (B formed
    in float64), and :math:`F - X_{b,R}\hat\beta_R`, with a hand-written backward (the
    transposed map). The same result as :func:`metanorm.linalg.batch_statistics`,
    :func:`~metanorm.linalg.beta_from_statistics` and :func:`~metanorm.linalg.remove_effect` in
    sequence. No gradient flows to the design rows.

    Args:
        features: ``(m, D)`` floating tensor.
        rows: ``(m, K)`` design rows, same dtype and device.
        gram_inverse: :math:`\Sigma^{-1}`, ``(K, K)``.
        n_samples: N, the number of training rows behind ``gram_inverse``.
        remove_mask: ``(K,)`` bool, true for the removed columns.
        reducer: sums the statistics over processes (stage 2); ``None`` in one process.

    Returns:
        ``(residual, beta, count)``: ``(m, D)``, ``(K, D)`` and the (summed) batch size as a
        float64 0-d tensor; ``beta`` and ``count`` carry no gradient. With a reducer, a summed
        batch size of 0 gives a zero ``beta`` (and an empty residual).

    Examples::

        >>> import torch
        >>> from metanorm.linalg import inverse_gram
        >>> X = torch.cat([torch.randn(40, 1), torch.ones(40, 1)], 1).double()
        >>> F = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
        >>> out, beta, count = batch_residual(
        ...     F, X[:8], inverse_gram(X), 40, torch.tensor([True, True]))
        >>> out.shape, beta.shape, float(count)
        (torch.Size([8, 5]), torch.Size([2, 5]), 8.0)
        >>> out.sum().backward()                  # differentiable in the features
    """
    rows = rows.detach()
    removed_rows = torch.where(remove_mask, rows, 0.0)  # kept columns never enter
    if reducer is not None:
        out, beta, count = SyncBatchResidual.apply(
            features, removed_rows, rows, gram_inverse, n_samples, reducer
        )
        return out, beta, count
    m = features.shape[0]
    count = torch.full((), m, dtype=torch.float64, device=features.device)
    b = weighted_rows(rows, batch_weight(gram_inverse, n_samples, m))
    out, beta = BatchResidual.apply(features, removed_rows, b)
    return out, beta, count


def update_running_beta(
    running_beta: Tensor,
    beta: Tensor,
    count: Tensor | int,
    momentum: float | None,
    *,
    num_batches_tracked: Tensor | None = None,
    num_samples_tracked: Tensor | None = None,
    num_batches_skipped: Tensor | None = None,
) -> Tensor:
    r"""Stage 4: folds a batch estimate into the running β, in place, unless it is not finite.

    The factor of ``running_beta ← (1 − f)·running_beta + f·β̂`` is

    - ``momentum=None``: ``f = m / S``, S the samples seen including this batch (the
      cumulative average, weighted by batch size);
    - a number μ: ``f = min(1, max(μ·m/m̄, m / S))``, m̄ the mean size of the batches folded in
      before: a cumulative average until its factor falls to μ, an exponential average from then
      on, so the running β is never biased towards its zero start, and a batch smaller than
      the others (a short last batch) weighs in proportion to its size. With batches of one size
      this is ``max(μ, m / S)``. Without the counters, ``f = μ``.

    ``count`` is the batch size m: a Python int in one process, or the summed batch size as a
    0-d tensor (a synchronised layer). A non-finite ``beta`` (or one whose sum overflows its
    dtype) leaves every buffer as it was except ``num_batches_skipped`` (+1). A ``count`` of 0
    (an empty batch over every process of a synchronised layer) leaves every buffer as it was.
    No value is read on the host, except for CPU tensors in eager mode with all three counters
    (their values are in host memory: the update is then four operations instead of about
    seventeen, by the same rule).

    Returns:
        A bool 0-d tensor: whether the estimate was finite (and so used, when ``count`` > 0).

    Examples::

        >>> import torch
        >>> running, seen = torch.zeros(2, 3), torch.tensor(0)
        >>> count = torch.tensor(10.0, dtype=torch.float64)
        >>> bool(update_running_beta(running, torch.ones(2, 3), count, None,
        ...                          num_samples_tracked=seen))
        True
        >>> running[0], int(seen)                 # the first batch: a cumulative average
        (tensor([1., 1., 1.]), 10)
    """
    finite = fold_running_beta(
        running_beta,
        beta,
        count,
        momentum,
        num_batches_tracked,
        num_samples_tracked,
        num_batches_skipped,
    )
    if isinstance(finite, bool):
        return torch.tensor(finite)
    return finite


def fold_running_beta(
    running_beta: Tensor,
    beta: Tensor,
    count: Tensor | int,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    num_samples_tracked: Tensor | None,
    num_batches_skipped: Tensor | None,
) -> Tensor | bool:
    """:func:`update_running_beta` for the modules: whether β̂ was finite.

    A bool where it is known on the host (CPU tensors in eager mode: no tensor is made for it),
    else a bool 0-d tensor.
    """
    if beta.requires_grad:
        beta = beta.detach()
    if (
        not isinstance(count, Tensor)
        and count > 0
        and running_beta.is_cpu
        and num_batches_tracked is not None
        and num_samples_tracked is not None
        and num_batches_skipped is not None
        and not torch.compiler.is_compiling()
    ):
        return _fold_on_cpu(
            running_beta,
            beta,
            count,
            momentum,
            num_batches_tracked,
            num_samples_tracked,
            num_batches_skipped,
        )
    # one sum tells: an estimate with a NaN/inf entry (or whose sum overflows, beyond any useful
    # estimate) has a non-finite sum, and s − s is 0 exactly when s is finite (two operations;
    # isfinite is four)
    total = beta.sum()
    finite = (total - total) == 0
    dtype = running_beta.dtype
    if not isinstance(count, Tensor):
        if count <= 0:
            return finite
        _update_one_process(
            running_beta,
            beta,
            finite,
            count,
            momentum,
            num_batches_tracked,
            num_samples_tracked,
            num_batches_skipped,
        )
        return finite
    positive = count > 0
    used = finite & positive
    # factor: in the running β's dtype (counts stay exact in it up to 2²⁴ samples in float32)
    if num_samples_tracked is not None:
        samples = num_samples_tracked.to(dtype)
        factor = _as_dtype(count / (samples + count), dtype)
        if momentum is not None:
            if num_batches_tracked is not None:
                # μ·m/m̄ with m̄ = S/B the mean size of the batches folded in before (0 before
                # the first: the cumulative factor is 1 then)
                weighted = (momentum * count) / samples.clamp_min(1) * num_batches_tracked
                factor = torch.maximum(factor, _as_dtype(weighted, dtype).clamp_max(1.0))
            else:
                factor = factor.clamp_min(momentum)
    elif momentum is None:
        raise ValueError("momentum=None (cumulative average) needs num_samples_tracked")
    else:
        factor = torch.full((), momentum, dtype=dtype, device=running_beta.device)
    with torch.no_grad():
        # a non-finite estimate gets factor 0 and its entries are zeroed (0·NaN would be NaN)
        target = _as_dtype(beta, dtype).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        running_beta.lerp_(target, _as_dtype(factor * used, dtype))
        if num_batches_tracked is not None:
            num_batches_tracked.add_(used)
        if num_samples_tracked is not None:
            num_samples_tracked.add_(_as_dtype(used * count, num_samples_tracked.dtype))
        if num_batches_skipped is not None:
            num_batches_skipped.add_(~finite & positive)
    return finite


def _fold_on_cpu(
    running_beta: Tensor,
    beta: Tensor,
    count: int,
    momentum: float | None,
    num_batches_tracked: Tensor,
    num_samples_tracked: Tensor,
    num_batches_skipped: Tensor,
) -> bool:
    """The update for CPU tensors in eager mode, its scalars read: whether β̂ was finite.

    A CPU tensor's value is in host memory: reading the estimate's sum and the counters costs
    no synchronisation, and the update is then four small operations instead of about fifteen.
    Everywhere else (a GPU, ``torch.compile``, a summed batch size) the update reads nothing.
    """
    if not math.isfinite(float(beta.sum())):
        num_batches_skipped.add_(1)
        return False
    batches, samples = num_batches_tracked.item(), num_samples_tracked.item()
    factor = count / (samples + count)
    if momentum is not None:
        factor = max(factor, min(1.0, momentum * count / max(samples, 1) * batches))
    running_beta.lerp_(_as_dtype(beta, running_beta.dtype), factor)
    num_batches_tracked.fill_(batches + 1)  # a fill costs half an add
    num_samples_tracked.fill_(samples + count)
    return True


@torch.no_grad()
def _update_one_process(
    running_beta: Tensor,
    beta: Tensor,
    finite: Tensor,
    count: int,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    num_samples_tracked: Tensor | None,
    num_batches_skipped: Tensor | None,
) -> None:
    """The running update for a batch size known on the host: the same rule in fewer operations.

    The factor is written f = m / max(m, min(S + m, S/(μ·B))), which is min(1, max(μ·m·B/S,
    m/(S + m))): ``fmin`` passes over the NaN or inf of S/(μ·B) before the first batch.
    """
    dtype = running_beta.dtype
    factor: Tensor | float
    if num_samples_tracked is not None:
        samples = num_samples_tracked.to(dtype)
        denominator = samples + count  # the cumulative average: m / (S + m)
        if momentum is not None:
            if num_batches_tracked is not None:
                mean_size = samples / num_batches_tracked / momentum  # S/(μ·B), in dtype
                denominator = torch.fmin(denominator, mean_size).clamp_min_(count)
            elif momentum > 0:
                denominator = denominator.clamp_max_(count / momentum)
        factor = denominator.reciprocal_().mul_(count)
    elif momentum is None:
        raise ValueError("momentum=None (cumulative average) needs num_samples_tracked")
    else:
        factor = momentum
    # a non-finite estimate moves nothing: the target is then the running β itself
    target = torch.where(finite, _as_dtype(beta, dtype), running_beta)
    running_beta.lerp_(target, factor)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(finite)
    if num_samples_tracked is not None:
        num_samples_tracked.add_(finite, alpha=count)
    if num_batches_skipped is not None:
        num_batches_skipped.add_(~finite)


def metadata_norm(
    input: Tensor,
    metadata: Tensor,
    gram_inverse: Tensor,
    n_samples: float | Tensor,
    remove_mask: Tensor,
    running_beta: Tensor | None = None,
    training: bool = True,
    momentum: float | Tensor = 0.1,
    **deprecated: Any,
) -> Tensor:
    r"""Regresses the removed design columns out of ``input``.

    See :class:`~metanorm.nn.MetadataNorm` for details. In training, the batch estimate
    :math:`\hat\beta = (N/m)\,\Sigma^{-1}X_b^\top F` gives the output
    :math:`F - X_{b,R}\hat\beta_R` (any m ≥ 1) and, if ``running_beta`` is given, is folded into
    it in place, ``running_beta ← running_beta + momentum·(β̂ − running_beta)``, unless it is not
    finite (then ``running_beta`` keeps its value). In evaluation the output is
    :math:`F - X_{b,R}\beta_{run,R}`. The computation runs in float32 for float16/bfloat16
    input (autocast is turned off inside) and the result has the input's dtype. The module's
    policies (the factor from the counters, ``momentum=None``, batches of m ≤ K, the non-finite
    policy, synchronisation over processes) are not applied here.

    Args:
        input: features ``(m, *)``; flattened per sample to ``(m, D)``.
        metadata: design rows ``(m, K)`` for this batch.
        gram_inverse: :math:`\Sigma^{-1}` of the full training design, ``(K, K)``.
        n_samples: N, the number of training rows behind ``gram_inverse``.
        remove_mask: ``(K,)`` bool, true for the columns whose effect is removed.
        running_beta: ``(K, D)`` buffer in full-data scale, updated in place when ``training``.
        training: estimate β from the batch (and update ``running_beta``); otherwise use
            ``running_beta``. Default: ``True``.
        momentum: the factor of the running update (a float or a 0-d tensor). Default: 0.1.
        **deprecated: the module's policies that earlier versions took here
            (``num_batches_tracked``, ``num_samples_tracked``, ``num_batches_skipped``,
            ``on_nonfinite``, ``reducer``): still applied as before, with a
            ``DeprecationWarning``; use :class:`~metanorm.nn.MetadataNorm`.

    Returns:
        A tensor of ``input``'s shape and dtype.

    Examples::

        >>> import torch
        >>> from metanorm.linalg import inverse_gram
        >>> X = torch.cat([torch.randn(40, 1), torch.ones(40, 1)], 1)
        >>> running = torch.zeros(2, 6)
        >>> out = metadata_norm(torch.randn(8, 6), X[:8], inverse_gram(X), 40,
        ...                     torch.tensor([True, True]), running, training=True)
        >>> out.shape
        torch.Size([8, 6])
    """
    if not isinstance(training, bool):
        raise TypeError(
            f"expected training to be a bool, got {describe(training)}: metadata_norm takes "
            "(input, metadata, gram_inverse, n_samples, remove_mask, running_beta, training, "
            "momentum); the counters and policies are the module's (metanorm.nn.MetadataNorm)"
        )
    if deprecated:
        return _legacy_metadata_norm(
            input,
            metadata,
            gram_inverse,
            n_samples,
            remove_mask,
            running_beta,
            training,
            momentum,
            **deprecated,
        )
    if momentum is None:
        raise ValueError(
            "momentum=None (cumulative average) needs num_samples_tracked: use the module "
            "(metanorm.nn.MetadataNorm), which keeps the counters, or pass the factor"
        )
    features, rows, flat_shape = _flatten(input, metadata, gram_inverse.shape[0])
    with autocast_off(features.device.type):
        mask = remove_mask.to(rows.device)
        if not training:
            if running_beta is None:
                raise RuntimeError(
                    "evaluation needs a running β: build the layer with "
                    "track_running_stats=True, or keep it in training mode"
                )
            out = remove_effect(features, rows, _as_dtype(running_beta, features.dtype), mask)
        else:
            out, beta, _ = batch_residual(features, rows, gram_inverse, n_samples, mask)
            if running_beta is not None:
                with torch.no_grad():
                    total = beta.sum()
                    finite = (total - total) == 0
                    target = _as_dtype(beta, running_beta.dtype).nan_to_num(0.0, 0.0, 0.0)
                    running_beta.lerp_(
                        target,
                        finite
                        * _as_dtype(
                            torch.as_tensor(momentum, device=running_beta.device),
                            running_beta.dtype,
                        ),
                    )
    return _unflatten(out, input, flat_shape)


_LEGACY = (
    "num_batches_tracked",
    "num_samples_tracked",
    "num_batches_skipped",
    "on_nonfinite",
    "reducer",
)


def _legacy_metadata_norm(
    input: Tensor,
    metadata: Tensor,
    gram_inverse: Tensor,
    n_samples: float | Tensor,
    remove_mask: Tensor,
    running_beta: Tensor | None,
    training: bool,
    momentum: Any,
    **options: Any,
) -> Tensor:
    """The functional of earlier versions, which applied the module's policies."""
    unknown = sorted(set(options) - set(_LEGACY))
    if unknown:
        raise TypeError(f"metadata_norm() got unexpected keyword arguments {unknown}")
    warnings.warn(
        f"metadata_norm({', '.join(sorted(options))}=...) is deprecated: the functional no "
        "longer applies the module's policies (counters, on_nonfinite, m <= K, processes); "
        "use metanorm.nn.MetadataNorm, or pass the running update's factor as momentum",
        DeprecationWarning,
        stacklevel=3,
    )
    on_nonfinite = options.get("on_nonfinite", "skip")
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"expected on_nonfinite in {NONFINITE_POLICIES}, got {on_nonfinite!r}")
    samples = options.get("num_samples_tracked")
    if training and running_beta is not None and momentum is None and samples is None:
        raise ValueError("momentum=None (cumulative average) needs num_samples_tracked")
    reducer = options.get("reducer")
    features, rows, reshape = _flatten(input, metadata, gram_inverse.shape[0])
    m, k = features.shape[0], gram_inverse.shape[0]
    with autocast_off(features.device.type):
        mask = remove_mask.to(rows.device)
        if not training:
            return metadata_norm(
                input, metadata, gram_inverse, n_samples, remove_mask, running_beta, False
            )
        out, beta, count = batch_residual(
            features, rows, gram_inverse, n_samples, mask, reducer=reducer
        )
        if running_beta is not None:
            if m <= k:
                fallback = remove_effect(features, rows, _as_dtype(running_beta, out.dtype), mask)
                out = torch.where(count > k, out, fallback) if reducer is not None else fallback
            finite = update_running_beta(
                running_beta,
                beta,
                count if reducer is not None else m,
                momentum,
                num_batches_tracked=options.get("num_batches_tracked"),
                num_samples_tracked=samples,
                num_batches_skipped=options.get("num_batches_skipped"),
            )
            if on_nonfinite != "skip":
                report_nonfinite(finite, rows, on_nonfinite)
    return _unflatten(out, input, reshape)


def _flatten(input: Any, metadata: Any, k: int) -> tuple[Tensor, Tensor, bool]:
    """Checks the call; ``(features (m, D), rows (m, K))`` in the compute dtype."""
    if not isinstance(input, Tensor):
        raise TypeError(f"expected input to be a tensor, got {describe(input)}")
    if not input.is_floating_point():
        raise TypeError(f"expected a floating-point input, got {describe(input)}")
    if input.dim() < 1 or input.shape[0] == 0:
        raise ValueError(f"expected input of shape (m, *) with m >= 1, got {describe(input)}")
    m = input.shape[0]
    check_metadata(metadata, m, k)
    dtype = torch.float32 if input.dtype in _LOW_PRECISION else input.dtype
    flat = input if input.dim() == 2 else input.reshape(m, math.prod(input.shape[1:]))
    features = _as_dtype(flat, dtype)
    rows = metadata.reshape(m, k)
    if rows.device != features.device or rows.dtype != dtype:
        rows = rows.to(device=features.device, dtype=dtype)
    return features, rows, input.dim() != 2


def _unflatten(out: Tensor, input: Tensor, reshape: bool) -> Tensor:
    if reshape:
        out = out.reshape(input.shape)
    return _as_dtype(out, input.dtype)


def report_nonfinite(finite: Tensor | bool, rows: Tensor, on_nonfinite: str) -> None:
    """The ``"warn"`` and ``"raise"`` policies: one host sync to read ``finite``."""
    if bool(finite):
        return
    _check_finite_metadata(rows)
    msg = (
        "the batch's β estimate is not finite (NaN or infinite features, or an overflow in low "
        "precision); the running β keeps its previous value"
    )
    if on_nonfinite == "raise":
        raise NonFiniteEstimateError(
            msg + ". Pass on_nonfinite='skip' to count such batches in num_batches_skipped "
            "and go on instead"
        )
    warnings.warn(msg, RuntimeWarning, stacklevel=4)
