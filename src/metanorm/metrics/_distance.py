"""Pairwise Euclidean distances in tiles, so that no n×n matrix is ever stored.

The dCor² estimators (:mod:`metanorm.metrics.dcor`) and the permutation test
(:mod:`metanorm.metrics.permutation`) visit the upper triangle of the distance matrix in
``block × n`` tiles (:func:`upper_tiles`) and accumulate what they need from each. Distances are
float64; how they stay accurate is described in ``docs/metrics.md``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "LIVE_TILES",
    "CentredPoints",
    "add_row_sums",
    "exact_distances",
    "gram_distances",
    "resolve_block",
    "row_sums_1d",
    "upper_tiles",
]

#: Default memory budget, in bytes, for the distance tiles of one dcor² computation.
DEFAULT_MAX_MEMORY: int = 256 * 2**20

#: Number of (block × n) float64 tiles alive at once in a pass over two variables.
LIVE_TILES = 6

# Columns from which the matrix-product form of the distances is used (with exact fix-ups).
_MM_MIN_COLUMNS = 8
# Relative threshold under which a squared distance from the Gram form is recomputed exactly.
_MM_TAU = 1e-2
# Above this fraction of fix-ups in a tile, the whole tile is recomputed in the exact form.
_MM_MAX_FIXUP_FRACTION = 0.05


def resolve_block(n: int, block_size: int | None, max_memory: int, tiles: int) -> int:
    """Rows per tile: ``block_size`` if given, else the most that fit in ``max_memory``.

    Args:
        n: number of samples.
        block_size: rows per tile, or None to derive it from ``max_memory``.
        max_memory: budget in bytes for ``tiles`` float64 tiles of ``block × n``.
        tiles: number of tiles alive at once.

    Returns:
        The block size, between 1 and ``max(n, 1)``.

    Raises:
        ValueError: when ``block_size`` or ``max_memory`` is not a positive integer.
    """
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"expected block_size to be a positive integer, got {block_size!r}")
        return min(block_size, max(n, 1))
    if isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 1:
        raise ValueError(
            f"expected max_memory to be a positive number of bytes, got {max_memory!r}"
        )
    return max(1, min(n, max_memory // (8 * tiles * max(n, 1))))


def upper_tiles(n: int, block: int) -> list[tuple[slice, slice, float]]:
    """The upper triangle of an n×n symmetric matrix, in tiles of ``block`` rows.

    Args:
        n: matrix size.
        block: rows per tile.

    Returns:
        ``(rows, cols, weight)`` triples: for each block of rows, the diagonal tile (weight 1) and
        the tile of the columns after it (weight 2, as it stands for its mirror image too).

    Examples::

        >>> [(r.start, r.stop, c.start, c.stop, w) for r, c, w in upper_tiles(3, 2)]
        [(0, 2, 0, 2, 1.0), (0, 2, 2, 3, 2.0), (2, 3, 2, 3, 1.0)]
    """
    out = []
    for s in range(0, n, block):
        e = min(s + block, n)
        out.append((slice(s, e), slice(s, e), 1.0))
        if e < n:
            out.append((slice(s, e), slice(e, n), 2.0))
    return out


class CentredPoints:
    """Column-centred float64 points (centring leaves distances unchanged), tile by tile.

    Args:
        t: float64 samples ``(n, p)``.

    Attributes:
        x: the centred points ``(n, p)``.
        sq: their squared norms ``(n,)`` when the Gram form is used (``p >= 8``), else None.
    """

    def __init__(self, t: Tensor) -> None:
        self.x = t - t.mean(0, keepdim=True)
        self.sq = (self.x * self.x).sum(1) if self.x.shape[1] >= _MM_MIN_COLUMNS else None

    def tile(self, rows: slice, cols: slice) -> Tensor:
        """Distances between the points ``rows`` and ``cols``, a new ``(len(rows), len(cols))``.

        Equal slices make a diagonal tile, whose diagonal is exactly 0.
        """
        u, v = self.x[rows], self.x[cols]
        if self.sq is None:
            return exact_distances(u, v)
        return gram_distances(u, v, self.sq[rows], self.sq[cols], rows == cols)


def exact_distances(u: Tensor, v: Tensor) -> Tensor:
    """Euclidean distances ``(m, k)`` between the rows of ``u`` (m, p) and ``v`` (k, p).

    Computed from the differences (no matrix-product shortcut), so exact up to rounding.
    """
    if u.shape[1] == 1:
        return (u - v.T).abs_()
    return torch.cdist(u, v, compute_mode="donot_use_mm_for_euclid_dist")


def gram_distances(u: Tensor, v: Tensor, sq_u: Tensor, sq_v: Tensor, same: bool) -> Tensor:
    r"""Euclidean distances from the Gram form, with the inaccurate entries recomputed exactly.

    :math:`\lVert u\rVert^2 + \lVert v\rVert^2 - 2u\cdot v` is one matrix product; every entry
    below 1 % of :math:`\lVert u\rVert^2 + \lVert v\rVert^2` (near-ties, duplicates, zeros) is
    recomputed from the differences, so each distance keeps a relative error below about
    :math:`10^{-12}` for centred points.

    Args:
        u: points ``(m, p)``.
        v: points ``(k, p)``.
        sq_u: squared norms of ``u``, ``(m,)``.
        sq_v: squared norms of ``v``, ``(k,)``.
        same: ``u`` and ``v`` are the same rows, so the diagonal is the zero self-distance.

    Returns:
        Distances ``(m, k)``.
    """
    base = sq_u[:, None] + sq_v[None, :]
    d2 = torch.addmm(base, u, v.T, alpha=-2.0)
    # |error of d2| <= (p/2 + 2) * eps * base, so entries above tau * base keep a relative error
    # below (p/2 + 2) * eps / tau; the rest (near-ties, duplicates, zeros) are recomputed.
    diag = d2.diagonal()
    if same:
        diag.fill_(math.inf)  # known zeros: set after the check
    mask = d2 <= base.mul_(_MM_TAU)
    del base
    if bool(mask.any()):
        rows, cols = mask.nonzero(as_tuple=True)
        count = rows.numel()
        if count > _MM_MAX_FIXUP_FRACTION * mask.numel():
            return exact_distances(u, v)
        step = max(1, mask.numel() // u.shape[1])
        for s in range(0, count, step):
            r, c = rows[s : s + step], cols[s : s + step]
            d2[r, c] = (u[r] - v[c]).square_().sum(1)
    del mask
    if same:
        diag.zero_()
    return d2.sqrt_()


def add_row_sums(out: Tensor, tile: Tensor, rows: slice, cols: slice) -> None:
    """Adds one tile of a symmetric matrix to its row sums ``out`` (n,), in place.

    An off-diagonal tile (``rows != cols``) also adds its mirror image.
    """
    ones = torch.ones(max(tile.shape), dtype=tile.dtype, device=tile.device)
    out[rows] += tile @ ones[: tile.shape[1]]
    if rows != cols:
        out[cols] += ones[: tile.shape[0]] @ tile


def row_sums_1d(v: Tensor) -> Tensor:
    """``sum_j |v_i - v_j|`` for every i of a vector ``v`` (n,), in O(n log n).

    From the sorted values and their prefix sums; no distance is formed.

    Examples::

        >>> row_sums_1d(torch.tensor([0.0, 1.0, 3.0]))
        tensor([4., 3., 5.])
    """
    n = v.shape[0]
    s, order = torch.sort(v)
    prefix = torch.cumsum(s, 0) - s  # sum of the values before position k
    k = torch.arange(n, dtype=v.dtype, device=v.device)
    sums = s * (2.0 * k - n) + s.sum() - 2.0 * prefix
    out = torch.empty_like(v)
    out[order] = sums
    return out
