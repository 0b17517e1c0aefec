"""The training and evaluation loop, as plain functions.

A model here is called as ``model(images, design_rows)`` and returns ``(logits, features)``. One
logit per sample means a binary task (``BCEWithLogits``, prediction ``logit > 0``); C logits mean
C classes (cross-entropy, prediction ``argmax``). Loaders yield ``(images, labels, design_rows)``
(:class:`metanorm.datasets.DesignDataset`).

A model with a submodule ``objective`` (the alternatives to MDN,
:mod:`metanorm_repro.experiments.alternatives`) trains on
``model.objective(logits, features, labels, design_rows)`` instead of the task loss; evaluation
is the same for every model. :func:`train_one_epoch` is the one training loop of the harness:
the sweeps, the continual and running-β studies and the regression study (through its ``loss``
hook) all train with it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metanorm import metrics

__all__ = [
    "epoch_lr",
    "evaluate",
    "loss_and_predictions",
    "predict",
    "train_one_epoch",
]

Batch = tuple[Tensor, Tensor, Tensor]


def epoch_lr(lr: float, schedule: str, epoch: int, epochs: int) -> float:
    """The learning rate of epoch ``epoch`` (from 0) of ``epochs`` under ``schedule``.

    Args:
        lr: the base (first-epoch) learning rate.
        schedule: ``"constant"`` (always ``lr``) or ``"cosine"``
            (``lr · (1 + cos(π · epoch / epochs)) / 2``, stepped once per epoch).
        epoch: the epoch, ``0 <= epoch < epochs``.
        epochs: the number of epochs.

    Examples:
        >>> [round(epoch_lr(1e-3, "cosine", e, 4), 6) for e in range(4)]
        [0.001, 0.000854, 0.0005, 0.000146]
    """
    if not 0 <= epoch < epochs:
        raise ValueError(f"expected 0 <= epoch < epochs={epochs}, got epoch={epoch}")
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return lr * (1.0 + math.cos(math.pi * epoch / epochs)) / 2.0
    raise ValueError(f"expected schedule 'constant' or 'cosine', got {schedule!r}")


def loss_and_predictions(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The mean loss of a batch and its predicted labels (see the module docstring)."""
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape (m, C), got shape {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], labels.to(logits.dtype))
        return loss, (logits[:, 0] > 0).long()
    return F.cross_entropy(logits, labels), logits.argmax(1)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device | str = "cpu",
    loss: Callable[[nn.Module, Any], Tensor] | None = None,
) -> dict[str, float]:
    """Trains ``model`` for one pass over ``loader``: the one training loop of the harness.

    By default each batch is ``(images, labels, rows)`` and the loss is the task loss, or
    ``model.objective(logits, features, labels, rows)`` when the model has an ``objective``
    submodule (see the module docstring). ``loss`` replaces that for other tasks (regression
    targets, extra per-sample columns): it is called as ``loss(model, batch)`` on each batch as
    the loader yields it (already on the device) and returns the batch's mean loss; the first
    element of a batch gives its sample count.

    Returns:
        ``{"loss": mean training loss over samples, "time_s": wall-clock seconds of the pass,
        "samples": samples seen}``.
    """
    model.train()
    objective = getattr(model, "objective", None)
    total, seen = 0.0, 0
    start = time.perf_counter()
    for batch in loader:
        if loss is not None:
            value = loss(model, batch)
            m = len(batch[0])
        else:
            images, labels, rows = (t.to(device) for t in batch)
            logits, feats = model(images, rows)
            if isinstance(objective, nn.Module):
                value = objective(logits, feats, labels, rows)
            else:
                value, _ = loss_and_predictions(logits, labels)
            m = len(labels)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        total += float(value.detach()) * m
        seen += m
    if seen == 0:
        raise ValueError("the training loader yielded no batches")
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return {"loss": total / seen, "time_s": time.perf_counter() - start, "samples": float(seen)}


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable[Batch], *, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """Runs ``model`` in eval mode over ``loader``.

    Returns:
        CPU tensors ``{"logits": (n, C), "features": (n, D), "labels": (n,), "predictions": (n,),
        "loss": 0-d mean loss}``.
    """
    model.eval()
    logits, feats, labels = [], [], []
    for images, y, rows in loader:
        out, f = model(images.to(device), rows.to(device))
        logits.append(out.float().cpu())
        feats.append(f.float().cpu().flatten(1))
        labels.append(y.cpu())
    if not logits:
        raise ValueError("the evaluation loader yielded no batches")
    lg, lab = torch.cat(logits), torch.cat(labels)
    loss, pred = loss_and_predictions(lg, lab)
    return {
        "logits": lg,
        "features": torch.cat(feats),
        "labels": lab,
        "predictions": pred,
        "loss": loss,
    }


def _key(v: Any) -> str:
    return str(v.item() if hasattr(v, "item") else v)


def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    confounder: np.ndarray | Tensor,
    groups: np.ndarray | None = None,
    device: torch.device | str = "cpu",
    return_outputs: bool = False,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class recall and per-class bias of ``model`` on a split.

    Args:
        model: the model.
        loader: the split's loader, in the split's order (no shuffling).
        confounder: the split's confounder column, ``(n,)`` or ``(n, p)``, aligned with the
            loader's samples.
        groups: group label per sample for :func:`metanorm.metrics.group_accuracy`, or ``None``.
        device: where the model runs.
        return_outputs: also return the :func:`predict` outputs under ``"outputs"``.

    Returns:
        ``{"loss", "accuracy", "balanced_accuracy", "recall": {class: recall},
        "dcor2": {class: bias-corrected dcor² between the features and the confounder within the
        class; NaN where the confounder is constant within the class}, "group_accuracy": {group:
        accuracy} (when ``groups`` is given)}``; class and group keys are strings (JSON keys).
    """
    out = predict(model, loader, device=device)
    y, p = out["labels"].numpy(), out["predictions"].numpy()
    conf = torch.as_tensor(np.asarray(confounder), dtype=torch.float64)
    if conf.shape[0] != len(y):
        raise ValueError(f"expected {len(y)} confounder values, got {tuple(conf.shape)}")
    if conf.dim() == 1:
        conf = conf[:, None]
    dcor = metrics.grouped_distance_correlation_sqr(out["features"], conf, y, unbiased=True)
    for c in dcor:  # undefined (NaN, JSON null) where the metadata are constant within the class
        sel = torch.as_tensor(y == c)
        if bool((conf[sel] == conf[sel][:1]).all()):
            dcor[c] = float("nan")
    result: dict[str, Any] = {
        "loss": float(out["loss"]),
        "accuracy": float(np.mean(y == p)),
        "balanced_accuracy": metrics.balanced_accuracy(y, p),
        "recall": {_key(c): float(np.mean(p[y == c] == c)) for c in np.unique(y)},
        "dcor2": {_key(c): float(v) for c, v in dcor.items()},
    }
    if groups is not None:
        acc = metrics.group_accuracy(y, p, np.asarray(groups))
        result["group_accuracy"] = {_key(g): float(v) for g, v in acc.items()}
    if return_outputs:
        result["outputs"] = out
    return result
