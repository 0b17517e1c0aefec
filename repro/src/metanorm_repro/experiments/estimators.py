r"""Experiments on the estimators beyond the paper: R-MDN and PMDN against MDN.

Two experiments on the paper's synthetic task (:mod:`metanorm_repro.experiments.synthetic`), for the
paper's batch estimator (``mdn-linear``), recursive MDN (``rmdn``, Shah et al., ICML 2025),
penalty MDN (``pmdn``, Vento et al., MICCAI 2022) and the baseline, each layer after fc1:

- ``synthetic-batch`` (``metanorm reproduce synthetic-batch``): the paper's batch-size figure
  (MDN weakens as batches shrink): batch sizes 200, 64, 16 and 4, validation dcor² per epoch
  (``epochs.csv`` of every run; :func:`epoch_dcor_table`) and the final test bAcc. Defaults sized
  for a CPU: 400 training images per class, 500 per class for validation and test, 5 epochs of
  Adam from 1e-3 with a cosine decay, the MDN running β with its momentum (no refit, so every
  estimator is used as it comes out of training; ``--refit-running-beta`` refits MDN's).
  Options: ``forgetting`` (R-MDN's λ; 0.9 here, where the layer's default 0.999 follows the
  training features too slowly, see ``docs/estimators.md``), ``rmdn_grad`` (R-MDN's
  ``grad_through_beta``, default false), ``pmdn_lr`` (PMDN's β learning rate, default 1e-2).
  With equal epochs a large batch takes fewer steps (4 per epoch at batch 200), so bAcc there
  says more about steps than about estimators.
- continual learning with a shifting confounder (:func:`run_continual`; ``metanorm reproduce
  continual``): five stages whose confounder association
  (:mod:`metanorm_repro.datasets.shifting`) goes 1, 0.5, 0, −0.5, −1 (the paper's confounder, half
  of it, none, half reversed, reversed), trained stage after stage; after each stage the model is
  tested on every stage's validation set: a bAcc matrix and per-class dcor² matrices.

``docs/estimators.md`` has the measured tables.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from metanorm.datasets import DesignDataset
from metanorm.design import Design
from metanorm.linalg import inverse_gram
from metanorm.nn import MetadataNorm, RecursiveMetadataNorm, split_parameters
from metanorm.nn.utils import refit_running_beta
from metanorm_repro.datasets.shifting import CONTINUAL_ASSOCIATIONS, make_shifting_stages
from metanorm_repro.experiments._io import write_text
from metanorm_repro.experiments.config import RunConfig
from metanorm_repro.experiments.engine import evaluate, train_one_epoch
from metanorm_repro.experiments.registry import Check, Experiment, Study, check_methods
from metanorm_repro.experiments.synthetic import SYNTHETIC
from metanorm_repro.models import PaperCNN
from metanorm_repro.models.methods import method_display_name as norm_display_name

__all__ = [
    "SYNTHETIC_BATCH",
    "continual_report",
    "continual_settings",
    "continual_unit",
    "epoch_dcor_table",
    "estimator_kwargs",
    "main",
    "run_continual",
]


def _continual_study() -> Study:
    """The ``continual`` study's spec (its methods: accepted and the default run's)."""
    from metanorm_repro.experiments.studies import builtin_study

    return builtin_study("continual")


def __getattr__(name: str) -> Any:
    # METHODS, BATCH_METHODS and CONTINUAL_METHODS were the experiments' method lists, now in
    # the specs of synthetic-batch and continual
    moved = {
        "METHODS": ("get_experiment('synthetic-batch').methods", lambda: SYNTHETIC_BATCH.methods),
        "BATCH_METHODS": (
            "get_experiment('synthetic-batch').defaults['methods']",
            lambda: tuple(SYNTHETIC_BATCH.defaults["methods"]),
        ),
        "CONTINUAL_METHODS": (
            "get_study('continual').settings['methods']",
            lambda: tuple(_continual_study().settings["methods"]),
        ),
    }
    if name not in moved:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where, get = moved[name]
    warnings.warn(
        f"metanorm_repro.experiments.estimators.{name} is deprecated: it is {where}",
        DeprecationWarning,
        stacklevel=2,
    )
    return get()


def estimator_kwargs(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The layer arguments a method takes from a run's options.

    ``forgetting`` and ``rmdn_grad`` (as ``grad_through_beta``) go to R-MDN layers, ``pmdn_lr``
    to PMDN layers (as ``lr``); other methods take none.

    Examples:
        >>> estimator_kwargs("rmdn", {"forgetting": 0.99, "pmdn_lr": 0.1})
        {'forgetting': 0.99}
        >>> estimator_kwargs("mdn-linear", {"forgetting": 0.99})
        {}
    """
    out: dict[str, Any] = {}
    if method.startswith("rmdn"):
        if "forgetting" in options:
            out["forgetting"] = float(options["forgetting"])
        if "rmdn_grad" in options:
            out["grad_through_beta"] = bool(options["rmdn_grad"])
    if method.startswith("pmdn") and "pmdn_lr" in options:
        out["lr"] = float(options["pmdn_lr"])
    return out


