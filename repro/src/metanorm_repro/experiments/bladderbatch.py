"""Batch correction on bladderbatch: none, MetadataResidualizer, CorrelationRemover, ComBat.

For each method it measures
  1. how much batch is left: squared distance correlation between the corrected expression of
     the most variable genes and the batch indicator (one-hot), within each tissue status
     (Cancer, Normal, Biopsy), each correction fitted on all 57 arrays;
  2. how much biology is left: cross-validated balanced accuracy of cancer vs normal (48 arrays,
     repeated stratified k-fold), the correction, the gene selection, the scaler and the
     logistic regression all fitted on the training rows of each fold only. Also the bAcc on
     the test arrays of batch 2, the only batch holding both statuses (batch cannot be the
     shortcut there), pooled over the folds of each repeat.

Usage (the study ``bladderbatch``; ``scripts/compare_bladderbatch.py`` runs :func:`main`)::

    metanorm reproduce bladderbatch [--option genes=1000] [--option folds=5]
        [--option repeats=10] [--seed 0] [--data PATH] [--out runs/bladderbatch]

Needs `pip install -e ".[compare]"` (fairlearn, neurocombat, rdata) and the data
(`bash scripts/install-data.sh`). Methods whose package is missing are reported as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import RepeatedStratifiedKFold
from sklearn.preprocessing import StandardScaler

from metanorm.metrics import grouped_distance_correlation_sqr
from metanorm.preprocessing import MetadataResidualizer
from metanorm_repro.datasets import load_bladderbatch

# A correction: fit(train expression, train metadata) -> apply(expression, metadata without
# labels) -> corrected expression. Metadata: DataFrame with columns batch, status.
Fitted = Callable[[np.ndarray, pd.DataFrame], np.ndarray]
Method = Callable[[np.ndarray, pd.DataFrame], Fitted]


def fit_none(F: np.ndarray, meta: pd.DataFrame) -> Fitted:
    """No correction: the expression as it is."""
    return lambda G, m: G


def fit_residualizer(F: np.ndarray, meta: pd.DataFrame) -> Fitted:
    """:class:`~metanorm.preprocessing.MetadataResidualizer`, status kept, batch removed."""
    res = MetadataResidualizer(keep=["status"], categorical=["batch", "status"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # single-row levels in tiny folds
        res.fit(F, metadata=meta[["batch", "status"]])
    return lambda G, m: res.transform(G, metadata=m[["batch"]])  # no labels at transform


def _batch_onehot(batch: np.ndarray, levels: np.ndarray) -> np.ndarray:
    return (np.asarray(batch)[:, None] == levels[1:][None, :]).astype(np.float64)


def fit_correlation_remover(F: np.ndarray, meta: pd.DataFrame) -> Fitted:
    """The ``CorrelationRemover`` of fairlearn on the one-hot batch columns."""
    from fairlearn.preprocessing import CorrelationRemover

    levels = np.unique(meta["batch"])
    d = F.shape[1]
    sens = list(range(d, d + len(levels) - 1))
    cr = CorrelationRemover(sensitive_feature_ids=sens)
    cr.fit(np.hstack([F, _batch_onehot(meta["batch"].to_numpy(), levels)]))
    return lambda G, m: cr.transform(np.hstack([G, _batch_onehot(m["batch"].to_numpy(), levels)]))


def fit_combat(F: np.ndarray, meta: pd.DataFrame) -> Fitted:
    """The neuroCombat correction fitted on the training rows, status a covariate (parametric EB).

    neuroCombatFromTraining (0.2.12) fails on numpy >= 2 (int() of a 1-element array), so the
    training estimates are applied here with its formula: standardise with the pooled mean plus
    the average covariate effect and the pooled variance, remove the batch's γ* and δ*, and scale
    back. Test rows need no status.
    """
    from neuroCombat import neuroCombat

    counts = meta["batch"].value_counts()
    if (counts < 2).any():  # its variance would be NaN, and so every corrected value
        few = ", ".join(f"batch {b}: {n}" for b, n in counts[counts < 2].items())
        raise ValueError(
            f"ComBat estimates each batch's variance from the training arrays and needs at least "
            f"2 per batch, got {few}; in cross-validation use more folds (folds=5 keeps at "
            "least 2 of every bladderbatch batch in each training fold)"
        )
    covars = pd.DataFrame({"batch": meta["batch"].to_numpy(), "status": meta["status"].to_numpy()})
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = neuroCombat(dat=F.T, covars=covars, batch_col="batch", categorical_cols=["status"])[
            "estimates"
        ]
    batches = [str(b) for b in est["batches"]]
    mean = est["stand.mean"][:, 0] + est["mod.mean"].mean(axis=1)  # genes
    sd = np.sqrt(est["var.pooled"][:, 0])
    gamma, delta = est["gamma.star"], est["delta.star"]  # batches × genes

    def apply(G: np.ndarray, m: pd.DataFrame) -> np.ndarray:
        idx = [batches.index(str(b)) for b in m["batch"]]
        z = (G - mean) / sd
        return (z - gamma[idx]) / np.sqrt(delta[idx]) * sd + mean

    return apply


METHODS: dict[str, tuple[str, Method, str | None]] = {
    "none": ("no correction", fit_none, None),
    "residualizer": ("MetadataResidualizer (batch removed, status kept)", fit_residualizer, None),
    "correlation_remover": (
        "fairlearn CorrelationRemover (batch)",
        fit_correlation_remover,
        "fairlearn",
    ),
    "combat": ("ComBat, neuroCombat (status as covariate)", fit_combat, "neuroCombat"),
}


def top_variable(F: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k genes with the largest variance in F (ties broken by index)."""
    return np.sort(np.argsort(-F.var(axis=0), kind="stable")[:k])


