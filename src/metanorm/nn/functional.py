r"""Stateless form of Metadata Normalization, and the stages it is made of.

See :class:`metanorm.nn.MetadataNorm` for the maths and the arguments. The functional holds no
state: it updates the buffers it is given, in place, as ``F.batch_norm`` does.

A training step runs these stages, each written once, in plain PyTorch operations:

1. batch statistics :math:`X_b^\top F` (K×D) and the batch size m;
2. a reduce point (the identity in one process; a sum over processes in a synchronised layer);
3. the estimate :math:`\hat\beta = (N/m)\,\Sigma^{-1} X_b^\top F`;
4. the running update of :math:`\beta_{run}` (never with a non-finite estimate);
5. the residual :math:`F - X_{b,R}\,\hat\beta_R`.

Stages 1, 2, 3 and 5 are one autograd function with a hand-written backward (the transposed map,
one read of the upstream gradient), so the layer costs two passes over the features per direction.
Nothing here reads a tensor's value on the host, so the layer compiles with
``torch.compile(fullgraph=True)`` and can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Protocol

import torch
from torch import Tensor

from metanorm._validation import describe
from metanorm.linalg import remove_effect

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


class StatisticsReducer(Protocol):
    r"""Where the batch statistics of several processes meet (stage 2).

    ``sum`` returns the sum of a tensor over the processes (an all-reduce). The training map calls
    it three times per step: on the batch size m and on the (K, D) estimate in the forward pass,
    and on the (K, D) backward statistic. A reducer with a true attribute ``packs_count`` is
    called twice instead, once per direction: in the forward pass on one flat tensor holding
    :math:`X_b^\top F` (K·D values, the design rows not yet scaled by (N/M)Σ⁻¹) followed by m;
    in the backward pass on the (K, D) statistic (this is what
    :class:`metanorm.nn.SyncMetadataNorm` uses). A single process needs none (``reducer=None``).
    """

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the processes."""
        ...


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
    if metadata.device.type == "meta":
        raise ValueError(
            "expected design rows on a device that holds data (cpu, cuda, ...), got "
            f"{describe(metadata)} on the meta device"
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


def _check_finite_metadata(metadata: Tensor) -> None:
    """Raises ``ValueError`` if ``metadata`` holds NaN or infinite values (a host sync)."""
    finite = torch.isfinite(metadata)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"expected finite metadata, got {bad} NaN or infinite value(s)")


def _as_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)``, skipping the call when it is a no-op (it costs microseconds)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _autocast_off(device_type: str) -> Any:
    """A context with autocast off on ``device_type``; a no-op context when it is off already."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _LowRankResidual(torch.autograd.Function):
    r"""``F ↦ F − A·reduce(Bᵀ F)``, also returning ``P = reduce(Bᵀ F)`` (which carries no gradient).

    For fixed A and B the map is linear in F and its transpose is the same map with A and B
    swapped, ``G ↦ G − B·reduce(Aᵀ G)``: the backward is this function again, so double backward
    works. Two matrix products.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, a: Tensor, b: Tensor, reducer: StatisticsReducer | None
    ) -> tuple[Tensor, Tensor]:
        out, p = _low_rank_map(x, a, b, reducer)
        ctx.save_for_backward(a, b)
        ctx.reducer = reducer
        ctx.mark_non_differentiable(p)
        ctx.set_materialize_grads(False)
        return out, p

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor | None, grad_p: Tensor | None
    ) -> tuple[Tensor | None, None, None, None]:
        if grad_out is None:
            return None, None, None, None
        a, b = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the transpose is differentiable too
            grad, _ = _LowRankResidual.apply(grad_out, b, a, ctx.reducer)
        else:
            grad, _ = _low_rank_map(grad_out, b, a, ctx.reducer)
        return grad, None, None, None


def _low_rank_map(
    x: Tensor, a: Tensor, b: Tensor, reducer: StatisticsReducer | None
) -> tuple[Tensor, Tensor]:
    """``(x − A·reduce(Bᵀx), reduce(Bᵀx))`` without autograd: two products."""
    with _autocast_off(x.device.type):
        p = b.T @ x
        if reducer is not None:
            p = reducer.sum(p)
        return torch.addmm(x, a, p, alpha=-1), p


def _weighted(weight: Tensor, p: Tensor) -> Tensor:
    """``W·P`` with the (K, K) float64 ``W`` applied in float64, in ``p``'s dtype."""
    return (weight @ p.to(torch.float64)).to(p.dtype)


