"""scikit-learn's estimator checks for MetadataResidualizer.

The checks call ``fit(X, y)`` and ``transform(X)`` with no way to pass metadata, and the
residualizer refuses to run without metadata (it never passes features through uncorrected). So:

- ``MetadataResidualizer()`` itself runs every check; those that need a fit are expected failures,
  each with its reason (``xfail_strict`` turns a check that starts passing into a failure, so the
  list stays exact). The API checks (parameters, cloning, repr, tags, unfitted errors, sparse and
  empty input rejected before the metadata are looked at) pass.
- ``_RowMetadata``, a test-only subclass that derives the metadata from each row (its first
  feature) when none are given, runs the same checks with nothing expected to fail: the fitting
  machinery (validation, dtypes, pickling, idempotence, subset and order invariance, pandas
  output...) is the real class's.
"""

from __future__ import annotations

import inspect

import pytest
import scipy.sparse as sp
from sklearn.utils import check_array
from sklearn.utils.estimator_checks import parametrize_with_checks

from metanorm.preprocessing import MetadataResidualizer

_NO_METADATA = (
    "the check fits without metadata; MetadataResidualizer needs them and raises a ValueError "
    "(by design: it never returns X uncorrected). Run on the _RowMetadata adapter instead"
)
_NEEDS_FIT = [
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
    "check_readonly_memmap_input",
    "check_transformer_data_not_an_array",
    "check_transformer_general",
    "check_transformer_preserve_dtypes",
]


# scikit-learn >= 1.8 takes xfail_strict; before, the marks follow the xfail_strict = true of
# pyproject.toml, so a check that starts passing fails the run either way.
_STRICT = (
    {"xfail_strict": True}
    if "xfail_strict" in inspect.signature(parametrize_with_checks).parameters
    else {}
)


def _expected_failed_checks(estimator: object) -> dict[str, str]:
    if type(estimator) is not MetadataResidualizer:
        return {}
    out = dict.fromkeys(_NEEDS_FIT, _NO_METADATA)
    out["check_positive_only_tag_during_fit"] = _NO_METADATA
    out["check_fit2d_1sample"] = (
        "the check expects the one-sample error message; without metadata the missing-metadata "
        "error comes first (the one-sample message is checked on _RowMetadata)"
    )
    out["check_fit2d_1feature"] = (
        "the check expects a fit on one feature to succeed or name n_features; without metadata "
        "the missing-metadata error comes first"
    )
    return out


def _rows(X: object) -> object:
    """The first feature of each row, as metadata (None for sparse or invalid input)."""
    if sp.issparse(X):
        return None
    try:
        return check_array(X, dtype=None, ensure_all_finite=False, ensure_min_samples=0)[:, :1]
    except (TypeError, ValueError):
        return None


class _RowMetadata(MetadataResidualizer):
    """Test-only: metadata default to the rows' first feature, so the checks can fit."""

    def fit(self, X, y=None, *, metadata=None):  # type: ignore[no-untyped-def]
        return super().fit(X, y, metadata=_rows(X) if metadata is None else metadata)

    def transform(self, X, *, metadata=None):  # type: ignore[no-untyped-def]
        return super().transform(X, metadata=_rows(X) if metadata is None else metadata)


@pytest.mark.filterwarnings("ignore::UserWarning")
@parametrize_with_checks(
    [MetadataResidualizer(), _RowMetadata(), _RowMetadata(keep_intercept=True, ridge=1e-3)],
    expected_failed_checks=_expected_failed_checks,
    **_STRICT,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
