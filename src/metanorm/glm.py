r"""The GLM core: all of MDN's linear algebra, in one place.

Metadata Normalization (Lu et al., CVPR 2021, https://arxiv.org/abs/2104.09052) fits the general
linear model :math:`F = X\beta + R` of features :math:`F` (N×D) on a design :math:`X` (N×K) and
keeps the residual of the metadata columns. Everything here is shared by
:class:`metanorm.nn.MetadataNorm`, :class:`metanorm.preprocessing.MetadataResidualizer` and any
multi-process layer:

- :class:`DesignBuilder` / :func:`make_design` turn metadata (arrays, dicts, DataFrames) into a
  design matrix whose columns have *roles*: ``keep`` columns (labels, covariates of interest) are
  estimated but not removed; every other column, the intercept included, is removed.
- :func:`glm_kernel` computes :math:`\Sigma^{-1} = (X^\top X)^{-1}` once, in float64, and refuses a
  singular or ill-conditioned :math:`\Sigma` with an error naming the collinear columns (unless a
  ridge term is asked for).
- :func:`batch_statistics` and :func:`beta_from_statistics` split the batch estimate
  :math:`\hat\beta = (N/m)\,\Sigma^{-1} X_b^\top F` into a sum over samples and a solve, so that
  statistics summed over processes give the same :math:`\hat\beta` as one large batch.
- :func:`batch_residual` is the training-mode map (estimate and residual in one pass, with a
  hand-written backward) on :func:`low_rank_residual`, which uses the compiled CPU kernel
  ``metanorm._C`` when it is built; :func:`remove_effect` subtracts the removed columns' part;
  :func:`fit_beta` is the full-data closed form.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from metanorm._validation import as_2d_tensor, check_finite, describe

try:  # the optional compiled CPU kernel (setup.py); plain PyTorch products without it
    from metanorm import _C
except ModuleNotFoundError:  # pragma: no cover - not built
    _C = None  # type: ignore[assignment]
except (ImportError, OSError) as _exc:  # pragma: no cover - built, but against another torch
    warnings.warn(
        f"metanorm's compiled CPU kernel is built but does not load ({_exc}); the slower plain "
        "PyTorch path is used. Rebuild it against the installed torch: "
        "`pip install --no-build-isolation -e .` (or `make clean && make test`)",
        RuntimeWarning,
        stacklevel=1,
    )
    _C = None  # type: ignore[assignment]

__all__ = [
    "Design",
    "DesignBuilder",
    "batch_residual",
    "batch_residual_checked",
    "batch_statistics",
    "beta_from_statistics",
    "fit_beta",
    "glm_kernel",
    "has_cpu_kernel",
    "low_rank_residual",
    "make_design",
    "remove_effect",
    "set_cpu_kernel",
]

INTERCEPT = "intercept"
#: Largest accepted condition number of the column-scaled XᵀX before it counts as singular.
MAX_CONDITION = 1e10


# --------------------------------------------------------------------------------------------
# Design matrices
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Design:
    """A design matrix with named columns and roles.

    Attributes:
        matrix: float64 array of shape ``(N, K)``.
        columns: the K column names.
        keep: indices of the columns that are estimated but not removed (labels, covariates of
            interest). Every other column, the intercept included, is removed.
    """

    matrix: np.ndarray
    columns: tuple[str, ...]
    keep: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.matrix.ndim != 2 or self.matrix.shape[1] != len(self.columns):
            raise ValueError(
                f"expected a matrix with {len(self.columns)} columns, got {describe(self.matrix)}"
            )
        for k in self.keep:
            if not 0 <= k < len(self.columns):
                raise ValueError(f"keep index {k} out of range for {len(self.columns)} columns")

    @property
    def remove(self) -> tuple[int, ...]:
        """Indices of the columns whose effect is removed."""
        return tuple(k for k in range(len(self.columns)) if k not in self.keep)

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, K)``."""
        return (int(self.matrix.shape[0]), int(self.matrix.shape[1]))

    def tensor(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The matrix as a tensor (float32 by default), e.g. rows to pass to a layer."""
        return torch.as_tensor(self.matrix, dtype=dtype, device=device)


@dataclass
class _ColumnSpec:
    name: str
    kind: str  # "continuous" or "categorical"
    mean: float = 0.0
    scale: float = 1.0
    levels: list[Any] = field(default_factory=list)
    dropped: Any = None  # the reference level left out (None: all levels coded)


def _sorted_levels(values: np.ndarray) -> list[Any]:
    uniq = list(dict.fromkeys(values.tolist()))
    try:
        return sorted(uniq)
    except TypeError:
        return sorted(uniq, key=str)


def _is_missing(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "fc":
        return ~np.isfinite(values)
    if values.dtype == object:
        return np.array([_missing_scalar(v) for v in values], dtype=bool)
    if values.dtype.kind == "M":  # datetime64: NaT
        return np.isnat(values)
    return np.zeros(values.shape, dtype=bool)


# pandas' missing-value markers (pd.NA, pd.NaT), recognised without importing pandas
_MISSING_TYPES = frozenset({"NAType", "NaTType"})


def _missing_scalar(v: Any) -> bool:
    if v is None or type(v).__name__ in _MISSING_TYPES:
        return True
    return isinstance(v, float | np.floating) and not math.isfinite(v)


def _to_columns(data: Any) -> dict[str, np.ndarray]:
    """Splits metadata into named 1-D columns (DataFrame, mapping, array, tensor, vector)."""
    if hasattr(data, "columns") and hasattr(data, "__getitem__") and hasattr(data, "to_numpy"):
        return {str(c): np.asarray(data[c].to_numpy()) for c in data.columns}
    if isinstance(data, Mapping):
        cols = {
            str(k): np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v)
            for k, v in data.items()
        }
        for k, v in cols.items():
            if v.ndim != 1:
                raise ValueError(f"expected column {k!r} to be 1-D, got {describe(v)}")
        return cols
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    arr = np.asarray(data)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"expected metadata to be 1-D or 2-D, got {describe(arr)}")
    return {f"x{j}": arr[:, j] for j in range(arr.shape[1])}


def _match_columns(
    cols: dict[str, np.ndarray], expected: list[str], needed: list[str]
) -> dict[str, np.ndarray]:
    """Names the columns of ``cols`` after ``expected`` (all) or ``needed`` (a subset, in order).

    Named columns must match one of the two lists exactly; positional columns (``x0, x1, ...``
    from an array) are matched by count. Columns not in ``needed`` are dropped.
    """
    names = list(cols)
    positional = names == [f"x{j}" for j in range(len(names))]
    if names not in (expected, needed) and positional:
        if len(names) == len(expected):
            cols = dict(zip(expected, cols.values(), strict=True))
        elif len(names) == len(needed):
            cols = dict(zip(needed, cols.values(), strict=True))
        names = list(cols)
    if names not in (expected, needed):
        optional = [n for n in expected if n not in needed]
        alt = f" (or {needed}: the kept columns {optional} are not needed)" if optional else ""
        raise ValueError(f"expected metadata columns {expected}{alt}, got {names}")
    return {k: v for k, v in cols.items() if k in needed}


def _resolve_names(names: Iterable[str | int] | None, available: list[str], what: str) -> list[str]:
    out: list[str] = []
    for n in names or ():
        if isinstance(n, bool) or not isinstance(n, int | str | np.integer):
            raise TypeError(f"expected {what} entries to be column names or indices, got {n!r}")
        if isinstance(n, int | np.integer):
            if not 0 <= int(n) < len(available):
                raise ValueError(
                    f"{what} index {n} out of range: the metadata have {len(available)} columns"
                )
            out.append(available[int(n)])
        elif n in available:
            out.append(n)
        else:
            raise ValueError(f"{what} column {n!r} not found; the metadata have {available}")
    return out


class DesignBuilder:
    r"""Builds design matrices from metadata, scikit-learn style (``fit`` then ``transform``).

    Column order follows the input; the intercept comes last, as in the paper's ``[y, cf, 1]``.
    Categorical columns are one-hot coded; with an intercept the first level (in sorted order) is
    the dropped reference level. Continuous columns are standardised with the training mean and
    standard deviation when ``standardize`` is true. Rescaling a *removed* column mixes it only
    with the removed intercept, so neither the full-data nor MDN's batch residual changes, and
    :math:`\Sigma` is better conditioned. Centring a *kept* column (a 0/1 label) moves a constant
    between the kept part and the removed intercept: the full-data output shifts by a constant
    per feature and MDN's batch estimate changes (the synthetic experiment trains more stably
    with the raw 0/1 label: pass ``standardize=[metadata columns]`` to leave it raw).
    Levels, means and scales are recorded at ``fit``; an unseen level or a missing value at
    ``transform`` is a ``ValueError``.

    Args:
        keep: input columns (names or positions) that are estimated but not removed: labels, or
            covariates whose effect must stay in the features. Default: ``()``.
        categorical: input columns to one-hot code. Default ``None``: columns of object, string,
            category or bool dtype.
        standardize: standardise continuous columns: ``True`` (all), ``False`` (none), or the
            input columns (names or positions) to standardise, e.g. the metadata but not a kept
            0/1 label column. Default: ``True``.
        intercept: add a constant column. Default: ``True``.
        keep_intercept: keep (do not remove) the intercept's effect, so the output keeps the
            features' mean. Default: ``False`` (the paper removes it).

    Examples::

        >>> import numpy as np
        >>> b = DesignBuilder(keep=["y"], categorical=["site"])
        >>> d = b.fit_transform({"y": np.array([0, 1, 1, 0]),
        ...                      "site": np.array(["a", "b", "c", "a"]),
        ...                      "age": np.array([30.0, 40.0, 50.0, 60.0])})
        >>> d.columns
        ('y', 'site=b', 'site=c', 'age', 'intercept')
        >>> d.keep
        (0,)
    """

    def __init__(
        self,
        *,
        keep: Iterable[str | int] = (),
        categorical: Iterable[str | int] | None = None,
        standardize: bool | Iterable[str | int] = True,
        intercept: bool = True,
        keep_intercept: bool = False,
    ) -> None:
        self.keep = tuple(keep)
        self.categorical = None if categorical is None else tuple(categorical)
        self.standardize: bool | tuple[str | int, ...] = (
            standardize if isinstance(standardize, bool) else tuple(standardize)
        )
        self.intercept = intercept
        self.keep_intercept = keep_intercept
        self._specs: list[_ColumnSpec] | None = None
        self._keep_names: list[str] = []

    # -- fitting ------------------------------------------------------------------------------
    def fit(self, data: Any) -> DesignBuilder:
        """Records column kinds, levels, means and scales from the training metadata."""
        cols = _to_columns(data)
        names = list(cols)
        if not names:
            raise ValueError("expected at least one metadata column, got none")
        n = len(next(iter(cols.values())))
        for k, v in cols.items():
            if len(v) != n:
                raise ValueError(f"column {k!r} has {len(v)} rows, expected {n}")
        self._keep_names = _resolve_names(self.keep, names, "keep")
        if self.categorical is None:
            cat = [
                k for k, v in cols.items() if v.dtype.kind in "OUSbT" or v.dtype.name == "category"
            ]
        else:
            cat = _resolve_names(self.categorical, names, "categorical")
        if isinstance(self.standardize, bool):
            scaled = names if self.standardize else []
        else:
            scaled = _resolve_names(self.standardize, names, "standardize")
        specs: list[_ColumnSpec] = []
        first_cat = True
        for name, v in cols.items():
            missing = _is_missing(v)
            if missing.any():
                raise ValueError(
                    f"metadata column {name!r} has {int(missing.sum())} missing (NaN/None/inf) "
                    f"value(s); impute or drop those rows first"
                )
            if name in cat:
                levels = _sorted_levels(v)
                drop_ref = self.intercept or not first_cat
                first_cat = False
                specs.append(
                    _ColumnSpec(
                        name,
                        "categorical",
                        levels=levels[1:] if drop_ref else levels,
                        dropped=levels[0] if drop_ref else None,
                    )
                )
            else:
                if v.dtype.kind not in "biuf":
                    raise TypeError(
                        f"metadata column {name!r} is not numeric ({v.dtype}); "
                        f"list it in categorical= to one-hot code it"
                    )
                x = v.astype(np.float64)
                mean, scale = 0.0, 1.0
                if name in scaled:
                    mean = float(x.mean())
                    sd = float(x.std())
                    scale = sd if sd > 0 else 1.0
                specs.append(_ColumnSpec(name, "continuous", mean=mean, scale=scale))
        self._specs = specs
        return self

    @property
    def columns(self) -> tuple[str, ...]:
        """Output column names (after :meth:`fit`)."""
        specs = self._fitted()
        out: list[str] = []
        for s in specs:
            if s.kind == "categorical":
                out.extend(f"{s.name}={lv}" for lv in s.levels)
            else:
                out.append(s.name)
        if self.intercept:
            out.append(INTERCEPT)
        return tuple(out)

    @property
    def keep_indices(self) -> tuple[int, ...]:
        """Output column indices that are kept (after :meth:`fit`)."""
        specs = self._fitted()
        idx: list[int] = []
        j = 0
        for s in specs:
            width = len(s.levels) if s.kind == "categorical" else 1
            if s.name in self._keep_names:
                idx.extend(range(j, j + width))
            j += width
        if self.intercept and self.keep_intercept:
            idx.append(j)
        return tuple(idx)

    def _fitted(self) -> list[_ColumnSpec]:
        if self._specs is None:
            raise RuntimeError("this DesignBuilder is not fitted yet; call fit() first")
        return self._specs

    # -- transforming -------------------------------------------------------------------------
    def transform(self, data: Any, *, ignore_keep: bool = False) -> Design:
        """Codes metadata with the recorded kinds, levels and scales.

        Args:
            data: metadata with the columns seen at :meth:`fit`, in the same order (a 2-D array
                is matched by position).
            ignore_keep: build rows for *removing* effects only, e.g. at evaluation, where labels
                are unknown. The kept input columns may then be left out of ``data`` (an array
                then holds the other columns, in order) or passed, in which case they are
                ignored, not checked; their design columns are zeros. The result is only good
                for :func:`remove_effect`, which multiplies kept columns by nothing.
                Default: ``False``.
        """
        specs = self._fitted()
        expected = [s.name for s in specs]
        needed = [n for n in expected if n not in self._keep_names] if ignore_keep else expected
        raw = _to_columns(data)
        if not raw:
            raise ValueError(f"expected metadata columns {expected}, got none")
        n = len(next(iter(raw.values())))
        cols = _match_columns(raw, expected, needed)
        blocks: list[np.ndarray] = []
        for s in specs:
            if s.name not in cols:  # a kept column left out (ignore_keep)
                blocks.append(np.zeros((n, len(s.levels) if s.kind == "categorical" else 1)))
                continue
            v = cols[s.name]
            if len(v) != n:
                raise ValueError(f"column {s.name!r} has {len(v)} rows, expected {n}")
            missing = _is_missing(v)
            if missing.any():
                raise ValueError(
                    f"metadata column {s.name!r} has {int(missing.sum())} missing (NaN/None/inf) "
                    f"value(s); impute or drop those rows first"
                )
            if s.kind == "categorical":
                known = set(s.levels) | ({s.dropped} if s.dropped is not None else set())
                vals = v.tolist()
                unseen = sorted({str(x) for x in vals if x not in known})
                if unseen:
                    raise ValueError(
                        f"metadata column {s.name!r} has level(s) {unseen} not seen at fit; "
                        f"known levels: {sorted(map(str, known))}"
                    )
                block = np.zeros((n, len(s.levels)))
                lookup = {lv: j for j, lv in enumerate(s.levels)}
                for i, x in enumerate(vals):
                    j = lookup.get(x)
                    if j is not None:
                        block[i, j] = 1.0
                blocks.append(block)
            else:
                if v.dtype.kind not in "biuf":
                    raise TypeError(f"metadata column {s.name!r} is not numeric ({v.dtype})")
                blocks.append(((v.astype(np.float64) - s.mean) / s.scale)[:, None])
        if self.intercept:
            blocks.append(np.ones((n, 1)))
        return Design(np.hstack(blocks), self.columns, self.keep_indices)

    @property
    def input_kinds(self) -> dict[str, str]:
        """``{input column: "categorical" or "continuous"}``, in input order (after :meth:`fit`)."""
        return {s.name: s.kind for s in self._fitted()}

    @property
    def keep_columns(self) -> tuple[str, ...]:
        """Names of the kept input columns (after :meth:`fit`)."""
        self._fitted()
        return tuple(self._keep_names)

    def fit_transform(self, data: Any) -> Design:
        """``fit(data)`` then ``transform(data)``."""
        return self.fit(data).transform(data)

    def __repr__(self) -> str:
        return (
            f"DesignBuilder(keep={self.keep!r}, categorical={self.categorical!r}, "
            f"standardize={self.standardize}, intercept={self.intercept}, "
            f"keep_intercept={self.keep_intercept})"
        )


def make_design(
    data: Any,
    *,
    keep: Iterable[str | int] = (),
    categorical: Iterable[str | int] | None = None,
    standardize: bool = True,
    intercept: bool = True,
    keep_intercept: bool = False,
) -> Design:
    """Builds a :class:`Design` in one call; see :class:`DesignBuilder` for the arguments.

    Examples::

        >>> import numpy as np
        >>> y = np.array([0, 0, 1, 1]); cf = np.array([1.0, 2.0, 4.0, 5.0])
        >>> d = make_design({"y": y, "cf": cf}, keep=["y"])
        >>> d.columns, d.keep, d.shape
        (('y', 'cf', 'intercept'), (0,), (4, 3))
    """
    return DesignBuilder(
        keep=keep,
        categorical=categorical,
        standardize=standardize,
        intercept=intercept,
        keep_intercept=keep_intercept,
    ).fit_transform(data)


# --------------------------------------------------------------------------------------------
# The kernel Σ⁻¹
# --------------------------------------------------------------------------------------------


def _column_names(k: int, columns: Sequence[str] | None) -> list[str]:
    if columns is None:
        return [f"column {j}" for j in range(k)]
    if len(columns) != k:
        raise ValueError(f"expected {k} column names, got {len(columns)}")
    return [repr(c) for c in columns]


def glm_kernel(
    design: Any,
    *,
    ridge: float = 0.0,
    columns: Sequence[str] | None = None,
    max_condition: float = MAX_CONDITION,
) -> torch.Tensor:
    r"""Computes :math:`\Sigma^{-1} = (X^\top X + \lambda I)^{-1}` in float64.

    Args:
        design: the whole training design, ``(N, K)`` array, tensor or :class:`Design`.
        ridge: :math:`\lambda \ge 0`, added to the diagonal of :math:`X^\top X`. Use it only when
            the design is (nearly) collinear and the collinearity cannot be removed. Default: 0.
        columns: column names for error messages (taken from a :class:`Design`).
        max_condition: largest accepted condition number of the column-scaled
            :math:`X^\top X` when ``ridge == 0``. Default: ``1e10``.

    Returns:
        float64 tensor of shape ``(K, K)`` on the design's device (CPU for arrays).

    Raises:
        ValueError: if ``design`` is not finite, or :math:`X^\top X` is singular or ill-conditioned
            and ``ridge == 0``; the message names the columns involved.
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
    sigma = x.T @ x
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
        evals, evecs = torch.linalg.eigh(scaled)
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
    inv = torch.linalg.inv(sigma)
    return ((inv + inv.T) / 2).contiguous()  # symmetrised; contiguous for the CPU kernel


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
    """
    return design_rows.T @ features


def beta_from_statistics(
    kernel: torch.Tensor,
    xtf: torch.Tensor,
    batch_size: int | float | torch.Tensor,
    n_samples: int | float | torch.Tensor,
) -> torch.Tensor:
    r""":math:`\hat\beta = (N/m)\,\Sigma^{-1} X_b^\top F`, in the dtype of ``xtf``.

    Args:
        kernel: :math:`\Sigma^{-1}`, ``(K, K)`` (cast to ``xtf``'s dtype).
        xtf: :math:`X_b^\top F`, ``(K, D)``, from :func:`batch_statistics` (possibly summed).
        batch_size: m, the number of rows behind ``xtf``.
        n_samples: N, the number of rows behind ``kernel``.
    """
    scale = n_samples / batch_size
    return (kernel.to(xtf.dtype) * scale) @ xtf


def remove_effect(
    features: torch.Tensor,
    design_rows: torch.Tensor,
    beta: torch.Tensor,
    remove_mask: torch.Tensor,
) -> torch.Tensor:
    r"""``features − X_b[:, R] β[R, :]``, R being the columns where ``remove_mask`` is true.

    Shape:
        - features: ``(m, D)``
        - design_rows: ``(m, K)``
        - beta: ``(K, D)``
        - remove_mask: ``(K,)`` bool
        - Output: ``(m, D)``
    """
    return torch.addmm(features, design_rows * remove_mask.to(design_rows.dtype), beta, alpha=-1)


#: Widest design (K columns) the compiled CPU kernel takes (16; MKL's GEMM is as fast from
#: K = 24 and faster from 32); 0 without the kernel.
KERNEL_MAX_COLUMNS: int = _C.MAX_COLUMNS if _C is not None else 0
_kernel_enabled = _C is not None


def has_cpu_kernel() -> bool:
    """Whether the compiled CPU kernel ``metanorm._C`` is built and enabled.

    It is built by ``pip install --no-build-isolation`` when torch is importable at build time
    (``make`` does this); without it the same maths runs as plain PyTorch matrix products.
    """
    return _kernel_enabled


def set_cpu_kernel(enabled: bool) -> bool:
    """Turns the compiled CPU kernel on or off (for comparisons); returns the previous setting.

    Raises:
        RuntimeError: if ``enabled`` is true and the kernel was not built.
    """
    global _kernel_enabled
    if enabled and _C is None:
        raise RuntimeError(
            "metanorm's compiled CPU kernel is not built: reinstall with torch installed first "
            "and `pip install --no-build-isolation` (see setup.py)"
        )
    previous, _kernel_enabled = _kernel_enabled, bool(enabled)
    return previous


def _kernel_applies(features: torch.Tensor, num_columns: int) -> bool:
    return (
        _kernel_enabled
        and features.device.type == "cpu"
        and features.dtype in (torch.float32, torch.float64)
        and num_columns <= KERNEL_MAX_COLUMNS
    )


def low_rank_residual(
    features: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(F − A (Bᵀ F), Bᵀ F)``, no autograd: the one pass both directions of MDN are made of.

    Runs the compiled CPU kernel (one read of F from memory, the output written once) for
    contiguous float32/float64 CPU tensors with K ≤ :data:`KERNEL_MAX_COLUMNS`, plain PyTorch
    matrix products otherwise.

    Shape:
        - features: ``(m, D)``
        - a, b: ``(m, K)``, same dtype and device
        - Output: ``(m, D)`` and ``(K, D)``
    """
    if _kernel_applies(features, a.shape[1]):
        out, p = _C.low_rank_residual(features.contiguous(), a.contiguous(), b.contiguous())
        return out, p
    p = b.T @ features
    return torch.addmm(features, a, p, alpha=-1), p


class _LowRankResidual(torch.autograd.Function):
    """``F ↦ F − A Bᵀ F``, also returning ``P = Bᵀ F`` (which carries no gradient).

    For fixed A and B the map is linear in F and its transpose is the same map with A and B
    swapped, ``G ↦ G − B Aᵀ G``: the backward is this Function again, so double backward works
    and both directions take the fast path of :func:`low_rank_residual`. A and B get no
    gradient; :func:`batch_residual` takes the plain autograd route when design rows need one.
    """

    @staticmethod
    def forward(
        ctx: Any, features: torch.Tensor, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, p = low_rank_residual(features, a, b)
        ctx.save_for_backward(a, b)
        ctx.mark_non_differentiable(p)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for P
        return out, p

    @staticmethod
    def backward(
        ctx: Any, grad_out: torch.Tensor | None, grad_p: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None, None]:
        if grad_out is None:
            return None, None, None
        a, b = ctx.saved_tensors
        grad, _ = _LowRankResidual.apply(grad_out, b, a)
        return grad, None, None


def batch_residual(
    features: torch.Tensor,
    design_rows: torch.Tensor,
    kernel: torch.Tensor,
    n_samples: int | float,
    remove_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""MDN's training-mode map: the batch estimate and the residual, differentiable in F.

    Computes :math:`\hat\beta = (N/m)\,\Sigma^{-1} X_b^\top F = B^\top F` with
    :math:`B = X_b W^\top`, :math:`W = (N/m)\Sigma^{-1}` (B formed in float64), and
    :math:`F - X_{b,R}\hat\beta_R` in one pass (:func:`low_rank_residual`), with a hand-written
    backward (the transposed map). Same result as :func:`batch_statistics`,
    :func:`beta_from_statistics` and :func:`remove_effect` in sequence.

    Args:
        features: ``(m, D)`` floating tensor.
        design_rows: ``(m, K)``, same dtype and device.
        kernel: :math:`\Sigma^{-1}` ``(K, K)``.
        n_samples: N.
        remove_mask: ``(K,)`` bool, true for the removed columns.

    Returns:
        ``(residual, beta)``: ``(m, D)`` and ``(K, D)``; ``beta`` carries no gradient.
    """
    out, beta, _ = _batch_residual(features, design_rows, kernel, n_samples, remove_mask, False)
    return out, beta


def batch_residual_checked(
    features: torch.Tensor,
    design_rows: torch.Tensor,
    kernel: torch.Tensor,
    n_samples: int | float,
    remove_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """:func:`batch_residual`, plus ``sum(beta) + sum(design_rows)`` in float64.

    The sum is finite exactly when the estimate and the design rows are (float64 cannot
    overflow on float32 entries): one number to test instead of two elementwise checks.
    """
    return _batch_residual(features, design_rows, kernel, n_samples, remove_mask, True)


def _batch_residual(
    features: torch.Tensor,
    design_rows: torch.Tensor,
    kernel: torch.Tensor,
    n_samples: int | float,
    remove_mask: torch.Tensor,
    with_total: bool,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    m = features.shape[0]
    if design_rows.requires_grad:  # rare: gradients for the metadata too, via plain autograd
        beta = beta_from_statistics(kernel, batch_statistics(design_rows, features), m, n_samples)
        out = remove_effect(features, design_rows, beta, remove_mask)
        beta = beta.detach()
    elif _kernel_applies(features, design_rows.shape[1]):  # the same maths, autograd in C++
        return _C.batch_residual(features, design_rows, kernel, remove_mask, n_samples / m)
    else:
        weight = kernel.to(torch.float64) * (n_samples / m)
        b = (design_rows.to(torch.float64) @ weight.T).to(features.dtype)
        out, beta = _LowRankResidual.apply(features, design_rows * remove_mask, b)
    if not with_total:
        return out, beta, 0.0
    with torch.no_grad():
        total = float(beta.sum(dtype=torch.float64)) + float(design_rows.sum(dtype=torch.float64))
    return out, beta, total


def fit_beta(design: Any, features: Any, *, ridge: float = 0.0) -> torch.Tensor:
    r"""Full-data least squares :math:`\beta = (X^\top X + \lambda I)^{-1} X^\top F` in float64.

    Equals :func:`beta_from_statistics` on the whole set (m = N). Used by the scikit-learn
    residualizer and as the reference in tests.

    Shape:
        - design: ``(N, K)``
        - features: ``(N, D)``
        - Output: ``(K, D)`` float64
    """
    columns = design.columns if isinstance(design, Design) else None
    kernel = glm_kernel(design, ridge=ridge, columns=columns)
    x = as_2d_tensor(
        design.matrix if isinstance(design, Design) else design, "design", dtype=torch.float64
    )
    f = as_2d_tensor(features, "features", dtype=torch.float64, device=kernel.device)
    if f.shape[0] != x.shape[0]:
        raise ValueError(
            f"expected features with {x.shape[0]} rows (one per design row), got {f.shape[0]}"
        )
    check_finite(f, "features")
    return kernel @ batch_statistics(x.to(kernel.device), f)
