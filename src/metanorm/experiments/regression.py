r"""Regression targets: MDN with the target kept in the design, against no correction.

The experiment engine (:mod:`metanorm.experiments.engine`) trains classifiers, so regression
has this standalone runner (``python -m metanorm.experiments.regression synthetic|diabetes``),
which writes ``results.json`` and ``report.md`` into ``--out``.

- ``synthetic``: the regression variant of the paper's images
  (:mod:`metanorm.datasets.synthetic_regression`: target ``t``, the image's main effect
  ``mf = t + noise``, a confounder ``cf = t + noise``). A one-hidden-layer MLP on the pixels; the
  ``mdn`` method puts :class:`~metanorm.nn.MetadataNorm` after fc1 with the design
  ``[t, cf, 1]``, the target kept (``keep=[0]``). Test MSE and R² against the exact bounds with
  and without ``cf``; bias-corrected dcor² between the fc1 features (after MDN, before the ReLU)
  and ``cf`` within quantile bins of the target, against the same for ``mf`` itself (what a
  confounder-free model's features leave, as the bins are not points) and for ``(mf, cf)``.
- ``diabetes``: scikit-learn's diabetes data (442 patients, target = disease progression after
  one year; offline). Age and sex are taken out of the inputs and used as metadata. Two models,
  each with and without the correction, in K-fold cross-validation: a linear regression on the
  inputs, preceded by :class:`~metanorm.preprocessing.MetadataResidualizer` (fitted with the
  target kept), and an MLP with MetadataNorm after fc1 (design ``[target, age, sex, 1]``,
  target kept). R² (pooled over the out-of-fold predictions) and bias-corrected dcor² of the
  inputs / fc1 features with ``(age, sex)`` within target bins (mean over folds).

At evaluation the kept target column is multiplied by nothing; the runner fills it with zeros,
so no test target enters the model. ``docs/bounds_regression.md`` has the measured tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from metanorm.datasets.synthetic_regression import (
    RegressionLaw,
    make_synthetic_regression,
    regression_bounds,
)
from metanorm.experiments._io import write_json, write_text
from metanorm.metrics import distance_correlation_sqr
from metanorm.nn import MetadataNorm
from metanorm.nn.utils import refit_running_beta

__all__ = [
    "TASKS",
    "RegressionMLP",
    "binned_dcor2",
    "main",
    "regression_report",
    "run_diabetes",
    "run_regression",
    "run_synthetic_regression",
]

#: The tasks of :func:`run_regression`.
TASKS: tuple[str, ...] = ("synthetic", "diabetes")


class RegressionMLP(nn.Module):
    """fc1 → (MetadataNorm) → ReLU → fc2, one output.

    Args:
        in_features: inputs per sample (images are flattened).
        hidden: fc1's width.
        design: the training design ``(N, K)`` for the ``mdn`` method; ``None``: no MDN layer.
        keep: the design's kept columns (the target). Default: ``(0,)``.
        pool: for image input ``(m, C, H, W)``, average-pool ``pool × pool`` blocks before
            fc1 (``in_features`` counts the pooled values). Default: 1 (no pooling).

    Shape:
        - Input: ``(m, *)`` (flattened to ``(m, in_features)``) and design rows ``(m, K)``.
        - Output: ``(prediction (m,), fc1 features (m, hidden))``, the features after MDN and
          before the ReLU.
    """

    def __init__(
        self,
        in_features: int,
        hidden: int,
        design: torch.Tensor | None = None,
        keep: Sequence[int] = (0,),
        pool: int = 1,
    ) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool) if pool > 1 else nn.Identity()
        self.fc1 = nn.Linear(in_features, hidden)
        self.mdn = MetadataNorm(hidden, design, keep=list(keep)) if design is not None else None
        self.fc2 = nn.Linear(hidden, 1)

    def forward(
        self, x: torch.Tensor, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prediction ``(m,)`` and the fc1 features ``(m, hidden)`` (after MDN)."""
        h = self.fc1(self.pool(x).flatten(1))
        if self.mdn is not None:
            if rows is None:
                raise ValueError("expected design rows for a model with MetadataNorm, got None")
            h = self.mdn(h, rows)
        return self.fc2(torch.relu(h)).squeeze(1), h


