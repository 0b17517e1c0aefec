"""The configuration of one training run, saved (resolved) beside its results."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LR_SCHEDULES", "RunConfig"]

LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one run (one method, one batch size, one seed).

    Attributes:
        experiment: registered experiment name (see
        :func:`metanorm_repro.experiments.list_experiments`).
        method: the model's normalization method (``"none"`` is the baseline; see
            :func:`metanorm_repro.models.methods.list_methods`).
        batch_size: training batch size; it need not divide the training set size (the last
            batch is short).
        epochs: training epochs.
        lr: Adam learning rate (of the first epoch under a schedule).
        lr_schedule: ``"constant"``, or ``"cosine"``: epoch ``e`` of ``E`` (from 0) trains at
            ``lr · (1 + cos(π e / E)) / 2``, so the last epochs take small, steady steps (see
            ``metanorm_repro.experiments.engine.epoch_lr``).
        seed: base seed of the data (its splits use seeds derived from it), the model's
            initialisation and the batch order.
        n_per_class: training samples per class, for experiments that generate or subsample data.
        device: torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        threads: CPU threads for torch (``torch.set_num_threads``); ``None`` leaves torch's default.
        momentum: running-β momentum of the MDN layers.
        refit_running_beta: after every training epoch, refit the MDN layers' running β on the
            training set, layer by layer (:func:`metanorm.nn.utils.refit_running_beta`),
            so that evaluation uses the full-data β of the current weights.
        options: experiment-specific settings (JSON-serialisable).
    """

    experiment: str = "synthetic"
    method: str = "none"
    batch_size: int = 200
    epochs: int = 10
    lr: float = 1e-3
    lr_schedule: str = "constant"
    seed: int = 0
    n_per_class: int = 1000
    device: str = "cpu"
    threads: int | None = 2
    momentum: float | None = 0.1
    refit_running_beta: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "n_per_class"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"expected {name} to be a positive int, got {v!r}")
        if not isinstance(self.lr, int | float) or not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"expected lr to be a positive number, got {self.lr!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"expected lr_schedule in {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"expected seed to be a non-negative int, got {self.seed!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"expected threads to be a positive int or None, got {self.threads!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """The inverse of :meth:`to_dict`; unknown keys are a ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown RunConfig field(s) {unknown}; known: {sorted(names)}")
        return cls(**data)

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)
