r"""MDN's GLM for classical pipelines: a scikit-learn transformer that regresses metadata out.

:class:`MetadataResidualizer` is the offline counterpart of :class:`metanorm.nn.MetadataNorm`.
It fits the same general linear model :math:`F = X\beta + R` on the training rows, with the same
code (:class:`~metanorm.design.DesignBuilder` codes the metadata,
:func:`~metanorm.linalg.fit_beta` solves for β, :func:`~metanorm.linalg.remove_effect` subtracts the
removed columns' part), and removes the metadata's effect from new rows. Metadata reach it through
scikit-learn's metadata routing, so it fits inside :class:`~sklearn.pipeline.Pipeline`,
:func:`~sklearn.model_selection.cross_validate` and
:class:`~sklearn.model_selection.GridSearchCV`, where it is fitted on each training fold only.

scikit-learn is an optional dependency: ``pip install "metanorm[sklearn]"``.
"""

from __future__ import annotations

import numbers
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from metanorm import linalg
from metanorm.design import HANDLE_UNKNOWN, Design, DesignBuilder, metadata_columns

try:
    import scipy.sparse as sp
    from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
    from sklearn.utils.metadata_routing import MetadataRequest
    from sklearn.utils.validation import check_is_fitted, validate_data
    from threadpoolctl import ThreadpoolController
except ImportError as exc:  # pragma: no cover - exercised only without scikit-learn
    raise ImportError(
        "metanorm.preprocessing needs scikit-learn >= 1.6; install it with "
        "pip install 'metanorm[sklearn]'"
    ) from exc

__all__ = ["MetadataResidualizer", "expected_failed_checks", "metadata_scorer"]

_ROUTING_HINT = (
    "Inside a Pipeline or cross-validation, enable metadata routing "
    "(sklearn.set_config(enable_metadata_routing=True)) and pass the metadata as a parameter: "
    "pipe.fit(X, y, metadata=M), pipe.predict(X, metadata=M), "
    "cross_validate(pipe, X, y, params={'metadata': M}) (use "
    "metanorm.preprocessing.metadata_scorer, or scoring=None with scikit-learn >= 1.8, since "
    "scikit-learn's string scorers do not pass metadata to predict)"
)


def _as_names(value: Any, what: str) -> tuple[str | int, ...]:
    """A column list from a name, an index or an iterable of them."""
    if isinstance(value, str | numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, Iterable):
        out: list[str | int] = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, str | numbers.Integral):
                raise TypeError(
                    f"expected {what} to list metadata column names or indices, got {v!r}"
                )
            out.append(v if isinstance(v, str) else int(v))
        return tuple(out)
    raise TypeError(
        f"expected {what} to be a column name, an index or a list of them, got {value!r}"
    )


# a metadata table with more columns than this, used whole (no columns=), gets a warning
_FEW_COLUMNS = 4
# rows per block in the passes over X: about 1 MiB of float64 per block
_BLOCK_BYTES = 1 << 20


_CONTROLLER: Any = None


def _one_blas_thread() -> Any:
    """A context with BLAS on one thread, for the block products.

    They have K (a few) rows or columns and are bound by memory; OpenBLAS's threads,
    synchronised at every call, made them up to 1000 times slower on a loaded 2-core machine
    (measured: 0.4 s per 1 MiB block).
    """
    global _CONTROLLER
    if _CONTROLLER is None:  # finding the loaded libraries takes ~15 ms: once per process
        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="blas")