def _batch_model(method: str, design: Design, config: RunConfig) -> nn.Module:
    return PaperCNN(
        method, design, momentum=config.momentum, **estimator_kwargs(method, config.options)
    )


def _dcor(row: Mapping[str, Any]) -> list[float]:
    return [
        float(v)
        for k, v in row.items()
        if k.startswith("val_dcor2_") and not k.endswith("_std") and v is not None
    ]


def _batch_checks(rows: Sequence[dict[str, Any]]) -> list[Check]:
    """The batch sweep's bars: the baseline confounded; what each estimator leaves, per batch."""
    checks: list[Check] = []
    by = {(r["method"], r["batch_size"]): r for r in rows}
    sizes = sorted({r["batch_size"] for r in rows})
    for r in rows:
        dc = _dcor(r)
        if not dc:
            continue
        name, bs = norm_display_name(r["method"]), r["batch_size"]
        dcs = " / ".join(f"{v:.3f}" for v in dc)
        if r["method"] == "none":
            checks.append(
                Check(f"{name} bs={bs}: val dcor² ≥ 0.2 in every class", min(dc) >= 0.2, dcs)
            )
        elif r["method"] in ("rmdn", "rmdn-conv"):
            checks.append(
                Check(f"{name} bs={bs}: val dcor² ≤ 0.05 in every class", max(dc) <= 0.05, dcs)
            )
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        mdn_small, mdn_large = by.get(("mdn-linear", small)), by.get(("mdn-linear", large))
        if mdn_small is not None and mdn_large is not None:
            a, b = max(_dcor(mdn_small) or [math.nan]), max(_dcor(mdn_large) or [math.nan])
            checks.append(
                Check(
                    f"MDN weakens as batches shrink: max val dcor² at bs={small} > at bs={large}",
                    a > b,
                    f"{a:.3f} vs {b:.3f}",
                )
            )
        rmdn_small = by.get(("rmdn", small))
        if mdn_small is not None and rmdn_small is not None:
            a, b = max(_dcor(rmdn_small) or [math.nan]), max(_dcor(mdn_small) or [math.nan])
            checks.append(
                Check(f"R-MDN bs={small}: max val dcor² < MDN's", a < b, f"{a:.3f} vs {b:.3f}")
            )
    return checks


_BATCH_REFERENCE = """The paper (Lu et al., CVPR 2021) plots dcor² per epoch for batch sizes
from 200 down and finds that smaller batches leave more metadata dependence for every method, MDN
being strongest with large batches; its momentum running β averages batch estimates whose noise
grows as 1/m. R-MDN (Shah et al., ICML 2025) is built for small batches and streams (no N/m
factor, exact at m = 1); PMDN (Vento et al., MICCAI 2022) learns β by gradient steps."""

_FIELDS = {f.name for f in dataclasses.fields(Experiment)}
_OPTIONS: dict[str, Any] = (
    {"options": ("n_eval_per_class", "forgetting", "rmdn_grad", "pmdn_lr")}
    if "options" in _FIELDS
    else {}
)

