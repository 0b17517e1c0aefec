r"""Stateless bias and accuracy metrics.

Squared distance correlation (Székely, Rizzo & Bakirov 2007) between the rows of ``x`` (n×p) and
``y`` (n×q), with :math:`a_{ij} = \lVert x_i - x_j \rVert` and :math:`b_{ij} = \lVert y_i - y_j
\rVert`:

.. math::

    \mathrm{dCor}^2_n(x, y) = \frac{\langle A, B \rangle}{\sqrt{\langle A, A \rangle
    \langle B, B \rangle}}

where :math:`A, B` are the double-centred distance matrices and :math:`\langle A, B\rangle =
\frac{1}{n^2}\sum_{ij} A_{ij} B_{ij}` (the biased V-statistic), or the U-centred matrices and
:math:`\frac{1}{n(n-3)}\sum_{i \ne j}` (the bias-corrected estimator of Székely & Rizzo 2014, the
one the paper's code reports; it can be slightly negative and needs n > 3).

How it is computed. Neither n×n matrix is ever stored. Rows are processed in blocks of
``block_size`` rows against the rows at or after the block (the matrices are symmetric, so only
the upper triangle of tiles is visited), with only a few ``block × n`` float64 tiles alive:

* pass 1 over the variable with fewer columns (call it ``y``; dCor² is symmetric) gives the row
  sums of its distance matrix, hence its exact centring (for one column, from sorted values and
  prefix sums in O(n log n) instead);
* pass 2 computes both distance tiles, centres the ``y`` tile exactly, and accumulates
  :math:`\sum a_{ij}\tilde B_{ij}` (which equals :math:`\sum \tilde A_{ij}\tilde B_{ij}` because
  the rows of :math:`\tilde B` sum to zero), :math:`\sum \tilde B_{ij}^2` and the row sums of ``a``;
  with :math:`\sum a_{ij}^2 = 2n\sum_i \lVert x_i - \bar x\rVert^2`,
  :math:`\langle A, A\rangle` follows in closed form.

Distances are computed in float64. For inputs with many columns the Gram-matrix trick
(:math:`\lVert u\rVert^2 + \lVert v\rVert^2 - 2u\cdot v`, a matrix product) is used after centring
the columns, and every entry where it could lose precision (a squared distance below 1 % of
:math:`\lVert u\rVert^2 + \lVert v\rVert^2`, which includes all ties) is recomputed exactly from
the differences, so each distance keeps a relative error below about :math:`10^{-12}`. Inputs
with few columns use the exact difference form throughout.

Degenerate inputs follow the ``dcor`` package's definition: when either distance variance is zero
(a constant ``x`` or ``y``, n = 1, or a U-centred matrix that vanishes, e.g. a binary variable
with a single odd sample) the result is ``0.0``. A variance counts as zero when it is below
rounding level, ``256·eps·mean(distance)²``; ``dcor`` compares the rounded value with exactly 0
and so, in those cases, sometimes returns rounding noise divided by rounding noise (its O(n log n)
path for one-column inputs can even give e.g. -2.2 for a constant ``x``); we return 0 there. The
bias-corrected estimator raises ``ValueError`` for n ≤ 3 (``dcor`` returns NaN with a division
warning).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from metanorm._validation import as_float_tensor, check_finite, describe

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "DistanceCorrelationTestResult",
    "balanced_accuracy",
    "distance_correlation_sqr",
    "distance_correlation_test",
    "group_accuracy",
    "grouped_distance_correlation_sqr",
]

#: Default memory budget, in bytes, for the distance tiles of one dcor² computation.
DEFAULT_MAX_MEMORY: int = 256 * 2**20

# Number of (block × n) float64 tiles alive at once in pass 2 (distances of x and y, products).
_LIVE_TILES = 6
# Columns from which the matrix-product form of the distances is used (with exact fix-ups).
_MM_MIN_COLUMNS = 8
# Relative threshold under which a squared distance from the Gram form is recomputed exactly.
_MM_TAU = 1e-2
# Above this fraction of fix-ups in a tile, the whole tile is recomputed in the exact form.
_MM_MAX_FIXUP_FRACTION = 0.05
# A permuted variable with at most this many distinct rows uses the matrix-product route.
_DISCRETE_MAX_LEVELS = 32
# Distance variances below this times (mean distance)² are rounding noise, i.e. zero.
_ZERO_VARIANCE_EPS = 256 * float(np.finfo(np.float64).eps)
# Default number of permutations of the test.
DEFAULT_PERMUTATIONS = 199


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------


def _as_samples(x: Any, name: str, device: torch.device | str | None = None) -> Tensor:
    """A float64 (n, p) tensor: vectors become columns, trailing dims are flattened per sample."""
    t = as_float_tensor(x, name, dtype=torch.float64, device=device)
    if t.dim() == 0:
        raise ValueError(f"expected {name} of shape (n,) or (n, p), got a scalar ({describe(x)})")
    if t.dim() == 1:
        t = t.unsqueeze(1)
    elif t.dim() > 2:
        t = t.reshape(t.shape[0], -1)
    if t.shape[1] == 0:
        raise ValueError(f"expected {name} to have at least one column, got {describe(x)}")
    check_finite(t, name)
    return t


def _dcor_update(x: Any, y: Any, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Validates a pair of samples; returns float64 (n, p) and (n, q) tensors on one device.

    The device is ``device`` if given, else the device of ``x`` when it is a tensor, else that of
    ``y``, else the CPU.
    """
    if device is None:
        if isinstance(x, Tensor):
            device = x.device
        elif isinstance(y, Tensor):
            device = y.device
    a = _as_samples(x, "x", device)
    b = _as_samples(y, "y", a.device)
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"expected x and y to have the same number of rows (samples), "
            f"got {a.shape[0]} and {b.shape[0]}"
        )
    return a, b


