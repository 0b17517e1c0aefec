r"""Squared distance correlation (dCor²), the paper's measure of how much metadata features encode.

Squared distance correlation (Székely, Rizzo & Bakirov 2007) between the rows of ``x`` (n×p) and
``y`` (n×q), with :math:`a_{ij} = \lVert x_i - x_j \rVert` and :math:`b_{ij} = \lVert y_i - y_j
\rVert`:

.. math::

    \mathrm{dCor}^2_n(x, y) = \frac{\langle A, B \rangle}{\sqrt{\langle A, A \rangle
    \langle B, B \rangle}}

where :math:`A, B` are the double-centred distance matrices and :math:`\langle A, B\rangle =
\frac{1}{n^2}\sum_{ij} A_{ij} B_{ij}` (the biased V-statistic, ``unbiased=False``), or the
U-centred matrices and :math:`\frac{1}{n(n-3)}\sum_{i \ne j}` (the bias-corrected estimator of
Székely & Rizzo 2014, ``unbiased=True``, the one the paper reports; it can be slightly negative
and needs n > 3).

The results equal those of the ``dcor`` package (``dcor.distance_correlation_sqr`` and
``dcor.u_distance_correlation_sqr``). The computation is blocked: memory is O(n · block), float64,
on the input's device. When either distance variance is zero (a constant ``x`` or ``y``, n = 1, or
a U-centred matrix that vanishes) the result is ``0.0``. How it is computed, and where it differs
from ``dcor`` on degenerate input, is in ``docs/metrics.md``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metanorm.metrics._distance import (
    DEFAULT_MAX_MEMORY,
    LIVE_TILES,
    resolve_block,
)
from metanorm.metrics._exact import ExactSums, centred_stats, exact_sums
from metanorm.metrics._inputs import as_labels, as_sample_pair, label_key
from metanorm.metrics._projection import ProjectionTerms, projection_terms

__all__ = ["DcorEstimate", "distance_correlation_sqr", "grouped_distance_correlation_sqr"]

#: Default number of random projections of ``method="projection"``.
DEFAULT_PROJECTIONS = 100

_METHODS = ("exact", "projection", "auto")


class DcorEstimate(float):
    """A dCor² value (a ``float``) that carries how it was estimated.

    Attributes:
        standard_error: the standard error over the projections (the Monte Carlo error; the
            sampling error of the data is another matter).
        method: ``"projection"``.
        unbiased: which estimator.
        num_projections: number of projections (0 for the exact estimator).
    """

    standard_error: float
    method: str
    unbiased: bool
    num_projections: int

    def __new__(
        cls,
        value: float,
        *,
        standard_error: float = 0.0,
        method: str = "exact",
        unbiased: bool = False,
        num_projections: int = 0,
    ) -> DcorEstimate:
        """A value with its standard error and the estimator that gave it."""
        out = super().__new__(cls, value)
        out.standard_error = standard_error
        out.method = method
        out.unbiased = unbiased
        out.num_projections = num_projections
        return out

    def __reduce__(self) -> Any:
        kw = {
            "standard_error": self.standard_error,
            "method": self.method,
            "unbiased": self.unbiased,
            "num_projections": self.num_projections,
        }
        return (_rebuild_estimate, (float(self), kw))


def _rebuild_estimate(value: float, kw: dict[str, Any]) -> DcorEstimate:
    return DcorEstimate(value, **kw)


def check_method(method: str, num_projections: int | None, seed: int | None) -> tuple[str, int]:
    """Validates ``method`` and ``num_projections``; ``"auto"`` is the exact estimator."""
    if method not in _METHODS:
        raise ValueError(f"expected method to be one of {_METHODS}, got {method!r}")
    if num_projections is not None and (
        isinstance(num_projections, bool)
        or not isinstance(num_projections, int)
        or num_projections < 2
    ):
        raise ValueError(
            f"expected num_projections to be an integer >= 2 (the standard error needs two), "
            f"got {num_projections!r}"
        )
    if method != "projection" and num_projections is not None:
        raise ValueError(
            f"num_projections applies to method='projection' only, got method={method!r}"
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"expected seed to be an int, got {seed!r}")
    return ("exact" if method == "auto" else method), (num_projections or DEFAULT_PROJECTIONS)


# Distance variances below this times (mean distance)² are rounding noise, i.e. zero.
_ZERO_VARIANCE_EPS = 256 * float(np.finfo(np.float64).eps)


def check_num_samples(n: int, unbiased: bool) -> None:
    """Raises ``ValueError`` when ``n`` samples are too few for the chosen estimator.

    Args:
        n: number of samples.
        unbiased: the bias-corrected estimator, which needs n > 3.
    """
    if n < 1:
        raise ValueError("expected at least one sample, got 0 rows")
    if unbiased and n <= 3:
        raise ValueError(
            f"the bias-corrected (unbiased=True) estimator needs more than 3 samples, got {n}"
        )


def _unit_scale(t: Tensor) -> Tensor:
    top = t.abs().amax()
    return t / torch.where(top > 0, top, torch.ones_like(top))


def order_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Puts the variable with fewer columns second (dCor² is symmetric; its pass is cheaper).

    Each is divided by its largest ``|value|``: dCor² does not change with the scale of either
    variable, and the squared distances neither overflow (values beyond ~1e150) nor underflow.
    """
    x, y = _unit_scale(x), _unit_scale(y)
    return (y, x) if x.shape[1] < y.shape[1] else (x, y)


