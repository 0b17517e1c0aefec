r"""The linear algebra of Metadata Normalization, in one place.

MDN (Lu et al., CVPR 2021, https://arxiv.org/abs/2104.09052) fits the general linear model
:math:`F = X\beta + R` of features :math:`F` on a design :math:`X` and keeps the residual of the
removed columns. Shared by :class:`metanorm.nn.MetadataNorm`,
:class:`metanorm.preprocessing.MetadataResidualizer` and the multi-process layer:

- :func:`inverse_gram` computes :math:`\Sigma^{-1} = (X^\top X)^{-1}` once, in float64, and refuses
  a singular or ill-conditioned :math:`\Sigma` with an error naming the collinear columns (unless
  a ridge term is asked for);
- :func:`batch_statistics` and :func:`beta_from_statistics` split the batch estimate
  :math:`\hat\beta = (N/m)\,\Sigma^{-1} X_b^\top F` into a sum over samples and a solve, so that
  statistics summed over processes give the same :math:`\hat\beta` as one large batch;
- :func:`batch_weight` is the factor :math:`W = (N/m)\,\Sigma^{-1}` of the batch estimate
  (:math:`\hat\beta = W X_b^\top F`) and :func:`apply_weight` applies a float64 W to statistics
  of another dtype;
- :func:`remove_effect` subtracts the removed columns' part; :func:`fit_beta` is the full-data
  closed form.

The layers of :mod:`metanorm.nn` build their estimates from these functions only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from metanorm._validation import as_2d_tensor, check_finite
from metanorm.design import Design

__all__ = [
    "MAX_CONDITION",
    "apply_weight",
    "batch_statistics",
    "batch_weight",
    "beta_from_statistics",
    "fit_beta",
    "inverse_gram",
    "remove_effect",
    "weighted_rows",
]

#: Largest accepted condition number of the column-scaled XᵀX before it counts as singular.
MAX_CONDITION = 1e10


def _column_names(k: int, columns: Sequence[str] | None) -> list[str]:
    if columns is None:
        return [f"column {j}" for j in range(k)]
    if len(columns) != k:
        raise ValueError(f"expected {k} column names, got {len(columns)}")
    return [repr(c) for c in columns]


def inverse_gram(
    design: Any,
    *,
    ridge: float = 0.0,
    columns: Sequence[str] | None = None,
    max_condition: float = MAX_CONDITION,
) -> torch.Tensor:
    r"""Computes :math:`\Sigma^{-1} = (X^\top X + \lambda I)^{-1}` in float64.

    Args:
        design: the whole training design, ``(N, K)`` array, tensor or
            :class:`~metanorm.design.Design`.
        ridge: :math:`\lambda \ge 0`, added to the diagonal of :math:`X^\top X`. Use it only when
            the design is (nearly) collinear and the collinearity cannot be removed. Default: 0.
        columns: column names for error messages (taken from a :class:`~metanorm.design.Design`).
        max_condition: largest accepted condition number of the column-scaled
            :math:`X^\top X` when ``ridge == 0``. Default: ``1e10``.

    Returns:
        float64 tensor of shape ``(K, K)`` on the design's device (CPU for arrays).

    Raises:
        ValueError: if ``design`` is not finite, or :math:`X^\top X` is singular or ill-conditioned
            and ``ridge == 0``; the message names the columns involved.

    Examples::

        >>> import torch
        >>> X = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
        >>> inverse_gram(X)
        tensor([[ 0.8333, -0.5000],
                [-0.5000,  0.5000]], dtype=torch.float64)
    """
    if isinstance(design, Design):
        columns = design.columns if columns is None else columns
        design = design.matrix
    if isinstance(ridge, bool) or not isinstance(ridge, int | float) or not ridge >= 0:
        raise ValueError(f"expected ridge to be a non-negative number, got {ridge!r}")
    x = as_2d_tensor(design, "design", dtype=torch.float64)
    check_finite(x, "design")
    n, k = x.shape
    names = _column_names(k, columns)
    if n == 0 or k == 0:
        raise ValueError(f"expected a design with at least one row and one column, got {n}×{k}")
    sigma = x.T @ x
    if not bool(torch.isfinite(sigma).all()):
        big = x.abs().amax(dim=0)
        worst = int(big.argmax())
        raise ValueError(
            f"the design's values are too large: XᵀX overflows float64 ({names[worst]} "
            f"reaches {float(big[worst]):.3g}); standardise or rescale the columns "
            "(e.g. DesignBuilder(standardize=True))"
        )
    if ridge == 0:
        diag = torch.diagonal(sigma)
        zero = (diag == 0).nonzero().flatten().tolist()
        if zero:
            raise ValueError(
                f"the design is singular: {', '.join(names[j] for j in zero)} "
                f"{'is' if len(zero) == 1 else 'are'} all zeros; drop "
                f"{'it' if len(zero) == 1 else 'them'} or pass ridge > 0"
            )
        d = diag.sqrt()
        scaled = sigma / (d[:, None] * d[None, :])
        try:
            evals, evecs = torch.linalg.eigh(scaled)
        except RuntimeError as exc:  # torch.linalg.LinAlgError: no convergence
            raise ValueError(
                f"the design's XᵀX could not be decomposed ({exc}); check the design for "
                "extreme values, or pass ridge > 0"
            ) from None
        top = float(evals[-1])
        cond = top / float(evals[0]) if float(evals[0]) > 0 else math.inf
        if cond > max_condition:
            small = evals <= top / max_condition
            weight = evecs[:, small].abs().amax(dim=1)
            involved = (weight > 0.1 * float(weight.max())).nonzero().flatten().tolist()
            hint = f" (N = {n} rows for K = {k} columns)" if n < k else ""
            raise ValueError(
                f"the design is singular or ill-conditioned (condition number {cond:.3g} of the "
                f"scaled XᵀX, limit {max_condition:.3g}){hint}: columns "
                f"{', '.join(names[j] for j in involved)} are (nearly) collinear. Drop one of "
                f"them, or pass ridge > 0 to regularise"
            )
    else:
        sigma = sigma + ridge * torch.eye(k, dtype=sigma.dtype, device=sigma.device)
    try:
        inv = torch.linalg.inv(sigma)
    except RuntimeError as exc:  # torch.linalg.LinAlgError: singular (ridge > 0 but tiny)
        raise ValueError(f"XᵀX + ridge·I is singular ({exc}); pass a larger ridge") from None
    if not bool(torch.isfinite(inv).all()):
        raise ValueError("(XᵀX)⁻¹ is not finite: the design is too ill-conditioned; rescale it")
    return ((inv + inv.T) / 2).contiguous()  # symmetrised


# --------------------------------------------------------------------------------------------
# Batch estimate, residual, full-data fit
# --------------------------------------------------------------------------------------------


def batch_statistics(design_rows: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    r"""The batch's sufficient statistic :math:`X_b^\top F` (K×D).

    Summing it (and the batch sizes) over processes before :func:`beta_from_statistics` gives the
    same :math:`\hat\beta` as one batch holding every process's rows.

    Shape:
        - design_rows: ``(m, K)``
        - features: ``(m, D)``
        - Output: ``(K, D)``

    Examples::

        >>> import torch
        >>> batch_statistics(torch.ones(4, 2), torch.ones(4, 3)).shape
        torch.Size([2, 3])
    """
    return design_rows.T @ features


def beta_from_statistics(
    gram_inverse: torch.Tensor,
    xtf: torch.Tensor,
    batch_size: int | float | torch.Tensor,
    n_samples: int | float | torch.Tensor,
) -> torch.Tensor:
    r""":math:`\hat\beta = (N/m)\,\Sigma^{-1} X_b^\top F`, in the dtype of ``xtf`` (W in float64).

    Args:
        gram_inverse: :math:`\Sigma^{-1}`, ``(K, K)`` (cast to ``xtf``'s dtype).
        xtf: :math:`X_b^\top F`, ``(K, D)``, from :func:`batch_statistics` (possibly summed).
        batch_size: m, the number of rows behind ``xtf``.
        n_samples: N, the number of rows behind ``gram_inverse``.

    Examples::

        >>> import torch
        >>> X = torch.cat([torch.ones(6, 1), torch.arange(6.0).unsqueeze(1)], 1).double()
        >>> F = 2 + 3 * X[:, 1:]                            # F = 2 + 3·x exactly
        >>> beta = beta_from_statistics(inverse_gram(X), batch_statistics(X, F), 6, 6)
        >>> torch.allclose(beta, torch.tensor([[2.0], [3.0]], dtype=torch.float64))
        True
    """
    return apply_weight(batch_weight(gram_inverse, n_samples, batch_size), xtf)


def batch_weight(
    gram_inverse: torch.Tensor,
    n_samples: int | float | torch.Tensor,
    batch_size: int | float | torch.Tensor,
) -> torch.Tensor:
    r"""The batch estimator's factor :math:`W = (N/m)\,\Sigma^{-1}`, float64 ``(K, K)``.

    ``batch_size`` may be a 0-d tensor (a batch size summed over processes, read on the device);
    a batch size of 0 gives W = 0 (an empty union batch estimates β = 0), never a division by
    zero.

    Examples::

        >>> import torch
        >>> batch_weight(torch.eye(2, dtype=torch.float64), 10, 5)
        tensor([[2., 0.],
                [0., 2.]], dtype=torch.float64)
    """
    weight = gram_inverse if gram_inverse.dtype == torch.float64 else gram_inverse.double()
    if isinstance(batch_size, torch.Tensor):
        count = batch_size.to(torch.float64)
        return weight * torch.where(count > 0, n_samples / count.clamp_min(1.0), 0.0)
    if batch_size <= 0:
        return weight * 0.0
    return weight * (n_samples / batch_size)  # n_samples may be a tensor: no host read


def apply_weight(weight: torch.Tensor, statistics: torch.Tensor) -> torch.Tensor:
    r"""``W @ statistics``, the (K, K) float64 ``W`` applied in float64, in ``statistics``' dtype.

    Examples::

        >>> import torch
        >>> apply_weight(2 * torch.eye(2, dtype=torch.float64), torch.ones(2, 3)).dtype
        torch.float32
    """
    if statistics.dtype == torch.float64:
        return weight @ statistics
    return (weight @ statistics.to(torch.float64)).to(statistics.dtype)


def weighted_rows(design_rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    r"""``X_b W`` (m×K) formed in float64, in the rows' dtype: :math:`\hat\beta = (X_bW)^\top F`.

    Examples::

        >>> import torch
        >>> weighted_rows(torch.ones(4, 2), 2 * torch.eye(2, dtype=torch.float64))[0]
        tensor([2., 2.])
    """
    return apply_weight(weight, design_rows.T).T


def remove_effect(
    features: torch.Tensor,
    design_rows: torch.Tensor,
    beta: torch.Tensor,
    remove_mask: torch.Tensor | None,
) -> torch.Tensor:
    r"""``features − X_b[:, R] β[R, :]``, R being the columns where ``remove_mask`` is true.

    The other (kept) columns do not enter at all: NaN or inf in them leaves the output finite.

    ``remove_mask=None`` removes every column (the rows are then taken as given: pass rows
    already masked, :math:`X_{b,R}`, to skip the multiplication).

    Shape:
        - features: ``(m, D)``
        - design_rows: ``(m, K)``
        - beta: ``(K, D)``
        - remove_mask: ``(K,)`` bool
        - Output: ``(m, D)``

    Examples::

        >>> import torch
        >>> rows = torch.tensor([[1.0, 2.0]])                # [label, site effect]
        >>> beta = torch.tensor([[10.0], [1.0]])
        >>> remove_effect(torch.tensor([[13.0]]), rows, beta, torch.tensor([False, True]))
        tensor([[11.]])
    """
    if remove_mask is not None:
        # where, not a product: a NaN/inf in a kept column (an unknown label) never enters
        design_rows = torch.where(remove_mask, design_rows, 0.0)
    return subtract_product(features, design_rows, beta)


# On the CPU a product with an inner size of a few columns that writes a large output runs
# faster as that many fused multiply-subtracts than as one matrix product (with MKL, 0.2-0.6x
# the time of addmm for 4,096-25,088 columns and K = 2-3; at K = 8 they are even)
_FEW_COLUMNS = 4
_LARGE_OUTPUT = 1 << 16


def subtract_product(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""``x − a·b`` for ``a`` of shape ``(m, K)`` and ``b`` of shape ``(K, D)``.

    On the CPU, for K ≤ 4 and an output of at least 65,536 values, as K ``addcmul`` passes;
    otherwise (and under ``torch.compile``, which fuses either) one ``addmm``.
    """
    k = a.shape[1]
    if (
        0 < k <= _FEW_COLUMNS
        and x.is_cpu
        and x.numel() >= _LARGE_OUTPUT
        and not torch.compiler.is_compiling()
    ):
        out = torch.addcmul(x, a[:, :1], b[:1], value=-1)
        for j in range(1, k):
            out.addcmul_(a[:, j : j + 1], b[j : j + 1], value=-1)
        return out
    return torch.addmm(x, a, b, alpha=-1)


#: MKL runs a product aᵀ·x with at most this many columns in ``a`` on one thread, whatever the
#: thread count (at (200, 18432, 3): 0.66 ms as one product on 1 or 2 threads, 0.32 ms as a
#: batch of two halves on 2; at K = 16 the single product is the faster)
_SERIAL_COLUMNS = 8


def transpose_product(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    r"""``aᵀ·x`` for ``a`` of shape ``(m, K)`` and ``x`` of shape ``(m, D)``: a batch's statistics.

    On the CPU with several threads, for K ≤ 8 and at least 65,536 values in ``x``, as one
    batched product over as many column blocks of ``x`` as threads (one block per thread);
    otherwise (and under ``torch.compile``) one ``mm``.
    """
    k = a.shape[1]
    if (
        0 < k <= _SERIAL_COLUMNS
        and x.is_cpu
        and x.numel() >= _LARGE_OUTPUT
        and not torch.compiler.is_compiling()
    ):
        pieces, (m, d) = torch.get_num_threads(), x.shape
        if pieces > 1 and d % pieces == 0 and x.is_contiguous():
            blocks = x.view(m, pieces, d // pieces).transpose(0, 1)  # (pieces, m, D/pieces)
            out = torch.bmm(a.t().expand(pieces, k, m), blocks)
            return out.transpose(0, 1).reshape(k, d)
    return torch.mm(a.t(), x)


def fit_beta(design: Any, features: Any, *, ridge: float = 0.0) -> torch.Tensor:
    r"""Full-data least squares :math:`\beta = (X^\top X + \lambda I)^{-1} X^\top F` in float64.

    Equals :func:`beta_from_statistics` on the whole set (m = N). Used by the scikit-learn
    residualizer and as the reference in tests.

    Shape:
        - design: ``(N, K)``
        - features: ``(N, D)``
        - Output: ``(K, D)`` float64

    Examples::

        >>> import torch
        >>> X = torch.cat([torch.ones(5, 1), torch.arange(5.0).unsqueeze(1)], 1)
        >>> beta = fit_beta(X, 1 - 2 * X[:, 1:])
        >>> torch.allclose(beta, torch.tensor([[1.0], [-2.0]], dtype=torch.float64))
        True
    """
    columns = design.columns if isinstance(design, Design) else None
    gram_inverse = inverse_gram(design, ridge=ridge, columns=columns)
    x = as_2d_tensor(
        design.matrix if isinstance(design, Design) else design, "design", dtype=torch.float64
    )
    f = as_2d_tensor(features, "features", dtype=torch.float64, device=gram_inverse.device)
    if f.shape[0] != x.shape[0]:
        raise ValueError(
            f"expected features with {x.shape[0]} rows (one per design row), got {f.shape[0]}"
        )
    check_finite(f, "features")
    return gram_inverse @ batch_statistics(x.to(gram_inverse.device), f)