def _check_n(n: int, unbiased: bool) -> None:
    if n < 1:
        raise ValueError("expected at least one sample, got 0 rows")
    if unbiased and n <= 3:
        raise ValueError(
            f"the bias-corrected (unbiased=True) estimator needs more than 3 samples, got {n}"
        )


def _resolve_block(n: int, block_size: int | None, max_memory: int, tiles: int) -> int:
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"expected block_size to be a positive integer, got {block_size!r}")
        return min(block_size, max(n, 1))
    if isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 1:
        raise ValueError(
            f"expected max_memory to be a positive number of bytes, got {max_memory!r}"
        )
    return max(1, min(n, max_memory // (8 * tiles * max(n, 1))))


# --------------------------------------------------------------------------------------------
# distance tiles
# --------------------------------------------------------------------------------------------


class _Points:
    """Column-centred float64 points with cached squared norms (centring leaves distances)."""

    def __init__(self, t: Tensor) -> None:
        self.x = t - t.mean(0, keepdim=True)
        self.use_mm = self.x.shape[1] >= _MM_MIN_COLUMNS
        self.sq = (self.x * self.x).sum(1) if self.use_mm else None

    def tile(self, rows: slice, cols: slice) -> Tensor:
        """Distances between ``rows`` and ``cols`` (a new tensor); equal slices: a diagonal tile."""
        u, v = self.x[rows], self.x[cols]
        if self.sq is None:
            return _exact_distances(u, v)
        return _gram_distances(u, v, self.sq[rows], self.sq[cols], rows == cols)


def _exact_distances(u: Tensor, v: Tensor) -> Tensor:
    if u.shape[1] == 1:
        return (u - v.T).abs_()
    return torch.cdist(u, v, compute_mode="donot_use_mm_for_euclid_dist")


def _gram_distances(u: Tensor, v: Tensor, sq_u: Tensor, sq_v: Tensor, same: bool) -> Tensor:
    """Distances from the Gram form, with inaccurate entries recomputed exactly.

    ``same``: ``u`` and ``v`` are the same rows, so the diagonal is the zero self-distance.
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
            return _exact_distances(u, v)
        step = max(1, mask.numel() // u.shape[1])
        for s in range(0, count, step):
            r, c = rows[s : s + step], cols[s : s + step]
            d2[r, c] = (u[r] - v[c]).square_().sum(1)
    del mask
    if same:
        diag.zero_()
    return d2.sqrt_()


# --------------------------------------------------------------------------------------------
# the blocked computation
# --------------------------------------------------------------------------------------------


class _Sums(NamedTuple):
    n: int
    s_ab: float  # sum_ij a_ij * B~_ij
    s_aa: float  # sum_ij a_ij^2
    s_bb: float  # sum_ij B~_ij^2
    ra: Tensor  # row sums of a
    rb: Tensor  # row sums of b
    perm_raw: Tensor | None  # sum_ij a_ij * b_{pi(i) pi(j)} for each permutation


def _levels(t: Tensor) -> tuple[Tensor, Tensor] | None:
    """(distinct rows, code of each row) when ``t`` has few distinct rows, else None."""
    if t.shape[1] > _MM_MIN_COLUMNS:
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


class _Permuted:
    """What pass 2 needs to accumulate the permuted cross sums of the ``y`` variable."""

    def __init__(self, y: _Points, perms: Tensor, max_memory: int) -> None:
        self.perms = perms  # (P, n) long, on the device
        self.max_memory = max_memory
        found = _levels(y.x)
        self.discrete = found is not None
        self.y = y.x
        if found is not None:
            levels, codes = found
            self.num_levels = levels.shape[0]
            self.level_dist = _exact_distances(levels, levels)  # K×K
            self.codes = codes.reshape(-1)[perms]  # (P, n): level of y_{pi(i)}

    def accumulate(
        self, out: Tensor, a_tile: Tensor, rows: slice, cols: slice, weight: float
    ) -> None:
        """Adds ``weight * sum_ij a_ij b_{pi(i) pi(j)}`` over one tile to ``out`` (P,), every pi.

        ``a_tile`` holds the x distances between ``rows`` and ``cols``.
        """
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


def _add_row_sums(out: Tensor, tile: Tensor, rows: slice, cols: slice) -> None:
    """Adds a tile of a symmetric matrix to its row sums (an off-diagonal tile counts twice)."""
    ones = torch.ones(max(tile.shape), dtype=tile.dtype, device=tile.device)
    out[rows] += tile @ ones[: tile.shape[1]]
    if rows != cols:
        out[cols] += ones[: tile.shape[0]] @ tile


def _row_sums_1d(v: Tensor) -> Tensor:
    """``sum_j |v_i - v_j|`` for every i in O(n log n), from the sorted values and prefix sums."""
    n = v.shape[0]
    s, order = torch.sort(v)
    prefix = torch.cumsum(s, 0) - s  # sum of the values before position k
    k = torch.arange(n, dtype=v.dtype, device=v.device)
    sums = s * (2.0 * k - n) + s.sum() - 2.0 * prefix
    out = torch.empty_like(v)
    out[order] = sums
    return out


def _tiles(n: int, block: int) -> list[tuple[slice, slice, float]]:
    """The upper triangle in tiles: (rows, cols, weight); off-diagonal tiles stand for two."""
    out = []
    for s in range(0, n, block):
        e = min(s + block, n)
        out.append((slice(s, e), slice(s, e), 1.0))
        if e < n:
            out.append((slice(s, e), slice(e, n), 2.0))
    return out


def _blocked_sums(
    x: Tensor,
    y: Tensor,
    *,
    unbiased: bool,
    block: int,
    perms: Tensor | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> _Sums:
    """Both passes over the upper triangle of tiles; ``y`` is centred exactly (see module doc)."""
    n = x.shape[0]
    px, py = _Points(x), _Points(y)
    dev = px.x.device
    f64 = torch.float64

    # pass 1: row sums of the y distances
    tiles = _tiles(n, block)
    if py.x.shape[1] == 1:
        rb = _row_sums_1d(py.x[:, 0])
    else:
        rb = torch.zeros(n, dtype=f64, device=dev)
        for rows, cols, _ in tiles:
            _add_row_sums(rb, py.tile(rows, cols), rows, cols)
    tb = rb.sum()
    if unbiased:
        row, const = rb / (n - 2), tb / ((n - 1) * (n - 2))
    else:
        row, const = rb / n, tb / (n * n)
    row_c = row - const  # B~_ij = b_ij - row_i - row_j + const

    permuted = None if perms is None else _Permuted(py, perms, max_memory)
    perm_raw = None if perms is None else torch.zeros(perms.shape[0], dtype=f64, device=dev)

    # pass 2: cross sums
    ra = torch.zeros(n, dtype=f64, device=dev)
    zero = torch.zeros((), dtype=f64, device=dev)
    s_ab, s_bb = zero.clone(), zero.clone()
    # sum_ij |x_i - x_j|^2 = 2n sum_i |x_i - mean|^2 (px.x is centred): no tile pass needed
    s_aa = 2.0 * n * px.x.square().sum()
    for rows, cols, weight in tiles:
        at = px.tile(rows, cols)
        bt = py.tile(rows, cols)
        bt -= row_c[rows, None]
        bt -= row[None, cols]
        if unbiased and rows == cols:
            bt.diagonal().zero_()  # U-centred matrices have a zero diagonal
        fa, fb = at.reshape(-1), bt.reshape(-1)
        s_ab += weight * torch.dot(fa, fb)
        s_bb += weight * torch.dot(fb, fb)
        del bt, fb
        _add_row_sums(ra, at, rows, cols)
        if permuted is not None and perm_raw is not None:
            permuted.accumulate(perm_raw, at, rows, cols, weight)
    return _Sums(n, float(s_ab), float(s_aa), float(s_bb), ra, rb, perm_raw)


def _stats_from_sums(sums: _Sums, unbiased: bool) -> tuple[float, float, float]:
    """(dCov², dVar²_x, dVar²_y) of the chosen estimator."""
    n = sums.n
    ra = sums.ra
    ta = float(ra.sum())
    sra2 = float(torch.dot(ra, ra))
    if unbiased:
        c1 = n * (n - 3)
        cov = sums.s_ab / c1
        var_y = sums.s_bb / c1
        var_x = (
            sums.s_aa / c1
            - 2.0 * sra2 / (n * (n - 2) * (n - 3))
            + ta * ta / (n * (n - 1) * (n - 2) * (n - 3))
        )
    else:
        cov = sums.s_ab / n**2
        var_y = sums.s_bb / n**2
        var_x = sums.s_aa / n**2 - 2.0 * sra2 / n**3 + ta * ta / n**4
    return cov, var_x, var_y


def _correlation(sums: _Sums, unbiased: bool) -> float:
    """dCor² from the sums; 0 when a distance variance is zero up to rounding."""
    cov, var_x, var_y = _stats_from_sums(sums, unbiased)
    n2 = float(sums.n) ** 2
    mean_a, mean_b = float(sums.ra.sum()) / n2, float(sums.rb.sum()) / n2
    # A variance is a difference of sums of size mean² (rounding ~ eps * mean²); below that
    # level it is zero (a constant variable, or a U-centred matrix that vanishes exactly).
    eps = _ZERO_VARIANCE_EPS
    if mean_a == 0.0 or mean_b == 0.0:  # all distances zero: a constant variable
        return 0.0
    if abs(var_x) <= eps * mean_a**2 or abs(var_y) <= eps * mean_b**2:
        return 0.0
    denom = math.sqrt(abs(var_x * var_y))
    return 0.0 if denom == 0.0 else cov / denom


def _order(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """dCor² is symmetric: put the variable with fewer columns second (its pass is cheaper)."""
    return (y, x) if x.shape[1] < y.shape[1] else (x, y)


def _dcor_compute(
    x: Tensor,
    y: Tensor,
    *,
    unbiased: bool = False,
    block_size: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
) -> float:
    """dCor² of validated float64 samples (see :func:`_dcor_update`)."""
    n = x.shape[0]
    _check_n(n, unbiased)
    block = _resolve_block(n, block_size, max_memory, _LIVE_TILES)
    x, y = _order(x, y)
    sums = _blocked_sums(x, y, unbiased=unbiased, block=block)
    return _correlation(sums, unbiased)


# --------------------------------------------------------------------------------------------
# public functionals: distance correlation
# --------------------------------------------------------------------------------------------


def distance_correlation_sqr(
    x: Any,
    y: Any,
    *,
    unbiased: bool = False,
    block_size: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    device: torch.device | str | None = None,
) -> float:
    r"""Squared distance correlation between the rows of ``x`` and ``y``.

    The biased estimator (``unbiased=False``) equals ``dcor.distance_correlation_sqr``; the
    bias-corrected one (``unbiased=True``, the estimator the paper reports) equals
    ``dcor.u_distance_correlation_sqr``. Computed in float64 in blocks of rows, so memory is
    O(n · block) and no n×n matrix is ever formed (see :mod:`metanorm.metrics.functional`).

    Args:
        x: samples of the first variable, one row per sample: numpy array, tensor (any device) or
            nested sequence. Trailing dimensions are flattened (a conv feature map of shape
            (n, C, H, W) is a sample of C·H·W values).
        y: samples of the second variable, same number of rows.
        unbiased: the bias-corrected (U-centred) estimator, which can be slightly negative and
            needs n > 3. Default: ``False``.
        block_size: rows per tile. Default: chosen from ``max_memory``.
        max_memory: memory budget in bytes for the tiles when ``block_size`` is None.
            Default: 256 MiB.
        device: where to compute. Default: the device of ``x`` (or of ``y``) when a tensor, else
            the CPU.

    Returns:
        The estimate as a Python float; ``0.0`` when ``x`` or ``y`` is constant (as ``dcor``).

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
    a, b = _dcor_update(x, y, device)
    return _dcor_compute(a, b, unbiased=unbiased, block_size=block_size, max_memory=max_memory)


def _as_labels(labels: Any, name: str, n: int | None = None) -> np.ndarray:
    """A 1-D numpy array of labels (numbers or strings) from a tensor, array or sequence."""
    if isinstance(labels, Tensor):
        arr = labels.detach().cpu().numpy()
    elif hasattr(labels, "to_numpy"):
        arr = np.asarray(labels.to_numpy())
    else:
        arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"expected {name} to be 1-D (one label per sample), got {describe(arr)}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(
            f"expected {name} to have {n} entries (one per sample), got {arr.shape[0]}"
        )
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"expected {name} to be finite, got NaN or infinite label(s)")
    if arr.dtype == object and all(isinstance(v, str) for v in arr):
        arr = arr.astype(str)
    return arr