SYNTHETIC_BATCH = dataclasses.replace(
    SYNTHETIC,
    name="synthetic-batch",
    description="The paper's batch-size figure on its synthetic task, for the paper's MDN, "
    "recursive MDN (R-MDN), penalty MDN (PMDN) and the baseline (each estimator after fc1): "
    "validation dcor² per epoch and test bAcc at batch 200, 64, 16 and 4.",
    make_model=_batch_model,
    methods=(
        "none",
        "mdn-linear",
        "rmdn",
        "pmdn",
        "mdn-conv",
        "rmdn-conv",
        "pmdn-conv",
    ),
    defaults={
        "epochs": 5,
        "lr": 1e-3,
        "lr_schedule": "cosine",
        "refit_running_beta": False,
        "n_per_class": 400,
        "batch_sizes": [200, 64, 16, 4],
        "seeds": 1,
        "methods": ["none", "mdn-linear", "rmdn", "pmdn"],
        "options": {"n_eval_per_class": 500, "forgetting": 0.9},
    },
    paper={},
    reference=_BATCH_REFERENCE,
    checks=_batch_checks,
    **_OPTIONS,
)

#: The experiments of this module (registered by the registry's loader).
EXPERIMENTS = (SYNTHETIC_BATCH,)


def _method_rank(method: str) -> int:
    methods = SYNTHETIC_BATCH.methods
    return methods.index(method) if method in methods else len(methods)


def epoch_dcor_table(sweep_dir: str | Path) -> str:
    """A markdown table of the validation dcor² per epoch of every run of a sweep folder.

    One row per (batch size, method, seed), largest batch first and methods in the order of
    ``synthetic-batch``'s methods, one column per epoch, each cell the per-class values
    ``class 0 / class 1`` (from the runs' ``epochs.csv``), and the last column the test bAcc
    (from ``final.json``) when the run finished.
    """
    root = Path(sweep_dir) / "runs"
    runs = sorted(
        root.glob("bs*/*/seed*/epochs.csv"),
        key=lambda p: (-int(p.parts[-4][2:]), _method_rank(p.parts[-3]), p.parts[-3], p.parts[-2]),
    )
    if not runs:
        raise FileNotFoundError(f"no runs/bs*/<method>/seed*/epochs.csv under {sweep_dir}")
    lines: list[str] = []
    width = 0
    for path in runs:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        width = max(width, len(rows))
        cells = []
        for r in rows:
            vals = [r[k] for k in sorted(r) if k.startswith("val_dcor2_")]
            cells.append(" / ".join(f"{float(v):.3f}" if v else "n/a" for v in vals))
        final = path.parent / "final.json"
        bacc = (
            f"{json.loads(final.read_text())['test_balanced_accuracy']:.3f}"
            if final.exists()
            else "—"
        )
        bs, method, seed = path.parts[-4][2:], path.parts[-3], path.parts[-2][4:]
        lines.append(
            f"| {bs} | {norm_display_name(method)} | {seed} | " + " | ".join(cells) + f" | {bacc} |"
        )
    head = "| batch | method | seed | " + " | ".join(f"epoch {e + 1}" for e in range(width))
    head += " | test bAcc |\n|" + "---|" * (width + 4)
    return head + "\n" + "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- continual


def _rows(split: Any) -> torch.Tensor:
    """Design rows ``[y, cf, 1]`` (float32), y kept."""
    y = split.labels.to(torch.float64)
    cf = torch.as_tensor(np.asarray(split.metadata["cf"]), dtype=torch.float64)
    return torch.stack([y, cf, torch.ones_like(y)], dim=1).float()


def _set_design(model: nn.Module, rows: torch.Tensor) -> None:
    """Gives every MetadataNorm of ``model`` the Σ⁻¹ and N of a new training design."""
    gram_inverse = inverse_gram(rows)
    for layer in model.modules():
        if isinstance(layer, MetadataNorm):
            with torch.no_grad():
                layer.gram_inverse.copy_(gram_inverse)
                layer.n_samples.fill_(float(rows.shape[0]))


RMDN_RESETS = ("none", "covariance", "all")
MDN_DESIGNS = ("stage", "first")


