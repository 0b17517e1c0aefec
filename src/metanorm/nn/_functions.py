r"""The autograd Functions of the MDN layers (the role of ``torch/nn/modules/_functions.py``).

The batch estimator's training map for a fixed batch is linear in the features:

.. math::
    F \mapsto F - A\,W\,\mathrm{reduce}(B^\top F), \qquad
    A = X_{b,R},\ B = X_b,\ W = (N/M)\,\Sigma^{-1}

and its transpose is the same map with A and B swapped (W is symmetric), so each backward is
one more call of :class:`Transpose`, which is its own transpose (double backward works).
``reduce`` is the identity in one process (:class:`BatchResidual`) and a sum over processes in a
synchronised layer (:class:`SyncBatchResidual`: the statistic and the batch size in one flat
tensor, one collective per direction). The algebra is :mod:`metanorm.linalg`'s.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
from torch import Tensor

from metanorm.linalg import (
    apply_weight,
    batch_weight,
    remove_effect,
    subtract_product,
    transpose_product,
)

__all__ = ["AllReduceSum", "BatchResidual", "StatisticsReducer", "SyncBatchResidual", "Transpose"]


class StatisticsReducer(Protocol):
    """Where the batch statistics of several processes meet: ``sum`` is an all-reduce."""

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the processes."""
        ...


def autocast_off(device_type: str) -> Any:
    """A context with autocast off on ``device_type``; a no-op context when it is off already."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class Transpose(torch.autograd.Function):
    """``G ↦ G − A·W·reduce(Bᵀ G)`` for a fixed symmetric float64 W; its own transpose.

    ``weight=None`` is the identity (W already folded into A or B).
    """

    @staticmethod
    def forward(
        ctx: Any, g: Tensor, a: Tensor, b: Tensor, weight: Tensor | None, reducer: Any
    ) -> Tensor:
        with autocast_off(g.device.type):
            p = b.T @ g
            if reducer is not None:
                p = reducer.sum(p)
            out = remove_effect(g, a, p if weight is None else apply_weight(weight, p), None)
        ctx.save_for_backward(a, b, weight)
        ctx.reducer = reducer
        ctx.grad_shape = g.shape
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor | None) -> tuple[Tensor | None, None, None, None, None]:
        a, b, weight = ctx.saved_tensors
        if grad_out is None:
            if ctx.reducer is None:
                return None, None, None, None, None
            grad_out = a.new_zeros(ctx.grad_shape)  # still join the other processes' sum
        return Transpose.apply(grad_out, b, a, weight, ctx.reducer), None, None, None, None


class BatchResidual(torch.autograd.Function):
    r"""One process: ``F ↦ (F − A·β̂, β̂)`` with :math:`\hat\beta = B^\top F`, B = X_b·W.

    B carries W (:func:`metanorm.linalg.weighted_rows`), so each direction is two thin products;
    β̂ carries no gradient; the backward pass is :class:`Transpose` (A and B swapped).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        if torch.is_autocast_enabled(x.device.type):  # no context to enter when it is off
            with torch.autocast(x.device.type, enabled=False):
                beta = transpose_product(b, x)
                out = subtract_product(x, a, beta)
        else:
            beta = transpose_product(b, x)
            out = subtract_product(x, a, beta)
        ctx.save_for_backward(a, b)
        ctx.mark_non_differentiable(beta)
        ctx.set_materialize_grads(False)
        return out, beta

    @staticmethod
    def backward(
        ctx: Any, grad_out: Tensor | None, grad_beta: Tensor | None
    ) -> tuple[Tensor | None, None, None]:
        if grad_out is None:
            return None, None, None
        a, b = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a Function, so double backward works
            return Transpose.apply(grad_out, b, a, None, None), None, None
        if torch.is_autocast_enabled(grad_out.device.type):  # no context to enter when it is off
            with torch.autocast(grad_out.device.type, enabled=False):
                return subtract_product(grad_out, b, transpose_product(a, grad_out)), None, None
        return subtract_product(grad_out, b, transpose_product(a, grad_out)), None, None


class SyncBatchResidual(torch.autograd.Function):
    r"""Over processes: one flat sum of :math:`[B^\top F,\ m]`, then W from the summed M.

    Returns ``(out, β̂, M)`` (β̂ and M without gradient; M float64 0-d). The backward pass is
    :class:`Transpose` with the reducer: the gradient of the sum of every process's loss.
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
        with autocast_off(x.device.type):
            local = b.T @ x
            packed = reducer.sum(torch.cat([local.reshape(-1), local.new_full((1,), x.shape[0])]))
            count = packed[-1].to(torch.float64)
            weight = batch_weight(gram_inverse, n_samples, count)
            beta = apply_weight(weight, packed[:-1].view(local.shape))
            out = remove_effect(x, a, beta, None)
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
            grad_out = a.new_zeros(ctx.grad_shape)
        return Transpose.apply(grad_out, b, a, weight, ctx.reducer), None, None, None, None, None


class AllReduceSum(torch.autograd.Function):
    """``reduce(x)`` with the gradient ``reduce(g)``: the sum of every process's loss gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, reducer: StatisticsReducer) -> Tensor:
        ctx.reducer = reducer
        return reducer.sum(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return AllReduceSum.apply(grad, ctx.reducer), None
