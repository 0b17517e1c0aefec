"""Permutation test of independence based on dCor² (:func:`distance_correlation_test`)."""

from __future__ import annotations

import copy
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from metanorm.metrics._distance import DEFAULT_MAX_MEMORY, exact_distances, row_sums_1d
from metanorm.metrics._exact import ExactSums, Points, centred_stats, square_tiles
from metanorm.metrics._inputs import as_sample_pair
from metanorm.metrics.dcor import check_num_samples, dcor_from_exact, order_pair, square_block

__all__ = ["DEFAULT_PERMUTATIONS", "DistanceCorrelationTestResult", "distance_correlation_test"]

#: Default number of permutations of :func:`distance_correlation_test`.
DEFAULT_PERMUTATIONS = 199

# A permuted variable with at most this many distinct rows uses the matrix-product route.
_DISCRETE_MAX_LEVELS = 32
# ... and at most this many columns (distinct rows are not looked for in wider variables).
_DISCRETE_MAX_COLUMNS = 8
# Values per chunk of permuted distances that stay in the cache (one-column continuous route).
_CACHE_VALUES = 2**19
# Tile side of the one-column continuous route (small tiles keep a chunk of permutations).
_PERMUTATION_TILE = 256


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

    Called on every tile of the ``x`` distances (rows, columns and weight: 2 for an off-diagonal
    tile, which stands for its mirror image too); ``y`` is the permuted variable, centred, and
    ``perms`` holds one permutation per row.
    """

    def __init__(self, y: Tensor, perms: Tensor, max_memory: int) -> None:
        self.perms = perms  # (P, n) long, on the device
        self.max_memory = max_memory
        self.out = torch.zeros(perms.shape[0], dtype=torch.float64, device=y.device)
        found = _levels(y)
        self.discrete = found is not None
        self.y = y
        self.one_column = y.shape[1] == 1
        if found is not None:
            levels, codes = found
            self.num_levels = levels.shape[0]
            self.level_dist = exact_distances(levels, levels)  # K×K
            self.codes = codes.reshape(-1)[perms]  # (P, n): level of y_{pi(i)}
        self.small_ops = not self.discrete and self.one_column
        if not self.discrete and self.one_column:
            # |s - t| = 2 max(s, t) - s - t: the tiles accumulate sum_ij a_ij max(z_i, z_j) and
            # finish() subtracts sum_ij a_ij (z_i + z_j) = 2 sum_i ra_i z_i
            self.z = y[:, 0][perms]  # (P, n): y_{pi(i)}

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
        elif self.one_column:
            # one pass writing (m, k, width) maxima and one product: about 2^19 values per
            # chunk keep both in the cache
            chunk = max(1, min(num, _CACHE_VALUES // (k * width)))
            flat = a_tile.reshape(-1)
            zr, zc = (
                self.z[:, rows].contiguous(),
                self.z[:, cols].contiguous(),
            )  # strided: 15x slower
            for c in range(0, num, chunk):
                m = min(chunk, num - c)
                top = torch.maximum(zr[c : c + m, :, None], zc[c : c + m, None, :])
                out[c : c + m] += (2.0 * weight) * torch.mv(top.view(m, -1), flat)
        else:
            per_perm = 8 * k * width * 2
            chunk = max(1, min(num, self.max_memory // per_perm))
            flat = a_tile.reshape(-1)
            for c in range(0, num, chunk):
                yp = self.y[self.perms[c : c + chunk]]  # (m, n, q)
                b = torch.cdist(
                    yp[:, rows], yp[:, cols], compute_mode="donot_use_mm_for_euclid_dist"
                )
                out[c : c + b.shape[0]] += weight * (b.reshape(b.shape[0], -1) @ flat)

    def finish(self, ra: Tensor) -> Tensor:
        """The cross sums, given the row sums ``ra`` of the x distances (input order)."""
        if self.discrete or not self.one_column:
            return self.out
        return self.out - 2.0 * (self.z @ ra)


def permuted_sums(
    x: Tensor, y: Tensor, perms: Tensor, *, block: int, max_memory: int
) -> tuple[ExactSums, Tensor]:
    r"""The exact sums of ``(x, y)`` and the cross sums of every permutation of ``y``'s rows.

    Args:
        x: float64 samples ``(n, p)``.
        y: float64 samples ``(n, q)`` (the permuted variable).
        perms: ``(P, n)`` permutations; row 0 is usually the identity.
        block: side of the square tiles.
        max_memory: memory budget for chunks of permutations.

    Returns:
        :class:`~metanorm.metrics._exact.ExactSums` (input order) and the ``(P,)`` cross sums
        :math:`\sum_{ij} a_{ij} b_{\pi(i)\pi(j)}`.
    """
    n = x.shape[0]
    px, py = Points(x), Points(y)
    cross = _PermutedCrossSums(py.x, perms, max_memory)
    dev = px.x.device
    ones = torch.ones(min(block, n), dtype=torch.float64, device=dev)
    tiles = square_tiles(n, block)
    workers = torch.get_num_threads() if dev.type == "cpu" and cross.small_ops else 1

    def run(part: int) -> tuple[Tensor, _PermutedCrossSums]:
        mine = copy.copy(cross)
        mine.out = torch.zeros_like(cross.out)
        ra_part = torch.zeros(n, dtype=torch.float64, device=dev)
        for rows, cols in tiles[part::workers]:
            at = px.tile(rows, cols)
            k, w = at.shape
            ra_part[rows] += torch.mv(at, ones[:w])
            if rows != cols:
                ra_part[cols] += torch.mv(at.T, ones[:k])
            mine(at, rows, cols, 1.0 if rows == cols else 2.0)
        return ra_part, mine

    if workers > 1:
        # many small operations: one thread each over its share of the tiles, instead of
        # intra-op threads meeting at a barrier after every ~0.1 ms operation
        def one_thread(part: int) -> tuple[Tensor, _PermutedCrossSums]:
            torch.set_num_threads(1)
            return run(part)

        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(one_thread, range(workers)))
        torch.set_num_threads(workers)
    else:
        parts = [run(0)]
    ra = torch.stack([p[0] for p in parts]).sum(0)
    cross.out = torch.stack([p[1].out for p in parts]).sum(0)
    if y.shape[1] == 1:
        rb = row_sums_1d(py.x[:, 0])
    else:
        rb = torch.zeros(n, dtype=torch.float64, device=dev)
        for rows, cols in square_tiles(n, block):
            bt = py.tile(rows, cols)
            k, w = bt.shape
            rb[rows] += torch.mv(bt, ones[:w])
            if rows != cols:
                rb[cols] += torch.mv(bt.T, ones[:k])
    out = cross.finish(ra)
    sums = ExactSums(n, out[0], px.sum_sq_distances(), py.sum_sq_distances(), ra, rb, False)
    return sums, out


def permutation_statistics(
    a: Tensor, b: Tensor, perms: Tensor, *, unbiased: bool, block: int, max_memory: int
) -> tuple[float, Tensor, Tensor, float]:
    """dCor² of the data and of every permutation of ``b``'s rows.

    Args:
        a: float64 samples ``(n, p)``.
        b: float64 samples ``(n, q)``, the permuted variable.
        perms: ``(P, n)`` permutations; row 0 the identity.
        unbiased: the estimator.
        block: tile side.
        max_memory: budget for chunks of permutations.

    Returns:
        ``(statistic, dcor2, t, scale)``: dCor² of the data, ``(P,)`` dCor² of ``(a, b[pi])``,
        ``(P,)`` the statistic up to a positive factor and a constant (what the p-value
        compares), and the size of the sums behind ``t`` (for a tolerance).
    """
    n = a.shape[0]
    sums, cross = permuted_sums(a, b, perms, block=block, max_memory=max_memory)
    statistic = dcor_from_exact(sums, unbiased)
    # T_pi = sum a_ij B~^pi_ij up to a constant: raw cross sum minus the centring term
    coef = 2.0 / (n - 2) if unbiased else 2.0 / n
    centring = sums.rb[perms] @ sums.ra  # (P,): sum_i ra_i rb_{pi(i)}
    t = cross - coef * centring
    scale = float(cross[0] + coef * centring[0])
    _, var_a, var_b = centred_stats(sums, unbiased)
    ta, tb = float(sums.ra.sum()), float(sums.rb.sum())
    if unbiased:
        cov = t / (n * (n - 3)) + ta * tb / (n * (n - 1) * (n - 2) * (n - 3))
    else:
        cov = t / n**2 + ta * tb / n**4
    denom = math.sqrt(abs(var_a * var_b))
    dcor2 = cov / denom if statistic != 0.0 and denom > 0 else torch.zeros_like(cov)
    return statistic, dcor2, t, scale


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
    # permute the cheaper variable: one with few distinct rows, else the one with fewer columns
    a, b = order_pair(a, b)
    if _levels(b) is None and _levels(a) is not None:
        a, b = b, a
    block = square_block(n, block_size, max_memory)
    if block_size is None and b.shape[1] == 1 and _levels(b) is None:
        block = min(block, _PERMUTATION_TILE)
    drawn = _permutations(n, num_permutations, random_state)
    perms = np.concatenate([np.arange(n)[None, :], drawn])  # row 0: the data themselves
    perm_t = torch.from_numpy(np.ascontiguousarray(perms)).to(a.device)
    statistic, _, t, scale = permutation_statistics(
        a, b, perm_t, unbiased=unbiased, block=block, max_memory=max_memory
    )
    tol = 64 * torch.finfo(torch.float64).eps * scale
    extreme = int((t[1:] >= t[0] - tol).sum())
    pvalue = (1 + extreme) / (1 + num_permutations)
    return DistanceCorrelationTestResult(statistic, pvalue, num_permutations)
