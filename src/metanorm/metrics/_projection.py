r"""dCor² by random projections (Huang & Huo 2022) on top of an O(n log n) one-dimensional dCov².

For one-dimensional samples the sum :math:`S = \sum_{ij} |x_i - x_j|\,|y_i - y_j|` takes
O(n log n) (Huo & Székely 2016): with the samples in ``y`` order,
:math:`S = 2\sum_{i<j} |x_i - x_j|(y_j - y_i)`, and splitting the pairs by whether
:math:`x_i < x_j` leaves the "dominance" sums
:math:`D_w(j) = \sum_{i<j,\ x_i<x_j} w_i` for :math:`w \in \{1, x, y, xy\}`. They are computed
here level by level over the bits of the ``x`` ranks (a wavelet tree): at each level a group of
samples sharing the higher bits is split, stably, into the lower and upper half of its ranks, and
every sample of the upper half adds the prefix sum (within its group, in ``y`` order) of the
lower half's weights. Each level is a cumulative sum, a gather and a scatter over (K, n, 4):
all K projections at once, no Python loop over samples.

With :math:`C_p = \mathrm{E}|u_1| = \Gamma(p/2) / (\sqrt\pi\,\Gamma((p+1)/2))` for ``u`` uniform
on the sphere, :math:`\lVert d\rVert = \mathrm{E}_u|u^\top d| / C_p`; both dCov² estimators are
bilinear in the two distance matrices, so
:math:`\mathrm{dCov}^2(x, y) = \mathrm{E}_{u,v}[\mathrm{dCov}^2(u^\top x, v^\top y)] / (C_p C_q)`
and :math:`\mathrm{dVar}^2(x) = \mathrm{E}_{u,u'}[\mathrm{dCov}^2(u^\top x, u'^\top x)] / C_p^2`
with ``u``, ``u'`` independent. A one-column variable needs no projection (``C_1 = 1``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ProjectionTerms", "cross_sums_1d", "projection_constant", "projection_terms"]

# Projected values processed at once (K·n), which bounds the (K, n, 4) work arrays.
_CHUNK_VALUES = 2**21


def projection_constant(p: int) -> float:
    r""":math:`C_p = \mathrm{E}|u_1|` for ``u`` uniform on the unit sphere of :math:`\mathbb{R}^p`.

    Examples::

        >>> projection_constant(1), round(projection_constant(2), 6), round(2 / 3.14159265, 6)
        (1.0, 0.63662, 0.63662)
    """
    if p == 1:
        return 1.0  # |u_1| = 1 on the 0-sphere {-1, 1}
    return math.exp(math.lgamma(p / 2) - math.lgamma((p + 1) / 2)) / math.sqrt(math.pi)


def row_sums_1d_batched(v: Tensor) -> Tensor:
    """``sum_j |v_kj - v_ki|`` for every row ``k`` and sample ``i`` of ``v`` (K, n)."""
    n = v.shape[1]
    s, order = torch.sort(v, dim=1)
    prefix = torch.cumsum(s, 1) - s
    k = torch.arange(n, dtype=v.dtype, device=v.device)
    sums = s * (2.0 * k - n) + s.sum(1, keepdim=True) - 2.0 * prefix
    return torch.empty_like(v).scatter_(1, order, sums)


def _levels(w: Tensor, rank: Tensor, top: int, bottom: int) -> tuple[Tensor, Tensor, Tensor]:
    """Adds up the dominance terms of the levels ``top - 1`` down to ``bottom`` (see module doc).

    Args:
        w: weights ``(4, K, m)`` in the current order (groups by the rank bits above ``top``).
        rank: ranks ``(K, m)``, in ``[0, m)``, same order.
        top: one more than the first level.
        bottom: the last level.

    Returns:
        ``(K,)``: ``sum_j 2 coef_j . D_j`` over these levels, and ``w`` and ``rank`` in the
        order they leave (groups by the rank bits from ``bottom`` up).
    """
    _, num, m = w.shape
    dev, dtype = w.device, w.dtype
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=dtype, device=dev).view(4, 1, 1)
    flip = [3, 2, 1, 0]
    zero = torch.zeros((), dtype=dtype, device=dev)
    pos = torch.arange(m, device=dev).expand(num, m)
    total = torch.zeros(num, dtype=dtype, device=dev)
    for level in range(top - 1, bottom - 1, -1):
        upper = (rank >> level) & 1
        is_upper = upper.bool()
        # inclusive prefix sums of the lower halves' weights; an upper sample adds nothing to
        # its own, so at an upper sample they are the sums over the samples before it
        cs = torch.cumsum(torch.where(is_upper, zero, w), 2)
        start = (rank >> (level + 1)) << (level + 1)  # where the sample's group starts
        prev = (start - 1).clamp_(min=0)
        off = torch.gather(cs, 2, prev.expand(4, num, m)) * (start > 0)
        rel = cs.sub_(off)  # sums within the group, up to and including the sample
        coef = torch.where(is_upper, w[flip], zero).mul_(sign)
        total += 2.0 * (coef * rel).sum((0, 2))
        # stable split of each group: its lower half first, both in y order
        zeros_upto = rel[0].round_().long()  # lower samples of the group up to this one
        size_lower = torch.clamp(m - start, max=1 << level)
        new = torch.where(
            is_upper, start + size_lower + (pos - start - zeros_upto), start + zeros_upto - 1
        )
        w = torch.empty_like(w).scatter_(2, new.expand(4, num, m), w)
        rank = torch.empty_like(rank).scatter_(1, new, rank)
    return total, w, rank


def cross_sums_1d(x: Tensor, y: Tensor, segment: int = 2**15) -> Tensor:
    r""":math:`\sum_{ij} |x_{ki} - x_{kj}|\,|y_{ki} - y_{kj}|` for every row ``k``, in O(n log n).

    Args:
        x: float64 ``(K, n)``.
        y: float64 ``(K, n)``.
        segment: samples per segment for the lower levels (a power of 2; cache-sized).

    Returns:
        ``(K,)``.
    """
    num, n = x.shape
    dev = x.device
    if n < 2:
        return torch.zeros(num, dtype=x.dtype, device=dev)
    x = x - x.mean(1, keepdim=True)
    y = y - y.mean(1, keepdim=True)
    ys, oy = torch.sort(y, dim=1)
    xs = torch.gather(x, 1, oy)
    ox = torch.argsort(xs, dim=1)
    pos = torch.arange(n, device=dev).expand(num, n)
    rank = torch.empty_like(ox).scatter_(1, ox, pos)  # x rank of each sample, in y order
    # channels first, (4, K, n): the weights (1, x, y, xy) of each sample
    w = torch.stack([torch.ones_like(xs), xs, ys, xs * ys])
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=x.dtype, device=dev).view(4, 1, 1)
    flip = [3, 2, 1, 0]
    # sum_{i<j} |x_i - x_j| (y_j - y_i) = sum_j 2 coef_j . D_j - coef_j . T_j with
    # coef_j = (x_j y_j, -y_j, -x_j, 1) = sign * flip(w_j) and T_j the prefix sums of w before j
    before = torch.cumsum(w, 2) - w
    total = -(w[flip] * sign * before).sum((0, 2))
    del before
    levels = max(1, (n - 1).bit_length())
    seg_bits = max(1, segment.bit_length() - 1)
    if levels <= seg_bits:
        return 2.0 * (total + _levels(w, rank, levels, 0)[0])
    # the top levels over everything; after them the groups are contiguous segments of
    # 2**seg_bits samples, each of which goes through the remaining levels while in the cache
    top, w, rank = _levels(w, rank, levels, seg_bits)
    total += top
    size = 1 << seg_bits
    for s in range(0, n, size):
        e = min(s + size, n)
        total += _levels(w[:, :, s:e].contiguous(), rank[:, s:e] - s, seg_bits, 0)[0]
    return 2.0 * total


class ProjectionTerms:
    """Per-projection dCov² of ``(u'x, v'y)``, ``(u'x, u2'x)`` and ``(v'y, v2'y)``, unscaled."""

    def __init__(self, cov: Tensor, var_x: Tensor, var_y: Tensor, cp: float, cq: float) -> None:
        self.cov, self.var_x, self.var_y, self.cp, self.cq = cov, var_x, var_y, cp, cq

    def estimate(self, keep: Tensor | None = None) -> float:
        """dCor² from the projections ``keep`` (a boolean mask; default: all)."""
        cov, vx, vy = self.cov, self.var_x, self.var_y
        if keep is not None:
            cov, vx, vy = cov[keep], vx[keep], vy[keep]
        c = float(cov.mean()) / (self.cp * self.cq)
        a = float(vx.mean()) / self.cp**2
        b = float(vy.mean()) / self.cq**2
        if a <= 0.0 or b <= 0.0:
            return 0.0
        return c / math.sqrt(a * b)

    def jackknife(self) -> tuple[float, float]:
        """(estimate, standard error by the delete-one jackknife over projections)."""
        num = self.cov.shape[0]
        full = self.estimate()
        if num < 2:
            return full, math.nan
        keep = torch.ones(num, dtype=torch.bool, device=self.cov.device)
        loo = []
        for k in range(num):
            keep[k] = False
            loo.append(self.estimate(keep))
            keep[k] = True
        t = torch.tensor(loo, dtype=torch.float64)
        se = math.sqrt((num - 1) / num * float(((t - t.mean()) ** 2).sum()))
        return full, se


def _stat(s: Tensor, ra: Tensor, rb: Tensor, num: int, unbiased: bool) -> Tensor:
    """dCov² (rows) from the cross sums ``s`` and the row sums ``ra``, ``rb`` (K, n)."""
    n = float(num)
    rab = (ra * rb).sum(1)
    ta, tb = ra.sum(1), rb.sum(1)
    if unbiased:
        return (
            s / (n * (n - 3))
            - 2.0 * rab / (n * (n - 2) * (n - 3))
            + ta * tb / (n * (n - 1) * (n - 2) * (n - 3))
        )
    return s / n**2 - 2.0 * rab / n**3 + ta * tb / n**4


def dcov_1d(x: Tensor, y: Tensor, unbiased: bool) -> Tensor:
    """dCov² between the rows of ``x`` and ``y`` (K, n) of one-dimensional samples, O(n log n)."""
    n = x.shape[1]
    out = []
    step = max(1, _CHUNK_VALUES // max(n, 1))
    for s in range(0, x.shape[0], step):
        a, b = x[s : s + step], y[s : s + step]
        cross = cross_sums_1d(a, b)
        out.append(_stat(cross, row_sums_1d_batched(a), row_sums_1d_batched(b), n, unbiased))
    return torch.cat(out)


def _scale(t: Tensor) -> Tensor:
    """``1 / max |t|`` (1 for a zero tensor), without an ``|t|``-sized temporary.

    dCov² terms of rescaled variables change by a common factor and their ratio not at all;
    scaling keeps the squared values away from overflow. The factor depends on the data only,
    so every process and every share of the projections uses the same one.
    """
    top = torch.maximum(t.amax(), -t.amin())
    return 1.0 / torch.where(top > 0, top, torch.ones_like(top))


def _directions(dim: int, num: int, gen: torch.Generator, device: torch.device) -> Tensor:
    u = torch.randn(dim, num, generator=gen, dtype=torch.float64)
    return (u / u.norm(dim=0, keepdim=True)).to(device)


def projection_terms(
    x: Tensor,
    y: Tensor,
    *,
    unbiased: bool,
    num_projections: int,
    seed: int,
    part: int = 0,
    parts: int = 1,
) -> tuple[ProjectionTerms, Tensor]:
    """The per-projection terms of the projections ``part::parts`` (all directions are drawn).

    Args:
        x: float64 samples ``(n, p)``.
        y: float64 samples ``(n, q)``.
        unbiased: the estimator of each one-dimensional term.
        num_projections: number K of directions for each variable.
        seed: seed of the directions (drawn on the CPU, so every device and process agrees).
        part: which share of the projections to compute.
        parts: number of shares.

    Returns:
        The terms of this share and the indices of its projections.
    """
    n, p = x.shape
    q = y.shape[1]
    gen = torch.Generator().manual_seed(seed)
    dev = x.device
    u, u2 = _directions(p, num_projections, gen, dev), _directions(p, num_projections, gen, dev)
    mine = torch.arange(part, num_projections, parts)
    idx = mine.to(dev)
    sx = _scale(x)
    zx = ((x @ u[:, idx]).T * sx).contiguous()  # (k, n)
    zx2 = ((x @ u2[:, idx]).T * sx).contiguous()
    y = y * _scale(y)
    if q == 1:
        zy = y[:, 0].expand(idx.numel(), n).contiguous()
        var_y = dcov_1d(y[:, 0][None], y[:, 0][None], unbiased).expand(idx.numel())
    else:
        v, v2 = _directions(q, num_projections, gen, dev), _directions(q, num_projections, gen, dev)
        zy = (y @ v[:, idx]).T.contiguous()
        var_y = dcov_1d(zy, (y @ v2[:, idx]).T.contiguous(), unbiased)
    cov = dcov_1d(zx, zy, unbiased)
    var_x = dcov_1d(zx, zx2, unbiased)
    cp, cq = projection_constant(p), projection_constant(q)
    return ProjectionTerms(cov, var_x, var_y.clone(), cp, cq), mine
