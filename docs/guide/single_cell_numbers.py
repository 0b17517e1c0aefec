"""The numbers of docs/guide/single_cell.md.

Needs scanpy: pip install -e ".[bench,bladderbatch]".
"""

import numpy as np
import pandas as pd
import scanpy as sc

from metanorm.integrations.anndata import regress_out
from metanorm_repro.datasets.bladderbatch import load_bladderbatch


def between_variance(X: np.ndarray, groups: pd.Series) -> float:
    """Sum over genes of the variance of the group means (weighted by group size)."""
    df = pd.DataFrame(X)
    means = df.groupby(groups.to_numpy()).transform("mean").to_numpy()
    return float(((means - X.mean(0)) ** 2).mean(0).sum())


def within_cov(X: np.ndarray, groups: pd.Series, covariate: np.ndarray) -> float:
    """Largest |covariance| with the covariate, within groups, over genes."""
    Xc = X - pd.DataFrame(X).groupby(groups.to_numpy()).transform("mean").to_numpy()
    c = covariate - pd.Series(covariate).groupby(groups.to_numpy()).transform("mean").to_numpy()
    return float(np.abs(c @ Xc / len(c)).max())


# 1. pbmc68k_reduced: the raw counts (the file's .X is already scaled), 700 cells × 765 genes
raw = sc.datasets.pbmc68k_reduced().raw.to_adata()
raw.X = np.asarray(raw.X.toarray(), dtype=np.float32)
keys = ["n_counts", "percent_mito"]
theirs = sc.pp.regress_out(raw, keys, copy=True)
ours = regress_out(raw, keys, copy=True)
sd = raw.X.std(0)
print(
    "pbmc68k: max |ours - scanpy| / gene sd:", float((np.abs(ours.X - theirs.X).max(0) / sd).max())
)
kept = regress_out(raw, keys, keep=["bulk_labels"], copy=True)
types = raw.obs["bulk_labels"]
before = between_variance(raw.X.astype(np.float64), types)
for name, a in (("scanpy", theirs), ("metanorm, keep=bulk_labels", kept)):
    X = np.asarray(a.X, dtype=np.float64)
    counts = raw.obs.n_counts.to_numpy()
    lost = 1 - between_variance(X, types) / before
    cov_before = within_cov(raw.X.astype(np.float64), types, counts)
    print(
        f"pbmc68k {name}: between-type variance lost {lost:.1%}, max within-type "
        f"|cov(gene, n_counts)| {within_cov(X, types, counts):.2g} (before {cov_before:.3g})"
    )

# 2. bladderbatch: remove the batch, keep the status; against ComBat with the status as covariate
bb = load_bladderbatch()
obs = bb.metadata().reset_index()
obs.index = obs.index.astype(str)
obs["batch"] = pd.Categorical(obs["batch"].astype(str))
obs["status"] = pd.Categorical(obs["status"])
base = sc.AnnData(bb.expression.astype(np.float64), obs=obs[["batch", "status"]])
mdn = regress_out(base, ["batch"], keep=["status"], copy=True)
combat = base.copy()
sc.pp.combat(combat, key="batch", covariates=["status"])
combat_plain = base.copy()
sc.pp.combat(combat_plain, key="batch")


def batch_r2(X: np.ndarray) -> float:
    """Mean over genes of the share of within-status variance explained by the batch."""
    s = obs["status"].to_numpy()
    b = obs["batch"].to_numpy()
    resid = X - pd.DataFrame(X).groupby(s).transform("mean").to_numpy()
    by_batch = pd.DataFrame(resid).groupby([s, b]).transform("mean").to_numpy()
    return float(((by_batch**2).sum(0) / (resid**2).sum(0)).mean())


def scale_spread(X: np.ndarray) -> float:
    """Mean over genes of max/min within-batch sd of the status-centred data."""
    s = obs["status"].to_numpy()
    resid = X - pd.DataFrame(X).groupby(s).transform("mean").to_numpy()
    sds = pd.DataFrame(resid).groupby(obs["batch"].to_numpy()).std().to_numpy()
    return float((sds.max(0) / sds.min(0)).mean())


status = obs["status"]
b0 = between_variance(base.X, status)
runs = (
    ("none", base),
    ("metanorm keep=status", mdn),
    ("ComBat covariates=status", combat),
    ("ComBat, no covariate", combat_plain),
)
for name, a in runs:
    X = np.asarray(a.X, dtype=np.float64)
    print(
        f"bladderbatch {name}: batch R² within status {batch_r2(X):.3f}, "
        f"between-status variance kept {between_variance(X, status) / b0:.1%}, "
        f"within-batch sd max/min {scale_spread(X):.2f}"
    )
for name, a in runs[2:]:
    X = np.asarray(a.X, dtype=np.float64)
    d = np.abs((X - X.mean(0)) - np.asarray(mdn.X))  # metanorm's output is centred per gene
    print(f"bladderbatch: metanorm vs {name}, gene-centred median |Δ| {np.median(d):.3f} (log2)")
    print(f"  {name}: mean |output - input| {np.abs(X - base.X).mean():.2f} (log2)")