def dcor_of_samples(
    x: Tensor,
    y: Tensor,
    *,
    unbiased: bool = False,
    block_size: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    share: Share | None = None,
) -> float:
    """dCor² of checked float64 samples (from :func:`~metanorm.metrics._inputs.as_sample_pair`).

    Args:
        x: float64 samples ``(n, p)``.
        y: float64 samples ``(n, q)``, on the same device.
        unbiased: see :func:`distance_correlation_sqr`.
        block_size: see :func:`distance_correlation_sqr`.
        max_memory: see :func:`distance_correlation_sqr`.
        share: ``(part, parts, all_reduce)``: compute the tiles ``part::parts`` only and add
            the partial sums of all parts with ``all_reduce`` (an in-place sum over processes
            that all hold the same rows).

    Returns:
        The estimate as a Python float.
    """
    n = x.shape[0]
    check_num_samples(n, unbiased)
    block = square_block(n, block_size, max_memory)
    x, y = order_pair(x, y)
    if share is None:
        sums, _ = exact_sums(x, y, block=block)
        return dcor_from_exact(sums, unbiased)
    part, parts, all_reduce = share
    sums, _ = exact_sums(x, y, block=block, part=part, parts=parts)
    packed = [sums.s_ab.reshape(1), sums.ra] + ([sums.rb] if sums.rb_partial else [])
    total = torch.cat(packed)
    all_reduce(total)
    rb = total[1 + n :] if sums.rb_partial else sums.rb
    sums = sums._replace(s_ab=total[0], ra=total[1 : 1 + n], rb=rb, rb_partial=False)
    return dcor_from_exact(sums, unbiased)


#: ``(part, parts, all_reduce)``: a share of the work and how to add up the shares.
Share = tuple[int, int, Callable[[Tensor], None]]


