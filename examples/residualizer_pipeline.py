"""MetadataResidualizer in a scikit-learn pipeline, cross-validated, against the same pipeline
without it. Needs scikit-learn and pandas: pip install "metanorm[sklearn,pandas]".

The training data come from three sites that go with the label and shift the features. The
residualizer removes the site effect (fitted on each training fold only) and keeps the label's.
Printed: the CV balanced accuracy of residualizer → scaler → logistic regression and of scaler →
logistic regression, and their balanced accuracy on test data where the site does not go with the
label. Run: python examples/residualizer_pipeline.py [--samples N] [--folds K]
"""

import argparse
import json

import numpy as np
import pandas as pd
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_validate
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from metanorm.preprocessing import MetadataResidualizer, metadata_scorer


def make_data(n, confounded, rng, site_shift):
    label = rng.integers(0, 2, n)
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7]]) if confounded else np.full((2, 3), 1 / 3)
    site = np.array([rng.choice(3, p=p[c]) for c in label])
    X = rng.normal(0, 1, (n, 30)) + site_shift[site]  # every feature shifts with the site ...
    X[:, :5] += 0.6 * label[:, None]  # ... and five carry a weak label signal
    meta = pd.DataFrame({"site": np.array(["A", "B", "C"])[site], "label": label})
    return X, label, meta


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=1500, help="training (and test) samples")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the models")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    site_shift = rng.normal(0, 1, (3, 30))
    X, y, meta = make_data(args.samples, True, rng, site_shift)
    X_te, y_te, meta_te = make_data(args.samples, False, rng, site_shift)
    cv = StratifiedKFold(args.folds, shuffle=True, random_state=0)

    result = {}
    # metadata routing lets cross_validate split `metadata` with X and hand each fold's rows to
    # the residualizer's fit and transform (config_context: only inside this block)
    with sklearn.config_context(enable_metadata_routing=True):
        mdn = make_pipeline(
            MetadataResidualizer(keep=["label"], categorical=["site"]),
            StandardScaler(),
            LogisticRegression(),
        )
        # scikit-learn's string scorers call predict without metadata: use metadata_scorer
        scorer = metadata_scorer(balanced_accuracy_score)
        cv_run = cross_validate(mdn, X, y, cv=cv, params={"metadata": meta}, scoring=scorer)
        scores = cv_run["test_score"]
        mdn.fit(X, y, metadata=meta)
        # the label is needed at fit only: the test rows pass the site alone
        test = balanced_accuracy_score(y_te, mdn.predict(X_te, metadata=meta_te[["site"]]))
        result["residualizer"] = {"cv": scores.tolist(), "test": test}

    plain = make_pipeline(StandardScaler(), LogisticRegression())
    scores = cross_validate(plain, X, y, cv=cv, scoring="balanced_accuracy")["test_score"]
    test = balanced_accuracy_score(y_te, plain.fit(X, y).predict(X_te))
    result["plain"] = {"cv": scores.tolist(), "test": test}

    for name, r in result.items():
        cv_scores = np.array(r["cv"])
        print(f"{name:12s} CV bAcc {cv_scores.mean():.3f} ± {cv_scores.std():.3f}", end="  ")
        print(f"test bAcc (site independent of label) {r['test']:.3f}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
