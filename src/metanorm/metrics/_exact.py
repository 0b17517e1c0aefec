r"""The exact dCor² sums in one pass over square tiles of the distance matrices.

Everything both estimators need follows from five sums over all pairs (see ``docs/metrics.md``):
:math:`S_{ab} = \sum_{ij} a_{ij} b_{ij}`, the row sums ``ra``, ``rb`` of the two distance
matrices, and :math:`\sum a_{ij}^2`, :math:`\sum b_{ij}^2`, which have closed forms. Centring
is linear, so no tile is centred: :math:`\sum a_{ij}\tilde B_{ij}` follows from
:math:`S_{ab}` and the row sums.

Per tile the ``x`` distances come from one matrix product of augmented points
(:math:`[u, \lVert u\rVert^2, 1]\cdot[-2v, 1, \lVert v\rVert^2]^\top`), a row-minimum check that
finds the rare entries to recompute exactly, and one square root. When ``y`` has one column the
rows are sorted by ``y`` first: in a tile whose rows all come before its columns,
:math:`b_{ij} = y_j - y_i`, so :math:`\sum_{ij} a_{ij} b_{ij}` and the row and column sums of the
tile are two thin matrix products, and no ``y`` tile is formed.

The tiles are a list of ``(row block, column block)`` pairs of the upper triangle; a share of
them (``part``, ``parts``) can be computed by each of several processes and the sums added up.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from metanorm.metrics._distance import exact_distances, row_sums_1d

__all__ = ["ExactSums", "Points", "exact_sums", "square_tiles"]

# Columns from which the matrix-product form of the distances is used (with exact fix-ups).
_MM_MIN_COLUMNS = 8
# Relative threshold under which a squared distance from the Gram form is recomputed exactly.
_MM_TAU = 1e-2


class ExactSums(NamedTuple):
    """Sums over all pairs; ``ra`` and ``rb`` are in the order of ``perm`` (see below)."""

    #: Number of samples.
    n: int
    #: :math:`\sum_{ij} a_{ij} b_{ij}` (0-d tensor; a partial sum when tiles are shared).
    s_ab: Tensor
    #: :math:`\sum_{ij} a_{ij}^2` (closed form).
    s_aa: float
    #: :math:`\sum_{ij} b_{ij}^2` (closed form).
    s_bb: float
    #: Row sums of the x distances ``(n,)`` (partial when tiles are shared).
    ra: Tensor
    #: Row sums of the y distances ``(n,)`` (partial when shared and ``y`` has several columns).
    rb: Tensor
    #: Whether ``rb`` is partial (a tile sum) or complete (closed form, one column).
    rb_partial: bool


class Points:
    """Centred float64 points, augmented for the one-product Gram form when they are wide.

    Args:
        t: samples ``(n, p)``.
    """

    def __init__(self, t: Tensor) -> None:
        self.x = t - t.mean(0, keepdim=True)
        self.gram = self.x.shape[1] >= _MM_MIN_COLUMNS
        if self.gram:
            sq = self.x.square().sum(1, keepdim=True)
            one = torch.ones_like(sq)
            self.sq = sq[:, 0]
            self.left = torch.cat([self.x, sq, one], 1)  # [u, |u|², 1]
            self.right = torch.cat([-2.0 * self.x, one, sq], 1)  # [-2v, 1, |v|²]

    def sum_sq_distances(self) -> float:
        """The sum of all squared distances, ``2n`` times that to the mean (no tile needed)."""
        return float(2.0 * self.x.shape[0] * self.x.square().sum())

    def tile(self, rows: slice, cols: slice) -> Tensor:
        """Distances between the points ``rows`` and ``cols`` (equal slices: zero diagonal)."""
        u, v = self.x[rows], self.x[cols]
        if not self.gram:
            return exact_distances(u, v)
        same = rows == cols
        d2 = torch.mm(self.left[rows], self.right[cols].T)
        if same:
            d2.diagonal().fill_(math.inf)
        # every entry below tau * (|u|² + |v|²) is recomputed; a row whose minimum is above
        # tau * (|u|² + max |v|²) has none (this also catches negative rounding)
        low = d2.amin(1) <= _MM_TAU * (self.sq[rows] + self.sq[cols].amax())
        if bool(low.any()):
            _fix_rows(d2, u, v, self.sq[rows], self.sq[cols], low.nonzero().squeeze(1))
        if same:
            d2.diagonal().zero_()
        return d2.sqrt_()


def _fix_rows(d2: Tensor, u: Tensor, v: Tensor, sq_u: Tensor, sq_v: Tensor, rows: Tensor) -> None:
    """Recomputes from the differences the entries of ``rows`` that the Gram form got wrong."""
    sub = d2[rows]
    mask = sub <= _MM_TAU * (sq_u[rows, None] + sq_v[None, :])
    if int(mask.sum()) > 0.05 * mask.numel():  # many near-ties: the whole rows, exactly
        fixed = exact_distances(u[rows], v).square_()
        keep = torch.isinf(sub)  # the diagonal of a diagonal tile stays marked
        d2[rows] = torch.where(keep, sub, fixed)
        return
    r, c = mask.nonzero(as_tuple=True)
    step = max(1, mask.numel() // max(1, u.shape[1]))
    for s in range(0, r.numel(), step):
        rr, cc = r[s : s + step], c[s : s + step]
        sub[rr, cc] = (u[rows[rr]] - v[cc]).square_().sum(1)
    d2[rows] = sub


def square_tiles(n: int, block: int) -> list[tuple[slice, slice]]:
    """The tiles ``(rows, cols)`` of the upper triangle in blocks of ``block``, diagonal ones first.

    Examples::

        >>> [(r.start, c.start) for r, c in square_tiles(5, 2)]
        [(0, 0), (2, 2), (4, 4), (0, 2), (0, 4), (2, 4)]
    """
    starts = list(range(0, n, block))
    blocks = [slice(s, min(s + block, n)) for s in starts]
    out = [(b, b) for b in blocks]
    out += [(blocks[i], blocks[j]) for i in range(len(blocks)) for j in range(i + 1, len(blocks))]
    return out


def exact_sums(
    x: Tensor, y: Tensor, *, block: int, part: int = 0, parts: int = 1
) -> tuple[ExactSums, Tensor | None]:
    """The sums of :class:`ExactSums` from the tiles ``part::parts`` of :func:`square_tiles`.

    Args:
        x: float64 samples ``(n, p)``.
        y: float64 samples ``(n, q)``; put the variable with fewer columns here.
        block: side of the square tiles.
        part: which share of the tiles to compute.
        parts: into how many shares the tiles are cut (one per process).

    Returns:
        The sums, and the order of the samples they use (None: the input order). ``ra`` and
        ``rb`` are in that order; the statistics only use their sums and dot product.
    """
    n = x.shape[0]
    px = Points(x)
    dev = px.x.device
    f64 = torch.float64
    tiles = square_tiles(n, block)[part::parts]
    ra = torch.zeros(n, dtype=f64, device=dev)
    s_ab = torch.zeros((), dtype=f64, device=dev)
    if y.shape[1] == 1:
        yv, order = torch.sort(y[:, 0] - y[:, 0].mean(), stable=True)
        px = Points(x[order])
        rb = row_sums_1d(yv)
        s_bb = float(2.0 * n * yv.square().sum())
        ones = torch.ones(min(block, n), dtype=f64, device=dev)
        for rows, cols in tiles:
            at = px.tile(rows, cols)
            if rows == cols:
                bt = (yv[rows, None] - yv[None, rows]).abs_()
                s_ab += torch.dot(at.reshape(-1), bt.reshape(-1))
                ra[rows] += torch.mv(at, ones[: at.shape[1]])
                continue
            # rows before cols in y order: b_ij = (y_j - c) + (c - y_i) >= 0 with c = y_cols[0]
            c = yv[cols.start]
            left = torch.stack([ones[: at.shape[0]], c - yv[rows]], 0)  # (2, k)
            h = torch.mm(left, at)  # column sums, sum_i (c - y_i) a_ij
            ra[rows] += torch.mv(at, ones[: at.shape[1]])
            ra[cols] += h[0]
            s_ab += 2.0 * (torch.mv(at, yv[cols] - c).sum() + h[1].sum())
        return ExactSums(n, s_ab, px.sum_sq_distances(), s_bb, ra, rb, False), order
    py = Points(y)
    rb = torch.zeros(n, dtype=f64, device=dev)
    ones = torch.ones(min(block, n), dtype=f64, device=dev)
    for rows, cols in tiles:
        at = px.tile(rows, cols)
        bt = py.tile(rows, cols)
        weight = 1.0 if rows == cols else 2.0
        s_ab += weight * torch.dot(at.reshape(-1), bt.reshape(-1))
        k, w = at.shape
        ra[rows] += torch.mv(at, ones[:w])
        rb[rows] += torch.mv(bt, ones[:w])
        if rows != cols:
            ra[cols] += torch.mv(at.T, ones[:k])
            rb[cols] += torch.mv(bt.T, ones[:k])
    sums = ExactSums(n, s_ab, px.sum_sq_distances(), py.sum_sq_distances(), ra, rb, True)
    return sums, None


def centred_stats(sums: ExactSums, unbiased: bool) -> tuple[float, float, float]:
    """(dCov², dVar²_x, dVar²_y) of the chosen estimator from complete sums."""
    n = sums.n
    ra, rb = sums.ra, sums.rb
    ta, tb = float(ra.sum()), float(rb.sum())
    sab = float(sums.s_ab)
    rab, raa, rbb = float(torch.dot(ra, rb)), float(torch.dot(ra, ra)), float(torch.dot(rb, rb))

    def stat(s: float, r: float, t1: float, t2: float) -> float:
        if unbiased:
            return (
                s / (n * (n - 3))
                - 2.0 * r / (n * (n - 2) * (n - 3))
                + t1 * t2 / (n * (n - 1) * (n - 2) * (n - 3))
            )
        return s / n**2 - 2.0 * r / n**3 + t1 * t2 / n**4

    return stat(sab, rab, ta, tb), stat(sums.s_aa, raa, ta, ta), stat(sums.s_bb, rbb, tb, tb)