def run_continual(
    out_dir: str | Path | None = None,
    *,
    methods: Sequence[str] | None = None,
    associations: Sequence[float] = CONTINUAL_ASSOCIATIONS,
    n_per_class: int = 400,
    n_eval_per_class: int = 400,
    epochs_per_stage: int = 4,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    forgetting: float = 0.9,
    rmdn_reset: str = "none",
    mdn_design: str = "stage",
    pmdn_lr: float = 1e-2,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    r"""Continual learning with a shifting confounder: stages trained one after another.

    Every method starts from the same initial weights and sees the same stages in the same
    order (:func:`metanorm_repro.datasets.shifting.make_shifting_stages`). Each stage trains
    ``epochs_per_stage`` epochs of Adam (one optimiser for the whole run, constant ``lr``) on
    that stage's training set only; after each stage the model is evaluated on the validation
    set of every stage. The design is ``[y, cf, 1]`` with y kept (raw units).

    - ``mdn-linear`` (the paper's MDN) needs the training design up front: with
      ``mdn_design="stage"`` (default, generous to it) each stage's Σ⁻¹ and N replace the
      previous stage's when the stage starts; with ``"first"`` the first stage's are kept (a
      true stream). Its running β is refitted on the stage's training set after every epoch.
    - ``rmdn``: λ = ``forgetting`` per step; ``rmdn_reset``: at a new stage do nothing
      (``"none"``, default: forgetting alone adapts), reset P (``"covariance"``) or everything
      (``"all"``).
    - ``pmdn``: β's learning rate ``pmdn_lr``.

    Args:
        out_dir: where to write ``results.json`` and ``report.md`` (``None``: nothing written).
        methods: methods among those the ``continual`` study accepts
            (``get_study("continual").methods``). Default: its default run's
            (``settings["methods"]``).
        associations: the confounder association of each stage (the schedule).
        n_per_class: training images per label and stage. Default: 400.
        n_eval_per_class: validation images per label and stage. Default: 400.
        epochs_per_stage: epochs per stage. Default: 4.
        batch_size: training batch size. Default: 32.
        lr: Adam learning rate. Default: 1e-3.
        seed: seed of the data, the initial weights and the batch order. Default: 0.
        forgetting: R-MDN's λ. Default: 0.9 (a memory of about 10 steps; see
            ``docs/estimators.md`` for 0.99).
        rmdn_reset: ``"none"``, ``"covariance"`` or ``"all"`` (see above). Default: ``"none"``.
        mdn_design: ``"stage"`` or ``"first"`` (see above). Default: ``"stage"``.
        pmdn_lr: PMDN's β learning rate. Default: 1e-2.
        threads: ``torch.set_num_threads``; ``None`` leaves it.
        progress: print one line per stage.

    Returns:
        ``{"settings": {...}, "methods": {method: {"bacc": [[after stage i, on stage j]],
        "dcor2": {class: [[...]]}, "train_loss": [per stage], "time_s": float}}}``.
    """
    if methods is None:
        methods = _continual_study().settings["methods"]
    settings = continual_settings(
        methods=methods,
        associations=associations,
        n_per_class=n_per_class,
        n_eval_per_class=n_eval_per_class,
        epochs_per_stage=epochs_per_stage,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        forgetting=forgetting,
        rmdn_reset=rmdn_reset,
        mdn_design=mdn_design,
        pmdn_lr=pmdn_lr,
    )
    if threads is not None:
        torch.set_num_threads(threads)
    results: dict[str, Any] = {"settings": settings, "methods": {}}
    for method in methods:
        results["methods"][method] = continual_unit(settings, method, progress=progress)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # atomically, the results first: a kill never leaves a report without its results
        write_text(out / "results.json", json.dumps(results, indent=2, allow_nan=True))
        write_text(out / "report.md", continual_report(results))
    return results


def continual_settings(
    *,
    methods: Sequence[str] | None = None,
    associations: Sequence[float] = CONTINUAL_ASSOCIATIONS,
    n_per_class: int = 400,
    n_eval_per_class: int = 400,
    epochs_per_stage: int = 4,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    forgetting: float = 0.9,
    rmdn_reset: str = "none",
    mdn_design: str = "stage",
    pmdn_lr: float = 1e-2,
) -> dict[str, Any]:
    """The checked settings of :func:`run_continual`, as its result's ``"settings"``.

    Raises:
        ValueError: an unknown method, reset or design, or a count that is not a positive int.
    """
    study = _continual_study()
    given = study.settings["methods"] if methods is None else methods
    check_methods(study.name, given, study.methods or (), spellings=False)
    if rmdn_reset not in RMDN_RESETS:
        raise ValueError(f"expected rmdn_reset in {RMDN_RESETS}, got {rmdn_reset!r}")
    if mdn_design not in MDN_DESIGNS:
        raise ValueError(f"expected mdn_design in {MDN_DESIGNS}, got {mdn_design!r}")
    for name, v in (
        ("n_per_class", n_per_class),
        ("n_eval_per_class", n_eval_per_class),
        ("epochs_per_stage", epochs_per_stage),
        ("batch_size", batch_size),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"expected {name} to be a positive int, got {v!r}")
    settings = {
        "associations": list(associations),
        "n_per_class": n_per_class,
        "n_eval_per_class": n_eval_per_class,
        "epochs_per_stage": epochs_per_stage,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "forgetting": forgetting,
        "rmdn_reset": rmdn_reset,
        "mdn_design": mdn_design,
        "pmdn_lr": pmdn_lr,
        "design": ["y", "cf", "intercept"],
        "keep": ["y"],
    }
    return settings


def continual_unit(
    settings: Mapping[str, Any], method: str, *, progress: bool = False
) -> dict[str, Any]:
    """Trains one method through the stages of :func:`run_continual` (its run unit).

    Args:
        settings: the ``"settings"`` of :func:`run_continual`'s result.
        method: one of the methods the ``continual`` study accepts.
        progress: print one line per stage.

    Returns:
        ``{"bacc", "dcor2", "train_loss", "time_s"}`` as in :func:`run_continual`'s result.
    """
    associations, seed = settings["associations"], settings["seed"]
    n_per_class, n_eval_per_class = settings["n_per_class"], settings["n_eval_per_class"]
    epochs_per_stage, batch_size = settings["epochs_per_stage"], settings["batch_size"]
    lr, forgetting, pmdn_lr = settings["lr"], settings["forgetting"], settings["pmdn_lr"]
    rmdn_reset, mdn_design = settings["rmdn_reset"], settings["mdn_design"]
    stages = make_shifting_stages(
        n_per_class, associations=associations, seed=seed, n_per_class_eval=n_eval_per_class
    )
    rows = [(_rows(tr), _rows(va)) for tr, va in stages]
    val_loaders = [
        DataLoader(DesignDataset(va, r[1]), batch_size=500)
        for (_, va), r in zip(stages, rows, strict=True)
    ]
    start = time.perf_counter()
    torch.manual_seed(seed)
    options = {"forgetting": forgetting, "pmdn_lr": pmdn_lr}
    model = PaperCNN(method, rows[0][0], keep=[0], **estimator_kwargs(method, options))
    network, _ = split_parameters(model)
    optimizer = torch.optim.Adam(network, lr=lr)
    bacc: list[list[float]] = []
    dcor: dict[str, list[list[float]]] = {}
    losses: list[float] = []
    for i, (train, _) in enumerate(stages):
        if i > 0 and mdn_design == "stage":
            _set_design(model, rows[i][0])
        if i > 0 and rmdn_reset != "none":
            for layer in model.modules():
                if isinstance(layer, RecursiveMetadataNorm):
                    if rmdn_reset == "all":
                        layer.reset_running_stats()
                    else:
                        layer.reset_covariance()
        data = DesignDataset(train, rows[i][0])
        loader = DataLoader(
            data,
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(1000 * seed + i),
        )
        for _ in range(epochs_per_stage):
            loss = train_one_epoch(model, loader, optimizer)["loss"]
            # the batch GLM layers only: a refit would replace the recursive layers'
            # forgetting memory with a closed-form fit over this stage ("first" keeps stage
            # 1's design on purpose: its rows no longer describe the stage's)
            refit_running_beta(
                model,
                DataLoader(data, batch_size=500),
                estimators=MetadataNorm,
                check_design=mdn_design == "stage",
            )
        losses.append(loss)
        row_bacc: list[float] = []
        for j, ((_, val), vl) in enumerate(zip(stages, val_loaders, strict=True)):
            ev = evaluate(model, vl, confounder=np.asarray(val.metadata["cf"]))
            row_bacc.append(ev["balanced_accuracy"])
            for c, v in ev["dcor2"].items():
                dcor.setdefault(c, [[math.nan] * len(stages) for _ in stages])[i][j] = v
        bacc.append(row_bacc)
        if progress:
            print(
                f"{norm_display_name(method)} stage {i + 1}/{len(stages)}: loss {loss:.3f}, "
                f"bAcc on stages {' '.join(f'{b:.3f}' for b in row_bacc)}",
                flush=True,
            )
    return {
        "bacc": bacc,
        "dcor2": dcor,
        "train_loss": losses,
        "time_s": time.perf_counter() - start,
    }


def _matrix(m: Sequence[Sequence[float]]) -> list[str]:
    n = len(m[0])
    out = ["| after stage | " + " | ".join(f"val {j + 1}" for j in range(n)) + " |"]
    out.append("|" + "---|" * (n + 1))
    for i, row in enumerate(m):
        out.append(f"| {i + 1} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    return out


def continual_report(results: Mapping[str, Any]) -> str:
    """The markdown report of :func:`run_continual`'s results."""
    s = results["settings"]
    lines = [
        "# Continual learning with a shifting confounder",
        "",
        f"Stages: confounder association a = {', '.join(f'{a:g}' for a in s['associations'])} "
        "(cf | y ~ U(c_y ± 1.5), c_1 = 3.5 + a, c_0 = 3.5 − a; mf as in the paper). "
        f"{s['n_per_class']} training and {s['n_eval_per_class']} validation images per class "
        f"and stage; {s['epochs_per_stage']} epochs per stage, batch {s['batch_size']}, Adam "
        f"lr {s['lr']:g}, seed {s['seed']}. R-MDN: λ = {s['forgetting']}, reset at a new stage: "
        f"{s['rmdn_reset']}. MDN: Σ from "
        f"{'each stage' if s['mdn_design'] == 'stage' else 'stage 1'}, running β refitted "
        "after every epoch. Rows: the model after training stage i; "
        "columns: the validation set of stage j.",
        "",
        "| method | mean bAcc, last row | mean bAcc, diagonal | max dcor², last row | "
        "mean dcor², diagonal | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for method, r in results["methods"].items():
        b = np.asarray(r["bacc"], dtype=float)
        d = np.stack([np.asarray(v, dtype=float) for v in r["dcor2"].values()])
        lines.append(
            f"| {norm_display_name(method)} | {b[-1].mean():.3f} | {np.diag(b).mean():.3f} | "
            f"{np.nanmax(d[:, -1]):.3f} | {np.nanmean(np.diagonal(d, axis1=1, axis2=2)):.3f} | "
            f"{r['time_s']:.0f} |"
        )
    for method, r in results["methods"].items():
        lines += ["", f"## {norm_display_name(method)}", "", "bAcc:", "", *_matrix(r["bacc"])]
        for c, m in r["dcor2"].items():
            lines += ["", f"dcor² (bias-corrected) within class {c}:", "", *_matrix(m)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m metanorm_repro.experiments.estimators continual [...]``; returns 0."""
    parser = argparse.ArgumentParser(
        prog="python -m metanorm_repro.experiments.estimators",
        description="The estimator experiments. The batch-size sweep runs as "
        "'metanorm reproduce synthetic-batch'; this runs the continual-learning experiment.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "continual",
        help="continual learning with a shifting confounder (5 stages)",
        description=(run_continual.__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--out", default="runs/continual", help="output folder")
    study = _continual_study()
    p.add_argument(
        "--methods", nargs="+", default=list(study.settings["methods"]), choices=study.methods
    )
    p.add_argument("--associations", nargs="+", type=float, default=list(CONTINUAL_ASSOCIATIONS))
    p.add_argument("--n-per-class", type=int, default=400)
    p.add_argument("--n-eval-per-class", type=int, default=400)
    p.add_argument("--epochs-per-stage", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--forgetting", type=float, default=0.9)
    p.add_argument("--rmdn-reset", choices=RMDN_RESETS, default="none")
    p.add_argument("--mdn-design", choices=MDN_DESIGNS, default="stage")
    p.add_argument("--pmdn-lr", type=float, default=1e-2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    print(
        "note: this runner is deprecated; run 'metanorm reproduce continual' (the same study "
        "and numbers, written atomically; --epochs sets the epochs per stage)",
        file=sys.stderr,
    )
    results = run_continual(
        args.out,
        methods=args.methods,
        associations=args.associations,
        n_per_class=args.n_per_class,
        n_eval_per_class=args.n_eval_per_class,
        epochs_per_stage=args.epochs_per_stage,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        forgetting=args.forgetting,
        rmdn_reset=args.rmdn_reset,
        mdn_design=args.mdn_design,
        pmdn_lr=args.pmdn_lr,
        threads=args.threads,
        progress=not args.quiet,
    )
    print(continual_report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