def binned_dcor2(features: Any, meta: Any, target: Any, bins: int = 3) -> list[float]:
    """Bias-corrected dcor² between ``features`` and ``meta`` within quantile bins of ``target``.

    Args:
        features: ``(n, D)`` array or tensor.
        meta: ``(n,)`` or ``(n, p)`` metadata.
        target: ``(n,)`` continuous target.
        bins: number of equal-count bins. Default: 3.

    Returns:
        One dcor² per bin, lowest target first.

    Examples::

        >>> rng = np.random.default_rng(0)
        >>> t = rng.normal(size=300); c = t + rng.normal(size=300)
        >>> [round(v, 1) for v in binned_dcor2(c[:, None], c, t)]
        [1.0, 1.0, 1.0]
    """
    target = np.asarray(target, dtype=np.float64)
    if target.ndim != 1:
        raise ValueError(f"expected a 1-D target, got shape {target.shape}")
    if bins < 1 or len(target) < 4 * bins:
        raise ValueError(f"expected bins >= 1 and at least 4 samples per bin, got {bins} bins")
    order = np.argsort(target, kind="stable")
    f = np.asarray(features, dtype=np.float64).reshape(len(target), -1)
    m = np.asarray(meta, dtype=np.float64).reshape(len(target), -1)
    return [
        float(distance_correlation_sqr(f[idx], m[idx], unbiased=True))
        for idx in np.array_split(order, bins)
    ]