def batch_dependence(F: np.ndarray, meta: pd.DataFrame, fit: Method, genes: int) -> dict[str, Any]:
    """dcor² (biased and bias-corrected) between corrected genes and batch, per status."""
    sel = top_variable(F, genes)
    corrected = fit(F[:, sel], meta)(F[:, sel], meta)
    onehot = pd.get_dummies(meta["batch"]).to_numpy(dtype=np.float64)
    status = meta["status"].to_numpy()
    out: dict[str, Any] = {}
    for unbiased in (False, True):
        vals = grouped_distance_correlation_sqr(corrected, onehot, status, unbiased=unbiased)
        out["dcor2_u" if unbiased else "dcor2"] = {str(k): float(v) for k, v in vals.items()}
    return out


def cv_accuracy(
    F: np.ndarray,
    meta: pd.DataFrame,
    fit: Method,
    genes: int,
    folds: int,
    repeats: int,
    seed: int,
) -> dict[str, Any]:
    """Repeated stratified k-fold bAcc of cancer vs normal; everything fitted on train rows."""
    keep = meta["status"].isin(["Cancer", "Normal"]).to_numpy()
    X, m = F[keep], meta[keep].reset_index(drop=True)
    y = (m["status"] == "Cancer").to_numpy().astype(int)
    cv = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    per_repeat: list[float] = []
    batch2: list[float] = []
    oof_dcor: list[dict[str, float]] = []
    preds = np.empty(len(y), dtype=int)
    sel_all = top_variable(X, genes)  # label-free, for the out-of-fold dcor² only
    oof = np.empty((len(y), len(sel_all)))
    onehot = pd.get_dummies(m["batch"]).to_numpy(dtype=np.float64)
    for i, (train, test) in enumerate(cv.split(X, y)):
        no_labels_tr = m.iloc[train][["batch"]].assign(status="?")  # labels are not used here
        no_labels_te = m.iloc[test][["batch"]].assign(status="?")
        sel = top_variable(X[train], genes)
        apply = fit(X[train][:, sel], m.iloc[train])
        Xtr = apply(X[train][:, sel], no_labels_tr)
        Xte = apply(X[test][:, sel], no_labels_te)
        scaler = StandardScaler().fit(Xtr)
        clf = LogisticRegression(max_iter=5000).fit(scaler.transform(Xtr), y[train])
        preds[test] = clf.predict(scaler.transform(Xte))
        oof[test] = fit(X[train][:, sel_all], m.iloc[train])(X[test][:, sel_all], no_labels_te)
        if (i + 1) % folds == 0:  # one repeat done: every array predicted once
            per_repeat.append(balanced_accuracy_score(y, preds))
            b2 = (m["batch"] == 2).to_numpy()
            batch2.append(balanced_accuracy_score(y[b2], preds[b2]))
            vals = grouped_distance_correlation_sqr(
                oof, onehot, m["status"].to_numpy(), unbiased=False
            )
            oof_dcor.append({str(k): float(v) for k, v in vals.items()})
    return {
        "bacc_mean": float(np.mean(per_repeat)),
        "bacc_sd": float(np.std(per_repeat)),
        "bacc_batch2_mean": float(np.mean(batch2)),
        "bacc_batch2_sd": float(np.std(batch2)),
        "dcor2_out_of_fold": {k: float(np.mean([d[k] for d in oof_dcor])) for k in oof_dcor[0]},
        "n_arrays": len(y),
    }


