"""One training run, end to end: :func:`run_experiment`.

A run folder holds:

- ``config.json``: the resolved configuration (every :class:`RunConfig` field, the design's
  columns, split sizes, versions), written first;
- ``epochs.csv``: one row per epoch (training loss, validation loss/accuracy/bAcc, per-class
  validation dcor², epoch time), rewritten after every epoch;
- ``final.json``: the test metrics (bAcc, per-class recall, per-class dcor², accuracy per group)
  and the last epoch's validation metrics, written last: its presence marks a complete run;
- ``checkpoint.pt``: the model's ``state_dict`` (MDN buffers included) and the config;
- ``test_features.npz``: the test set's features, labels and confounder (for the plots).

Every file is written atomically. An existing, non-empty run folder is refused unless
``overwrite=True``.

About the design rows at evaluation: the design is ``[y, metadata..., 1]`` with the label column
``y`` kept. Validation and test rows are built with the TRUE labels, because a design row needs a
value in every column, but in eval mode an MDN layer subtracts only the removed columns' effect
with its running β, so the kept label column is multiplied by nothing: predictions never see the
label.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from metanorm.datasets import DataSplit, DesignDataset
from metanorm.experiments import _io
from metanorm.experiments.config import RunConfig
from metanorm.experiments.engine import evaluate, train_one_epoch
from metanorm.experiments.registry import Experiment, get_experiment
from metanorm.glm import DesignBuilder

__all__ = ["EPOCH_COLUMNS", "build_designs", "check_run_dir", "run_experiment", "seed_everything"]

LABEL = "y"
EVAL_BATCH = 500


def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and CUDA) and Python's ``random``; numpy draws use explicit generators."""
    import random

    random.seed(seed)
    torch.manual_seed(seed)


def check_run_dir(out_dir: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuses an existing non-empty folder unless ``overwrite``; returns the path."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{path} already holds a run; choose another --out or pass --overwrite"
        )
    return path