def _mse_r2(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    mse = float(np.mean((pred - target) ** 2))
    return mse, 1.0 - mse / float(np.var(target))


def _train(
    model: RegressionMLP,
    x: torch.Tensor,
    z: torch.Tensor,
    rows: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(z)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            pred, _ = model(x[idx], rows[idx])
            loss = torch.mean((pred - z[idx]) ** 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
    if model.mdn is not None:  # the full-data β of the final weights, for evaluation
        batches = [
            (x[i : i + batch_size], rows[i : i + batch_size]) for i in range(0, n, batch_size)
        ]
        refit_running_beta(model, batches)
    model.eval()


@torch.no_grad()
def _predict(
    model: RegressionMLP, x: torch.Tensor, rows: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    pred, h = model(x, rows)
    return pred.numpy().astype(np.float64), h.numpy().astype(np.float64)


def _design(z: np.ndarray, meta: np.ndarray) -> torch.Tensor:
    """``[z, meta..., 1]`` as float32; ``meta`` ``(n, p)``."""
    n = len(z)
    return torch.from_numpy(np.column_stack([z, meta, np.ones(n)]).astype(np.float32))


def run_synthetic_regression(
    *,
    n_train: int = 1000,
    n_test: int = 1000,
    methods: Sequence[str] = ("none", "mdn"),
    epochs: int = 60,
    batch_size: int = 200,
    lr: float = 3e-3,
    hidden: int = 32,
    pool: int = 4,
    bins: int = 5,
    seed: int = 0,
    law: RegressionLaw | None = None,
) -> dict[str, Any]:
    """Trains the MLP on the synthetic regression task, per method; see the module docstring.

    Returns:
        ``{"task", "config", "bounds", "reference_dcor2", "rows"}``: ``rows`` one dict per method
        with ``test_mse``, ``test_r2``, ``dcor2_bins`` (features vs ``cf`` within target bins) and
        ``seconds``.
    """
    for m in methods:
        if m not in ("none", "mdn"):
            raise ValueError(f"expected methods among ('none', 'mdn'), got {m!r}")
    law = law or RegressionLaw()
    ss = np.random.SeedSequence(seed)
    s_train, s_test = ss.spawn(2)
    train = make_synthetic_regression(n_train, random_state=s_train, law=law, name="train")
    test = make_synthetic_regression(n_test, random_state=s_test, law=law, name="test")
    mu, sd = float(train.target.mean()), float(train.target.std())
    cmu, csd = float(train.metadata["cf"].mean()), float(train.metadata["cf"].std())
    z = (train.target - mu) / sd
    c_tr = (train.metadata["cf"] - cmu) / csd
    c_te = (test.metadata["cf"] - cmu) / csd
    rows_tr = _design(z, c_tr[:, None])
    rows_te = _design(np.zeros(len(test)), c_te[:, None])  # the kept target: multiplied by nothing
    x_tr, x_te = train.images * 10.0, test.images * 10.0  # pixel scale ~1
    out_rows = []
    for method in methods:
        torch.manual_seed(seed)
        model = RegressionMLP(
            x_tr[0].numel() // pool**2, hidden, rows_tr if method == "mdn" else None, pool=pool
        )
        t0 = time.perf_counter()
        _train(
            model,
            x_tr,
            torch.from_numpy(z.astype(np.float32)),
            rows_tr,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=0.0,
            seed=seed,
        )
        pred, h = _predict(model, x_te, rows_te)
        mse, r2 = _mse_r2(pred * sd + mu, test.target)
        out_rows.append(
            {
                "method": method,
                "test_mse": mse,
                "test_r2": r2,
                "dcor2_bins": binned_dcor2(h, test.metadata["cf"], test.target, bins),
                "seconds": time.perf_counter() - t0,
            }
        )
    b = regression_bounds(law)
    mf, cf = test.metadata["mf"], test.metadata["cf"]
    return {
        "task": "synthetic",
        "config": {
            "n_train": n_train,
            "n_test": n_test,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "hidden": hidden,
            "pool": pool,
            "bins": bins,
            "seed": seed,
            "law": dataclasses.asdict(law),
        },
        "bounds": dataclasses.asdict(b),
        "reference_dcor2": {
            "mf (confounder-free)": binned_dcor2(mf[:, None], cf, test.target, bins),
            "(mf, cf) (confounded)": binned_dcor2(np.column_stack([mf, cf]), cf, test.target, bins),
        },
        "rows": out_rows,
    }


def run_diabetes(
    *,
    folds: int = 5,
    epochs: int = 300,
    lr: float = 1e-2,
    hidden: int = 16,
    weight_decay: float = 0.1,
    bins: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Cross-validated linear and MLP regressions on scikit-learn's diabetes data.

    Each with and without the metadata correction; see the module docstring.

    Returns:
        ``{"task", "config", "rows"}``: one row per (model, method) with ``r2`` (pooled
        out-of-fold), ``r2_folds`` and ``dcor2_bins`` (inputs or fc1 features vs (age, sex)
        within target bins of each test fold, mean over folds) and ``seconds``.
    """
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import LinearRegression
    from sklearn.model_selection import KFold

    from metanorm.preprocessing import MetadataResidualizer

    data = load_diabetes()
    X_all, y = data.data.astype(np.float64), data.target.astype(np.float64)
    names = list(data.feature_names)
    mcols = [names.index("age"), names.index("sex")]
    icols = [i for i in range(X_all.shape[1]) if i not in mcols]
    X, meta = X_all[:, icols], X_all[:, mcols]
    kf = KFold(n_splits=folds, shuffle=True, random_state=seed)
    variants = [("linear", "none"), ("linear", "residualizer"), ("mlp", "none"), ("mlp", "mdn")]
    acc: dict[tuple[str, str], dict[str, Any]] = {
        v: {"pred": np.zeros_like(y), "r2_folds": [], "dcor": [], "seconds": 0.0} for v in variants
    }
    for fold, (tr, te) in enumerate(kf.split(X)):
        for model_name, method in variants:
            a = acc[(model_name, method)]
            t0 = time.perf_counter()
            if model_name == "linear":
                Xtr, Xte = X[tr], X[te]
                if method == "residualizer":
                    res = MetadataResidualizer(keep=[0], categorical=[])
                    res.fit(Xtr, metadata=np.column_stack([y[tr], meta[tr]]))
                    # the kept target column is ignored at transform: zeros, no test target
                    Xtr = res.transform(Xtr, metadata=np.column_stack([0 * y[tr], meta[tr]]))
                    Xte = res.transform(Xte, metadata=np.column_stack([0 * y[te], meta[te]]))
                pred = LinearRegression().fit(Xtr, y[tr]).predict(Xte)
                feats = Xte
            else:
                xm, xs = X[tr].mean(0), X[tr].std(0)
                mm, ms = meta[tr].mean(0), meta[tr].std(0)
                ym, ys = y[tr].mean(), y[tr].std()
                x_tr = torch.from_numpy(((X[tr] - xm) / xs).astype(np.float32))
                x_te = torch.from_numpy(((X[te] - xm) / xs).astype(np.float32))
                z = (y[tr] - ym) / ys
                rows_tr = _design(z, (meta[tr] - mm) / ms)
                rows_te = _design(np.zeros(len(te)), (meta[te] - mm) / ms)
                torch.manual_seed(seed + fold)
                model = RegressionMLP(X.shape[1], hidden, rows_tr if method == "mdn" else None)
                _train(
                    model,
                    x_tr,
                    torch.from_numpy(z.astype(np.float32)),
                    rows_tr,
                    epochs=epochs,
                    batch_size=len(tr),
                    lr=lr,
                    weight_decay=weight_decay,
                    seed=seed + fold,
                )
                p, feats = _predict(model, x_te, rows_te)
                pred = p * ys + ym
            a["pred"][te] = pred
            a["r2_folds"].append(_mse_r2(pred, y[te])[1])
            a["dcor"].append(binned_dcor2(feats, meta[te], y[te], bins))
            a["seconds"] += time.perf_counter() - t0
    out_rows = []
    for (model_name, method), a in acc.items():
        out_rows.append(
            {
                "model": model_name,
                "method": method,
                "r2": _mse_r2(a["pred"], y)[1],
                "r2_folds": a["r2_folds"],
                "dcor2_bins": np.mean(np.array(a["dcor"]), axis=0).tolist(),
                "seconds": a["seconds"],
            }
        )
    return {
        "task": "diabetes",
        "config": {
            "folds": folds,
            "epochs": epochs,
            "lr": lr,
            "hidden": hidden,
            "weight_decay": weight_decay,
            "bins": bins,
            "seed": seed,
            "metadata": ["age", "sex"],
            "inputs": [names[i] for i in icols],
        },
        "rows": out_rows,
    }


def _fmt(values: Sequence[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def regression_report(result: dict[str, Any]) -> str:
    """The markdown report of a :func:`run_synthetic_regression` or :func:`run_diabetes` result."""
    cfg = result["config"]
    lines = [f"# Regression: {result['task']}", ""]
    if result["task"] == "synthetic":
        b = result["bounds"]
        lines += [
            f"Synthetic regression, {cfg['n_train']} training / {cfg['n_test']} test images, MLP "
            f"on {cfg['pool']}×{cfg['pool']}-pooled pixels (hidden {cfg['hidden']}), "
            f"{cfg['epochs']} epochs, batch {cfg['batch_size']}, "
            f"seed {cfg['seed']}. dcor²: bias-corrected, fc1 features vs cf within "
            f"{cfg['bins']} target bins.",
            "",
            f"Exact bounds: MSE {b['mse_mf_cf']:.3f} (R² {b['r2_mf_cf']:.3f}) using cf; "
            f"{b['mse_mf']:.3f} (R² {b['r2_mf']:.3f}) without cf (confounder-free).",
            "",
            "| method | test MSE | test R² | dcor² per target bin | seconds |",
            "|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            lines.append(
                f"| {r['method']} | {r['test_mse']:.3f} | {r['test_r2']:.3f} | "
                f"{_fmt(r['dcor2_bins'])} | {r['seconds']:.1f} |"
            )
        for name, v in result["reference_dcor2"].items():
            lines.append(f"| reference: {name} | | | {_fmt(v)} | |")
    else:
        lines += [
            f"scikit-learn diabetes data (442 patients), metadata age and sex, "
            f"{cfg['folds']}-fold CV, seed {cfg['seed']}. R² pooled out-of-fold; dcor²: "
            f"bias-corrected, inputs (linear) or fc1 features (MLP) vs (age, sex) within "
            f"{cfg['bins']} target bins, mean over folds.",
            "",
            "| model | method | R² | dcor² per target bin | seconds |",
            "|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            lines.append(
                f"| {r['model']} | {r['method']} | {r['r2']:.3f} | {_fmt(r['dcor2_bins'])} | "
                f"{r['seconds']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def run_regression(task: str, out: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """Runs ``task`` (``"synthetic"`` or ``"diabetes"``).

    Writes ``results.json`` and ``report.md`` atomically into ``out`` when given.

    Examples::

        >>> r = run_regression("diabetes", folds=2, epochs=5)
        >>> [(row["model"], row["method"]) for row in r["rows"]][:2]
        [('linear', 'none'), ('linear', 'residualizer')]
    """
    if task not in TASKS:
        raise ValueError(f"expected task in {TASKS}, got {task!r}")
    t0 = time.perf_counter()
    result = (run_synthetic_regression if task == "synthetic" else run_diabetes)(**kwargs)
    result["wall_seconds"] = time.perf_counter() - t0
    if out is not None:
        out = Path(out)
        write_json(out / "results.json", result)
        write_text(out / "report.md", regression_report(result))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m metanorm.experiments.regression synthetic|diabetes [--out DIR] ...``."""
    p = argparse.ArgumentParser(
        prog="python -m metanorm.experiments.regression",
        description="MDN for regression targets (target kept in the design) against none.",
    )
    p.add_argument("task", choices=TASKS)
    p.add_argument("--out", default=None, help="folder for results.json and report.md")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=None, help="synthetic: training images")
    p.add_argument("--folds", type=int, default=None, help="diabetes: CV folds")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: these models are tiny, and on a busy machine more "
        "threads are several times slower)",
    )
    a = p.parse_args(argv)
    if a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    torch.set_num_threads(a.threads)
    kwargs: dict[str, Any] = {"seed": a.seed}
    if a.epochs is not None:
        kwargs["epochs"] = a.epochs
    if a.task == "synthetic" and a.n_train is not None:
        kwargs["n_train"] = a.n_train
    if a.task == "diabetes" and a.folds is not None:
        kwargs["folds"] = a.folds
    result = run_regression(a.task, a.out, **kwargs)
    print(regression_report(result), end="")
    print(f"wall time {result['wall_seconds']:.1f} s")
    if not all(math.isfinite(v) for r in result["rows"] for v in r["dcor2_bins"]):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
