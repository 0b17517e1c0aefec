r"""Design matrices: metadata (arrays, dicts, DataFrames) coded as columns with roles.

Metadata Normalization (Lu et al., CVPR 2021, https://arxiv.org/abs/2104.09052) regresses a
design :math:`X` (N×K) out of a layer's features. :class:`DesignBuilder` and :func:`make_design`
build that design: categorical columns one-hot coded, continuous ones optionally standardised, an
intercept, and a role for each column: ``keep`` columns (labels, covariates of interest) are
estimated but not removed; every other column, the intercept included, is removed.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from metanorm._validation import describe

__all__ = ["INTERCEPT", "Design", "DesignBuilder", "make_design"]

INTERCEPT = "intercept"
HANDLE_UNKNOWN = ("error", "mean", "ignore")
# an automatically detected categorical column with more levels than this (or than half the rows)
# is refused unless named in categorical= (catches subject IDs)
MAX_AUTO_LEVELS = 50


@dataclass(frozen=True)
class Design:
    """A design matrix with named columns and roles.

    Attributes:
        matrix: float64 array of shape ``(N, K)``.
        columns: the K column names.
        keep: indices of the columns that are estimated but not removed (labels, covariates of
            interest). Every other column, the intercept included, is removed.

    Examples::

        >>> import numpy as np
        >>> d = Design(np.array([[0.0, 1.0], [1.0, 1.0]]), ("y", "intercept"), keep=(0,))
        >>> d.shape, d.remove, d.tensor().dtype
        ((2, 2), (1,), torch.float32)
    """

    matrix: np.ndarray
    columns: tuple[str, ...]
    keep: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.matrix, torch.Tensor):
            _check_data_device(self.matrix, "the design matrix")
            object.__setattr__(self, "matrix", self.matrix.detach().cpu().numpy())
        matrix = np.asarray(self.matrix)
        if matrix.dtype == object or matrix.dtype.kind not in "biuf":
            raise TypeError(f"expected a numeric design matrix, got {describe(matrix)}")
        object.__setattr__(self, "matrix", matrix.astype(np.float64, copy=False))
        object.__setattr__(self, "columns", tuple(self.columns))
        object.__setattr__(self, "keep", tuple(int(k) for k in self.keep))
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
    frequencies: list[float] = field(default_factory=list)  # training share of each coded level


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
        try:  # look at each distinct value once (a column of a few levels is the usual case)
            if not any(_missing_scalar(v) for v in dict.fromkeys(values.tolist())):
                return np.zeros(values.shape, dtype=bool)
        except TypeError:  # unhashable values
            pass
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


def _check_data_device(t: torch.Tensor, what: str) -> None:
    if t.device.type == "meta":
        raise ValueError(
            f"expected {what} on a device that holds data (cpu, cuda, ...), got a tensor on the "
            "meta device"
        )


def _as_number(v: Any) -> float | None:
    """``v`` as a finite float when it is a number or a numeric string, else ``None``."""
    if isinstance(v, bool | np.bool_):
        return None
    if isinstance(v, int | float | np.integer | np.floating):
        return float(v)
    if isinstance(v, str | np.str_):
        try:
            x = float(v)
        except ValueError:
            return None
        return x if math.isfinite(x) else None
    return None


def _is_integer_column(values: np.ndarray) -> bool:
    """Integer dtype, or an object column of integers only (not bools)."""
    if values.dtype.kind in "iu":
        return True
    return values.dtype == object and all(
        isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_)
        for v in values.tolist()
    )


def _not_numeric(name: str, values: np.ndarray) -> str:
    """The message for a non-numeric column that is not categorical."""
    vals = values.tolist() if values.dtype.kind in "OUST" else []
    parses = bool(vals) and all(_as_number(v) is not None for v in vals)
    hint = (
        f"its values are numbers written as text: convert it with pd.to_numeric if they are "
        f"quantities, or list {name!r} in categorical= if they are codes"
        if parses
        else f"list {name!r} in categorical= to one-hot code it"
    )
    return f"metadata column {name!r} is not numeric ({values.dtype}); {hint}"


def _all_numbers(values: np.ndarray) -> bool:
    """Whether an object column holds real numbers only (not text, not bools)."""
    return values.dtype == object and all(
        isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool | np.bool_)
        for v in values.tolist()
    )


def _check_not_numeric_text(name: str, values: np.ndarray) -> None:
    """Refuses to guess what a column of numbers written as text, or numbers and text, means.

    Text codes such as ``"1"``, ``"2"`` may be site codes (zero-padded ``"007"`` is not the number
    7) or numbers read from a file as text: the column is refused and the user says which, with
    ``pd.to_numeric`` or ``categorical=``. A column that mixes numbers (or numeric text) with
    other text ("?", "NA") is refused too.

    Raises:
        ValueError: naming the column and the values concerned.
    """
    vals = values.tolist()
    numeric = [_as_number(v) is not None for v in vals]
    text = [isinstance(v, str | np.str_) for v in vals]
    if not any(numeric):
        return  # levels without numbers: categorical
    others = sorted({str(v) for v, ok in zip(vals, numeric, strict=True) if not ok})
    if not others:  # numbers, some or all of them written as text
        shown = sorted({str(v) for v, t in zip(vals, text, strict=True) if t})
        what = "holds numbers written as text" if all(text) else "mixes numbers and text"
        raise ValueError(
            f"metadata column {name!r} {what} ({shown[:10]}{' ...' if len(shown) > 10 else ''}):"
            f" convert it with pd.to_numeric (or .astype(float)) if the values are quantities, "
            f"or list {name!r} in categorical= to one-hot code them as codes (parsing would turn "
            f"a zero-padded code such as '007' into the number 7)"
        )
    raise ValueError(
        f"metadata column {name!r} looks numeric but holds {sum(not ok for ok in numeric)} "
        f"non-numeric value(s) {others[:10]}{' ...' if len(others) > 10 else ''}: turn them "
        f"into NaN and drop or impute those rows, or list {name!r} in categorical= to "
        "one-hot code every distinct value"
    )


def metadata_columns(data: Any) -> dict[str, np.ndarray]:
    """Splits metadata into named 1-D arrays (DataFrame, mapping, array, tensor, vector).

    Arrays and tensors get positional names ``x0, x1, ...``.
    """
    return _columns_and_categories(data)[0]


def _is_category(v: Any) -> bool:
    """Whether ``v`` is a pandas ``category`` column (Series or Categorical)."""
    return getattr(getattr(v, "dtype", None), "name", None) == "category"


def _columns_and_categories(data: Any) -> tuple[dict[str, np.ndarray], set[str]]:
    """:func:`metadata_columns` and the names of the columns of pandas ``category`` dtype."""
    if hasattr(data, "columns") and hasattr(data, "__getitem__") and hasattr(data, "to_numpy"):
        category = {str(c) for c in data.columns if _is_category(data[c])}
        return {str(c): np.asarray(data[c].to_numpy()) for c in data.columns}, category
    if isinstance(data, Mapping):
        for k, v in data.items():
            if isinstance(v, torch.Tensor):
                _check_data_device(v, f"metadata column {k!r}")
        category = {str(k) for k, v in data.items() if _is_category(v)}
        cols = {
            str(k): np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v)
            for k, v in data.items()
        }
        for k, v in cols.items():
            if v.ndim != 1:
                raise ValueError(f"expected column {k!r} to be 1-D, got {describe(v)}")
        return cols, category
    if isinstance(data, torch.Tensor):
        _check_data_device(data, "metadata")
        data = data.detach().cpu().numpy()
    if isinstance(data, str | bytes) or data is None:
        raise TypeError(
            f"expected metadata as an array, a tensor, a mapping of columns or a DataFrame, "
            f"got {describe(data)}"
        )
    if _is_category(data):  # a categorical Series
        return {"x0": np.asarray(data)}, {"x0"}
    arr = np.asarray(data)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"expected metadata to be 1-D or 2-D, got {describe(arr)}")
    return {f"x{j}": arr[:, j] for j in range(arr.shape[1])}, set()


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
    the dropped reference level. By default the continuous columns that are *removed* are
    standardised with the training mean and standard deviation (with an intercept this changes
    neither the full-data nor MDN's batch residual, and conditions :math:`\Sigma` better), and the
    *kept* columns (labels) are coded raw: centring a kept 0/1 label would move a constant between
    the kept part and the removed intercept and change MDN's batch estimate. Levels, means and
    scales are recorded at ``fit``; a missing value at ``transform`` is a ``ValueError``, and a
    level not seen at ``fit`` is handled as ``handle_unknown`` says.

    Column types are never guessed silently (when ``categorical`` is ``None``):

    - columns of pandas ``category`` dtype are one-hot coded, whatever the type of their
      categories (also when ``categorical`` is given and does not list them);
    - a text, object or category column with more than 50 distinct values, or with at least N/2
      of them (two rows or fewer per value, as a subject ID repeated over two visits), is
      refused unless listed in ``categorical`` (columns with two values are exempt): one-hot
      coding an ID would add one design column per subject;
    - numbers written as text (``"1"``, ``"007"``) are refused by name: convert them with
      ``pd.to_numeric`` if they are quantities, or list the column in ``categorical`` if they are
      codes (parsing would turn a zero-padded site code into a number);
    - an integer column with 3 to 10 distinct values is coded as one continuous column with a
      ``UserWarning`` that suggests ``categorical`` (site codes 0/1/2 are rarely a quantity);
      passing ``categorical`` explicitly says the other columns are continuous and silences it;
    - a column named ``"intercept"`` beside the intercept is refused.

    Args:
        keep: input columns (names or positions) that are estimated but not removed: labels, or
            covariates whose effect must stay in the features. Default: ``()``.
        categorical: input columns to one-hot code. Default ``None``: columns of object, string,
            category or bool dtype.
        standardize: which continuous columns to standardise: ``True`` (every removed one; kept
            columns stay raw), ``False`` (none), or the input columns (names or positions) to
            standardise, kept ones included if listed. Default: ``True``.
        intercept: add a constant column. Default: ``True``.
        keep_intercept: keep (do not remove) the intercept's effect, so the output keeps the
            features' mean. Default: ``False`` (the paper removes it).
        handle_unknown: what :meth:`transform` does with a categorical level not seen at
            :meth:`fit` (a new site or scanner at evaluation), after scikit-learn's
            ``OneHotEncoder``: ``"error"`` raises a ``ValueError``; ``"mean"`` codes the row
            with the training frequency of each level, so that the *average* training-level
            effect is removed (the result does not depend on which level is the dropped
            reference); ``"ignore"`` codes the row with zeros, which with an intercept means
            the reference (first sorted) level, an arbitrary choice. ``"mean"`` is the sound
            one (see the guide "Evaluating on a new site"). Default: ``"error"``.

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
        handle_unknown: str = "error",
    ) -> None:
        if handle_unknown not in HANDLE_UNKNOWN:
            raise ValueError(
                f"expected handle_unknown to be one of {HANDLE_UNKNOWN}, got {handle_unknown!r}"
            )
        self.handle_unknown = handle_unknown
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
        """Records column kinds, levels, means and scales from the training metadata.

        Raises:
            ValueError: a missing value, a column of numbers written as text, an automatically
                detected categorical column with too many levels, a column named
                ``"intercept"`` beside the intercept; each message names the column.
            TypeError: a non-numeric column that is not categorical.
        """
        cols, category = _columns_and_categories(data)
        names = list(cols)
        if not names:
            raise ValueError("expected at least one metadata column, got none")
        n = len(next(iter(cols.values())))
        for k, v in cols.items():
            if len(v) != n:
                raise ValueError(f"column {k!r} has {len(v)} rows, expected {n}")
        if n == 0:
            raise ValueError(f"expected at least one row of metadata to fit, got 0 rows of {names}")
        if self.intercept and INTERCEPT in names:
            raise ValueError(
                f"a metadata column is named {INTERCEPT!r}, the name of the design's constant "
                f"column: rename it (e.g. data.rename(columns={{'intercept': 'intercept_'}})), "
                f"or pass intercept=False if it is a constant column you built yourself"
            )
        self._keep_names = _resolve_names(self.keep, names, "keep")
        if self.categorical is None:
            self._warn_integer_codes(
                {k: v for k, v in cols.items() if k not in category},
                [k for k, v in cols.items() if v.dtype.kind in "bT"],
            )
        # an object column of numbers only is continuous (as scikit-learn reads it)
        cols = {
            k: v.astype(np.float64) if k not in category and _all_numbers(v) else v
            for k, v in cols.items()
        }
        named = (
            []
            if self.categorical is None
            else _resolve_names(self.categorical, names, "categorical")
        )
        if self.categorical is None:
            cat = [
                k
                for k, v in cols.items()
                if k in category or v.dtype.kind in "OUSbT" or v.dtype.name == "category"
            ]
            for k in cat:
                v = cols[k]
                if k not in category and v.dtype.kind in "OUST" and not _is_missing(v).any():
                    _check_not_numeric_text(k, v)
        else:  # category dtype is categorical whether listed or not
            cat = named + [k for k in names if k in category and k not in named]
        if isinstance(self.standardize, bool):
            scaled = [n for n in names if n not in self._keep_names] if self.standardize else []
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
                values = v.tolist()
                levels = _sorted_levels(v)
                many = len(levels) > MAX_AUTO_LEVELS or len(levels) >= n / 2
                if name not in named and len(levels) > 2 and many:
                    raise ValueError(
                        f"metadata column {name!r} has {len(levels)} distinct values in {n} rows "
                        f"(more than {MAX_AUTO_LEVELS}, or two rows or fewer per value): one-hot "
                        f"coding it "
                        f"would add {len(levels) - 1} design columns. If it is an identifier "
                        f"(subject, scan, file), leave it out of the metadata; if it is a "
                        f"quantity, convert it to numbers; if it really is a categorical "
                        f"variable, list {name!r} in categorical="
                    )
                counts = Counter(values)
                drop_ref = self.intercept or not first_cat
                first_cat = False
                coded = levels[1:] if drop_ref else levels
                specs.append(
                    _ColumnSpec(
                        name,
                        "categorical",
                        levels=coded,
                        dropped=levels[0] if drop_ref else None,
                        frequencies=[counts[lv] / n for lv in coded],
                    )
                )
            else:
                if v.dtype.kind not in "biuf":
                    raise TypeError(_not_numeric(name, v))
                x = v.astype(np.float64)
                mean, scale = 0.0, 1.0
                if name in scaled:
                    # scaled by the largest |value| first: no overflow for values near 1e308
                    top = float(np.abs(x).max())
                    unit = x / top if top > 0 else x
                    mean = float(unit.mean()) * (top if top > 0 else 1.0)
                    sd = float(unit.std()) * (top if top > 0 else 1.0)
                    scale = sd if sd > 0 else 1.0
                specs.append(_ColumnSpec(name, "continuous", mean=mean, scale=scale))
        self._specs = specs
        return self

    @staticmethod
    def _warn_integer_codes(cols: dict[str, np.ndarray], cat: list[str]) -> None:
        """One warning naming the integer columns with 3 to 10 values read as continuous."""
        coded = [
            k
            for k, v in cols.items()
            if k not in cat and _is_integer_column(v) and 3 <= len(set(v.tolist())) <= 10
        ]
        if coded:
            warnings.warn(
                f"metadata column(s) {coded} hold 3 to 10 distinct integers and are coded as one "
                f"continuous column each; if they are codes (site, scanner, batch), list them in "
                f"categorical= (passing categorical= explicitly also silences this warning)",
                UserWarning,
                stacklevel=3,
            )

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
                for :func:`~metanorm.linalg.remove_effect`, which multiplies kept columns by
                nothing.
                Default: ``False``.
        """
        specs = self._fitted()
        expected = [s.name for s in specs]
        needed = [n for n in expected if n not in self._keep_names] if ignore_keep else expected
        raw = metadata_columns(data)
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
                if unseen and self.handle_unknown == "error":
                    raise ValueError(
                        f"metadata column {s.name!r} has level(s) {unseen} not seen at fit; "
                        f"known levels: {sorted(map(str, known))}. To code new levels (a new "
                        f"site or scanner at evaluation), build the design with "
                        f"handle_unknown='mean' (the training levels' average effect)"
                    )
                block = np.zeros((n, len(s.levels)))
                lookup = {lv: j for j, lv in enumerate(s.levels)}
                if s.dropped is not None:
                    lookup[s.dropped] = -1  # the reference level: a row of zeros
                idx = np.fromiter((lookup.get(x, -2) for x in vals), dtype=np.intp, count=n)
                hit = np.flatnonzero(idx >= 0)
                block[hit, idx[hit]] = 1.0
                if self.handle_unknown == "mean":
                    block[idx == -2] = np.asarray(s.frequencies, dtype=np.float64)
                blocks.append(block)
            else:
                if _all_numbers(v):
                    v = v.astype(np.float64)
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
            f"keep_intercept={self.keep_intercept}, handle_unknown={self.handle_unknown!r})"
        )


def make_design(
    data: Any,
    *,
    keep: Iterable[str | int] = (),
    categorical: Iterable[str | int] | None = None,
    standardize: bool | Iterable[str | int] = True,
    intercept: bool = True,
    keep_intercept: bool = False,
    handle_unknown: str = "error",
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
        handle_unknown=handle_unknown,
    ).fit_transform(data)
