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
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from metanorm import linalg
from metanorm.design import Design, DesignBuilder, metadata_columns

try:
    from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
    from sklearn.utils.metadata_routing import MetadataRequest
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as exc:  # pragma: no cover - exercised only without scikit-learn
    raise ImportError(
        "metanorm.preprocessing needs scikit-learn >= 1.6; install it with "
        "pip install 'metanorm[sklearn]'"
    ) from exc

__all__ = ["MetadataResidualizer", "metadata_scorer"]

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
            object, category or bool dtype. Integer-coded sites or batches must be listed here.
        standardize: which continuous metadata columns to standardise with the training mean
            and standard deviation: ``True`` (every removed one; kept columns stay raw), ``False``
            (none), or the columns (names or positions) to standardise, kept ones included if
            listed. Standardising a removed column only improves conditioning (the output does not
            change when an intercept is present); standardising a kept one changes its kept part
            (see above). Default: ``True``.
        intercept: add a constant column to the design. Default: ``True``.
        keep_intercept: keep the intercept's effect, so that the output keeps the features'
            training mean. Default: ``False``, as the layer and the paper.
        ridge: :math:`\lambda \ge 0` added to the diagonal of :math:`X^\top X`. Use it for a
            collinear design that cannot be fixed by dropping a column. Default: 0.

    Attributes:
        n_features_in_: D, the number of features seen at fit.
        feature_names_in_: feature names seen at fit (only when ``X`` had string column names).
        design_builder_: the fitted :class:`metanorm.design.DesignBuilder` (levels, means, scales).
        design_columns_: names of the K design columns, e.g. ``('y', 'site=b', 'intercept')``.
        remove_mask_: bool array ``(K,)``, true for the removed design columns.
        coef_: β, float64 array ``(K, D)``.
        n_metadata_in_: number of metadata columns seen at fit.
        metadata_names_in_: their names (``x0, x1, ...`` for an array).

    Shape:
        - X: ``(n_samples, n_features)``, float32 or float64 (kept in the output), no NaN.
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
        categorical: Iterable[str | int] | str | int | None = None,
        standardize: bool | Iterable[str | int] | str = True,
        intercept: bool = True,
        keep_intercept: bool = False,
        ridge: float = 0.0,
    ) -> None:
        self.keep = keep
        self.categorical = categorical
        self.standardize = standardize
        self.intercept = intercept
        self.keep_intercept = keep_intercept
        self.ridge = ridge

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
        for name in ("intercept", "keep_intercept"):
            value = getattr(self, name)
            if not isinstance(value, bool | np.bool_):
                raise TypeError(f"expected {name} to be a bool, got {value!r}")
        if self.keep_intercept and not self.intercept:
            raise ValueError("keep_intercept=True needs intercept=True (there is no intercept)")
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

    # -- scikit-learn API ---------------------------------------------------------------------
    def fit(self, X: Any, y: Any = None, *, metadata: Any = None) -> MetadataResidualizer:
        """Codes the metadata and fits β on the training rows.

        Args:
            X: training features, ``(n_samples, n_features)``.
            y: ignored (put labels in ``metadata`` and list them in ``keep``).
            metadata: the training rows' metadata, with the kept columns (labels) too.

        Returns:
            self.

        Raises:
            ValueError: without metadata, with a row count that does not match ``X``, NaN in
                metadata, or a singular design (the message names the collinear columns).
        """
        self._check_params()
        X = validate_data(self, X, dtype=[np.float64, np.float32])
        if metadata is None:
            raise self._missing("fit")
        builder = DesignBuilder(
            keep=_as_names(self.keep, "keep"),
            categorical=None
            if self.categorical is None
            else _as_names(self.categorical, "categorical"),
            standardize=self._standardize_arg(),
            intercept=bool(self.intercept),
            keep_intercept=bool(self.keep_intercept),
        )
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
        beta = linalg.fit_beta(
            design, torch.tensor(X, dtype=torch.float64), ridge=float(self.ridge)
        )
        mask = np.zeros(design.shape[1], dtype=bool)
        mask[list(design.remove)] = True
        self.design_builder_ = builder
        self.design_columns_ = design.columns
        self.remove_mask_ = mask
        self.coef_ = beta.cpu().numpy()
        self.metadata_names_in_ = np.asarray(list(builder.input_kinds), dtype=object)
        self.n_metadata_in_ = len(self.metadata_names_in_)
        return self

    def transform(self, X: Any, *, metadata: Any = None) -> np.ndarray:
        """Removes the fitted metadata effect from ``X``.

        Args:
            X: features, ``(n_samples, n_features_in_)``.
            metadata: the rows' metadata. The kept columns (labels) may be left out; if given,
                they are ignored.

        Returns:
            ``X − X_R β_R``, same shape and dtype as ``X``.
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        if metadata is None:
            raise self._missing("transform")
        design = self.design_builder_.transform(metadata, ignore_keep=True)
        self._check_rows(design, X.shape[0], "transform")
        out = linalg.remove_effect(
            torch.tensor(X, dtype=torch.float64),
            torch.tensor(design.matrix, dtype=torch.float64),
            torch.tensor(self.coef_, dtype=torch.float64),
            torch.tensor(self.remove_mask_),
        )
        return out.numpy().astype(X.dtype, copy=False)

    def fit_transform(self, X: Any, y: Any = None, *, metadata: Any = None) -> np.ndarray:
        """``fit(X, y, metadata=metadata)`` then ``transform(X, metadata=metadata)``."""
        return self.fit(X, y, metadata=metadata).transform(X, metadata=metadata)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        if tags.transformer_tags is not None:
            tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    def _warn_single_rows(self, builder: DesignBuilder, metadata: Any) -> None:
        kept = set(builder.keep_columns)
        cols = metadata_columns(metadata)
        for name, kind in builder.input_kinds.items():
            if kind != "categorical" or name in kept or name not in cols:
                continue
            levels, counts = np.unique(np.asarray(cols[name]).astype(str), return_counts=True)
            single = levels[counts == 1].tolist()
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
