r"""Regression targets: MDN (target kept in the design) and the alternatives to MDN, against none.

The experiment engine (``metanorm_repro.experiments.engine``) trains classifiers, so regression
has its own runner, registered as the studies ``regression-synthetic`` and
``regression-diabetes`` (``metanorm reproduce regression-synthetic``), which write
``results.json``, ``report.md`` and (synthetic, with matplotlib) ``r2_vs_dcor2.png`` into
``--out``.

- ``synthetic``: the regression variant of the paper's images
  (:mod:`metanorm_repro.datasets.synthetic_regression`: target ``t``, the image's main effect
  ``mf = t + noise``, a confounder ``cf = t + noise``). A one-hidden-layer MLP on the pixels,
  trained on the MSE of the standardised target, for every method of the study's default run
  (``get_study("regression-synthetic").settings["methods"]``, names of the methods table
  :data:`metanorm_repro.models.methods.METHODS`), at batch sizes 200 and 32, over 3 seeds.
  Test MSE and R² against the exact bounds with and without ``cf``; bias-corrected dcor²
  between the fc1 features (after MDN, before the ReLU) and ``cf`` within quantile bins of the
  target, against the same for ``mf`` itself (what a confounder-free model's features leave, as
  the bins are not points) and for ``(mf, cf)``; the training time per epoch. The report gives
  mean ± std (``ddof=1``) over the seeds.
- ``diabetes``: scikit-learn's diabetes data (442 patients, target = disease progression after
  one year; offline). Age and sex are taken out of the inputs and used as metadata. Two models,
  each with and without the correction, in K-fold cross-validation: a linear regression on the
  inputs, preceded by :class:`~metanorm.preprocessing.MetadataResidualizer` (fitted with the
  target kept), and an MLP with MetadataNorm after fc1 (design ``[target, age, sex, 1]``,
  target kept). R² (pooled over the out-of-fold predictions) and bias-corrected dcor² of the
  inputs / fc1 features with ``(age, sex)`` within target bins (mean over folds).

The methods, adapted to a continuous target (the design rows are ``[t, cf, 1]``, ``t`` kept;
the *confounder columns* are those neither kept nor the intercept,
:func:`~metanorm_repro.models.norms.confounder_columns`):

===============  ===========================================================================
``none``         the MLP alone (it sees ``cf`` in the image: a confounded model)
``mdn``          :class:`~metanorm.nn.MetadataNorm` after fc1, design ``[t, cf, 1]``, ``t`` kept
``concat``       the confounder columns appended to the head's input (``fc2([relu(h), cf])``)
``brnet``        BR-Net: a predictor of ``cf`` from the features (trained on the detached
                 features to maximise the squared Pearson r²,
                 :func:`~metanorm_repro.experiments.alternatives.pearson_r2`); the encoder
                 minimises r² through the frozen predictor; plus the MSE
``brnet-cond``   the same, r² within bins of the target (each variable centred per bin)
``dann``         a head predicting ``cf``'s quantile bin behind a gradient reversal layer
                 (:func:`~metanorm_repro.experiments.alternatives.grad_reverse`); plus the MSE
``dann-cond``    one such head per target bin, with ``cf`` bins from within that bin
``groupdro``     Group DRO over the groups target bin × ``cf`` bin, on the per-sample MSE
===============  ===========================================================================

The objectives are those of :mod:`metanorm_repro.experiments.alternatives` (BR-Net and DANN with the
classification task loss replaced by the MSE; Group DRO's group weighting applied to the
squared errors), built on a design whose kept column is the target's bin (``group_bins``
equal-count bins of the training target), which plays the part of the class label. At evaluation
the kept target column is multiplied by nothing (MDN) or unused (the objectives train only); the
runner fills it with zeros, so no test target enters the model. ``docs/bounds_regression.md``
has the measured tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metanorm.design import Design
from metanorm.metrics import distance_correlation_sqr
from metanorm.nn import MetadataNorm
from metanorm.nn.utils import refit_running_beta
from metanorm_repro.datasets.synthetic_regression import (
    RegressionLaw,
    make_synthetic_regression,
    regression_bounds,
)
from metanorm_repro.experiments._io import write_bytes, write_json, write_text
from metanorm_repro.experiments.alternatives import (
    BRNetObjective,
    DANNObjective,
    GroupDROObjective,
)
from metanorm_repro.experiments.engine import train_one_epoch
from metanorm_repro.experiments.plots import pyplot
from metanorm_repro.experiments.registry import Study, check_methods
from metanorm_repro.models.methods import get_method as get_norm
from metanorm_repro.models.methods import method_display_name as norm_display_name

__all__ = [
    "TASKS",
    "RegressionMLP",
    "RegressionObjective",
    "binned_dcor2",
    "diabetes_config",
    "diabetes_unit",
    "diabetes_units",
    "main",
    "plot_r2_vs_dcor2",
    "regression_report",
    "run_diabetes",
    "run_regression",
    "run_synthetic_regression",
    "summarize_diabetes",
    "summarize_regression",
    "summarize_synthetic_regression",
    "synthetic_regression_config",
    "synthetic_regression_unit",
    "synthetic_regression_units",
    "write_plot",
]

#: The tasks of :func:`run_regression`.
TASKS: tuple[str, ...] = ("synthetic", "diabetes")


def _study(task: str) -> Study:
    """The spec of the study ``regression-TASK`` (its methods: accepted and the default run's)."""
    from metanorm_repro.experiments.studies import builtin_study

    return builtin_study(f"regression-{task}")


def __getattr__(name: str) -> Any:
    # METHODS was the regression studies' method list, now in their specs
    if name != "METHODS":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        "metanorm_repro.experiments.regression.METHODS is deprecated: the methods of the "
        "regression studies are get_study('regression-synthetic').methods (accepted) and "
        ".settings['methods'] (the default run's)",
        DeprecationWarning,
        stacklevel=2,
    )
    return tuple(_study("synthetic").settings["methods"])