def compare(
    data: Any,
    *,
    genes: int = 1000,
    folds: int = 5,
    repeats: int = 10,
    seed: int = 0,
    methods: list[str] | None = None,
) -> dict[str, Any]:
    """Runs every available method; returns {method: results or {'skipped': reason}}."""
    F = data.expression
    meta = pd.DataFrame({"batch": data.batch, "status": data.status})
    results: dict[str, Any] = {}
    for name in methods or list(METHODS):
        label, fit, package = METHODS[name]
        if package is not None:
            try:
                __import__(package)
            except ImportError:
                results[name] = {"label": label, "skipped": f"{package} is not installed"}
                continue
        t0 = time.perf_counter()
        r: dict[str, Any] = {"label": label}
        r.update(batch_dependence(F, meta, fit, genes))
        r.update(cv_accuracy(F, meta, fit, genes, folds, repeats, seed))
        r["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = r
    return results


def to_markdown(results: dict[str, Any]) -> str:
    """The table of :func:`compare`'s results, one row per method."""
    statuses = ["Cancer", "Normal", "Biopsy"]
    head = (
        "| method | "
        + " | ".join(f"dcor² {s} (bias-corr.)" for s in statuses)
        + " | out-of-fold dcor² Cancer / Normal"
        + " | CV bAcc cancer vs normal | bAcc, batch-2 test arrays |\n"
        + "|---|"
        + "---|" * (len(statuses) + 3)
        + "\n"
    )
    rows = []
    for r in results.values():
        if "skipped" in r:
            rows.append(f"| {r['label']} | skipped: {r['skipped']} |")
            continue
        cells = [f"{r['dcor2'][s]:.3f} ({r['dcor2_u'][s]:.3f})" for s in statuses]
        rows.append(
            f"| {r['label']} | "
            + " | ".join(cells)
            + f" | {r['dcor2_out_of_fold']['Cancer']:.3f} / {r['dcor2_out_of_fold']['Normal']:.3f}"
            + f" | {r['bacc_mean']:.3f} ± {r['bacc_sd']:.3f}"
            + f" | {r['bacc_batch2_mean']:.3f} ± {r['bacc_batch2_sd']:.3f} |"
        )
    return head + "\n".join(rows) + "\n"


def _write_atomic(path: Path, text: str, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """``python scripts/compare_bladderbatch.py``: runs :func:`compare`, prints the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--genes", type=int, default=1000, help="most variable genes (default 1000)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="bladderdata.rda or its folder")
    p.add_argument("--methods", nargs="*", choices=list(METHODS), default=None)
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.genes < 2 or args.folds < 2 or args.repeats < 1:
        p.error("expected --genes >= 2, --folds >= 2 and --repeats >= 1")
    try:
        data = load_bladderbatch(args.data)
    except (FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results = compare(
        data,
        genes=args.genes,
        folds=args.folds,
        repeats=args.repeats,
        seed=args.seed,
        methods=args.methods,
    )
    print(
        f"bladderbatch: {data.expression.shape[0]} arrays, top {args.genes} variable genes, "
        f"{args.repeats}×{args.folds}-fold CV ({time.perf_counter() - t0:.0f} s)\n"
    )
    print(to_markdown(results))
    if args.out is not None:
        payload = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, **results}
        payload["settings"]["overwrite"] = bool(args.overwrite)
        _write_atomic(args.out, json.dumps(payload, indent=2, default=str) + "\n", args.overwrite)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