def _is_pandas(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "pandas" and hasattr(obj, "index")


def _aligned(X: Any, metadata: Any, method: str) -> Any:
    """``metadata`` reordered to ``X``'s index when both are pandas objects with the same labels.

    Raises:
        ValueError: when both are pandas objects and their index labels differ.
    """
    if not (_is_pandas(X) and _is_pandas(metadata)):
        return metadata
    xi, mi = X.index, metadata.index
    if xi.equals(mi):
        return metadata
    if xi.is_unique and mi.is_unique and len(xi) == len(mi):
        order = mi.get_indexer(xi)
        if (order >= 0).all():
            return metadata.iloc[order]
    missing = [str(v) for v in xi[~xi.isin(mi)][:5]]
    raise ValueError(
        f"X and metadata are pandas objects whose indexes differ in {method} (X's labels "
        f"{missing or '(duplicated)'} ... are not matched one to one in the metadata's index): "
        f"rows would be paired by position, possibly with the wrong metadata. Give both the same "
        f"index (metadata.set_index(X.index) if the rows are known to be in the same order, or "
        f"metadata.loc[X.index] to select them by label)"
    )


def _subset(metadata: Any, columns: tuple[str | int, ...], keep: tuple[str | int, ...]) -> Any:
    """The ``columns`` of ``metadata`` (names or positions), then the named ``keep`` columns.

    Kept columns that are absent are left out (they are not needed at transform).
    """
    if hasattr(metadata, "columns") and hasattr(metadata, "iloc"):  # a DataFrame
        labels = list(metadata.columns)
        names = [str(c) for c in labels]
    elif isinstance(metadata, Mapping):
        labels = list(metadata)
        names = [str(c) for c in labels]
    else:
        metadata = metadata_columns(metadata)
        labels = names = list(metadata)
    chosen: list[int] = []
    for c in columns:
        if isinstance(c, str):
            if c not in names:
                raise ValueError(f"columns entry {c!r} not found; the metadata have {names}")
            j = names.index(c)
        else:
            if not 0 <= c < len(names):
                raise ValueError(
                    f"columns index {c} out of range: the metadata have {len(names)} columns"
                )
            j = c
        if j not in chosen:
            chosen.append(j)
    for k in keep:
        if isinstance(k, str) and k in names and names.index(k) not in chosen:
            chosen.append(names.index(k))
    picked = [labels[j] for j in chosen]
    if hasattr(metadata, "columns") and hasattr(metadata, "iloc"):
        return metadata[picked]
    return {str(c): metadata[c] for c in picked}


def _block_rows(n_features: int) -> int:
    return max(8, _BLOCK_BYTES // (8 * max(n_features, 1)))


def _check_finite(X: Any, offset: int = 0) -> None:
    """Raises a ValueError naming the first non-finite entry of ``X``, if there is one."""
    if sp.issparse(X):
        bad = np.flatnonzero(~np.isfinite(X.data))
        if bad.size:
            raise ValueError(
                f"expected finite features (no NaN or inf), got {bad.size} NaN/inf stored "
                f"value(s) in the sparse X"
            )
        return
    step = _block_rows(X.shape[1])
    for start in range(0, X.shape[0], step):
        block = X[start : start + step]
        ok = np.isfinite(block)
        if not ok.all():
            i, j = np.argwhere(~ok)[0]
            raise ValueError(
                f"expected finite features (no NaN or inf), got {block[i, j]} in X at row "
                f"{offset + start + i}, column {j} ({int((~ok).sum())} non-finite value(s) in rows "
                f"{offset + start}...{offset + start + len(block) - 1})"
            )


def _cross_product(design: np.ndarray, X: Any) -> np.ndarray:
    """``designᵀ X`` in float64, ``(K, D)``, and the check that ``X`` is finite.

    Dense ``X`` is read once, in blocks of rows converted to float64 (no copy of ``X``); the
    product's row of ones (the intercept, or one added here) carries any NaN or inf of ``X`` into
    the result, so that a finite result proves ``X`` finite. Sparse ``X`` is multiplied as it is.
    """
    n, k = design.shape
    has_ones = bool(np.any(np.all(design == 1.0, axis=0)))
    D = design if has_ones else np.hstack([design, np.ones((n, 1))])
    if sp.issparse(X):
        _check_finite(X)
        return np.asarray((X.T @ D).T)[:k]
    acc = np.zeros((D.shape[1], X.shape[1]))
    step = _block_rows(X.shape[1])
    buf = None if X.dtype == np.float64 else np.empty((min(step, n), X.shape[1]))
    with _one_blas_thread():
        for start in range(0, n, step):
            block = X[start : start + step]
            if buf is not None:
                b = buf[: len(block)]
                b[...] = block
                block = b
            acc += D[start : start + step].T @ block
    if not np.isfinite(acc).all():
        _check_finite(X)  # names the entry; finite values whose products overflow pass it
        raise ValueError(
            "the features' products with the design overflow float64: rescale X (its values "
            f"reach {float(np.abs(X).max()):.3g})"
        )
    return acc[:k]


def _inverse_gram(design: Design, ridge: float) -> np.ndarray:
    """:func:`metanorm.linalg.inverse_gram` of the design, from the K×K factor R of its QR.

    ``RᵀR = XᵀX`` (R from Householder QR is backward stable, so a collinear design keeps a
    near-zero pivot and is still diagnosed, which a Cholesky factor of XᵀX does not guarantee):
    the checks and messages (collinear columns named) are those of the full design, without
    passing the N×K design through torch.
    """
    x = design.matrix
    if x.shape[0] <= x.shape[1] or not np.isfinite(x).all():
        return linalg.inverse_gram(design, ridge=ridge).numpy()
    with _one_blas_thread():
        factor = np.linalg.qr(x, mode="r")
    return linalg.inverse_gram(factor, ridge=ridge, columns=design.columns).numpy()


def _residual(
    X: Any, rows: np.ndarray, beta: np.ndarray, *, out: np.ndarray | None = None, check: bool
) -> np.ndarray:
    """``X − rows @ beta`` in ``X``'s dtype, in blocks of rows (into ``out`` when given).

    Sparse ``X`` gives a dense result. With ``check``, a non-finite result is traced back to the
    entry of ``X`` that caused it (β is finite).
    """
    dtype = X.dtype
    if sp.issparse(X):
        out = X.toarray()
        X = out
    elif out is None:
        out = np.empty(X.shape, dtype=dtype)
    r = rows.astype(dtype, copy=False)
    b = beta.astype(dtype, copy=False)
    step = _block_rows(X.shape[1])
    tmp = np.empty((min(step, max(X.shape[0], 1)), X.shape[1]), dtype=dtype)
    with _one_blas_thread():
        for start in range(0, X.shape[0], step):
            stop = min(start + step, X.shape[0])
            t = tmp[: stop - start]
            np.matmul(r[start:stop], b, out=t)
            np.subtract(X[start:stop], t, out=out[start:stop])
            if check and not np.isfinite(np.add.reduce(out[start:stop], axis=None)):
                _check_finite(out[start:stop], offset=start)
    return out


def _log_scale_fit(
    design: np.ndarray, squares: np.ndarray, *, max_iter: int = 100, tol: float = 1e-10
) -> np.ndarray:
    r"""γ (K×D) of the log-linear scale model :math:`E[q_{id}] = \exp(2x_i\gamma_d)`: Gaussian ML.

    Minimises :math:`\sum_i x_i\gamma_d + \tfrac12 q_{id}\exp(-2x_i\gamma_d)` per feature (the
    negative log-likelihood of :math:`r \sim N(0, \exp(2x\gamma))` with :math:`q = r^2`), a
    convex function, by Newton's method with step halving, from the least-squares fit of
    :math:`\tfrac12\log q`. With a design of one-hot levels and an intercept the optimum is
    the per-level mean of q (each level's variance).
    """
    q = squares + 1e-12 * squares.mean(axis=0, keepdims=True) + np.finfo(np.float64).tiny
    gamma, *_ = np.linalg.lstsq(design, 0.5 * np.log(q), rcond=None)

    def objective(g: np.ndarray) -> np.ndarray:
        eta = design @ g
        return np.sum(eta + 0.5 * q * np.exp(-2.0 * eta), axis=0)

    current = objective(gamma)
    for _ in range(max_iter):
        w = q * np.exp(-2.0 * (design @ gamma))
        grad = design.T @ (1.0 - w)  # (K, D)
        hess = 2.0 * np.einsum("nk,nd,nl->dkl", design, w, design)  # (D, K, K)
        step = np.linalg.solve(hess, grad.T[:, :, None])[:, :, 0].T
        t = np.ones(q.shape[1])
        for _ in range(60):  # halve the step of each feature whose objective did not fall
            trial = gamma - t * step
            value = objective(trial)
            worse = ~(value <= current)
            if not worse.any():
                break
            t = np.where(worse, t / 2, t)
        gamma, current = trial, value
        if np.max(np.abs(t * step)) < tol:
            break
    return gamma


class MetadataResidualizer(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    r"""Removes the linear effect of metadata from features, fitted on training rows only.

    Method of `Metadata Normalization <https://arxiv.org/abs/2104.09052>`__ (Lu et al., CVPR
    2021), as a preprocessing step. At :meth:`fit`, the metadata of the N training rows are coded
    into a design :math:`X` (N×K: one-hot categorical columns, standardised continuous columns,
    an intercept) and the features :math:`F` (N×D) are regressed on it in float64:

    .. math::
        \beta = (X^\top X + \lambda I)^{-1} X^\top F, \qquad
        \mathrm{transform}(F', X') = F' - X'_{R}\,\beta_{R}

    where R are the *removed* design columns: every column except those of ``keep`` (and except
    the intercept when ``keep_intercept``). ``keep`` columns (labels, covariates of interest)
    take part in the estimate, so that the metadata's effect is not confused with theirs when the
    two are correlated, but are not subtracted: their effect stays in the output. The output does
    not depend on how the removed columns are coded, but the coding of the kept columns decides
    how a constant is shared between their kept part and the removed intercept. Kept columns are
    coded raw by default (``standardize=True`` scales only the removed continuous columns), so a
    kept 0/1 label's part is 0 for the rows labelled 0 (the removed intercept takes the rest); a
    categorical kept column's part is relative to its reference (first) level. To centre a kept
    continuous column (its kept part then has zero training mean), list it in ``standardize``.

    This is exactly what :class:`metanorm.nn.MetadataNorm` computes in evaluation mode once its
    running β is the full-data β (``momentum=None`` after one epoch), with the same defaults: the
    intercept is removed (the output is centred, like the layer's), unless ``keep_intercept``.

    **Scale** (``scale=True``): ComBat's location-scale model without its empirical Bayes.
    After β, the residual of every column :math:`r = F - X\beta` is taken as
    :math:`\exp(X\gamma)\,\varepsilon`, and γ (K×D) is the Gaussian maximum-likelihood fit of
    that log-linear scale model per feature (Newton's method), on the squared residuals
    divided by :math:`1 - h_{ii}` (:math:`h_{ii}` the leverage of each row, so that they are
    unbiased for :math:`\exp(2x_i\gamma)`). For a design of one-hot levels (sites) and an
    intercept this is each level's residual variance with ``n − 1`` in the denominator, the
    per-level variance of ComBat (neuroCombat with ``eb=False``, its output then equal to this
    one up to a per-feature affine map); unlike a per-level variance it also takes continuous
    metadata (age, a scanner's field strength), whose scale effect is then log-linear. The
    ML fit is chosen over the regression of :math:`\log|r|` because that regression's
    per-level means are means of logs, which differ from the log of the variance by a
    sampling error of their own at finite n (equal only in expectation). Transform:

    .. math::
        \mathrm{transform}(F', X') = (F' - X'_R\beta_R) \odot \exp(-X'_S\gamma_S)

    S the removed columns other than the intercept (the features' typical scale is kept), the
    kept columns' location staying in the residual and divided with it (labels are not read
    at transform). Fitting keeps an N×D float64 residual in memory.

    **Labels are needed at fit only.** The kept columns are multiplied by nothing at
    :meth:`transform`, so test rows need only the removed metadata: pass the same columns as at
    fit (the kept ones are then ignored, not even checked) or leave the kept columns out.

    **Metadata are required.** Without them :meth:`fit` and :meth:`transform` raise a
    ``ValueError``; features are never passed through unchanged. The ``metadata`` parameter of
    ``fit`` and ``transform`` is requested by default in scikit-learn's metadata routing, so with
    ``sklearn.set_config(enable_metadata_routing=True)`` a ``Pipeline`` or ``cross_validate``
    forwards it without ``set_fit_request``; ``set_fit_request(metadata="other_name")`` renames
    it. scikit-learn's string scorers call ``predict`` without metadata: use
    :func:`metadata_scorer`, or ``scoring=None`` (the pipeline's ``score``, which forwards it
    from scikit-learn 1.8 on).

    Args:
        keep: metadata columns (names, or positions for an array) that are estimated but not
            removed: labels, covariates of interest. Default: ``()``.
        categorical: metadata columns to one-hot code. Default ``None``: columns of string,
            object, category or bool dtype (with the typing rules of
            :class:`~metanorm.design.DesignBuilder`: too many levels, numbers written as text and
            integer codes are flagged). Integer-coded sites or batches must be listed here;
            ``category`` columns are always one-hot coded.
        standardize: which continuous metadata columns to standardise with the training mean
            and standard deviation: ``True`` (every removed one; kept columns stay raw), ``False``
            (none), or the columns (names or positions) to standardise, kept ones included if
            listed. Standardising a removed column only improves conditioning (the output does not
            change when an intercept is present); standardising a kept one changes its kept part
            (see above). Default: ``True``.
        intercept: add a constant column to the design. Default: ``True``.
        keep_intercept: keep the intercept's effect, so that the output keeps the features'
            training mean. Default: ``False``, as the layer and the paper.
        columns: the metadata columns (names, or positions) whose effect is regressed out; the
            ``keep`` columns named outside it are added to the design. Positions in ``keep``,
            ``categorical`` and ``standardize`` then refer to the selected columns. Default
            ``None``: every column, with a ``UserWarning`` naming them when there are more than
            four (a whole table would also regress out labels and identifiers).
        ridge: :math:`\lambda \ge 0` added to the diagonal of :math:`X^\top X`. Use it for a
            collinear design that cannot be fixed by dropping a column. Default: 0.
        handle_unknown: a categorical level not seen at fit (a new site at evaluation):
            ``"error"``, ``"mean"`` (remove the training levels' average effect, the sound
            choice) or ``"ignore"`` (code it as the reference level); see
            :class:`~metanorm.design.DesignBuilder`. Default: ``"error"``.
        copy: ``False`` lets :meth:`transform` and :meth:`fit_transform` write the result into
            ``X`` when it is a writable float32/float64 array (as scanpy's ``regress_out``);
            otherwise a new array is returned. Default: ``True``.
        scale: also remove the metadata's effect on each feature's scale (see above); dense
            ``X`` only. Default: ``False``.

    Attributes:
        n_features_in_: D, the number of features seen at fit.
        feature_names_in_: feature names seen at fit (only when ``X`` had string column names).
        design_builder_: the fitted :class:`metanorm.design.DesignBuilder` (levels, means, scales).
        design_columns_: names of the K design columns, e.g. ``('y', 'site=b', 'intercept')``.
        remove_mask_: bool array ``(K,)``, true for the removed design columns.
        coef_: β, float64 array ``(K, D)``.
        scale_coef_: γ, float64 array ``(K, D)`` (with ``scale=True``).
        scale_mask_: bool array ``(K,)``, the columns whose scale is divided out (with
            ``scale=True``).
        n_metadata_in_: number of metadata columns seen at fit.
        metadata_names_in_: their names (``x0, x1, ...`` for an array).

    **Speed and memory.** ``X`` is not copied or converted: :math:`X^\top F` is accumulated in
    float64 over blocks of rows converted on the fly (so a float32 ``X`` gives the same β as a
    float64 one, up to summation order), the K×K system is solved in float64, the finiteness
    check rides on the same pass, and the residual is written block by block in ``X``'s dtype.
    Beyond the output, the extra memory is the design (N×K) and two blocks of about 1 MiB.
    Sparse ``X`` (CSR/CSC) is multiplied as it is; the result is dense.

    **Pandas inputs** are matched on their index: when ``X`` and ``metadata`` are both pandas
    objects with the same index labels in another order, the metadata are reordered to ``X``'s;
    different labels are an error (rows would be paired by position).

    Shape:
        - X: ``(n_samples, n_features)``, float32 or float64 (kept in the output), or a CSR/CSC
          sparse matrix; finite.
        - metadata: ``(n_samples, n_metadata)``: DataFrame, 2-D array, or dict of 1-D columns.
        - Output: same shape and dtype as X.

    Examples::

        >>> import numpy as np, pandas as pd
        >>> rng = np.random.default_rng(0)
        >>> meta = pd.DataFrame({"site": rng.choice(["a", "b", "c"], 200),
        ...                      "y": rng.integers(0, 2, 200)})
        >>> X = rng.normal(size=(200, 5)) + (meta["site"] == "b").to_numpy()[:, None]
        >>> res = MetadataResidualizer(keep=["y"]).fit(X, metadata=meta)
        >>> res.design_columns_
        ('site=b', 'site=c', 'y', 'intercept')
        >>> Xt = res.transform(X, metadata=meta[["site"]])   # no labels needed here
        >>> Xt.shape
        (200, 5)
    """

    # Metadata are mandatory: request them by default so that routing forwards them.
    __metadata_request__fit = {"metadata": True}  # noqa: RUF012
    __metadata_request__transform = {"metadata": True}  # noqa: RUF012

    def __init__(
        self,
        *,
        keep: Iterable[str | int] | str | int = (),
        columns: Iterable[str | int] | str | int | None = None,
        categorical: Iterable[str | int] | str | int | None = None,
        standardize: bool | Iterable[str | int] | str = True,
        intercept: bool = True,
        keep_intercept: bool = False,
        ridge: float = 0.0,
        handle_unknown: str = "error",
        copy: bool = True,
        scale: bool = False,
    ) -> None:
        self.keep = keep
        self.columns = columns
        self.categorical = categorical
        self.standardize = standardize
        self.intercept = intercept
        self.keep_intercept = keep_intercept
        self.ridge = ridge
        self.handle_unknown = handle_unknown
        self.copy = copy
        self.scale = scale

    # -- helpers ------------------------------------------------------------------------------
    def _check_params(self) -> None:
        if isinstance(self.standardize, numbers.Integral) and not isinstance(
            self.standardize, bool | np.bool_
        ):  # 0 or 1 would silently mean a column position
            raise TypeError(
                f"expected standardize to be a bool or a list of metadata columns, got "
                f"{self.standardize!r}"
            )
        self._standardize_arg()
        if self.columns is not None:
            _as_names(self.columns, "columns")
        for name in ("intercept", "keep_intercept", "copy", "scale"):
            value = getattr(self, name)
            if not isinstance(value, bool | np.bool_):
                raise TypeError(f"expected {name} to be a bool, got {value!r}")
        if self.keep_intercept and not self.intercept:
            raise ValueError("keep_intercept=True needs intercept=True (there is no intercept)")
        if self.handle_unknown not in HANDLE_UNKNOWN:
            raise ValueError(
                f"expected handle_unknown to be one of {HANDLE_UNKNOWN}, got "
                f"{self.handle_unknown!r}"
            )
        r = self.ridge
        if (
            isinstance(r, bool)
            or not isinstance(r, numbers.Real)
            or not (r >= 0 and np.isfinite(r))
        ):
            raise ValueError(f"expected ridge to be a finite number >= 0, got {r!r}")

    def _standardize_arg(self) -> bool | tuple[str | int, ...]:
        if isinstance(self.standardize, bool | np.bool_):
            return bool(self.standardize)
        return _as_names(self.standardize, "standardize")

    @staticmethod
    def _missing(method: str) -> ValueError:
        return ValueError(
            f"MetadataResidualizer.{method} needs metadata: call {method}(X, metadata=M) with one "
            f"row of metadata per sample of X; the features are never passed through "
            f"uncorrected. {_ROUTING_HINT}"
        )

    @staticmethod
    def _check_rows(design: Design, n: int, method: str) -> None:
        if design.shape[0] != n:
            raise ValueError(
                f"expected metadata with {n} rows (one per sample of X) in {method}, got "
                f"{design.shape[0]}; inside cross-validation pass the metadata as a DataFrame or "
                f"an array so that they are split with X"
            )

    def _validate(self, X: Any, reset: bool) -> Any:
        """``X`` as a float32/float64 array (or CSR/CSC matrix), not copied when it is one."""
        return validate_data(
            self,
            X,
            reset=reset,
            accept_sparse=("csr", "csc"),
            dtype=[np.float64, np.float32],
            ensure_all_finite=False,  # checked in the pass that computes the products
        )

    def _select(self, metadata: Any, fitting: bool) -> Any:
        """The metadata columns the design uses: ``columns`` plus ``keep``, or all of them."""
        if self.columns is None:
            if fitting:
                names = list(metadata_columns(metadata))
                if len(names) > _FEW_COLUMNS:
                    warnings.warn(
                        f"the design uses every one of the {len(names)} metadata columns "
                        f"{names}: each one's effect is removed unless listed in keep. Pass "
                        f"columns=[...] to choose the columns to regress out (this also "
                        f"silences the warning)",
                        UserWarning,
                        stacklevel=3,
                    )
            return metadata
        return _subset(metadata, _as_names(self.columns, "columns"), _as_names(self.keep, "keep"))

    def _builder(self) -> DesignBuilder:
        return DesignBuilder(
            keep=_as_names(self.keep, "keep"),
            categorical=None
            if self.categorical is None
            else _as_names(self.categorical, "categorical"),
            standardize=self._standardize_arg(),
            intercept=bool(self.intercept),
            keep_intercept=bool(self.keep_intercept),
            handle_unknown=self.handle_unknown,
        )

    def _fit(self, X: Any, metadata: Any) -> tuple[Any, Design]:
        """Fits β; returns the validated ``X`` and the training design."""
        self._check_params()
        metadata = _aligned(X, metadata, "fit")
        X = self._validate(X, reset=True)
        if metadata is None:
            raise self._missing("fit")
        metadata = self._select(metadata, fitting=True)
        builder = self._builder()
        design = builder.fit_transform(metadata)
        self._check_rows(design, X.shape[0], "fit")
        if not design.remove:
            raise ValueError(
                f"keep lists every design column {list(design.columns)}: nothing would be "
                f"removed; leave the metadata to remove out of keep"
            )
        n, k = design.shape
        if n < k and self.ridge == 0:
            raise ValueError(
                f"expected at least as many samples as design columns to fit β, got "
                f"n_samples = {n} for K = {k} columns {list(design.columns)}; add rows, drop "
                f"metadata columns, or pass ridge > 0"
            )
        self._warn_single_rows(builder, metadata)
        gram_inverse = _inverse_gram(design, float(self.ridge))
        beta = gram_inverse @ _cross_product(design.matrix, X)
        mask = np.zeros(design.shape[1], dtype=bool)
        mask[list(design.remove)] = True
        self.design_builder_ = builder
        self.design_columns_ = design.columns
        self.remove_mask_ = mask
        self.coef_ = beta
        if self.scale:
            self._fit_scale(X, design.matrix, gram_inverse, beta)
        self.metadata_names_in_ = np.asarray(list(builder.input_kinds), dtype=object)
        self.n_metadata_in_ = len(self.metadata_names_in_)
        return X, design

    def _fit_scale(
        self, X: Any, matrix: np.ndarray, gram_inverse: np.ndarray, beta: np.ndarray
    ) -> None:
        if sp.issparse(X):
            raise TypeError("scale=True needs dense X (the residual's scale is dense anyway)")
        residual = _residual(X.astype(np.float64, copy=False), matrix, beta, check=False)
        leverage = np.einsum("nk,kl,nl->n", matrix, gram_inverse, matrix)
        squares = residual**2 / np.clip(1.0 - leverage, 1e-12, None)[:, None]
        constant = np.all(matrix == matrix[:1], axis=0)
        self.scale_coef_ = _log_scale_fit(matrix, squares)
        self.scale_mask_ = self.remove_mask_ & ~constant

    def _apply(self, X: Any, design: Design, X_in: Any, *, check: bool) -> np.ndarray:
        rows = design.matrix[:, self.remove_mask_]
        beta = self.coef_[self.remove_mask_]
        in_place = not self.copy and X is X_in and not sp.issparse(X) and X.flags.writeable
        out = _residual(X, rows, beta, out=X if in_place else None, check=check)
        if self.scale:
            log_factor = design.matrix[:, self.scale_mask_] @ self.scale_coef_[self.scale_mask_]
            out *= np.exp(-log_factor).astype(out.dtype, copy=False)
        return out

    # -- scikit-learn API ---------------------------------------------------------------------
    def fit(self, X: Any, y: Any = None, *, metadata: Any = None) -> MetadataResidualizer:
        """Codes the metadata and fits β on the training rows.

        Args:
            X: training features, ``(n_samples, n_features)``: a float array (not copied) or a
                CSR/CSC sparse matrix.
            y: ignored (put labels in ``metadata`` and list them in ``keep``).
            metadata: the training rows' metadata, with the kept columns (labels) too.

        Returns:
            self.

        Raises:
            ValueError: without metadata, with a row count that does not match ``X``, NaN or
                inf in ``X`` or the metadata, pandas indexes that differ, or a singular design
                (the message names the collinear columns).
        """
        self._fit(X, metadata)
        return self

    def transform(self, X: Any, *, metadata: Any = None) -> np.ndarray:
        """Removes the fitted metadata effect from ``X``.

        Args:
            X: features, ``(n_samples, n_features_in_)``, dense or CSR/CSC sparse.
            metadata: the rows' metadata. The kept columns (labels) may be left out; if given,
                they are ignored.

        Returns:
            ``X − X_R β_R``, a dense array of the same shape and dtype as ``X`` (``X`` itself,
            overwritten, when ``copy=False`` and ``X`` is a writable float array).
        """
        check_is_fitted(self)
        metadata = _aligned(X, metadata, "transform")
        X_in = X
        X = self._validate(X, reset=False)
        if metadata is None:
            raise self._missing("transform")
        metadata = self._select(metadata, fitting=False)
        design = self.design_builder_.transform(metadata, ignore_keep=True)
        self._check_rows(design, X.shape[0], "transform")
        return self._apply(X, design, X_in, check=True)

    def fit_transform(self, X: Any, y: Any = None, *, metadata: Any = None) -> np.ndarray:
        """``fit(X, y, metadata=metadata).transform(X, metadata=metadata)``, with less work.

        The design is coded once and ``X`` is read twice: once for the products with the
        design (and the finiteness check), once for the residual.
        """
        X_in = X
        X, design = self._fit(X, metadata)
        return self._apply(X, design, X_in, check=False)  # X was checked by the fit

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        if tags.transformer_tags is not None:
            tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        tags.input_tags.sparse = True
        return tags

    def _warn_single_rows(self, builder: DesignBuilder, metadata: Any) -> None:
        kept = set(builder.keep_columns)
        cols = metadata_columns(metadata)
        for name, kind in builder.input_kinds.items():
            if kind != "categorical" or name in kept or name not in cols:
                continue
            single = sorted(str(v) for v, c in Counter(cols[name].tolist()).items() if c == 1)
            if single:
                warnings.warn(
                    f"metadata column {name!r} has level(s) {single} with a single training row: "
                    f"that level's effect is estimated from one row, whose output is then its "
                    f"kept part only",
                    UserWarning,
                    stacklevel=3,
                )


class _MetadataScorer:
    """A scorer that passes the test rows' metadata to the estimator's response method."""

    def __init__(
        self,
        score_func: Callable[..., float],
        response_method: str,
        sign: int,
        kwargs: dict[str, Any],
    ) -> None:
        self._score_func = score_func
        self._response_method = response_method
        self._sign = sign
        self._kwargs = kwargs

    def __call__(self, estimator: Any, X: Any, y_true: Any, *, metadata: Any = None) -> float:
        if metadata is None:
            raise ValueError(
                "metadata_scorer got no metadata: enable metadata routing "
                "(sklearn.set_config(enable_metadata_routing=True)) and pass "
                "params={'metadata': M} to cross_validate / cross_val_score / GridSearchCV.fit"
            )
        y_pred = getattr(estimator, self._response_method)(X, metadata=metadata)
        if (
            self._response_method == "predict_proba"
            and np.ndim(y_pred) == 2
            and (y_pred.shape[1] == 2)
        ):
            y_pred = y_pred[:, 1]
        return float(self._sign * self._score_func(y_true, y_pred, **self._kwargs))

    def get_metadata_routing(self) -> MetadataRequest:
        """Requests ``metadata`` for ``score`` (scikit-learn's routing protocol)."""
        request = MetadataRequest(owner=self)
        request.score.add_request(param="metadata", alias=True)
        return request

    def __repr__(self) -> str:
        name = getattr(self._score_func, "__name__", repr(self._score_func))
        return f"metadata_scorer({name}, response_method={self._response_method!r})"


def metadata_scorer(
    score_func: Callable[..., float],
    *,
    response_method: str = "predict",
    greater_is_better: bool = True,
    **kwargs: Any,
) -> Callable[..., float]:
    """A scorer for cross-validation that forwards the test fold's metadata to ``predict``.

    scikit-learn's scorers call ``estimator.predict(X)`` without metadata, so a pipeline holding a
    :class:`MetadataResidualizer` cannot predict in them (it raises). This scorer requests
    ``metadata`` through metadata routing and calls ``estimator.<response_method>(X,
    metadata=metadata)`` on the test fold, then ``score_func(y_true, y_pred, **kwargs)``.

    Args:
        score_func: a metric ``score_func(y_true, y_pred, **kwargs)``, e.g.
            :func:`sklearn.metrics.balanced_accuracy_score`.
        response_method: ``"predict"``, ``"predict_proba"`` (the positive column for two
            classes) or ``"decision_function"``. Default: ``"predict"``.
        greater_is_better: ``False`` negates the score, as :func:`sklearn.metrics.make_scorer`.
            Default: ``True``.
        **kwargs: passed to ``score_func``.

    Examples::

        >>> import sklearn
        >>> from sklearn.metrics import balanced_accuracy_score
        >>> scorer = metadata_scorer(balanced_accuracy_score)
        >>> # with sklearn.config_context(enable_metadata_routing=True):
        >>> #     cross_validate(pipe, X, y, params={"metadata": meta}, scoring=scorer)
    """
    methods = ("predict", "predict_proba", "decision_function")
    if response_method not in methods:
        raise ValueError(f"expected response_method in {methods}, got {response_method!r}")
    if not callable(score_func):
        raise TypeError(f"expected score_func to be callable, got {score_func!r}")
    return _MetadataScorer(score_func, response_method, 1 if greater_is_better else -1, kwargs)


_NO_METADATA = (
    "the check fits without metadata; MetadataResidualizer needs them and raises a ValueError "
    "(by design: it never returns X uncorrected)"
)
# scikit-learn's checks that fit or transform, which the missing metadata make fail
_NEEDS_FIT = (
    "check_dict_unchanged",
    "check_dont_overwrite_parameters",
    "check_dtype_object",
    "check_estimators_dtypes",
    "check_estimators_fit_returns_self",
    "check_estimators_nan_inf",
    "check_estimators_overwrite_params",
    "check_estimators_pickle",
    "check_f_contiguous_array_estimator",
    "check_fit2d_predict1d",
    "check_fit_check_is_fitted",
    "check_fit_idempotent",
    "check_fit_score_takes_y",
    "check_methods_sample_order_invariance",
    "check_methods_subset_invariance",
    "check_n_features_in",
    "check_n_features_in_after_fitting",
    "check_pipeline_consistency",
    "check_positive_only_tag_during_fit",
    "check_readonly_memmap_input",
    "check_transformer_data_not_an_array",
    "check_transformer_general",
    "check_transformer_preserve_dtypes",
    "check_estimator_sparse_array",
    "check_estimator_sparse_matrix",
    "check_estimator_sparse_tag",
)


def expected_failed_checks(estimator: Any = None) -> dict[str, str]:
    """scikit-learn's estimator checks that :class:`MetadataResidualizer` fails, and why.

    scikit-learn's checks call ``fit(X, y)`` and ``transform(X)`` with no way to pass metadata,
    and the residualizer refuses to run without them (it never returns features uncorrected),
    so every check that fits fails with the missing-metadata ``ValueError``. The API checks
    (parameters, cloning, repr, tags, errors before fitting) pass. scikit-learn (>= 1.6) takes
    this list through its own mechanism, the ``expected_failed_checks`` argument of
    :func:`~sklearn.utils.estimator_checks.check_estimator` and
    :func:`~sklearn.utils.estimator_checks.parametrize_with_checks`; the project's tests also
    run every check, with nothing expected to fail, on a subclass that derives metadata from
    each row.

    Args:
        estimator: ignored (the list does not depend on the parameters); present so that the
            function can be passed as ``parametrize_with_checks(expected_failed_checks=...)``.

    Returns:
        ``{check name: reason}``.

    Examples::

        >>> from sklearn.utils.estimator_checks import check_estimator
        >>> failed = expected_failed_checks()
        >>> "check_transformer_general" in failed, "check_get_params_invariance" in failed
        (True, False)
        >>> # check_estimator(MetadataResidualizer(), expected_failed_checks=failed)
    """
    out = dict.fromkeys(_NEEDS_FIT, _NO_METADATA)
    out["check_fit2d_1sample"] = (
        "the check expects the one-sample error message; without metadata the missing-metadata "
        "error comes first"
    )
    out["check_fit2d_1feature"] = (
        "the check expects a fit on one feature to succeed or name n_features; without metadata "
        "the missing-metadata error comes first"
    )
    return out