def _check_methods(methods: Sequence[str] | None, task: str = "synthetic") -> list[str]:
    """The registered names of ``methods`` (aliases resolved), each one the study accepts.

    ``None``: the default run's methods of the study ``regression-TASK``.
    """
    study = _study(task)
    if methods is None:
        return list(study.settings["methods"])
    names = [get_norm(m).name for m in methods]  # a ValueError listing the table if unknown
    return check_methods(study.name, names, study.methods or (), spellings=False)


class RegressionMLP(nn.Module):
    """fc1 → (MetadataNorm) → ReLU → fc2, one output; optionally metadata appended to fc2's input.

    Args:
        in_features: inputs per sample (images are flattened).
        hidden: fc1's width.
        design: the training design ``(N, K)`` for the ``mdn`` method; ``None``: no MDN layer.
        keep: the design's kept columns (the target). Default: ``(0,)``.
        pool: for image input ``(m, C, H, W)``, average-pool ``pool × pool`` blocks before
            fc1 (``in_features`` counts the pooled values). Default: 1 (no pooling).
        concat_columns: design-row columns appended to the ReLU'd features before fc2 (the
            ``concat`` method: the confounder columns). Default: ``()``.

    Shape:
        - Input: ``(m, *)`` (flattened to ``(m, in_features)``) and design rows ``(m, K)``.
        - Output: ``(prediction (m,), fc1 features (m, hidden))``, the features after MDN and
          before the ReLU.

    Examples::

        >>> rows = torch.tensor([[0.0, 1.0, 1.0], [0.0, -1.0, 1.0]])
        >>> model = RegressionMLP(4, 8, concat_columns=[1])
        >>> pred, h = model(torch.randn(2, 4), rows)
        >>> pred.shape, h.shape, model.fc2.in_features
        (torch.Size([2]), torch.Size([2, 8]), 9)
    """

    def __init__(
        self,
        in_features: int,
        hidden: int,
        design: torch.Tensor | None = None,
        keep: Sequence[int] = (0,),
        pool: int = 1,
        concat_columns: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool) if pool > 1 else nn.Identity()
        self.fc1 = nn.Linear(in_features, hidden)
        self.mdn = MetadataNorm(hidden, design, keep=list(keep)) if design is not None else None
        self.concat_columns = [int(c) for c in concat_columns]
        self.fc2 = nn.Linear(hidden + len(self.concat_columns), 1)

    def forward(
        self, x: torch.Tensor, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prediction ``(m,)`` and the fc1 features ``(m, hidden)`` (after MDN)."""
        h = self.fc1(self.pool(x).flatten(1))
        if (self.mdn is not None or self.concat_columns) and rows is None:
            raise ValueError("expected design rows for a model that reads metadata, got None")
        if self.mdn is not None:
            h = self.mdn(h, rows)
        a = torch.relu(h)
        if self.concat_columns:
            assert rows is not None
            a = torch.cat([a, rows[:, self.concat_columns].to(a.dtype)], dim=1)
        return self.fc2(a).squeeze(1), h


class _BRNetRegularizer(BRNetObjective):
    """BR-Net's predictor and r² terms only (the regression task loss is added by the caller)."""

    def task(self, logits: Tensor, labels: Tensor) -> Tensor:
        return logits.new_zeros(())


class _DANNRegularizer(DANNObjective):
    """DANN's reversed confounder-bin loss only (the task loss is added by the caller)."""

    def task(self, logits: Tensor, labels: Tensor) -> Tensor:
        return logits.new_zeros(())


class RegressionObjective(nn.Module):
    """The training loss of an alternative method for a continuous target.

    The objectives of :mod:`metanorm_repro.experiments.alternatives` with the MSE as the task loss:
    ``brnet``/``brnet-cond`` and ``dann``/``dann-cond`` add their adversarial terms to the MSE;
    ``groupdro`` weights the per-sample squared errors of its groups. The target's bin stands
    in for the class label (the conditional variants' groups, Group DRO's label × bin groups).

    Args:
        name: the method's objective (:attr:`metanorm_repro.models.methods.Method.objective`).
        design: the objective's training design ``[target bin, confounder..., 1]``, the bin
            kept (integers ``0 .. bins - 1``).
        features: the features' width.
        **settings: keyword arguments of the objective's class.

    Shape:
        - Input: ``pred (m,)``, ``features (m, D)``, ``target (m,)``, ``bins (m,)`` (long)
          and design rows ``(m, K)`` whose confounder columns are those of ``design``.
        - Output: a scalar loss.

    Examples::

        >>> import numpy as np
        >>> t = np.linspace(-1, 1, 40); cf = t + 0.1 * np.cos(7 * t)
        >>> bins = (t > 0).astype(float)
        >>> d = Design(np.column_stack([bins, cf, np.ones(40)]), ("bin", "cf", "intercept"), (0,))
        >>> obj = RegressionObjective("brnet-cond", d, features=3)
        >>> rows = torch.as_tensor(d.matrix, dtype=torch.float32)
        >>> loss = obj(torch.zeros(40), torch.randn(40, 3), torch.zeros(40),
        ...            torch.as_tensor(bins).long(), rows)
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, name: str, design: Design, features: int, **settings: Any) -> None:
        super().__init__()
        base, _, suffix = name.partition("-")
        if base not in ("brnet", "dann", "groupdro") or suffix not in ("", "cond"):
            raise ValueError(
                f"expected an objective in brnet, brnet-cond, dann, dann-cond, groupdro, "
                f"got {name!r}"
            )
        self.name = name
        self.inner: nn.Module
        if base == "groupdro":
            if suffix:
                raise ValueError(f"groupdro has no conditional variant, got {name!r}")
            self.inner = GroupDROObjective(design, **settings)
        elif base == "brnet":
            self.inner = _BRNetRegularizer(design, features, conditional=bool(suffix), **settings)
        else:
            self.inner = _DANNRegularizer(design, features, conditional=bool(suffix), **settings)

    def forward(
        self, pred: Tensor, features: Tensor, target: Tensor, bins: Tensor, rows: Tensor
    ) -> Tensor:
        """The batch's loss; see the class docstring."""
        if isinstance(self.inner, GroupDROObjective):
            return self.inner.weighted((pred - target) ** 2, self.inner.group(bins, rows))
        extra: Tensor = self.inner(pred[:, None], features, bins, rows)
        return F.mse_loss(pred, target) + extra


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
    bins: torch.Tensor | None = None,
) -> list[float]:
    """Trains ``model`` (with ``model.objective`` if it has one); returns the epoch times."""
    objective = getattr(model, "objective", None)
    if isinstance(objective, RegressionObjective) and bins is None:
        raise ValueError("a model with a regression objective needs the target bins")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(z)

    def loss(model: nn.Module, idx: tuple[torch.Tensor]) -> torch.Tensor:
        pred, h = model(x[idx[0]], rows[idx[0]])
        if isinstance(objective, RegressionObjective):
            assert bins is not None
            return objective(pred, h, z[idx[0]], bins[idx[0]], rows[idx[0]])
        return torch.mean((pred - z[idx[0]]) ** 2)

    times = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        indices = ((idx,) for idx in perm.split(batch_size))  # a batch: its sample indices
        times.append(train_one_epoch(model, indices, opt, loss=loss)["time_s"])
    if model.mdn is not None:  # the full-data β of the final weights, for evaluation
        batches = [
            (x[i : i + batch_size], rows[i : i + batch_size]) for i in range(0, n, batch_size)
        ]
        refit_running_beta(model, batches)
    model.eval()
    return times


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


