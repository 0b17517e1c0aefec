"""Metadata routing: Pipeline, cross_validate, GridSearchCV fit the residualizer on train folds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score, cross_validate
from sklearn.pipeline import make_pipeline

from metanorm.preprocessing import MetadataResidualizer, metadata_scorer


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 2, n)
    site = rng.choice(["a", "b", "c"], n)
    X = rng.normal(size=(n, 4)) + np.outer(y, [3.0, 0, 0, 0]) + np.outer(site == "b", [0, 3, 3, 0])
    return X, y, pd.DataFrame({"site": site, "label": y})


@pytest.fixture
def routing():  # type: ignore[no-untyped-def]
    with sklearn.config_context(enable_metadata_routing=True):
        yield


def test_metadata_are_requested_by_default_and_can_be_aliased() -> None:
    res = MetadataResidualizer()
    routing = res.get_metadata_routing()
    assert routing.fit.requests == {"metadata": True}
    assert routing.transform.requests == {"metadata": True}
    with sklearn.config_context(enable_metadata_routing=True):
        res.set_fit_request(metadata="site_info")
    assert res.get_metadata_routing().fit.requests == {"metadata": "site_info"}


@pytest.mark.skipif(
    tuple(int(v) for v in sklearn.__version__.split(".")[:2]) < (1, 8),
    reason="the default scorer forwards metadata to score() from scikit-learn 1.8 on",
)
@pytest.mark.usefixtures("routing")
def test_cross_validate_fits_on_training_folds_only(data) -> None:  # type: ignore[no-untyped-def]
    X, y, meta = data
    pipe = make_pipeline(MetadataResidualizer(keep=["label"]), LogisticRegression())
    cv = KFold(5, shuffle=True, random_state=0)
    out = cross_validate(
        pipe,
        X,
        y,
        cv=cv,
        params={"metadata": meta},
        return_estimator=True,
        return_indices=True,
        error_score="raise",
    )
    for est, train in zip(out["estimator"], out["indices"]["train"], strict=True):
        fold = MetadataResidualizer(keep=["label"]).fit(X[train], metadata=meta.iloc[train])
        np.testing.assert_allclose(est[0].coef_, fold.coef_)
        assert est[0].coef_.shape == (4, 4)
    # scoring=None uses Pipeline.score, which forwards the test fold's metadata to transform
    assert np.all(out["test_score"] > 0.8)
    # metadata_scorer forwards them to predict for any metric; its values are the manual ones
    scorer = metadata_scorer(balanced_accuracy_score)
    bacc = cross_val_score(
        pipe, X, y, cv=cv, params={"metadata": meta}, scoring=scorer, error_score="raise"
    )
    manual = []
    for train, test in cv.split(X):
        p = make_pipeline(MetadataResidualizer(keep=["label"]), LogisticRegression())
        p.fit(X[train], y[train], metadata=meta.iloc[train])
        # test rows: no label needed
        pred = p.predict(X[test], metadata=meta.iloc[test][["site"]])
        manual.append(balanced_accuracy_score(y[test], pred))
    np.testing.assert_allclose(bacc, manual)


@pytest.mark.usefixtures("routing")
def test_string_scorer_cannot_reach_the_residualizer(data) -> None:  # type: ignore[no-untyped-def]
    X, y, meta = data
    pipe = make_pipeline(MetadataResidualizer(keep=["label"]), LogisticRegression())
    with pytest.raises(ValueError, match="transform needs metadata"):
        cross_val_score(
            pipe, X, y, params={"metadata": meta}, scoring="balanced_accuracy", error_score="raise"
        )


@pytest.mark.usefixtures("routing")
def test_grid_search(data) -> None:  # type: ignore[no-untyped-def]
    X, y, meta = data
    pipe = make_pipeline(MetadataResidualizer(keep=["label"]), LogisticRegression())
    search = GridSearchCV(
        pipe,
        {"metadataresidualizer__keep_intercept": [False, True]},
        cv=3,
        scoring=metadata_scorer(balanced_accuracy_score),
        error_score="raise",
    )
    search.fit(X, y, metadata=meta)
    assert 0.8 < search.best_score_ <= 1.0
    pred = search.best_estimator_.predict(X[:7], metadata=meta.iloc[:7][["site"]])
    assert pred.shape == (7,)


@pytest.mark.usefixtures("routing")
def test_alias(data) -> None:  # type: ignore[no-untyped-def]
    X, y, meta = data
    res = MetadataResidualizer(keep=["label"])
    res.set_fit_request(metadata="info").set_transform_request(metadata="info")
    pipe = make_pipeline(res, LogisticRegression()).fit(X, y, info=meta)
    ref = MetadataResidualizer(keep=["label"]).fit(X, metadata=meta)
    np.testing.assert_allclose(pipe[0].coef_, ref.coef_)
    assert pipe.predict(X[:5], info=meta.iloc[:5]).shape == (5,)


def test_pipeline_without_routing_uses_step_params(data) -> None:  # type: ignore[no-untyped-def]
    X, y, meta = data
    pipe = make_pipeline(MetadataResidualizer(keep=["label"]), LogisticRegression())
    pipe.fit(X, y, metadataresidualizer__metadata=meta)
    with pytest.raises(ValueError, match="needs metadata"):
        pipe.predict(X)  # never silently uncorrected


@pytest.mark.usefixtures("routing")
def test_metadata_scorer_response_methods(data) -> None:  # type: ignore[no-untyped-def]
    from sklearn.metrics import log_loss, roc_auc_score

    X, y, meta = data
    pipe = make_pipeline(MetadataResidualizer(keep=["label"]), LogisticRegression())
    pipe.fit(X, y, metadata=meta)
    proba = pipe.predict_proba(X, metadata=meta[["site"]])
    auc = metadata_scorer(roc_auc_score, response_method="predict_proba")
    assert auc(pipe, X, y, metadata=meta) == pytest.approx(roc_auc_score(y, proba[:, 1]))
    loss = metadata_scorer(log_loss, response_method="predict_proba", greater_is_better=False)
    # two columns are reduced to the positive one, which log_loss also accepts
    assert loss(pipe, X, y, metadata=meta) == pytest.approx(-log_loss(y, proba[:, 1]))
    with pytest.raises(ValueError, match="got no metadata"):
        auc(pipe, X, y)
    with pytest.raises(ValueError, match="response_method"):
        metadata_scorer(roc_auc_score, response_method="transform")