def _key(level: Any) -> Hashable:
    """A plain Python dict key for a numpy label."""
    return level.item() if hasattr(level, "item") else level


def grouped_distance_correlation_sqr(
    x: Any,
    y: Any,
    groups: Any,
    *,
    unbiased: bool = False,
    block_size: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    device: torch.device | str | None = None,
) -> dict[Any, float]:
    r"""dCor² within each group (the paper reports it per label class): ``{group: value}``.

    Each value equals :func:`distance_correlation_sqr` on the rows of that group.

    Args:
        x: features, (n, p) or (n,) or (n, \*).
        y: metadata, (n, q) or (n,).
        groups: one label per row (numbers or strings); the keys of the result, in sorted order.
        unbiased: see :func:`distance_correlation_sqr`.
        block_size: see :func:`distance_correlation_sqr`.
        max_memory: see :func:`distance_correlation_sqr`.
        device: see :func:`distance_correlation_sqr`.

    Returns:
        ``{group: dCor²}`` with plain Python keys.

    Raises:
        ValueError: as :func:`distance_correlation_sqr`; also when ``groups`` does not have one
            entry per row, or (``unbiased=True``) when a group has 3 samples or fewer (the
            message lists them).

    Examples::

        >>> import numpy as np
        >>> from metanorm.metrics import grouped_distance_correlation_sqr
        >>> x = np.arange(8.0)
        >>> sorted(grouped_distance_correlation_sqr(x, x**2, [0, 1] * 4))
        [0, 1]
    """
    a, b = _dcor_update(x, y, device)
    g = _as_labels(groups, "groups", a.shape[0])
    levels, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    if unbiased:
        small = [
            f"{_key(lv)!r} ({c} samples)" for lv, c in zip(levels, counts, strict=True) if c <= 3
        ]
        if small:
            raise ValueError(
                "the bias-corrected (unbiased=True) estimator needs more than 3 samples per "
                f"group, got {', '.join(small)}"
            )
    out: dict[Any, float] = {}
    inv = torch.from_numpy(inverse.reshape(-1)).to(a.device)
    for i, level in enumerate(levels):
        sel = (inv == i).nonzero().squeeze(1)
        out[_key(level)] = _dcor_compute(
            a[sel], b[sel], unbiased=unbiased, block_size=block_size, max_memory=max_memory
        )
    return out