def _design_data(split: DataSplit, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    missing = [c for c in columns if c not in split.metadata]
    if missing:
        raise ValueError(
            f"split {split.name!r} lacks metadata column(s) {missing}; "
            f"it has {sorted(split.metadata)}"
        )
    data = {LABEL: split.labels.numpy()}
    data.update({c: np.asarray(split.metadata[c]) for c in columns})
    return data


def build_designs(
    experiment: Experiment, splits: tuple[DataSplit, ...]
) -> tuple[DesignBuilder, list[torch.Tensor]]:
    """Fits the design ``[y, metadata..., 1]`` (``y`` kept) on ``splits[0]``; rows of every split.

    The label is one-hot coded (reference level dropped) when it has more than two classes.
    """
    train = splits[0]
    categorical = list(experiment.categorical)
    if len(np.unique(train.labels.numpy())) > 2:
        categorical.insert(0, LABEL)
    builder = DesignBuilder(keep=[LABEL], categorical=categorical)
    builder.fit(_design_data(train, experiment.metadata_columns))
    rows = [
        builder.transform(_design_data(s, experiment.metadata_columns)).tensor() for s in splits
    ]
    return builder, rows


def _environment(device: torch.device) -> dict[str, Any]:
    from metanorm import __version__

    env: dict[str, Any] = {
        "metanorm": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def _resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"expected a torch device such as 'cpu' or 'cuda', got {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def _flat(prefix: str, d: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in d.items()}


EPOCH_COLUMNS = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy")


def run_experiment(
    config: RunConfig,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains and evaluates one configuration, writing the run folder (see the module docstring).

    Args:
        config: the run's configuration.
        out_dir: the run folder (created).
        overwrite: replace the files of an existing run in ``out_dir``. Default: ``False`` (an
            existing non-empty folder is a ``FileExistsError``).
        progress: show a progress bar over the epochs. Default: ``True``.

    Returns:
        ``{"config": dict, "history": [per-epoch dict], "final": dict, "out_dir": str}``.
    """
    experiment = get_experiment(config.experiment)
    if config.method not in experiment.methods:
        raise ValueError(
            f"experiment {experiment.name!r} has methods {experiment.methods}, "
            f"got {config.method!r}"
        )
    out = check_run_dir(out_dir, overwrite)
    device = _resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)

    splits = experiment.make_splits(config)
    train, val, test = splits
    builder, (train_rows, val_rows, test_rows) = build_designs(experiment, splits)
    design = builder.transform(_design_data(train, experiment.metadata_columns))
    seed_everything(config.seed)
    model = experiment.make_model(config.method, design, config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

    loader = DataLoader(
        DesignDataset(train, train_rows),
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
    )
    val_loader = DataLoader(DesignDataset(val, val_rows), batch_size=EVAL_BATCH)
    test_loader = DataLoader(DesignDataset(test, test_rows), batch_size=EVAL_BATCH)
    conf = experiment.confounder

    def groups(split: DataSplit) -> np.ndarray:
        if experiment.groups is not None:
            return experiment.groups(split)
        return np.asarray(split.metadata[conf])

    resolved = {
        "config": config.to_dict(),
        "experiment": experiment.name,
        "design": {
            "columns": list(design.columns),
            "keep": [design.columns[k] for k in design.keep],
        },
        "confounder": conf,
        "sizes": {"train": len(train), "val": len(val), "test": len(test)},
        "batches_per_epoch": len(loader),
        "environment": _environment(device),
    }
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("final.json", "epochs.csv", "checkpoint.pt", "test_features.npz"):
        (out / stale).unlink(missing_ok=True)
    _io.write_json(out / "config.json", resolved)

    history: list[dict[str, Any]] = []
    columns: list[str] = []
    bar = tqdm(
        range(1, config.epochs + 1),
        desc=f"{experiment.name} {config.method} bs={config.batch_size} seed={config.seed}",
        unit="epoch",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    for epoch in bar:
        tr = train_one_epoch(model, loader, optimizer, device=device)
        t0 = time.perf_counter()
        ev = evaluate(model, val_loader, confounder=val.metadata[conf], device=device)
        row: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": tr["loss"],
            "val_loss": ev["loss"],
            "val_accuracy": ev["accuracy"],
            "val_balanced_accuracy": ev["balanced_accuracy"],
            **_flat("val_dcor2", ev["dcor2"]),
            "epoch_time_s": tr["time_s"],
            "eval_time_s": time.perf_counter() - t0,
        }
        history.append(row)
        if not columns:
            columns = list(row)
        _io.write_csv(out / "epochs.csv", history, columns)
        dc = "/".join(f"{v:.3f}" for v in ev["dcor2"].values())
        bar.set_postfix_str(
            f"loss {tr['loss']:.3f} val bAcc {ev['balanced_accuracy']:.3f} dcor² {dc}"
        )
    bar.close()

    test_ev = evaluate(
        model,
        test_loader,
        confounder=test.metadata[conf],
        groups=groups(test),
        device=device,
        return_outputs=True,
    )
    outputs = test_ev.pop("outputs")
    times = [h["epoch_time_s"] for h in history]
    last = history[-1]
    final = {
        "experiment": experiment.name,
        "method": config.method,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "epochs": config.epochs,
        "test_balanced_accuracy": test_ev["balanced_accuracy"],
        "test_accuracy": test_ev["accuracy"],
        "test_loss": test_ev["loss"],
        "test_recall": test_ev["recall"],
        "test_dcor2": test_ev["dcor2"],
        "test_group_accuracy": test_ev.get("group_accuracy", {}),
        "val_balanced_accuracy": last["val_balanced_accuracy"],
        "val_dcor2": {
            k[len("val_dcor2_") :]: v for k, v in last.items() if k.startswith("val_dcor2_")
        },
        "epoch_time_s_median": float(np.median(times)),
        "epoch_time_s_mean": float(np.mean(times)),
        "train_time_s": float(np.sum(times)),
    }
    _io.write_torch(
        out / "checkpoint.pt",
        {
            "model": model.state_dict(),
            "config": config.to_dict(),
            "epoch": config.epochs,
            "design_columns": list(design.columns),
        },
    )
    feats = outputs["features"].numpy().astype(np.float32)
    _io.atomic_write(
        out / "test_features.npz",
        lambda f: np.savez_compressed(
            f,
            features=feats,
            labels=outputs["labels"].numpy(),
            confounder=np.asarray(test.metadata[conf]),
        ),
    )
    _io.write_json(out / "final.json", final)
    return {"config": config.to_dict(), "history": history, "final": final, "out_dir": str(out)}
