r"""dCor² by random projections (Huang & Huo 2022) on top of an O(n log n) one-dimensional dCov².

For one-dimensional samples the sum :math:`S = \sum_{ij} |x_i - x_j|\,|y_i - y_j|` takes
O(n log n) (Huo & Székely 2016): with the samples in ``y`` order,
:math:`S = 2\sum_{i<j} |x_i - x_j|(y_j - y_i)`, and splitting the pairs by whether
:math:`x_i < x_j` leaves the "dominance" sums
:math:`D_w(j) = \sum_{i<j,\ x_i<x_j} w_i` for :math:`w \in \{1, x, y, xy\}`. They are computed
here level by level over the bits of the ``x`` ranks (a wavelet tree; the samples padded to a
power of 2 with zero weights): at each level every aligned group of samples sharing the higher
bits is split, stably, into the lower and upper half of its ranks, and every sample of the upper
half adds the prefix sum (within its group, in ``y`` order) of the lower half's weights. Each
level is a cumulative sum over (K, 4, n), one small matrix product per row that gives the four
weighted sums at once, and a scatter: all K projections at once, no Python loop over samples.
The lower levels run segment by segment, each segment in the cache. The two sorts use numpy's
vectorised ``argsort`` on the CPU.

With :math:`C_p = \mathrm{E}|u_1| = \Gamma(p/2) / (\sqrt\pi\,\Gamma((p+1)/2))` for ``u`` uniform
on the sphere, :math:`\lVert d\rVert = \mathrm{E}_u|u^\top d| / C_p`; both dCov² estimators are
bilinear in the two distance matrices, so
:math:`\mathrm{dCov}^2(x, y) = \mathrm{E}_{u,v}[\mathrm{dCov}^2(u^\top x, v^\top y)] / (C_p C_q)`
and :math:`\mathrm{dVar}^2(x) = \mathrm{E}_{u,u'}[\mathrm{dCov}^2(u^\top x, u'^\top x)] / C_p^2`
with ``u``, ``u'`` independent. A one-column variable needs no projection (``C_1 = 1``).

Control variates. The terms spread widely over directions (in high dimension a random direction
catches a dependence confined to a few coordinates only weakly), so the plain average converges
slowly. Functions of the directions whose mean over the sphere is known in closed form remove
much of that spread: for fixed symmetric ``A``, a fixed vector ``c`` and ``u``, ``u'``
independent and uniform on the sphere of :math:`\mathbb{R}^p`,
:math:`\mathrm{E}[u^\top Au] = \operatorname{tr}A / p`, :math:`\mathrm{E}[(c^\top u)^2] =
\lVert c\rVert^2 / p`, :math:`\mathrm{E}[(u^\top Au')^2] = \operatorname{tr}A^2 / p^2` and
:math:`\mathrm{E}[u^\top Au\;u'^\top Au'] = (\operatorname{tr}A / p)^2`. The matrices come from
a pilot subsample of the rows: the covariance of ``x`` (the distance-variance terms, and the
scale of each projection); for a one-column ``y`` the moments of ``x`` weighted by the
standardised mid-ranks ``r`` of ``y`` (``c = E[r x]``, ``E[r x x']``, ``E[(r^2 - 1) x x']``: a
dependence in the mean and in the spread of ``x``); for several columns the cross-covariance
``C`` (:math:`(u^\top Cv)^2`). Each term's average is then the regression estimator
:math:`\bar g - \hat\beta^\top(\bar h - \mathrm{E}h)` (``beta`` by least squares over the
projections), with the same expectation up to O(1/K) and, when the features explain the spread,
a far smaller variance. The standard error is the delta method on the regression residuals,
each divided by one less its leverage (the HC3 form, close to a jackknife of the regression).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Features",
    "ProjectionTerms",
    "cross_sums_1d",
    "projection_constant",
    "projection_terms",
]

# Rows of the pilot subsample from which the control variates' matrices are computed, and the
# largest rows x columns² spent on them.
_PILOT_ROWS = 50_000
_PILOT_WORK = 2 * 10**10
# Widest variable given control variates (the pilot keeps a few p x p matrices).
_MAX_CV_COLUMNS = 4096

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


def _argsort_rows(t: Tensor) -> Tensor:
    """``argsort`` of each row; on the CPU numpy's (vectorised, several times torch's speed)."""
    if t.device.type == "cpu":
        return torch.from_numpy(np.argsort(t.detach().contiguous().numpy(), axis=1))
    return torch.argsort(t, dim=1)


def _sorted_row_sums(s: Tensor) -> Tensor:
    """``sum_j |s_kj - s_ki|`` for rows ``s`` (K, n) sorted in increasing order."""
    n = s.shape[1]
    k = torch.arange(n, dtype=s.dtype, device=s.device)
    return s * (2.0 * k - n) + s.sum(1, keepdim=True) - 2.0 * (torch.cumsum(s, 1) - s)


def _levels(w: Tensor, rank: Tensor, top: int, bottom: int) -> tuple[Tensor, Tensor, Tensor]:
    """Adds up the dominance terms of the levels ``top - 1`` down to ``bottom`` (see module doc).

    Args:
        w: weights ``(R, 4, M)`` (channels ``1, x, y, xy``), ``M`` a multiple of ``2**top``, in
            the current order: aligned groups of ``2**top`` samples (those that share the rank
            bits from ``top`` up), each group in ``y`` order.
        rank: ranks ``(R, M)``, same order.
        top: one more than the first level.
        bottom: the last level.

    Returns:
        ``(R,)``: ``sum_j coef_j . D_j`` over these levels, with
        ``coef_j = (x_j y_j, -y_j, -x_j, 1)``; and ``w`` and ``rank`` in the order the levels
        leave (aligned groups of ``2**bottom``).
    """
    rows, _, m = w.shape
    dev = w.device
    total = torch.zeros(rows, dtype=w.dtype, device=dev)
    for level in range(top - 1, bottom - 1, -1):
        size, half = 2 << level, 1 << level
        groups = m // size
        r = rank.view(rows, 1, groups, size)
        wv = w.view(rows, 4, groups, size)
        lower = (r & half) == 0
        # prefix sums (within each group, in y order) of the lower half's weights: at an upper
        # sample, the sums over the lower samples before it
        cs = torch.cumsum(wv * lower.to(w.dtype), 3)
        # sum over the upper samples j of coef_j . cs_j, coef being w with its channels reversed
        # and signed: the anti-diagonal of the 4 x 4 products cs w^T (one small matrix product
        # per row) over all samples, less that over the lower ones, which is the sum of
        # (x_j - x_i)(y_j - y_i) over the pairs of lower samples: c Sxy - Sx Sy per group
        prods = torch.bmm(cs.view(rows, 4, m), w.transpose(1, 2))
        total += prods[:, 0, 3] - prods[:, 1, 2] - prods[:, 2, 1] + prods[:, 3, 0]
        sums = cs[..., -1]  # (rows, 4, groups): count, Sx, Sy, Sxy of each lower half
        total -= (sums[:, 0] * sums[:, 3] - sums[:, 1] * sums[:, 2]).sum(1)
        del cs, prods
        # stable split of each group: its lower half first, both halves in y order
        zeros = torch.cumsum(lower, 3)  # lower samples up to and including this one
        pos = torch.arange(half, size + half, device=dev)
        new = torch.where(lower, zeros - 1, pos - zeros)
        w = torch.empty_like(wv).scatter_(3, new.expand(rows, 4, groups, size), wv).view(w.shape)
        rank = torch.empty_like(r).scatter_(3, new, r).view(rank.shape)
    return total, w, rank


def pair_sums_1d(x: Tensor, y: Tensor, segment: int = 2**15) -> tuple[Tensor, ...]:
    r"""The sums a one-dimensional dCov² is made of, for every row pair, in O(n log n).

    Args:
        x: float64 ``(K, n)``.
        y: float64 ``(K, n)``, or ``(1, n)`` for the same ``y`` with every row of ``x`` (sorted
            once).
        segment: samples per segment for the lower levels (a power of 2; cache-sized).

    Returns:
        ``(K,)`` each: :math:`\sum_{ij} |x_i - x_j|\,|y_i - y_j|`, :math:`\sum_i a_i b_i`,
        :math:`\sum_i a_i` and :math:`\sum_i b_i`, where :math:`a_i = \sum_j |x_i - x_j|`
        and :math:`b_i = \sum_j |y_i - y_j|`.
    """
    num, n = x.shape
    dev, dtype = x.device, x.dtype
    x = x - x.mean(1, keepdim=True)
    y = y - y.mean(1, keepdim=True)
    oy = _argsort_rows(y)
    ys = torch.gather(y, 1, oy)
    xs = torch.gather(x, 1, oy.expand(num, n))  # x in y order
    ox = _argsort_rows(xs)
    xsorted = torch.gather(xs, 1, ox)
    ra_sorted = _sorted_row_sums(xsorted)
    del xsorted
    rb = _sorted_row_sums(ys)  # already in y order
    ra = torch.empty_like(xs).scatter_(1, ox, ra_sorted)
    rab = (ra * rb).sum(1)
    ta, tb = ra_sorted.sum(1), rb.sum(1).expand(num)
    del ra, ra_sorted, rb
    if n < 2:
        return torch.zeros(num, dtype=dtype, device=dev), rab, ta, tb
    ys = ys.expand(num, n)
    # sum_{i<j} |x_i - x_j| (y_j - y_i) over the pairs in y order is
    # -sum_{i<j} (x_j - x_i)(y_j - y_i) + 2 sum_{i<j, x_i<x_j} (x_j - x_i)(y_j - y_i); the first
    # sum is n sum x y - sum x sum y, the second the dominance sums of the levels
    pairs = n * (xs * ys).sum(1) - xs.sum(1) * ys.sum(1)
    levels = max(1, (n - 1).bit_length())
    size = 1 << levels  # padded with zero weights and the top ranks, after every sample
    rank = torch.arange(size, dtype=torch.int32, device=dev).repeat(num, 1)
    rank[:, :n].scatter_(1, ox, rank[:, :n].clone())  # x rank of each sample, in y order
    del ox
    w = torch.zeros(num, 4, size, dtype=dtype, device=dev)
    w[:, 0, :n] = 1.0
    w[:, 1, :n] = xs
    w[:, 2, :n] = ys
    torch.mul(xs, ys, out=w[:, 3, :n])
    del xs, ys
    seg_bits = max(1, segment.bit_length() - 1)
    if levels <= seg_bits:
        dom = _levels(w, rank, levels, 0)[0]
    else:
        # the top levels over everything; after them the groups are aligned segments of
        # 2**seg_bits samples, each of which goes through the remaining levels in the cache
        dom, w, rank = _levels(w, rank, levels, seg_bits)
        seg = 1 << seg_bits
        blocks = size // seg
        w = w.view(num, 4, blocks, seg).transpose(1, 2).reshape(num * blocks, 4, seg)
        rank = rank.reshape(num * blocks, seg)
        parts = torch.cat(
            [_levels(w[b : b + 1], rank[b : b + 1], seg_bits, 0)[0] for b in range(num * blocks)]
        )
        dom = dom + parts.view(num, blocks).sum(1)
    return 2.0 * (2.0 * dom - pairs), rab, ta, tb


def cross_sums_1d(x: Tensor, y: Tensor, segment: int = 2**15) -> Tensor:
    r""":math:`\sum_{ij} |x_{ki} - x_{kj}|\,|y_{ki} - y_{kj}|` for every row ``k``, in O(n log n).

    Args:
        x: float64 ``(K, n)``.
        y: float64 ``(K, n)``.
        segment: samples per segment for the lower levels (a power of 2; cache-sized).

    Returns:
        ``(K,)``.
    """
    return pair_sums_1d(x, y, segment)[0]


class Features(NamedTuple):
    """Control variates of one kind of term: values ``(K, r)`` and their exact means ``(r,)``."""

    values: Tensor
    means: Tensor


def _regression_mean(g: Tensor, f: Features | None) -> tuple[float, Tensor, int]:
    """The control-variate mean of ``g``, its leave-one-out residuals, and the columns used.

    The residuals are divided by one less their leverage (the "HC3" form, close to a
    jackknife of the regression), so that their squares give the estimator's variance.
    """
    num = g.shape[0]
    centred = g - g.mean()
    if f is None or f.values.shape[1] == 0:
        return float(g.mean()), centred, 0
    h = f.values
    sd = h.std(0)
    used = sd > 0
    if not bool(used.any()):
        return float(g.mean()), centred, 0
    hs = (h[:, used] - h[:, used].mean(0)) / sd[used]
    pinv = torch.linalg.pinv(hs)
    beta = pinv @ centred
    shift = (h[:, used].mean(0) - f.means[used]) / sd[used]
    leverage = 1.0 / num + (hs * pinv.T).sum(1)
    resid = (centred - hs @ beta) / (1.0 - leverage).clamp_min(1.0 / num)
    return float(g.mean() - shift @ beta), resid, int(used.sum())


class ProjectionTerms:
    """Per-projection dCov² of ``(u'x, v'y)``, ``(u'x, u2'x)`` and ``(v'y, v2'y)``, unscaled.

    With ``features`` (one :class:`Features` or ``None`` per term, in the order ``cov``,
    ``var_x``, ``var_y``), :meth:`result` uses them as control variates.
    """

    def __init__(
        self,
        cov: Tensor,
        var_x: Tensor,
        var_y: Tensor,
        cp: float,
        cq: float,
        features: tuple[Features | None, Features | None, Features | None] | None = None,
    ) -> None:
        self.cov, self.var_x, self.var_y, self.cp, self.cq = cov, var_x, var_y, cp, cq
        self.features = features

    def estimate(self, keep: Tensor | None = None) -> float:
        """dCor² from the plain averages of the projections ``keep`` (a mask; default: all)."""
        cov, vx, vy = self.cov, self.var_x, self.var_y
        if keep is not None:
            cov, vx, vy = cov[keep], vx[keep], vy[keep]
        return self._ratio(float(cov.mean()), float(vx.mean()), float(vy.mean()))

    def _ratio(self, cov: float, vx: float, vy: float) -> float:
        c = cov / (self.cp * self.cq)
        a = vx / self.cp**2
        b = vy / self.cq**2
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

    def result(self) -> tuple[float, float]:
        """(estimate, standard error): with control variates if the terms have features."""
        if self.features is None:
            return self.jackknife()
        num = self.cov.shape[0]
        means, resid, used = [], [], 0
        for g, f in zip((self.cov, self.var_x, self.var_y), self.features, strict=True):
            m, e, r = _regression_mean(g, f)
            means.append(m)
            resid.append(e)
            used = max(used, r)
        if used == 0:
            return self.jackknife()
        c, a, b = means
        value = self._ratio(c, a, b)
        if a <= 0.0 or b <= 0.0:
            return value, math.nan
        # delta method: value = k c (ab)^(-1/2), so d value = k (ab)^(-1/2) (dc - c da/2a - c db/2b)
        scale = 1.0 / (self.cp * self.cq) / math.sqrt(a / self.cp**2 * b / self.cq**2)
        psi = scale * (resid[0] - 0.5 * c * resid[1] / a - 0.5 * c * resid[2] / b)
        return value, math.sqrt(float((psi**2).sum())) / num


def _stat(s: Tensor, rab: Tensor, ta: Tensor, tb: Tensor, num: int, unbiased: bool) -> Tensor:
    """dCov² from the cross sums ``s``, the row-sum products ``rab``, the totals ``ta``, ``tb``."""
    n = float(num)
    if unbiased:
        return (
            s / (n * (n - 3))
            - 2.0 * rab / (n * (n - 2) * (n - 3))
            + ta * tb / (n * (n - 1) * (n - 2) * (n - 3))
        )
    return s / n**2 - 2.0 * rab / n**3 + ta * tb / n**4


def dcov_1d(x: Tensor, y: Tensor, unbiased: bool) -> Tensor:
    """dCov² between the rows of ``x`` (K, n) and ``y`` (K, n) or (1, n), O(n log n) each.

    The rows are taken in chunks of about ``_CHUNK_VALUES`` values. On the CPU with several
    torch threads, the chunks run side by side, one per thread, each on one intra-op thread
    (torch's thread count is set to 1 for the duration and restored): the many small
    operations of a chunk gain little from a second intra-op thread, two chunks at once
    nearly twice. Every chunk is computed the same way whatever the thread count, so the
    result does not depend on it.
    """
    n = x.shape[1]
    step = max(1, _CHUNK_VALUES // max(n, 1))
    starts = range(0, x.shape[0], step)

    def chunk(s: int) -> Tensor:
        a = x[s : s + step]
        b = y if y.shape[0] == 1 else y[s : s + step]
        cross, rab, ta, tb = pair_sums_1d(a, b)
        return _stat(cross, rab, ta, tb, n, unbiased)

    if x.device.type != "cpu":
        return torch.cat([chunk(s) for s in starts])
    workers = min(torch.get_num_threads(), len(starts))
    with _intra_op_threads(1):
        if workers < 2:
            return torch.cat([chunk(s) for s in starts])
        with ThreadPoolExecutor(workers) as pool:
            return torch.cat(list(pool.map(chunk, starts)))


@contextlib.contextmanager
def _intra_op_threads(num: int) -> Iterator[None]:
    """Sets torch's intra-op thread count for the block (it is process-wide), then restores it."""
    before = torch.get_num_threads()
    if num != before:
        torch.set_num_threads(num)
    try:
        yield
    finally:
        if num != before:
            torch.set_num_threads(before)


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


def _form(left: Tensor, mat: Tensor, right: Tensor) -> Tensor:
    """``left[:, k]ᵀ · mat · right[:, k]`` for every column ``k``."""
    return (left * (mat @ right)).sum(0)


def _features(values: list[Tensor], means: list[float]) -> Features:
    """Feature columns ``(K, r)`` and their exact means on the columns' device."""
    out = torch.stack(values, 1)
    return Features(out, torch.tensor(means, dtype=out.dtype, device=out.device))


def _pair_features(u: Tensor, u2: Tensor, sigma: Tensor) -> Features:
    """Control variates of the distance-variance terms of the direction pairs ``(u, u2)``."""
    p = u.shape[0]
    b, s1, s2 = _form(u2, sigma, u), _form(u, sigma, u), _form(u2, sigma, u2)
    t1, t2 = float(torch.trace(sigma)), float(sigma.square().sum())
    return _features([b**2, s1, s2, s1 * s2], [t2 / p**2, t1 / p, t1 / p, (t1 / p) ** 2])


def _standard_ranks(t: Tensor) -> Tensor | None:
    """Mid-ranks of ``t``, centred and scaled to unit variance (``None`` if ``t`` is constant)."""
    levels, inverse, counts = torch.unique(t, return_inverse=True, return_counts=True)
    if levels.numel() < 2:
        return None
    top = torch.cumsum(counts, 0).to(t.dtype)
    r = (top - (counts.to(t.dtype) - 1.0) / 2.0)[inverse]
    r = r - r.mean()
    return r / r.square().mean().sqrt()


def _one_column_features(xp: Tensor, w: Tensor, sigma: Tensor, u: Tensor) -> Features:
    """Control variates of ``dCov²(u'x, y)`` for a one-column ``y`` (``w``: its standard ranks)."""
    p, m = xp.shape[1], xp.shape[0]
    c = xp.T @ w / m
    w2 = w * w - (w * w).mean()
    mats = [(xp * w[:, None]).T @ xp / m, (xp * w2[:, None]).T @ xp / m, sigma]
    values = [(c @ u) ** 2] + [_form(u, a, u) for a in mats]
    means = [float(c.square().sum()) / p] + [float(torch.trace(a)) / p for a in mats]
    return _features(values, means)


def _cross_features(cross: Tensor, sx: Tensor, sy: Tensor, u: Tensor, v: Tensor) -> Features:
    """Control variates of ``dCov²(u'x, v'y)`` from the cross-covariance ``(p, q)``."""
    p, q = cross.shape
    values = [_form(u, cross, v) ** 2, _form(u, sx, u), _form(v, sy, v)]
    means = [
        float(cross.square().sum()) / (p * q),
        float(torch.trace(sx)) / p,
        float(torch.trace(sy)) / q,
    ]
    return _features(values, means)


def _truncate(f: Features | None, num: int) -> Features | None:
    """At most ``num // 3 - 1`` control variates, so that the regression keeps its footing."""
    if f is None:
        return None
    keep = max(0, num // 3 - 1)
    return Features(f.values[:, :keep], f.means[:keep])


def control_variates(
    x: Tensor,
    y: Tensor,
    dirs: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
    gen: torch.Generator,
) -> tuple[Features | None, Features | None, Features | None]:
    """The control variates of the three kinds of term, from a pilot subsample of the rows.

    Args:
        x: float64 samples ``(n, p)``.
        y: float64 samples ``(n, q)``.
        dirs: the directions ``u``, ``u2`` ``(p, K)`` and ``v``, ``v2`` ``(q, K)`` (``None`` for
            a one-column ``y``).
        gen: CPU generator that draws the pilot rows.

    Returns:
        Features of the ``cov``, ``var_x`` and ``var_y`` terms (``None``: none for that term).
    """
    n, p = x.shape
    q = y.shape[1]
    if max(p, q) > _MAX_CV_COLUMNS or p < 2:
        return None, None, None
    u, u2, v, v2 = dirs
    num = u.shape[1]
    m = min(n, _PILOT_ROWS, max(256, _PILOT_WORK // max(p, q) ** 2))
    rows = torch.randperm(n, generator=gen)[:m].to(x.device)
    xp = x[rows]
    xp = xp - xp.mean(0, keepdim=True)
    yp = y[rows]
    yp = yp - yp.mean(0, keepdim=True)
    sigma_x = xp.T @ xp / m
    var_x = _pair_features(u, u2, sigma_x)
    if v is None or v2 is None:
        w = _standard_ranks(yp[:, 0])
        cov = None if w is None else _one_column_features(xp, w, sigma_x, u)
        var_y = None
    else:
        sigma_y = yp.T @ yp / m
        cov = _cross_features(xp.T @ yp / m, sigma_x, sigma_y, u, v)
        var_y = _pair_features(v, v2, sigma_y)
    return _truncate(cov, num), _truncate(var_x, num), _truncate(var_y, num)


def projection_terms(
    x: Tensor,
    y: Tensor,
    *,
    unbiased: bool,
    num_projections: int,
    seed: int,
    part: int = 0,
    parts: int = 1,
    control: bool = True,
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
        control: attach the control variates of all K projections (see the module doc).

    Returns:
        The terms of this share and the indices of its projections.
    """
    p, q = x.shape[1], y.shape[1]
    gen = torch.Generator().manual_seed(seed)
    dev = x.device
    u, u2 = _directions(p, num_projections, gen, dev), _directions(p, num_projections, gen, dev)
    mine = torch.arange(part, num_projections, parts)
    idx = mine.to(dev)
    sx = _scale(x)
    zx = ((x @ u[:, idx]).T * sx).contiguous()  # (k, n)
    zx2 = ((x @ u2[:, idx]).T * sx).contiguous()
    ys = y * _scale(y)
    v = v2 = None
    if q == 1:
        zy = ys[:, 0][None]  # the same row with every projection of x: sorted once
        var_y = dcov_1d(zy, zy, unbiased).expand(idx.numel())
    else:
        v, v2 = _directions(q, num_projections, gen, dev), _directions(q, num_projections, gen, dev)
        zy = (ys @ v[:, idx]).T.contiguous()
        var_y = dcov_1d(zy, (ys @ v2[:, idx]).T.contiguous(), unbiased)
    cov = dcov_1d(zx, zy, unbiased)
    var_x = dcov_1d(zx, zx2, unbiased)
    cp, cq = projection_constant(p), projection_constant(q)
    features = control_variates(x, y, (u, u2, v, v2), gen) if control else None
    return ProjectionTerms(cov, var_x, var_y.clone(), cp, cq, features), mine
