"""Permutation test of independence based on dCor² (:func:`distance_correlation_test`)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from metanorm.metrics._distance import (
    DEFAULT_MAX_MEMORY,
    LIVE_TILES,
    CentredPoints,
    exact_distances,
    resolve_block,
)
from metanorm.metrics._inputs import as_sample_pair
from metanorm.metrics.dcor import blocked_sums, check_num_samples, dcor_from_sums, order_pair

__all__ = ["DEFAULT_PERMUTATIONS", "DistanceCorrelationTestResult", "distance_correlation_test"]

#: Default number of permutations of :func:`distance_correlation_test`.
DEFAULT_PERMUTATIONS = 199

# A permuted variable with at most this many distinct rows uses the matrix-product route.
_DISCRETE_MAX_LEVELS = 32
# ... and at most this many columns (distinct rows are not looked for in wider variables).
_DISCRETE_MAX_COLUMNS = 8


class DistanceCorrelationTestResult(NamedTuple):
    """Result of :func:`distance_correlation_test`."""

    #: dCor² of the data (the chosen estimator).
    statistic: float
    #: Permutation p-value, ``(1 + #{permuted >= observed}) / (1 + num_permutations)``.
    pvalue: float
    #: Number of random permutations drawn.
    num_permutations: int


def _levels(t: Tensor) -> tuple[Tensor, Tensor] | None:
    """(distinct rows, code of each row) when ``t`` has few distinct rows, else None."""
    if t.shape[1] > _DISCRETE_MAX_COLUMNS:
        return None
    if t.shape[1] == 1:
        levels, codes = torch.unique(t.reshape(-1), return_inverse=True)
        levels = levels[:, None]
    else:
        arr, inv = np.unique(t.cpu().numpy(), axis=0, return_inverse=True)
        levels = torch.from_numpy(arr).to(t.device)
        codes = torch.from_numpy(inv.reshape(-1)).to(t.device)
    if levels.shape[0] > _DISCRETE_MAX_LEVELS:
        return None
    return levels, codes.reshape(-1)


class _PermutedCrossSums:
    """Accumulates ``sum_ij a_ij b_{pi(i) pi(j)}`` for every permutation pi, tile by tile.

    An instance is the ``on_tile`` hook of :func:`~metanorm.metrics.dcor.blocked_sums`; ``y`` is
    the permuted variable (centred, as there) and ``perms`` holds one permutation per row.
    """

    def __init__(self, y: Tensor, perms: Tensor, max_memory: int) -> None:
        self.perms = perms  # (P, n) long, on the device
        self.max_memory = max_memory
        self.out = torch.zeros(perms.shape[0], dtype=torch.float64, device=y.device)
        found = _levels(y)
        self.discrete = found is not None
        self.y = y
        if found is not None:
            levels, codes = found
            self.num_levels = levels.shape[0]
            self.level_dist = exact_distances(levels, levels)  # K×K
            self.codes = codes.reshape(-1)[perms]  # (P, n): level of y_{pi(i)}

    def __call__(self, a_tile: Tensor, rows: slice, cols: slice, weight: float) -> None:
        """Adds ``weight * sum_ij a_ij b_{pi(i) pi(j)}`` over one tile of x distances."""
        out = self.out
        k, width = a_tile.shape
        num = self.perms.shape[0]
        if self.discrete:
            levels = self.num_levels
            per_perm = 8 * levels * (3 * width + 3 * k)  # one-hot (int, float, reshaped), products
            chunk = max(1, min(num, self.max_memory // per_perm))
            for c in range(0, num, chunk):
                codes = self.codes[c : c + chunk]
                m = codes.shape[0]
                onehot = torch.nn.functional.one_hot(codes[:, cols], levels)
                onehot = onehot.to(a_tile.dtype).permute(1, 0, 2).reshape(width, m * levels)
                ae = (a_tile @ onehot).view(k, m, levels).permute(1, 0, 2)  # (m, k, K)
                dist_rows = self.level_dist[codes[:, rows]]  # (m, k, K)
                out[c : c + m] += weight * (ae * dist_rows).sum((1, 2))
        else:
            per_perm = 8 * k * width * 2
            chunk = max(1, min(num, self.max_memory // per_perm))
            flat = a_tile.reshape(-1)
            for c in range(0, num, chunk):
                yp = self.y[self.perms[c : c + chunk]]  # (m, n, q)
                if yp.shape[2] == 1:
                    b = (yp[:, rows, 0, None] - yp[:, None, cols, 0]).abs_()
                else:
                    b = torch.cdist(
                        yp[:, rows], yp[:, cols], compute_mode="donot_use_mm_for_euclid_dist"
                    )
                out[c : c + b.shape[0]] += weight * (b.reshape(b.shape[0], -1) @ flat)


def _permutations(n: int, num: int, random_state: Any) -> np.ndarray:
    if isinstance(random_state, torch.Generator):
        return torch.stack([torch.randperm(n, generator=random_state) for _ in range(num)]).numpy()
    rng = np.random.default_rng(random_state)
    return rng.permuted(np.broadcast_to(np.arange(n), (num, n)), axis=1)


def distance_correlation_test(
    x: Any,
    y: Any,
    *,
    num_permutations: int = DEFAULT_PERMUTATIONS,
    random_state: int | np.random.Generator | torch.Generator | None = None,
    unbiased: bool = False,
    categorical: bool | None = None,
    block_size: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    device: torch.device | str | None = None,
) -> DistanceCorrelationTestResult:
    r"""Permutation test of independence between ``x`` and ``y`` based on dCor².

    The rows of one variable are permuted ``num_permutations`` times at random; the p-value is
    :math:`(1 + \#\{T_\pi \ge T\}) / (1 + B)` (Phipson & Smyth 2010), where :math:`T` is the
    statistic on the data and ties within rounding count as at least as extreme, so it is never 0
    and a test at level α rejects with probability at most α under independence.

    The distances of the unpermuted variable are computed once, blockwise, and reused by every
    permutation. Memory stays O(n · block) plus the (B × n) permutation indices. A permuted
    variable with few distinct rows (a label, a site, a binary confounder) is much faster than a
    continuous one.

    Args:
        x: samples of the first variable (as :func:`~metanorm.metrics.distance_correlation_sqr`).
        y: samples of the second variable, same number of rows.
        num_permutations: number B of random permutations. Default: 199 (p-values down to
            0.005).
        random_state: seed (int), ``numpy.random.Generator`` or ``torch.Generator``; the same
            seed gives the same p-value. Default: None (fresh randomness).
        unbiased: use the bias-corrected estimator as the statistic. Default: ``False``; pass
            it explicitly.
        categorical: how ``y`` is coded, see
            :func:`~metanorm.metrics.distance_correlation_sqr`.
        block_size: rows per tile. Default: chosen from ``max_memory``.
        max_memory: memory budget in bytes for the tiles. Default: 256 MiB.
        device: where to compute. Default: the device of ``x`` (or ``y``) when a tensor.

    Returns:
        :class:`DistanceCorrelationTestResult` ``(statistic, pvalue, num_permutations)``.

    Raises:
        ValueError: as :func:`~metanorm.metrics.distance_correlation_sqr`, or when
            ``num_permutations < 1``.
        TypeError: when ``num_permutations`` is not an int.

    Shape:
        - x: (n,), (n, p) or (n, \*)
        - y: (n,), (n, q) or (n, \*)

    Examples::

        >>> import torch
        >>> from metanorm.metrics import distance_correlation_test
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(200, 2, generator=g)
        >>> distance_correlation_test(x, x[:, 0] ** 2, random_state=0).pvalue
        0.005
    """
    if isinstance(num_permutations, bool) or not isinstance(num_permutations, int):
        raise TypeError(f"expected num_permutations to be an int, got {num_permutations!r}")
    if num_permutations < 1:
        raise ValueError(f"expected num_permutations >= 1, got {num_permutations}")
    a, b = as_sample_pair(x, y, device, categorical=categorical)
    n = a.shape[0]
    check_num_samples(n, unbiased)
    block = resolve_block(n, block_size, max_memory, LIVE_TILES)
    # permute the cheaper variable: one with few distinct rows, else the one with fewer columns
    a, b = order_pair(a, b)
    if _levels(b) is None and _levels(a) is not None:
        a, b = b, a
    drawn = _permutations(n, num_permutations, random_state)
    perms = np.concatenate([np.arange(n)[None, :], drawn])  # row 0: the data themselves
    perm_t = torch.from_numpy(np.ascontiguousarray(perms)).to(a.device)
    # the same centred points as blocked_sums uses for b (centring leaves distances unchanged)
    cross = _PermutedCrossSums(CentredPoints(b).x, perm_t, max_memory)
    sums = blocked_sums(a, b, unbiased=unbiased, block=block, on_tile=cross)
    statistic = dcor_from_sums(sums, unbiased)
    # T_pi = sum a_ij B~^pi_ij up to a constant: raw cross sum minus the centring term
    coef = 2.0 / (n - 2) if unbiased else 2.0 / n
    centring = sums.rb[perm_t] @ sums.ra  # (P+1,): sum_i ra_i rb_{pi(i)}
    t = cross.out - coef * centring
    scale = float(cross.out[0] + coef * centring[0])
    tol = 64 * torch.finfo(torch.float64).eps * scale
    extreme = int((t[1:] >= t[0] - tol).sum())
    pvalue = (1 + extreme) / (1 + num_permutations)
    return DistanceCorrelationTestResult(statistic, pvalue, num_permutations)
