"""scikit-learn's estimator checks for MetadataResidualizer.

The checks call ``fit(X, y)`` and ``transform(X)`` with no way to pass metadata, and the
residualizer refuses to run without metadata (it never passes features through uncorrected). So:

- ``MetadataResidualizer()`` itself runs every check; those that need a fit are expected failures,
  each with its reason, from the library's ``metanorm.preprocessing.expected_failed_checks``
  (``xfail_strict`` turns a check that starts passing into a failure, so the list stays exact). The API checks (parameters, cloning, repr, tags, unfitted errors, sparse and
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

from metanorm.preprocessing import MetadataResidualizer, expected_failed_checks

# scikit-learn >= 1.8 takes xfail_strict; before, the marks follow the xfail_strict = true of
# pyproject.toml, so a check that starts passing fails the run either way.
_STRICT = (
    {"xfail_strict": True}
    if "xfail_strict" in inspect.signature(parametrize_with_checks).parameters
    else {}
)


def _expected_failed_checks(estimator: object) -> dict[str, str]:
    # the library's own list, exact: xfail_strict fails the run when a listed check passes
    if type(estimator) is not MetadataResidualizer:
        return {}
    return expected_failed_checks(estimator)


def _rows(X: object) -> object:
    """The first feature of each row, as metadata (None for invalid input)."""
    if sp.issparse(X):
        return sp.csc_array(X)[:, [0]].toarray()
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

    def fit_transform(self, X, y=None, *, metadata=None):  # type: ignore[no-untyped-def]
        return super().fit_transform(X, y, metadata=_rows(X) if metadata is None else metadata)


@pytest.mark.filterwarnings("ignore::UserWarning")
@parametrize_with_checks(
    [MetadataResidualizer(), _RowMetadata(), _RowMetadata(keep_intercept=True, ridge=1e-3)],
    expected_failed_checks=_expected_failed_checks,
    **_STRICT,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