def _target_bins(z: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.searchsorted(edges, z, side="right").astype(np.int64)


def _build_model(
    method: str,
    in_features: int,
    hidden: int,
    rows: torch.Tensor,
    meta_names: Sequence[str],
    bins: np.ndarray,
    pool: int = 1,
    total_steps: int | None = None,
) -> RegressionMLP:
    """The MLP of ``method`` (a registered name), its objective attached as ``model.objective``.

    ``rows`` are the training design rows ``[z, meta..., 1]``; ``bins`` the training target's
    bins (the objectives' stand-in for a class label); ``total_steps`` the run's training steps
    (DANN's reversal-weight ramp spans them).
    """
    spec = get_norm(method)
    conf = list(range(1, 1 + len(meta_names)))  # the confounder columns of [z, meta..., 1]
    model = RegressionMLP(
        in_features,
        hidden,
        rows if spec.needs_design else None,
        pool=pool,
        concat_columns=conf if spec.concat_metadata else (),
    )
    if spec.objective is not None:
        matrix = rows.double().numpy().copy()
        matrix[:, 0] = bins
        design = Design(matrix, ("target_bin", *meta_names, "intercept"), keep=(0,))
        objective = RegressionObjective(spec.objective, design, hidden)
        if isinstance(objective.inner, DANNObjective) and total_steps is not None:
            objective.inner.total_steps = total_steps
        model.objective = objective
    return model


def _summary_stats(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarize_regression(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, batch size) of the synthetic runs: mean and std over the seeds.

    Row keys: ``method``, ``batch_size``, ``seeds``, ``test_mse``, ``test_r2``, ``dcor2`` (the
    mean over the target bins), ``epoch_time_s`` (the median epoch time of a run), each with
    a ``_std`` (``ddof=1``; 0 for one seed), and ``dcor2_bins`` (per bin, mean over seeds).

    Examples::

        >>> runs = [{"method": "none", "batch_size": 8, "seed": s, "test_mse": m,
        ...          "test_r2": 1 - m, "dcor2_bins": [m, m], "epoch_time_s": 1.0}
        ...         for s, m in enumerate([0.1, 0.3])]
        >>> row = summarize_regression(runs)[0]
        >>> round(row["test_mse"], 3), round(row["test_mse_std"], 3), row["seeds"]
        (0.2, 0.141, 2)
    """
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["method"], int(r["batch_size"])), []).append(r)
    rows = []
    for (method, bs), rs in groups.items():
        row: dict[str, Any] = {"method": method, "batch_size": bs, "seeds": len(rs)}
        for key in ("test_mse", "test_r2", "epoch_time_s"):
            row[key], row[f"{key}_std"] = _summary_stats([r[key] for r in rs])
        row["dcor2"], row["dcor2_std"] = _summary_stats([np.mean(r["dcor2_bins"]) for r in rs])
        row["dcor2_bins"] = np.mean([r["dcor2_bins"] for r in rs], axis=0).tolist()
        rows.append(row)
    return rows


def run_synthetic_regression(
    *,
    n_train: int = 1000,
    n_test: int = 1000,
    methods: Sequence[str] | None = None,
    epochs: int = 60,
    batch_sizes: Sequence[int] = (200, 32),
    seeds: int = 3,
    lr: float = 3e-3,
    hidden: int = 32,
    pool: int = 4,
    bins: int = 5,
    group_bins: int = 4,
    seed: int = 0,
    law: RegressionLaw | None = None,
) -> dict[str, Any]:
    """Trains the MLP on the synthetic regression task, per method, batch size and seed.

    See the module docstring. Seeds ``seed, seed + 1, ...``: each draws its own training and test
    sets and initialisation.

    Args:
        n_train: training images. Default: 1000.
        n_test: test images. Default: 1000.
        methods: names of the methods table among those the study accepts
            (``get_study("regression-synthetic").methods``). Default: its default run's
            (``settings["methods"]``).
        epochs: training epochs. Default: 60.
        batch_sizes: the batch sizes. Default: ``(200, 32)``.
        seeds: the number of seeds. Default: 3.
        lr: Adam's learning rate. Default: 3e-3.
        hidden: fc1's width. Default: 32.
        pool: average pooling before fc1. Default: 4 (64 inputs).
        bins: target bins of the dcor² metric. Default: 5.
        group_bins: target bins of the objectives (the conditional variants' groups, Group
            DRO's). Default: 4.
        seed: the first seed. Default: 0.
        law: the data's ``RegressionLaw`` (:mod:`metanorm_repro.datasets.synthetic_regression`).

    Returns:
        ``{"task", "config", "bounds", "reference_dcor2", "runs", "rows"}``: ``runs`` one dict
        per (method, batch size, seed) with ``test_mse``, ``test_r2``, ``dcor2_bins``
        (features vs ``cf`` within target bins), ``epoch_time_s`` (median) and ``seconds``;
        ``rows`` their :func:`summarize_regression`; ``reference_dcor2`` the reference
        features' dcor² per bin, mean over the seeds.
    """
    config = synthetic_regression_config(
        n_train=n_train,
        n_test=n_test,
        methods=methods,
        epochs=epochs,
        batch_sizes=batch_sizes,
        seeds=seeds,
        lr=lr,
        hidden=hidden,
        pool=pool,
        bins=bins,
        group_bins=group_bins,
        seed=seed,
        law=law,
    )
    runs = [synthetic_regression_unit(config, u) for u in synthetic_regression_units(config)]
    return summarize_synthetic_regression(config, runs)


def synthetic_regression_config(
    *,
    n_train: int = 1000,
    n_test: int = 1000,
    methods: Sequence[str] | None = None,
    epochs: int = 60,
    batch_sizes: Sequence[int] = (200, 32),
    seeds: int = 3,
    lr: float = 3e-3,
    hidden: int = 32,
    pool: int = 4,
    bins: int = 5,
    group_bins: int = 4,
    seed: int = 0,
    law: RegressionLaw | None = None,
) -> dict[str, Any]:
    """The checked settings of :func:`run_synthetic_regression` as its result's ``"config"``.

    Raises:
        ValueError: an unknown method, ``seeds < 1``, no batch size or one below 2.
    """
    methods = _check_methods(methods)
    if seeds < 1 or not batch_sizes or any(int(b) < 2 for b in batch_sizes):
        raise ValueError(f"expected seeds >= 1 and batch sizes >= 2, got {seeds}, {batch_sizes}")
    law = law or RegressionLaw()
    return {
        "n_train": n_train,
        "n_test": n_test,
        "methods": list(methods),
        "epochs": epochs,
        "batch_sizes": [int(b) for b in batch_sizes],
        "seeds": list(range(seed, seed + seeds)),
        "lr": lr,
        "hidden": hidden,
        "pool": pool,
        "bins": bins,
        "group_bins": group_bins,
        "law": dataclasses.asdict(law),
    }


def synthetic_regression_units(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The run units of the synthetic regression: every seed × batch size × method.

    ``config`` is the ``"config"`` of :func:`run_synthetic_regression`'s result (``seeds`` the
    list of seeds).
    """
    return [
        {"seed": int(s), "batch_size": int(bs), "method": method}
        for s in config["seeds"]
        for bs in config["batch_sizes"]
        for method in config["methods"]
    ]


def _synthetic_sets(seed: int, n_train: int, n_test: int, law: RegressionLaw) -> tuple[Any, Any]:
    """The training and test sets of ``seed`` (each drawn from its own child seed)."""
    s_train, s_test = np.random.SeedSequence(seed).spawn(2)
    train = make_synthetic_regression(n_train, random_state=s_train, law=law, name="train")
    test = make_synthetic_regression(n_test, random_state=s_test, law=law, name="test")
    return train, test


def synthetic_regression_unit(config: dict[str, Any], unit: dict[str, Any]) -> dict[str, Any]:
    """Trains and tests one run unit (``seed``, ``batch_size``, ``method``) of the synthetic task.

    Returns:
        The unit with ``test_mse``, ``test_r2``, ``dcor2_bins`` (features vs ``cf`` within
        target bins), ``epoch_time_s`` (median) and ``seconds``.
    """
    s, bs, method = int(unit["seed"]), int(unit["batch_size"]), unit["method"]
    n_train, epochs, pool = config["n_train"], config["epochs"], config["pool"]
    group_bins = config["group_bins"]
    law = RegressionLaw(**config["law"])
    train, test = _synthetic_sets(s, n_train, config["n_test"], law)
    mu, sd = float(train.target.mean()), float(train.target.std())
    cmu, csd = float(train.metadata["cf"].mean()), float(train.metadata["cf"].std())
    z = (train.target - mu) / sd
    c_tr = (train.metadata["cf"] - cmu) / csd
    c_te = (test.metadata["cf"] - cmu) / csd
    rows_tr = _design(z, c_tr[:, None])
    rows_te = _design(np.zeros(len(test)), c_te[:, None])  # the kept target: not used
    edges = np.quantile(z, np.arange(1, group_bins) / group_bins)
    tbins = _target_bins(z, edges)
    x_tr, x_te = train.images * 10.0, test.images * 10.0  # pixel scale ~1
    z_t = torch.from_numpy(z.astype(np.float32))
    torch.manual_seed(s)
    model = _build_model(
        method,
        x_tr[0].numel() // pool**2,
        config["hidden"],
        rows_tr,
        ["cf"],
        tbins,
        pool,
        total_steps=epochs * math.ceil(n_train / bs),
    )
    t0 = time.perf_counter()
    times = _train(
        model,
        x_tr,
        z_t,
        rows_tr,
        epochs=epochs,
        batch_size=bs,
        lr=config["lr"],
        weight_decay=0.0,
        seed=s,
        bins=torch.from_numpy(tbins),
    )
    pred, h = _predict(model, x_te, rows_te)
    mse, r2 = _mse_r2(pred * sd + mu, test.target)
    return {
        "method": method,
        "batch_size": bs,
        "seed": s,
        "test_mse": mse,
        "test_r2": r2,
        "dcor2_bins": binned_dcor2(h, test.metadata["cf"], test.target, config["bins"]),
        "epoch_time_s": float(np.median(times)),
        "seconds": time.perf_counter() - t0,
    }


def summarize_synthetic_regression(
    config: dict[str, Any], runs: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """The result of the synthetic task from its runs (:func:`synthetic_regression_unit`).

    Adds the exact bounds and the reference features' dcor² per bin (mean over the seeds).
    """
    law = RegressionLaw(**config["law"])
    refs: dict[str, list[list[float]]] = {"mf (confounder-free)": [], "(mf, cf) (confounded)": []}
    for s in config["seeds"]:
        s_test = np.random.SeedSequence(int(s)).spawn(2)[1]  # the test set of the runs
        test = make_synthetic_regression(config["n_test"], random_state=s_test, law=law)
        mf, cf = test.metadata["mf"], test.metadata["cf"]
        bins = config["bins"]
        refs["mf (confounder-free)"].append(binned_dcor2(mf[:, None], cf, test.target, bins))
        refs["(mf, cf) (confounded)"].append(
            binned_dcor2(np.column_stack([mf, cf]), cf, test.target, bins)
        )
    return {
        "task": "synthetic",
        "config": config,
        "bounds": dataclasses.asdict(regression_bounds(law)),
        "reference_dcor2": {k: np.mean(v, axis=0).tolist() for k, v in refs.items()},
        "runs": list(runs),
        "rows": summarize_regression(runs),
    }


def run_diabetes(
    *,
    folds: int = 5,
    epochs: int = 300,
    lr: float = 1e-2,
    hidden: int = 16,
    weight_decay: float = 0.1,
    bins: int = 3,
    group_bins: int = 4,
    methods: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Cross-validated linear and MLP regressions on scikit-learn's diabetes data.

    The linear regression with and without :class:`~metanorm.preprocessing.MetadataResidualizer`;
    the MLP (full-batch Adam) for each method of ``methods``: the confounder columns are
    ``(age, sex)`` (BR-Net predicts both; DANN's and Group DRO's bins are age's quartiles);
    ``group_bins`` target bins of the training fold are the objectives' groups. See the module
    docstring.

    Returns:
        ``{"task", "config", "rows"}``: one row per (model, method) with ``r2`` (pooled
        out-of-fold), ``r2_folds`` and ``dcor2_bins`` (inputs or fc1 features vs (age, sex)
        within target bins of each test fold, mean over folds) and ``seconds``.
    """
    config = diabetes_config(
        folds=folds,
        epochs=epochs,
        lr=lr,
        hidden=hidden,
        weight_decay=weight_decay,
        bins=bins,
        group_bins=group_bins,
        methods=methods,
        seed=seed,
    )
    records = [diabetes_unit(config, u) for u in diabetes_units(config)]
    return summarize_diabetes(config, records)


def diabetes_config(
    *,
    folds: int = 5,
    epochs: int = 300,
    lr: float = 1e-2,
    hidden: int = 16,
    weight_decay: float = 0.1,
    bins: int = 3,
    group_bins: int = 4,
    methods: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The checked settings of :func:`run_diabetes` (the MLP's methods checked).

    Raises:
        ValueError: an unknown method, or fewer than two folds.
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"expected folds to be an int >= 2, got {folds!r}")
    return {
        "folds": folds,
        "epochs": epochs,
        "lr": lr,
        "hidden": hidden,
        "weight_decay": weight_decay,
        "bins": bins,
        "group_bins": group_bins,
        "methods": _check_methods(methods, "diabetes"),
        "seed": seed,
    }


def diabetes_units(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The run units of the diabetes task: every fold × (model, method).

    The models: ``linear`` with ``none`` and ``residualizer``, then ``mlp`` with each method
    of ``config["methods"]``.
    """
    variants = [("linear", "none"), ("linear", "residualizer")]
    variants += [("mlp", m) for m in config["methods"]]
    return [
        {"fold": fold, "model": model, "method": method}
        for fold in range(int(config["folds"]))
        for model, method in variants
    ]


def _diabetes_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[int]]:
    """The inputs, the metadata (age, sex), the target, the feature names, the input columns."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    X_all, y = data.data.astype(np.float64), data.target.astype(np.float64)
    names = list(data.feature_names)
    mcols = [names.index("age"), names.index("sex")]
    icols = [i for i in range(X_all.shape[1]) if i not in mcols]
    return X_all[:, icols], X_all[:, mcols], y, names, icols


def _diabetes_folds(config: dict[str, Any], n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import KFold

    kf = KFold(n_splits=int(config["folds"]), shuffle=True, random_state=config["seed"])
    return list(kf.split(np.zeros((n, 1))))


def diabetes_unit(config: dict[str, Any], unit: dict[str, Any]) -> dict[str, Any]:
    """Fits and tests one run unit (``fold``, ``model``, ``method``) of the diabetes task.

    Returns:
        The unit with the test fold's indices ``test_index``, predictions ``pred``, ``r2`` and
        ``dcor2_bins``, and ``seconds``.
    """
    from sklearn.linear_model import LinearRegression

    from metanorm.preprocessing import MetadataResidualizer

    X, meta, y, _, _ = _diabetes_data()
    fold, model_name, method = int(unit["fold"]), unit["model"], unit["method"]
    tr, te = _diabetes_folds(config, len(y))[fold]
    seed, group_bins, epochs = config["seed"], config["group_bins"], config["epochs"]
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
        edges = np.quantile(z, np.arange(1, group_bins) / group_bins)
        tbins = _target_bins(z, edges)
        torch.manual_seed(seed + fold)
        model = _build_model(
            method, X.shape[1], config["hidden"], rows_tr, ["age", "sex"], tbins, total_steps=epochs
        )
        _train(
            model,
            x_tr,
            torch.from_numpy(z.astype(np.float32)),
            rows_tr,
            epochs=epochs,
            batch_size=len(tr),
            lr=config["lr"],
            weight_decay=config["weight_decay"],
            seed=seed + fold,
            bins=torch.from_numpy(tbins),
        )
        p, feats = _predict(model, x_te, rows_te)
        pred = p * ys + ym
    return {
        **unit,
        "test_index": te.tolist(),
        "pred": np.asarray(pred, dtype=np.float64).tolist(),
        "r2": _mse_r2(pred, y[te])[1],
        "dcor2_bins": binned_dcor2(feats, meta[te], y[te], config["bins"]),
        "seconds": time.perf_counter() - t0,
    }


def summarize_diabetes(config: dict[str, Any], records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The result of the diabetes task from its run units' records (:func:`diabetes_unit`).

    One row per (model, method): ``r2`` pooled out-of-fold, ``r2_folds``, ``dcor2_bins`` (mean
    over the folds) and ``seconds`` (summed over the folds).
    """
    _, _, y, names, icols = _diabetes_data()
    acc: dict[tuple[str, str], dict[str, Any]] = {}
    for r in sorted(records, key=lambda r: int(r["fold"])):
        a = acc.setdefault(
            (r["model"], r["method"]),
            {"pred": np.zeros_like(y), "r2_folds": [], "dcor": [], "seconds": 0.0},
        )
        a["pred"][np.asarray(r["test_index"], dtype=np.int64)] = r["pred"]
        a["r2_folds"].append(r["r2"])
        a["dcor"].append(r["dcor2_bins"])
        a["seconds"] += r["seconds"]
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
            **{k: config[k] for k in ("folds", "epochs", "lr", "hidden", "weight_decay")},
            "bins": config["bins"],
            "group_bins": config["group_bins"],
            "methods": [r["method"] for r in out_rows if r["model"] == "mlp"],
            "seed": config["seed"],
            "metadata": ["age", "sex"],
            "inputs": [names[i] for i in icols],
        },
        "rows": out_rows,
    }


def _fmt(values: Sequence[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def _pm(row: dict[str, Any], key: str, digits: int = 3) -> str:
    return f"{row[key]:.{digits}f} ± {row[f'{key}_std']:.{digits}f}"


def regression_report(result: dict[str, Any]) -> str:
    """The markdown report of a :func:`run_synthetic_regression` or :func:`run_diabetes` result."""
    cfg = result["config"]
    lines = [f"# Regression: {result['task']}", ""]
    if result["task"] == "synthetic":
        b = result["bounds"]
        seeds = cfg["seeds"]
        lines += [
            f"Synthetic regression, {cfg['n_train']} training / {cfg['n_test']} test images, MLP "
            f"on {cfg['pool']}×{cfg['pool']}-pooled pixels (hidden {cfg['hidden']}), "
            f"{cfg['epochs']} epochs, Adam {cfg['lr']:g}, seeds {seeds[0]}–{seeds[-1]} "
            f"({len(seeds)}; mean ± std, ddof=1). dcor²: bias-corrected, fc1 features vs cf "
            f"within {cfg['bins']} target bins (the table: their mean; per bin below). "
            f"Objectives' groups: {cfg['group_bins']} target bins.",
            "",
            f"Exact bounds: MSE {b['mse_mf_cf']:.3f} (R² {b['r2_mf_cf']:.3f}) using cf; "
            f"{b['mse_mf']:.3f} (R² {b['r2_mf']:.3f}) without cf (confounder-free).",
            "",
            "| method | batch | test MSE | test R² | dcor² (mean over bins) | epoch time (s) |",
            "|---|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            lines.append(
                f"| {norm_display_name(r['method'])} | {r['batch_size']} | {_pm(r, 'test_mse')} | "
                f"{_pm(r, 'test_r2')} | {_pm(r, 'dcor2')} | {_pm(r, 'epoch_time_s')} |"
            )
        ref = result["reference_dcor2"]
        for name, v in ref.items():
            lines.append(f"| reference: {name} | | | | {np.mean(v):.3f} | |")
        lines += [
            "",
            "dcor² per target bin (low → high), mean over the seeds:",
            "",
            "| method | batch | dcor² per bin |",
            "|---|---|---|",
        ]
        for r in result["rows"]:
            lines.append(
                f"| {norm_display_name(r['method'])} | {r['batch_size']} | "
                f"{_fmt(r['dcor2_bins'])} |"
            )
        for name, v in ref.items():
            lines.append(f"| reference: {name} | | {_fmt(v)} |")
        if result.get("plot"):
            lines += ["", f"Plot: `{result['plot']}` (test R² against dcor²)."]
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
    if "wall_seconds" in result:
        lines += ["", f"Wall time: {result['wall_seconds']:.1f} s."]
    return "\n".join(lines) + "\n"


def plot_r2_vs_dcor2(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    bounds: dict[str, float] | None = None,
    reference_dcor2: float | None = None,
) -> Path:
    """Scatter of test R² against the mean within-bin dcor², one point per method × batch size.

    Error bars: the std over seeds of both. Horizontal lines: the exact R² bounds with and
    without cf (``bounds``, ``regression_bounds()`` of
    :mod:`metanorm_repro.datasets.synthetic_regression`
    as a dict). Written atomically.

    Args:
        rows: :func:`summarize_regression` rows.
        path: the PNG to write.
        bounds: the bounds, or ``None`` for no lines.
        reference_dcor2: a vertical line there (the confounder-free reference's dcor²: what
            binning leaves), or ``None``.

    Returns:
        ``path``.
    """
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sizes = sorted({int(r["batch_size"]) for r in rows}, reverse=True)
    for bs, marker in zip(sizes, "os^vD", strict=False):
        sel = [r for r in rows if int(r["batch_size"]) == bs]
        ax.errorbar(
            [r["dcor2"] for r in sel],
            [r["test_r2"] for r in sel],
            xerr=[r.get("dcor2_std", 0.0) for r in sel],
            yerr=[r.get("test_r2_std", 0.0) for r in sel],
            fmt=marker,
            label=f"batch {bs}",
            capsize=2,
        )
        for r in sel:
            ax.annotate(
                norm_display_name(r["method"]),
                (r["dcor2"], r["test_r2"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    if bounds is not None:
        ax.axhline(bounds["r2_mf_cf"], color="grey", lw=0.8, ls="--", label="bound using cf")
        ax.axhline(bounds["r2_mf"], color="grey", lw=0.8, ls=":", label="bound without cf")
    if reference_dcor2 is not None:
        ax.axvline(reference_dcor2, color="grey", lw=0.8, ls="-.", label="dcor² of mf itself")
    ax.set_xlabel("test dcor²(fc1 features, cf), mean over the target bins")
    ax.set_ylabel("test R²")
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return write_bytes(path, buf.getvalue())


def write_plot(result: dict[str, Any], folder: Path) -> None:
    """Writes ``r2_vs_dcor2.png`` of a synthetic result into ``folder``; notes it in ``result``.

    ``result["plot"]`` becomes the file's name, or ``result["plot_error"]`` says why there is
    none (matplotlib is an optional extra).
    """
    try:
        ref = result["reference_dcor2"]["mf (confounder-free)"]
        plot_r2_vs_dcor2(
            result["rows"],
            folder / "r2_vs_dcor2.png",
            result["bounds"],
            reference_dcor2=float(np.mean(ref)),
        )
        result["plot"] = "r2_vs_dcor2.png"
    except ModuleNotFoundError as exc:  # matplotlib is an optional extra
        result["plot_error"] = str(exc)


def run_regression(
    task: str, out: str | Path | None = None, *, plot: bool = True, **kwargs: Any
) -> dict[str, Any]:
    """Runs ``task`` (``"synthetic"`` or ``"diabetes"``).

    Writes ``results.json`` and ``report.md`` atomically into ``out`` when given, and for the
    synthetic task (with ``plot`` and matplotlib installed) ``r2_vs_dcor2.png``.

    Examples::

        >>> r = run_regression("diabetes", folds=2, epochs=5, methods=["none", "mdn"])
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
        if task == "synthetic" and plot:
            write_plot(result, out)
        write_json(out / "results.json", result)
        write_text(out / "report.md", regression_report(result))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m metanorm_repro.experiments.regression synthetic|diabetes [--out DIR] ...``."""
    p = argparse.ArgumentParser(
        prog="python -m metanorm_repro.experiments.regression",
        description="MDN and the alternatives to MDN for regression targets, against none.",
    )
    p.add_argument("task", choices=TASKS)
    p.add_argument("--out", default=None, help="folder for results.json, report.md and the plot")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="the (first) seed")
    p.add_argument("--seeds", type=int, default=3, help="synthetic: number of seeds (default 3)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="names of the methods table (default: the study's: "
        f"{' '.join(_study('synthetic').settings['methods'])}; diabetes: the MLP's)",
    )
    p.add_argument(
        "--batch-sizes", type=int, nargs="+", default=None, help="synthetic (default: 200 32)"
    )
    p.add_argument("--n-train", type=int, default=None, help="synthetic: training images")
    p.add_argument("--n-test", type=int, default=None, help="synthetic: test images")
    p.add_argument("--folds", type=int, default=None, help="diabetes: CV folds")
    p.add_argument("--no-plot", action="store_true", help="synthetic: skip r2_vs_dcor2.png")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: these models are tiny, and on a busy machine more "
        "threads are several times slower)",
    )
    a = p.parse_args(argv)
    print(
        f"note: this runner is deprecated; run 'metanorm reproduce regression-{a.task}' "
        "(the same study and numbers, written atomically; see its --help)",
        file=sys.stderr,
    )
    if a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    torch.set_num_threads(a.threads)
    kwargs: dict[str, Any] = {"seed": a.seed}
    if a.epochs is not None:
        kwargs["epochs"] = a.epochs
    if a.task == "synthetic":
        if a.seeds < 1:
            p.error(f"--seeds must be >= 1, got {a.seeds}")
        kwargs["seeds"] = a.seeds
        if a.n_train is not None:
            kwargs["n_train"] = a.n_train
        if a.n_test is not None:
            kwargs["n_test"] = a.n_test
        if a.batch_sizes is not None:
            kwargs["batch_sizes"] = a.batch_sizes
    if a.task == "diabetes" and a.folds is not None:
        kwargs["folds"] = a.folds
    if a.methods is not None:
        try:
            kwargs["methods"] = _check_methods(a.methods, a.task)
        except ValueError as exc:
            p.error(str(exc))
    result = run_regression(a.task, a.out, plot=not a.no_plot, **kwargs)
    print(regression_report(result), end="")
    if not all(math.isfinite(v) for r in result["rows"] for v in r["dcor2_bins"]):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
