"""One training run, end to end: :func:`run_experiment`.

A run folder holds:

- ``config.json``: the resolved configuration (every :class:`RunConfig` field, the design's
  columns, split sizes, versions), written first;
- ``epochs.csv``: one row per epoch (training loss, validation loss/accuracy/bAcc, per-class
  validation dcor², epoch time), rewritten after every epoch;
- ``final.json``: the test metrics (bAcc, per-class recall, per-class dcor², accuracy per group)
  and the last epoch's validation metrics; ``eval_splits`` holds the same metrics for every test
  split by name (``test`` first, then any further test split such as ``test_reversed``);
- ``checkpoint.pt``: the model's ``state_dict`` (MDN buffers included) and the config;
- ``test_features.npz``: the test set's features, labels, confounder (one value per sample, for
  the plots) and ``metric`` (the matrix dcor² was measured against);
- ``manifest.json``: the size and SHA-256 of each file above, written last: its presence marks a
  complete run, and :func:`load_result` checks every file against it (:class:`RunCorrupted`).

Every file is written atomically. An existing, non-empty run folder is refused unless
``overwrite=True``; :func:`run_experiment` then builds the new run in ``OUT.partial`` beside it
and swaps it in at the end, so the previous run stays intact until the new one is complete.

About the design rows at evaluation: the design is ``[y, metadata..., 1]`` with the label column
``y`` kept. Validation and test rows are built with the TRUE labels, because a design row needs a
value in every column, but in eval mode an MDN layer subtracts only the removed columns' effect
with its running β, so the kept label column is multiplied by nothing: predictions never see the
label.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from metanorm import metrics
from metanorm.datasets import DataSplit, DesignDataset
from metanorm.design import Design, DesignBuilder
from metanorm.nn.utils import refit_running_beta
from metanorm_repro.experiments import _io
from metanorm_repro.experiments.coding import build_designs, metric_matrix, training_design
from metanorm_repro.experiments.config import RunConfig
from metanorm_repro.experiments.engine import (
    epoch_lr,
    evaluate,
    train_one_epoch,
)
from metanorm_repro.experiments.registry import Experiment, get_experiment

__all__ = [
    "RUN_FILES",
    "RUN_MANIFEST",
    "PreparedRun",
    "Run",
    "RunCorrupted",
    "check_run_dir",
    "epoch_summary",
    "load_result",
    "prepare_run",
    "run_experiment",
    "seed_everything",
    "split_groups",
    "verify_run",
]

EVAL_BATCH = 500

#: The last file of a complete run folder: the size and SHA-256 of every file in :data:`RUN_FILES`.
RUN_MANIFEST = "manifest.json"

#: The files of a complete run folder, in the order they are written.
RUN_FILES = ("config.json", "epochs.csv", "checkpoint.pt", "test_features.npz", "final.json")


class RunCorrupted(ValueError):
    """A file of a complete run folder is not what the run wrote (see :func:`verify_run`).

    Attributes:
        path: the file.
    """

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}; the run's results cannot be trusted")
        self.path = path


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


def split_groups(experiment: Experiment, split: DataSplit) -> np.ndarray | None:
    """The group of each sample for the per-group accuracy (see :attr:`Experiment.groups`)."""
    if experiment.groups is not None:
        return np.asarray(experiment.groups(split))
    if experiment.confounder.endswith("*"):
        return None
    return np.asarray(split.metadata[experiment.confounder])


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


@dataclass
class PreparedRun:
    """What a run trains and evaluates, built from its configuration (:func:`prepare_run`).

    Attributes:
        config: the run's configuration.
        experiment: the experiment, resolved for the run's options (:meth:`Experiment.resolve`).
        splits: ``(train, val, test, *more_tests)``.
        builder: the design builder, fitted on the training split.
        design: the WHOLE training split's design (what the MDN layers store Σ⁻¹ and N of).
        rows: the design rows of every split, float32 ``(n, K)`` (true labels in the kept
            columns; an MDN layer in eval mode does not use them).
        metrics: per split, the ``(n, p)`` metadata the bias metric is measured against.
        model: the model, on the CPU.
    """

    config: RunConfig
    experiment: Experiment
    splits: tuple[DataSplit, ...]
    builder: DesignBuilder
    design: Design
    rows: list[torch.Tensor]
    metrics: list[np.ndarray]
    model: nn.Module


def _check_method(experiment: Experiment, method: str) -> None:
    experiment.check_methods([method], spellings=False)


def prepare_run(config: RunConfig) -> PreparedRun:
    """Builds a run's data, designs, bias-metric matrices and model, without training or files.

    Args:
        config: the run's configuration (experiment, method, seed, options, ...).

    Returns:
        A :class:`PreparedRun`.

    Raises:
        ValueError: unknown experiment or method, bad options, or splits that break the
            experiment contract.

    Examples::

        >>> from metanorm_repro.experiments import RunConfig
        >>> run = prepare_run(RunConfig(method="mdn-linear", n_per_class=20))
        >>> run.design.columns, tuple(run.rows[0].shape)
        (('y', 'cf', 'intercept'), (40, 3))
        >>> logits, features = run.model(run.splits[0].images[:8], run.rows[0][:8])
    """
    experiment = get_experiment(config.experiment).resolve(config.options)
    _check_method(experiment, config.method)
    seed_everything(config.seed)
    splits = tuple(experiment.make_splits(config))
    if len(splits) < 3:
        raise ValueError(
            f"experiment {experiment.name!r}: make_splits must return (train, val, test, "
            f"*more_tests), got {len(splits)} split(s)"
        )
    names = [s.name for s in splits[2:]]
    if len(set(names)) != len(names):
        raise ValueError(f"the test splits need distinct names, got {names}")
    train = splits[0]
    builder, rows = build_designs(experiment, splits)
    design = training_design(experiment, builder, train)
    metrics = [metric_matrix(experiment, s, train) for s in splits]
    seed_everything(config.seed)
    model = experiment.make_model(config.method, design, config)
    return PreparedRun(config, experiment, splits, builder, design, rows, metrics, model)


#: Resamples of the test intervals in ``final.json`` (bAcc: bootstrap; dcor²: subsamples).
INTERVAL_RESAMPLES = {"balanced_accuracy": 1000, "dcor2": 100}


def test_intervals(
    outputs: dict[str, Any], confounder: Any, dcor2: dict[str, float]
) -> dict[str, Any]:
    """95 % intervals of the test bAcc and of each class's dcor² (seed 0, stated resamples).

    bAcc: percentile bootstrap with rows resampled within classes; dcor²: subsampling (half of
    the class's rows, no repeats: a bootstrap's repeated rows bias distance statistics). Classes
    whose dcor² is undefined (NaN) get ``None``.
    """
    labels = outputs["labels"].numpy()
    bacc = metrics.balanced_accuracy_interval(
        labels,
        outputs["predictions"].numpy(),
        num_resamples=INTERVAL_RESAMPLES["balanced_accuracy"],
    )
    defined = [c for c, v in dcor2.items() if v == v]
    per_class: dict[str, list[float] | None] = {c: None for c in dcor2}
    if defined:
        conf = torch.as_tensor(np.asarray(confounder), dtype=torch.float64)
        conf = conf[:, None] if conf.dim() == 1 else conf
        keys = np.array([str(v.item() if hasattr(v, "item") else v) for v in labels])
        keep = np.isin(keys, defined)
        intervals = metrics.grouped_dcor_intervals(
            outputs["features"][torch.from_numpy(keep)].double(),
            conf[torch.from_numpy(keep)],
            keys[keep],
            unbiased=True,
            num_resamples=INTERVAL_RESAMPLES["dcor2"],
        )
        for c, iv in intervals.items():
            per_class[str(c)] = None if iv.low != iv.low else [iv.low, iv.high]
    return {
        "confidence": 0.95,
        "seed": 0,
        "balanced_accuracy": [bacc.low, bacc.high],
        "dcor2": per_class,
        "resamples": dict(INTERVAL_RESAMPLES),
    }


class Run:
    """One run, step by step.

    The data, design, model and ``config.json`` are built at construction; then
    :meth:`train_epoch` runs once per epoch and :meth:`finish` writes the results.

    :func:`run_experiment` drives one :class:`Run` to the end; the sweep interleaves the epochs
    of several runs (one per method) so that their epoch times are measured side by side.

    Args:
        config: the run's configuration.
        out_dir: the run folder (created).
        overwrite: replace the files of an existing run in ``out_dir``. Default: ``False`` (an
            existing non-empty folder is a ``FileExistsError``).
    """

    def __init__(
        self, config: RunConfig, out_dir: str | os.PathLike[str], *, overwrite: bool = False
    ) -> None:
        _check_method(get_experiment(config.experiment), config.method)
        self.out = check_run_dir(out_dir, overwrite)
        self.device = _resolve_device(config.device)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        prepared = prepare_run(config)
        self.config, self.experiment = config, prepared.experiment
        experiment, design, rows = prepared.experiment, prepared.design, prepared.rows
        self.splits = prepared.splits
        train, val = self.splits[0], self.splits[1]
        self.tests = self.splits[2:]
        self.metrics = prepared.metrics
        self.model = prepared.model.to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.loader = DataLoader(
            DesignDataset(train, rows[0]),
            batch_size=config.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(config.seed),
        )
        self.refit_loader = DataLoader(DesignDataset(train, rows[0]), batch_size=EVAL_BATCH)
        self.val_loader = DataLoader(DesignDataset(val, rows[1]), batch_size=EVAL_BATCH)
        self.test_loaders = [
            DataLoader(DesignDataset(s, r), batch_size=EVAL_BATCH)
            for s, r in zip(self.tests, rows[2:], strict=True)
        ]
        self.design_columns = list(design.columns)
        self.history: list[dict[str, Any]] = []
        resolved = {
            "config": config.to_dict(),
            "experiment": experiment.name,
            "design": {
                "columns": list(design.columns),
                "keep": [design.columns[k] for k in design.keep],
            },
            "model": {
                "class": type(self.model).__name__,
                "parameters": sum(p.numel() for p in self.model.parameters()),
            },
            "confounder": experiment.confounder,
            "sizes": {"train": len(train), "val": len(val), "test": len(self.tests[0])}
            | {s.name: len(s) for s in self.tests[1:]},
            "batches_per_epoch": len(self.loader),
            "environment": _environment(self.device),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in (RUN_MANIFEST, *reversed(RUN_FILES)):  # the manifest first: not complete
            (self.out / stale).unlink(missing_ok=True)
        _io.write_json(self.out / "config.json", resolved)

    @property
    def done(self) -> bool:
        """True once every epoch of the config has been trained."""
        return len(self.history) >= self.config.epochs

    def train_epoch(self) -> dict[str, Any]:
        """Trains one epoch, evaluates on the validation split, appends to ``epochs.csv``."""
        if self.done:
            raise RuntimeError(f"all {self.config.epochs} epochs are already trained")
        lr = epoch_lr(
            self.config.lr, self.config.lr_schedule, len(self.history), self.config.epochs
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        tr = train_one_epoch(self.model, self.loader, self.optimizer, device=self.device)
        t0 = time.perf_counter()
        if self.config.refit_running_beta:
            refit_running_beta(self.model, self.refit_loader, device=self.device)
        refit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ev = evaluate(self.model, self.val_loader, confounder=self.metrics[1], device=self.device)
        row: dict[str, Any] = {
            "epoch": len(self.history) + 1,
            "lr": lr,
            "train_loss": tr["loss"],
            "val_loss": ev["loss"],
            "val_accuracy": ev["accuracy"],
            "val_balanced_accuracy": ev["balanced_accuracy"],
            **_flat("val_dcor2", ev["dcor2"]),
            "epoch_time_s": tr["time_s"],
            "refit_time_s": refit_s,
            "eval_time_s": time.perf_counter() - t0,
        }
        self.history.append(row)
        _io.write_csv(self.out / "epochs.csv", self.history, list(row))
        return row

    def finish(self) -> dict[str, Any]:
        """Evaluates on the test split and writes the checkpoint, features and ``final.json``.

        Returns:
            ``{"config": dict, "history": [per-epoch dict], "final": dict, "out_dir": str}``.
        """
        if not self.history:
            raise RuntimeError("train at least one epoch before finish()")
        config, experiment = self.config, self.experiment
        evals: dict[str, dict[str, Any]] = {}
        outputs: dict[str, Any] = {}
        for i, (split, loader) in enumerate(zip(self.tests, self.test_loaders, strict=True)):
            ev = evaluate(
                self.model,
                loader,
                confounder=self.metrics[2 + i],
                groups=split_groups(experiment, split),
                device=self.device,
                return_outputs=i == 0,
            )
            if i == 0:
                outputs = ev.pop("outputs")
            evals[split.name] = ev
        test = self.tests[0]
        test_ev = evals[test.name]
        times = [h["epoch_time_s"] for h in self.history]
        last = self.history[-1]
        final = {
            "experiment": experiment.name,
            "method": config.method,
            "batch_size": config.batch_size,
            "seed": config.seed,
            "epochs": len(self.history),
            "test_balanced_accuracy": test_ev["balanced_accuracy"],
            "test_accuracy": test_ev["accuracy"],
            "test_loss": test_ev["loss"],
            "test_recall": test_ev["recall"],
            "test_dcor2": test_ev["dcor2"],
            "test_group_accuracy": test_ev.get("group_accuracy", {}),
            "eval_splits": evals,
            "val_balanced_accuracy": last["val_balanced_accuracy"],
            "val_dcor2": {
                k[len("val_dcor2_") :]: v for k, v in last.items() if k.startswith("val_dcor2_")
            },
            "epoch_time_s_median": float(np.median(times)),
            "epoch_time_s_mean": float(np.mean(times)),
            "train_time_s": float(np.sum(times)),
            "test_intervals": test_intervals(outputs, self.metrics[2], test_ev["dcor2"]),
        }
        _io.write_torch(
            self.out / "checkpoint.pt",
            {
                "model": self.model.state_dict(),
                "config": config.to_dict(),
                "epoch": len(self.history),
                "design_columns": self.design_columns,
            },
        )
        feats = outputs["features"].numpy().astype(np.float32)
        # one value per sample for the plots' colours: the confounder column, or for a matrix
        # (one-hot site, multi-hot tags) the group / the number of active tags
        groups = split_groups(experiment, test)
        conf_values = (
            np.asarray(test.metadata[experiment.confounder])
            if experiment.confounder in test.metadata
            else groups
            if groups is not None
            else self.metrics[2].sum(1)
        )
        if conf_values.dtype == object:  # e.g. site names: the npz must load without pickle
            conf_values = conf_values.astype(str)
        labels = outputs["labels"].numpy()
        _io.atomic_write(
            self.out / "test_features.npz",
            lambda f: np.savez_compressed(
                f, features=feats, labels=labels, confounder=conf_values, metric=self.metrics[2]
            ),
        )
        _io.write_json(self.out / "final.json", final)
        _io.write_json(
            self.out / RUN_MANIFEST,
            {
                "files": {
                    name: {
                        "bytes": (self.out / name).stat().st_size,
                        "sha256": _io.sha256(self.out / name),
                    }
                    for name in RUN_FILES
                }
            },
        )
        return {
            "config": config.to_dict(),
            "history": self.history,
            "final": final,
            "out_dir": str(self.out),
        }


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
    out = check_run_dir(out_dir, overwrite)
    replace = out.is_dir() and any(out.iterdir())
    work = _io.partial_dir(out) if replace else out
    if replace and work.exists():
        shutil.rmtree(work)
    run = Run(config, work, overwrite=overwrite)
    desc = f"{config.experiment} {config.method} bs={config.batch_size} seed={config.seed}"
    with tqdm(
        total=config.epochs, desc=desc, unit="epoch", disable=not progress, dynamic_ncols=True
    ) as bar:
        while not run.done:
            row = run.train_epoch()
            bar.update(1)
            bar.set_postfix_str(epoch_summary(row))
    result = run.finish()
    if replace:  # the previous run stayed intact until now
        _io.swap_in(work, out)
        result["out_dir"] = str(out)
    return result


def _csv_value(text: str) -> Any:
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def verify_run(out_dir: str | os.PathLike[str]) -> bool:
    """Checks a run folder's files against its ``manifest.json``.

    Args:
        out_dir: a run folder.

    Returns:
        ``True`` when the run is complete and every file has the size and SHA-256 recorded in
        its manifest; ``False`` when the run is not complete (no ``manifest.json``).

    Raises:
        RunCorrupted: a file is missing, truncated or changed (a random-byte checkpoint, an
            edited ``final.json``, ...), or the manifest itself is unreadable; the message names
            the file.
    """
    folder = Path(out_dir)
    manifest_path = folder / RUN_MANIFEST
    try:
        text = manifest_path.read_text()
    except FileNotFoundError:
        return False
    except (OSError, UnicodeDecodeError) as exc:
        raise RunCorrupted(manifest_path, f"unreadable ({exc})") from None
    try:
        files = json.loads(text)["files"]
        recorded = {
            name: (int(files[name]["bytes"]), str(files[name]["sha256"])) for name in RUN_FILES
        }
    except (ValueError, KeyError, TypeError):
        raise RunCorrupted(manifest_path, "not a run manifest (damaged)") from None
    for name, (size, digest) in recorded.items():
        path = folder / name
        try:
            found = path.stat().st_size
        except OSError:
            raise RunCorrupted(path, "missing (the manifest lists it)") from None
        if found != size:
            raise RunCorrupted(
                path, f"{found} bytes where the run wrote {size} (truncated or changed)"
            )
        if _io.sha256(path) != digest:
            raise RunCorrupted(path, "its SHA-256 differs from the one the run recorded (changed)")
    return True


def load_result(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The result of a complete run folder, as :func:`run_experiment` returned it.

    Every file is checked against the run's ``manifest.json`` first (:func:`verify_run`).

    Args:
        out_dir: a run folder.

    Returns:
        ``{"config", "history", "final", "out_dir"}`` read from ``config.json``, ``epochs.csv``
        and ``final.json``; ``None`` when the run is not complete (no ``manifest.json``).

    Raises:
        RunCorrupted: a file of the complete run is missing, truncated or changed (naming it).
    """
    folder = Path(out_dir)
    if not verify_run(folder):
        return None
    try:
        final = json.loads((folder / "final.json").read_text())
        config = json.loads((folder / "config.json").read_text())["config"]
        with open(folder / "epochs.csv", newline="") as f:
            history = [{k: _csv_value(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunCorrupted(folder, f"unreadable although its manifest matches ({exc})") from None
    if not isinstance(final, dict) or not isinstance(config, dict):
        raise RunCorrupted(folder / "final.json", "not a run's result")
    return {"config": config, "history": history, "final": final, "out_dir": str(folder)}


def epoch_summary(row: dict[str, Any]) -> str:
    """One line for a progress bar: training loss, validation bAcc and dcor² of an epoch row."""
    dc = "/".join(f"{v:.3f}" for k, v in row.items() if k.startswith("val_dcor2_"))
    return f"loss {row['train_loss']:.3f} val bAcc {row['val_balanced_accuracy']:.3f} dcor² {dc}"
