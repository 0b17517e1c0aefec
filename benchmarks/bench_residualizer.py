"""MetadataResidualizer against scanpy's regress_out (or numpy's normal equations): time, memory,
agreement.

Both sides correct a dense float32 matrix in place (scanpy's default ``copy=False``; ours with
``copy=False``); each repetition starts from a fresh copy of the input, made outside the timing.
The methods run interleaved, so that load on the machine hits them alike; the ratios are the
figures to read. scanpy runs in this process when installed (``pip install -e ".[bench]"``);
without it, numpy's normal equations in float64 are the reference.

Cases:
  continuous  N cells × G genes, 2 continuous covariates (n_counts, percent_mito) + intercept
  batch       the same + an 8-level batch; scanpy gets the batch as 7 float one-hot keys
              (a categorical key makes scanpy fit one gene at a time, far slower)
  pbmc68k     the raw counts of scanpy's bundled pbmc68k_reduced (700 × 765), regress out
              n_counts and percent_mito (scanpy only)

Run: python benchmarks/bench_residualizer.py [--cells 50000 --genes 2000 --reps 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from metanorm.preprocessing import MetadataResidualizer

HAVE_SCANPY = importlib.util.find_spec("scanpy") is not None


def make_data(n: int, g: int, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    obs = pd.DataFrame(
        {
            "n_counts": rng.lognormal(8, 0.5, n),
            "percent_mito": rng.uniform(0, 0.1, n),
            "batch": pd.Categorical(rng.choice([f"b{i}" for i in range(8)], n)),
        },
        index=[f"c{i}" for i in range(n)],
    )
    X = rng.standard_normal((n, g), dtype=np.float32)
    X += 3.0
    X += np.outer(np.log(obs.n_counts) - 8, rng.normal(size=g)).astype(np.float32)
    X += rng.normal(size=(8, g)).astype(np.float32)[obs.batch.cat.codes]
    return X, obs


def ours(keys: list[str]) -> Callable[[np.ndarray, pd.DataFrame], np.ndarray]:
    def run(X: np.ndarray, obs: pd.DataFrame) -> np.ndarray:
        res = MetadataResidualizer(columns=keys, copy=False)
        return res.fit_transform(X, metadata=obs.reset_index(drop=True))

    return run


def numpy_normal_equations(keys: list[str]) -> Callable[[np.ndarray, pd.DataFrame], np.ndarray]:
    def run(X: np.ndarray, obs: pd.DataFrame) -> np.ndarray:
        D = design_matrix(obs, keys)
        beta = np.linalg.solve(D.T @ D, D.T @ X)  # D float64: X is promoted to float64
        X -= (D @ beta).astype(X.dtype)
        return X

    return run


def design_matrix(obs: pd.DataFrame, keys: list[str]) -> np.ndarray:
    parts = [np.ones((len(obs), 1))]
    for k in keys:
        v = obs[k]
        if isinstance(v.dtype, pd.CategoricalDtype):
            parts.append(pd.get_dummies(v, drop_first=True).to_numpy(np.float64))
        else:
            parts.append(v.to_numpy(np.float64)[:, None])
    return np.hstack(parts)


def scanpy_regress_out(keys: list[str]) -> Callable[[np.ndarray, pd.DataFrame], np.ndarray]:
    import anndata as ad
    import scanpy as sc

    def run(X: np.ndarray, obs: pd.DataFrame) -> np.ndarray:
        adata = ad.AnnData(X, obs=obs)
        expanded = []
        for k in keys:  # categorical keys as float one-hot columns
            if isinstance(obs[k].dtype, pd.CategoricalDtype):
                dummies = pd.get_dummies(obs[k], drop_first=True, prefix=k).astype(np.float32)
                for c in dummies.columns:
                    adata.obs[c] = dummies[c].to_numpy()
                    expanded.append(c)
            else:
                expanded.append(k)
        sc.pp.regress_out(adata, expanded)
        return np.asarray(adata.X)

    return run


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def extra_memory(fn: Callable[..., Any], X: np.ndarray, obs: pd.DataFrame) -> float:
    """Peak traced allocation during ``fn`` beyond what it leaves, as a fraction of X's size."""
    work = X.copy()
    tracemalloc.start()
    try:
        fn(work, obs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / X.nbytes


def bench_case(name: str, X: np.ndarray, obs: pd.DataFrame, keys: list[str], reps: int) -> None:
    methods: dict[str, Callable[..., Any]] = {"metanorm": ours(keys)}
    methods["numpy normal eq."] = numpy_normal_equations(keys)
    if HAVE_SCANPY:
        methods["scanpy"] = scanpy_regress_out(keys)
        methods["scanpy"](X[:200].copy(), obs.iloc[:200])  # numba compilation, outside timing
    times: dict[str, list[float]] = {m: [] for m in methods}
    outputs: dict[str, np.ndarray] = {}
    for _ in range(reps):
        for m, fn in methods.items():
            work = X.copy()
            t, outputs[m] = timed(fn, work, obs)
            times[m].append(t)
    ref = "scanpy" if HAVE_SCANPY else "numpy normal eq."
    sd = X.astype(np.float64).std(0)
    print(f"\n## {name}: {X.shape[0]} × {X.shape[1]} {X.dtype}, keys {keys}, {reps} reps")
    print("| method | median s | × " + ref + " | max abs diff / gene sd vs " + ref + " |")
    print("|---|---|---|---|")
    med = {m: float(np.median(v)) for m, v in times.items()}
    for m in methods:
        gap = float((np.abs(outputs[m] - outputs[ref]).max(0) / sd).max())
        print(f"| {m} | {med[m]:.3f} | {med[m] / med[ref]:.2f} | {gap:.1e} |")
    print(f"metanorm / numpy normal equations: {med['metanorm'] / med['numpy normal eq.']:.2f}")
    print(
        "extra memory (tracemalloc peak, in place, / input size): metanorm "
        f"{extra_memory(methods['metanorm'], X, obs):.3f}, numpy normal eq. "
        f"{extra_memory(methods['numpy normal eq.'], X, obs):.3f}"
    )


def bench_pbmc68k(reps: int) -> None:
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced().raw.to_adata()  # .X of the file is already scaled
    X = np.asarray(adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X, np.float32)
    obs = adata.obs[["n_counts", "percent_mito"]].copy()
    bench_case("pbmc68k_reduced (.raw)", X, obs, ["n_counts", "percent_mito"], reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=50_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    print(
        f"scanpy: {'installed' if HAVE_SCANPY else 'not installed'}; threads: "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, cpus {os.cpu_count()}"
    )
    X, obs = make_data(a.cells, a.genes)
    bench_case("continuous", X, obs, ["n_counts", "percent_mito"], a.reps)
    bench_case("batch", X, obs, ["n_counts", "percent_mito", "batch"], a.reps)
    if HAVE_SCANPY:
        bench_pbmc68k(a.reps)


if __name__ == "__main__":
    main()