def square_block(n: int, block_size: int | None, max_memory: int) -> int:
    """Side of the square tiles: ``block_size``, else at most 1024 and within ``max_memory``."""
    if block_size is not None:
        return resolve_block(n, block_size, max_memory, LIVE_TILES)
    if isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 1:
        raise ValueError(
            f"expected max_memory to be a positive number of bytes, got {max_memory!r}"
        )
    # a few float64 tiles alive at once; 1024 keeps them near the cache
    side = math.isqrt(max(1, max_memory // (8 * LIVE_TILES)))
    return max(1, min(n, 1024, side))


def dcor_from_exact(sums: ExactSums, unbiased: bool) -> float:
    """dCor² from complete :class:`ExactSums`; ``0.0`` when a distance variance is zero."""
    cov, var_x, var_y = centred_stats(sums, unbiased)
    n2 = float(sums.n) ** 2
    mean_a, mean_b = float(sums.ra.sum()) / n2, float(sums.rb.sum()) / n2
    eps = _ZERO_VARIANCE_EPS
    if mean_a == 0.0 or mean_b == 0.0:  # all distances zero: a constant variable
        return 0.0
    if abs(var_x) <= eps * mean_a**2 or abs(var_y) <= eps * mean_b**2:
        return 0.0
    denom = math.sqrt(abs(var_x * var_y))
    return 0.0 if denom == 0.0 else cov / denom


def distance_correlation_sqr(
    x: Any,
    y: Any,
    *,
    unbiased: bool = False,
    categorical: bool | None = None,
    method: str = "exact",
    num_projections: int | None = None,
    seed: int | None = None,
    block_size: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    device: torch.device | str | None = None,
) -> float:
    r"""Squared distance correlation between the rows of ``x`` and ``y``.

    ``method="exact"`` (the default; ``"auto"`` is the same) visits every pair in O(n²·(p+q))
    time. ``method="projection"`` estimates it by random projections (Huang & Huo 2022): the
    average of ``num_projections`` one-dimensional dCov² terms, each exact in O(n log n), so
    n = 10⁶ is practical. The average is taken with control variates (functions of the
    directions whose mean over the sphere is known, built from a subsample of the rows), which
    keeps its expectation and cuts the spread over directions, 3-20× in the documented cases.
    The result carries a standard error over the projections (``result.standard_error``),
    which shrinks as ``num_projections`` grows. In high dimension the spread over directions can
    still be large: check the standard error, and compare with the exact estimator on a random
    subsample (``docs/metrics.md`` has an example where the subsample wins).

    The biased estimator (``unbiased=False``) equals ``dcor.distance_correlation_sqr``; the
    bias-corrected one (``unbiased=True``, the estimator the paper reports) equals
    ``dcor.u_distance_correlation_sqr``. Computed in float64 in blocks of rows, so memory is
    O(n · block) and no n×n matrix is ever formed.

    Args:
        x: samples of the first variable, one row per sample: numpy array, tensor (any device) or
            nested sequence. Trailing dimensions are flattened (a conv feature map of shape
            (n, C, H, W) is a sample of C·H·W values).
        y: samples of the second variable (the metadata), same number of rows. Text columns and
            pandas ``category`` columns are one-hot coded (one indicator per level).
        unbiased: the bias-corrected (U-centred) estimator, which can be slightly negative and
            needs n > 3. Default: ``False`` (the name and default of the ``dcor`` package); pass
            it explicitly.
        categorical: ``True`` one-hot codes numeric codes of ``y`` too (integer site codes 0, 1,
            2 taken as numbers give a different dCor² than the sites one-hot coded); ``False``
            takes numbers as numbers without the warning that ``None`` (default) gives for a
            numeric column of 3 to 10 distinct integers.
        method: ``"exact"``, ``"projection"`` or ``"auto"`` (exact). Default: ``"exact"``.
        num_projections: directions drawn for each variable with ``method="projection"``.
            Default: 100.
        seed: seed of the directions. Default: 0 (the same value on every call).
        block_size: rows per tile. Default: chosen from ``max_memory``.
        max_memory: memory budget in bytes for the tiles when ``block_size`` is None.
            Default: 256 MiB.
        device: where to compute. Default: the device of ``x`` (or of ``y``) when a tensor, else
            the CPU.

    Returns:
        The estimate as a Python float (``0.0`` when ``x`` or ``y`` is constant); with
        ``method="projection"`` a :class:`DcorEstimate`, a ``float`` that also carries
        ``standard_error``, ``method``, ``unbiased`` and ``num_projections``.

    Raises:
        ValueError: on a row-count mismatch, NaN/inf values, no rows, or n ≤ 3 with
            ``unbiased=True``.
        TypeError: for non-numeric input.

    Shape:
        - x: (n,), (n, p) or (n, \*)
        - y: (n,), (n, q) or (n, \*)

    Examples::

        >>> import torch
        >>> from metanorm.metrics import distance_correlation_sqr
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(500, 3, generator=g)
        >>> round(distance_correlation_sqr(x, x[:, 0] ** 2), 2) > 0.1
        True
    """
    how, num = check_method(method, num_projections, seed)
    a, b = as_sample_pair(x, y, device, categorical=categorical)
    if how == "projection":
        return projection_dcor(a, b, unbiased=unbiased, num_projections=num, seed=seed or 0)
    value = dcor_of_samples(a, b, unbiased=unbiased, block_size=block_size, max_memory=max_memory)
    return value


def projection_dcor(
    a: Tensor,
    b: Tensor,
    *,
    unbiased: bool,
    num_projections: int,
    seed: int,
    share: Share | None = None,
    control: bool = True,
) -> DcorEstimate:
    """dCor² of checked float64 samples by random projections (:func:`distance_correlation_sqr`).

    With ``share`` (see :func:`dcor_of_samples`) each process computes the projections
    ``part::parts`` and the per-projection terms of all of them are added up.
    """
    check_num_samples(a.shape[0], unbiased)
    if a.shape[1] < b.shape[1]:  # symmetric; a one-column variable goes second (no projection)
        a, b = b, a
    # no rescaled copy of the samples (n = 10^6 rows are big): the projections are rescaled
    part, parts = (0, 1) if share is None else share[:2]
    terms, mine = projection_terms(
        a,
        b,
        unbiased=unbiased,
        num_projections=num_projections,
        seed=seed,
        part=part,
        parts=parts,
        control=control,
    )
    if share is not None:
        table = torch.zeros(3, num_projections, dtype=torch.float64, device=a.device)
        idx = mine.to(a.device)
        table[0, idx], table[1, idx], table[2, idx] = terms.cov, terms.var_x, terms.var_y
        share[2](table)
        terms = ProjectionTerms(table[0], table[1], table[2], terms.cp, terms.cq, terms.features)
    value, se = terms.result()
    return DcorEstimate(
        value,
        standard_error=se,
        method="projection",
        unbiased=unbiased,
        num_projections=num_projections,
    )


def grouped_distance_correlation_sqr(
    x: Any,
    y: Any,
    groups: Any,
    *,
    unbiased: bool = False,
    categorical: bool | None = None,
    method: str = "exact",
    num_projections: int | None = None,
    seed: int | None = None,
    block_size: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    device: torch.device | str | None = None,
) -> dict[Any, float]:
    r"""dCor² within each group (the paper reports it per label class): ``{group: value}``.

    Each value equals :func:`distance_correlation_sqr` on the rows of that group.

    Args:
        x: features, one row per sample.
        y: metadata, same number of rows; text and ``category`` columns are one-hot coded.
        groups: one label per row (numbers or strings); the keys of the result, in sorted order.
        unbiased: see :func:`distance_correlation_sqr`; pass it explicitly.
        categorical: see :func:`distance_correlation_sqr`.
        method: see :func:`distance_correlation_sqr`.
        num_projections: see :func:`distance_correlation_sqr`.
        seed: see :func:`distance_correlation_sqr`.
        block_size: see :func:`distance_correlation_sqr`.
        max_memory: see :func:`distance_correlation_sqr`.
        device: see :func:`distance_correlation_sqr`.

    Returns:
        ``{group: dCor²}`` with plain Python keys. A group too small for the estimator (3 samples
        or fewer with ``unbiased=True``) gets NaN, and one warning lists every such group.

    Raises:
        ValueError: as :func:`distance_correlation_sqr`; also when ``groups`` does not have one
            entry per row.

    Shape:
        - x: (n,), (n, p) or (n, \*)
        - y: (n,), (n, q) or (n, \*)
        - groups: (n,)

    Examples::

        >>> import numpy as np
        >>> from metanorm.metrics import grouped_distance_correlation_sqr
        >>> x = np.arange(8.0)
        >>> sorted(grouped_distance_correlation_sqr(x, x**2, [0, 1] * 4))
        [0, 1]
    """
    how, num = check_method(method, num_projections, seed)
    a, b = as_sample_pair(x, y, device, categorical=categorical)
    g = as_labels(groups, "groups", a.shape[0])
    return grouped_of_samples(
        a,
        b,
        g,
        unbiased=unbiased,
        method=how,
        num_projections=num,
        seed=seed or 0,
        block_size=block_size,
        max_memory=max_memory,
        stacklevel=3,
    )


def grouped_of_samples(
    a: Tensor,
    b: Tensor,
    g: np.ndarray,
    *,
    unbiased: bool,
    method: str = "exact",
    num_projections: int = DEFAULT_PROJECTIONS,
    seed: int = 0,
    block_size: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    share: Share | None = None,
    stacklevel: int = 2,
) -> dict[Any, float]:
    """:func:`grouped_distance_correlation_sqr` of checked samples and labels.

    ``share``: see :func:`dcor_of_samples`.
    """
    levels, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    min_samples = 4 if unbiased else 1
    small = [
        f"{label_key(lv)!r} ({c} samples)"
        for lv, c in zip(levels, counts, strict=True)
        if c < min_samples
    ]
    if small:
        warnings.warn(
            "the bias-corrected (unbiased=True) estimator needs more than 3 samples per group; "
            f"NaN for group(s) {', '.join(small)}",
            UserWarning,
            stacklevel=stacklevel,
        )
    out: dict[Any, float] = {}
    inv = torch.from_numpy(inverse.reshape(-1)).to(a.device)
    for i, level in enumerate(levels):
        if counts[i] < min_samples:
            out[label_key(level)] = math.nan
            continue
        sel = (inv == i).nonzero().squeeze(1)
        if method == "projection":
            out[label_key(level)] = projection_dcor(
                a[sel],
                b[sel],
                unbiased=unbiased,
                num_projections=num_projections,
                seed=seed,
                share=share,
            )
        else:
            value = dcor_of_samples(
                a[sel],
                b[sel],
                unbiased=unbiased,
                block_size=block_size,
                max_memory=max_memory,
                share=share,
            )
            out[label_key(level)] = value
    return out