class _PackedResidual(torch.autograd.Function):
    r"""The training map over processes: ``F ↦ F − A·W·reduce(Bᵀ F)``, one collective a direction.

    ``B`` are the design rows (unscaled) and ``A`` their removed columns. The forward pass sums
    :math:`B^\top F` and the batch size m in ONE flat tensor, then forms
    :math:`W = (N/M)\,\Sigma^{-1}` from the summed M (a 0 M gives W = 0: an empty union batch
    is returned as it came). Returns ``(out, β̂ = W·reduce(BᵀF), M)``; β̂ and M carry no
    gradient. The backward pass is :class:`_ReducedTranspose`: ``G ↦ G − B·W·reduce(Aᵀ G)``
    (W is symmetric), i.e. the gradient of the sum of all processes' losses.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        a: Tensor,
        b: Tensor,
        gram_inverse: Tensor,
        n_samples: Tensor | float,
        reducer: StatisticsReducer,
    ) -> tuple[Tensor, Tensor, Tensor]:
        with _autocast_off(x.device.type):
            local = b.T @ x
            packed = torch.cat([local.reshape(-1), local.new_full((1,), x.shape[0])])
            packed = reducer.sum(packed)
            p = packed[:-1].view(local.shape)
            count = packed[-1].to(torch.float64)
            scale = torch.where(count > 0, n_samples / count.clamp_min(1.0), 0.0)
            weight = gram_inverse.to(torch.float64) * scale
            beta = _weighted(weight, p)
            out = torch.addmm(x, a, beta, alpha=-1)
        ctx.save_for_backward(a, b, weight)
        ctx.reducer = reducer
        ctx.grad_shape = x.shape
        ctx.mark_non_differentiable(beta, count)
        ctx.set_materialize_grads(False)
        return out, beta, count

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor | None, grad_beta: Tensor | None, grad_count: Tensor | None
    ) -> tuple[Tensor | None, None, None, None, None, None]:
        a, b, weight = ctx.saved_tensors
        if grad_out is None:  # still join the other processes' collective
            grad_out = weight.new_zeros(ctx.grad_shape, dtype=a.dtype)
        grad = _ReducedTranspose.apply(grad_out, b, a, weight, ctx.reducer)
        return grad, None, None, None, None, None


class _ReducedTranspose(torch.autograd.Function):
    """``G ↦ G − A·W·reduce(Bᵀ G)`` for a fixed symmetric W: its own transpose (double backward)."""

    @staticmethod
    def forward(
        ctx: Any, g: Tensor, a: Tensor, b: Tensor, weight: Tensor, reducer: StatisticsReducer
    ) -> Tensor:
        with _autocast_off(g.device.type):
            p = reducer.sum(b.T @ g)
            out = torch.addmm(g, a, _weighted(weight, p), alpha=-1)
        ctx.save_for_backward(a, b, weight)
        ctx.reducer = reducer
        ctx.grad_shape = g.shape
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor | None) -> tuple[Tensor | None, None, None, None, None]:
        a, b, weight = ctx.saved_tensors
        if grad_out is None:
            grad_out = weight.new_zeros(ctx.grad_shape, dtype=a.dtype)
        grad = _ReducedTranspose.apply(grad_out, b, a, weight, ctx.reducer)
        return grad, None, None, None, None


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
    removed_rows = rows.detach() * remove_mask  # a bool mask multiplies in rows' dtype
    if reducer is not None and getattr(reducer, "packs_count", False):
        out, beta, count = _PackedResidual.apply(
            features, removed_rows, rows.detach(), gram_inverse, n_samples, reducer
        )
        return out, beta, count
    count = torch.full((), features.shape[0], dtype=torch.float64, device=features.device)
    if reducer is not None:
        count = reducer.sum(count)
        # M = 0 (every process empty): B is empty and β̂ is 0; keep W finite all the same
        scale: Tensor | float = n_samples / count.clamp_min(1.0)
    else:
        scale = n_samples / features.shape[0]
    weight = _as_dtype(gram_inverse, torch.float64) * scale  # symmetric (K, K)
    b = _as_dtype(_as_dtype(rows.detach(), torch.float64) @ weight, features.dtype)
    out, beta = _LowRankResidual.apply(features, removed_rows, b, reducer)
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
    No value is read on the host.

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
    # one sum tells: s − s is 0 for a finite sum and NaN for NaN/inf (a sum that overflows,
    # beyond any useful estimate, counts as non-finite too)
    total = beta.sum()
    finite = (total - total) == 0
    dtype = running_beta.dtype
    if isinstance(count, Tensor):
        positive = count > 0
        seen: Tensor | None = positive
        used = finite & positive
    elif count <= 0:
        return finite
    else:  # a batch size known on the host (one process): the batch counts
        seen, used = None, finite
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
            if isinstance(count, Tensor):
                num_samples_tracked.add_(_as_dtype(used * count, num_samples_tracked.dtype))
            else:
                num_samples_tracked.add_(used, alpha=count)
        if num_batches_skipped is not None:
            num_batches_skipped.add_(~finite if seen is None else ~finite & seen)
    return finite


def _report_nonfinite(finite: Tensor, rows: Tensor, on_nonfinite: str) -> None:
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


def metadata_norm(
    input: Tensor,
    metadata: Tensor,
    gram_inverse: Tensor,
    n_samples: float | Tensor,
    remove_mask: Tensor,
    running_beta: Tensor | None = None,
    num_batches_tracked: Tensor | None = None,
    num_samples_tracked: Tensor | None = None,
    training: bool = True,
    momentum: float | None = 0.1,
    on_nonfinite: str = "skip",
    num_batches_skipped: Tensor | None = None,
    *,
    reducer: StatisticsReducer | None = None,
) -> Tensor:
    r"""Regresses the removed design columns out of ``input``.

    See :class:`~metanorm.nn.MetadataNorm` for details. The computation runs in float32 for
    float16/bfloat16 input (autocast is turned off inside) and the result has the input's dtype.

    Args:
        input: features ``(m, *)``; flattened per sample to ``(m, D)``.
        metadata: design rows ``(m, K)`` for this batch.
        gram_inverse: :math:`\Sigma^{-1}` of the full training design, ``(K, K)``.
        n_samples: N, the number of training rows behind ``gram_inverse``.
        remove_mask: ``(K,)`` bool, true for the columns whose effect is removed.
        running_beta: ``(K, D)`` buffer in full-data scale, updated in place when ``training``.
        num_batches_tracked: long 0-d buffer counting the updates of ``running_beta``.
        num_samples_tracked: long 0-d buffer counting the samples behind those updates
            (needed when ``momentum`` is None).
        training: estimate β from the batch (and update ``running_beta``); otherwise use
            ``running_beta``.
        momentum: see :func:`~metanorm.nn.functional.update_running_beta`.
        on_nonfinite: ``"skip"`` (default), ``"warn"`` or ``"raise"``: what a training batch with
            a non-finite β̂ does besides leaving ``running_beta`` as it was: count itself in
            ``num_batches_skipped``; also warn; raise
            :class:`NonFiniteEstimateError`. ``"warn"`` and ``"raise"`` read one flag on the
            host each training step.
        num_batches_skipped: long 0-d buffer counting the batches whose estimate was not used.
        reducer: sums the batch statistics over processes; ``None`` in one process. With a
            reducer, an empty local batch (m = 0) is accepted (it still joins the sums), and a
            training output uses the running β when the SUMMED batch size M is ≤ K (chosen on
            the device; every process still runs the batch map and joins its backward sum).

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
    if not isinstance(input, Tensor):
        raise TypeError(f"expected input to be a tensor, got {describe(input)}")
    if not input.is_floating_point():
        raise TypeError(f"expected a floating-point input, got {describe(input)}")
    if input.dim() < 1 or (input.shape[0] == 0 and reducer is None):
        raise ValueError(f"expected input of shape (m, *) with m >= 1, got {describe(input)}")
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"expected on_nonfinite in {NONFINITE_POLICIES}, got {on_nonfinite!r}")
    m = input.shape[0]
    k = gram_inverse.shape[0]
    check_metadata(metadata, m, k)
    if training and running_beta is not None and momentum is None and num_samples_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_samples_tracked")

    compute_dtype = torch.float32 if input.dtype in _LOW_PRECISION else input.dtype
    with _autocast_off(input.device.type):
        flat = input if input.dim() == 2 else input.reshape(m, math.prod(input.shape[1:]))
        features = _as_dtype(flat, compute_dtype)
        rows = metadata.reshape(m, k)
        if rows.device != features.device or rows.dtype != compute_dtype:
            rows = rows.to(device=features.device, dtype=compute_dtype)
        mask = remove_mask if remove_mask.device == rows.device else remove_mask.to(rows.device)
        if not training:
            if running_beta is None:
                raise RuntimeError(
                    "evaluation needs a running β: build the layer with "
                    "track_running_stats=True, or keep it in training mode"
                )
            out = remove_effect(features, rows, _as_dtype(running_beta, compute_dtype), mask)
        elif reducer is not None:
            # every process runs the differentiable map, so that each joins the backward
            # collective once; whether the output uses the running β depends on the summed M
            out, beta, count = batch_residual(
                features, rows, gram_inverse, n_samples, mask, reducer=reducer
            )
            if running_beta is not None and m <= k:  # M > K is known already when m > K
                fallback = remove_effect(
                    features, rows, _as_dtype(running_beta, compute_dtype), mask
                )
                out = torch.where(count > k, out, fallback)
        elif running_beta is None or m > k:
            out, beta, count = batch_residual(
                features, rows, gram_inverse, n_samples, mask, reducer=reducer
            )
        else:
            # m ≤ K: too few rows for the batch estimate to residualise this batch well, so the
            # output uses the running β, as in evaluation; the (unbiased, noisy) estimate is
            # still folded in below, with a factor in proportion to m
            out = remove_effect(features, rows, _as_dtype(running_beta, compute_dtype), mask)
            with torch.no_grad():
                _, beta, count = batch_residual(
                    features, rows, gram_inverse, n_samples, mask, reducer=reducer
                )
        if training and running_beta is not None:
            finite = update_running_beta(
                running_beta,
                beta,
                count if reducer is not None else m,  # one process: m, known on the host
                momentum,
                num_batches_tracked=num_batches_tracked,
                num_samples_tracked=num_samples_tracked,
                num_batches_skipped=num_batches_skipped,
            )
            if on_nonfinite != "skip":
                _report_nonfinite(finite, rows, on_nonfinite)
    if input.dim() != 2:
        out = out.reshape(input.shape)
    return _as_dtype(out, input.dtype)