class DistanceCorrelationTestResult(NamedTuple):
    """Result of :func:`distance_correlation_test`."""

    #: dCor² of the data (the chosen estimator).
    statistic: float
    #: Permutation p-value, ``(1 + #{permuted >= observed}) / (1 + num_permutations)``.
    pvalue: float
    #: Number of random permutations drawn.
    num_permutations: int


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
    block_size: int | None = None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    device: torch.device | str | None = None,
) -> DistanceCorrelationTestResult:
    r"""Permutation test of independence between ``x`` and ``y`` based on dCor².

    The rows of one variable are permuted ``num_permutations`` times at random; the p-value is
    :math:`(1 + \#\{T_\pi \ge T\}) / (1 + B)` (Phipson & Smyth 2010), where :math:`T` is the
    statistic on the data and ties within rounding count as at least as extreme, so it is never 0
    and a test at level α rejects with probability at most α under independence.

    Cost: the distance matrix of the unpermuted variable (the one with more columns) is computed
    once, blockwise, and reused by every permutation; only the cross sums
    :math:`\sum_{ij} a_{ij} b_{\pi(i)\pi(j)}` are redone per permutation (the centring terms of
    a permutation follow from row sums in O(n)). When the permuted variable has at most 32
    distinct rows (a label, a site, a binary confounder) a block of permutations is one matrix
    product, ``(block × n) @ (n × permutations·levels)``; otherwise every permutation costs
    O(n²·q) elementwise work. Memory stays O(n · block) plus the (B × n) permutation indices.

    Args:
        x: samples of the first variable (as :func:`distance_correlation_sqr`).
        y: samples of the second variable, same number of rows.
        num_permutations: number B of random permutations. Default: 199 (p-values down to
            0.005).
        random_state: seed (int), ``numpy.random.Generator`` or ``torch.Generator``; the same
            seed gives the same p-value. Default: None (fresh randomness).
        unbiased: use the bias-corrected estimator as the statistic. Default: ``False``.
        block_size: rows per tile. Default: chosen from ``max_memory``.
        max_memory: memory budget in bytes for the tiles. Default: 256 MiB.
        device: where to compute. Default: the device of ``x`` (or ``y``) when a tensor.

    Returns:
        :class:`DistanceCorrelationTestResult` ``(statistic, pvalue, num_permutations)``.

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
    a, b = _dcor_update(x, y, device)
    n = a.shape[0]
    _check_n(n, unbiased)
    block = _resolve_block(n, block_size, max_memory, _LIVE_TILES)
    # permute the cheaper variable: one with few distinct rows, else the one with fewer columns
    a, b = _order(a, b)
    if _levels(b) is None and _levels(a) is not None:
        a, b = b, a
    drawn = _permutations(n, num_permutations, random_state)
    perms = np.concatenate([np.arange(n)[None, :], drawn])  # row 0: the data themselves
    perm_t = torch.from_numpy(np.ascontiguousarray(perms)).to(a.device)
    sums = _blocked_sums(a, b, unbiased=unbiased, block=block, perms=perm_t, max_memory=max_memory)
    statistic = _correlation(sums, unbiased)
    assert sums.perm_raw is not None
    # T_pi = sum a_ij B~^pi_ij up to a constant: raw cross sum minus the centring term
    coef = 2.0 / (n - 2) if unbiased else 2.0 / n
    centring = sums.rb[perm_t] @ sums.ra  # (P+1,): sum_i ra_i rb_{pi(i)}
    t = sums.perm_raw - coef * centring
    scale = float(sums.perm_raw[0] + coef * centring[0])
    tol = 64 * torch.finfo(torch.float64).eps * scale
    extreme = int((t[1:] >= t[0] - tol).sum())
    pvalue = (1 + extreme) / (1 + num_permutations)
    return DistanceCorrelationTestResult(statistic, pvalue, num_permutations)


# --------------------------------------------------------------------------------------------
# accuracy
# --------------------------------------------------------------------------------------------


def _pair_labels(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t = _as_labels(y_true, "y_true")
    p = _as_labels(y_pred, "y_pred")
    if t.shape[0] != p.shape[0]:
        raise ValueError(
            f"expected y_true and y_pred to have the same length, got {t.shape[0]} and {p.shape[0]}"
        )
    return t, p


def _class_counts_update(y_true: Any, y_pred: Any) -> dict[Hashable, tuple[int, int]]:
    """Per class of ``y_true``: (number of samples, number predicted correctly)."""
    t, p = _pair_labels(y_true, y_pred)
    levels, inverse, counts = np.unique(t, return_inverse=True, return_counts=True)
    hits = np.bincount(inverse.reshape(-1), weights=(t == p), minlength=len(levels))
    return {_key(lv): (int(c), int(h)) for lv, c, h in zip(levels, counts, hits, strict=True)}


def _balanced_accuracy_compute(counts: dict[Hashable, tuple[int, int]], adjusted: bool) -> float:
    if not counts:
        raise ValueError("expected at least one sample to compute balanced accuracy, got none")
    recalls = [h / c for c, h in counts.values()]
    score = float(np.mean(recalls))
    if adjusted:
        chance = 1.0 / len(recalls)
        score = (score - chance) / (1.0 - chance) if chance < 1.0 else 0.0
    return score


def balanced_accuracy(y_true: Any, y_pred: Any, *, adjusted: bool = False) -> float:
    """Balanced accuracy: the mean over the classes of ``y_true`` of the per-class recall.

    Equals ``sklearn.metrics.balanced_accuracy_score``: classes that appear only in ``y_pred``
    do not count as classes (they only lower the recall of the true classes they were predicted
    for); a class never predicted has recall 0.

    Args:
        y_true: true labels, one per sample (numbers or strings; array, tensor or sequence).
        y_pred: predicted labels, same length.
        adjusted: rescale so that chance is 0 and perfect is 1, as scikit-learn's
            ``adjusted=True``. Default: ``False``.

    Returns:
        A float in [0, 1] (``adjusted=False``).

    Raises:
        ValueError: on empty input, a length mismatch or labels that are not 1-D.

    Examples::

        >>> from metanorm.metrics import balanced_accuracy
        >>> balanced_accuracy([0, 0, 0, 1], [0, 0, 1, 1])
        0.8333333333333333
    """
    return _balanced_accuracy_compute(_class_counts_update(y_true, y_pred), adjusted)


def _group_counts_update(y_true: Any, y_pred: Any, groups: Any) -> dict[Hashable, tuple[int, int]]:
    """Per group: (number of samples, number predicted correctly)."""
    t, p = _pair_labels(y_true, y_pred)
    g = _as_labels(groups, "groups", t.shape[0])
    levels, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    hits = np.bincount(inverse.reshape(-1), weights=(t == p), minlength=len(levels))
    return {_key(lv): (int(c), int(h)) for lv, c, h in zip(levels, counts, hits, strict=True)}


def group_accuracy(y_true: Any, y_pred: Any, groups: Any) -> dict[Any, float]:
    """Accuracy within each metadata group (per site, per shade bin): ``{group: accuracy}``.

    Args:
        y_true: true labels, one per sample.
        y_pred: predicted labels, same length.
        groups: group of each sample (numbers or strings), same length.

    Returns:
        ``{group: accuracy}`` with plain Python keys, in sorted order of the groups.

    Raises:
        ValueError: on a length mismatch or labels that are not 1-D.

    Examples::

        >>> from metanorm.metrics import group_accuracy
        >>> group_accuracy([1, 1, 0, 0], [1, 0, 0, 0], ["a", "a", "b", "b"])
        {'a': 0.5, 'b': 1.0}
    """
    return {g: h / c for g, (c, h) in _group_counts_update(y_true, y_pred, groups).items()}
