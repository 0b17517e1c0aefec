"""The data contract every experiment's data set follows.

A data set is a set of :class:`DataSplit` s (train, validation, test). A split holds images,
integer labels and its metadata: raw columns (1-D arrays, continuous or categorical). The
experiments code label + metadata into design rows (:mod:`metanorm_repro.experiments.coding`, with a
:class:`metanorm.design.DesignBuilder` fitted on the training split).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from metanorm._validation import describe

__all__ = ["DataSplit", "DesignDataset", "to_float_images"]


@dataclass
class DataSplit:
    """One split of a data set.

    Attributes:
        images: float32 tensor ``(N, C, H, W)`` (or ``(N, C, D, H, W)`` for volumes, ``(N, D)``
            for feature vectors).
        labels: int64 tensor ``(N,)``.
        metadata: raw metadata columns, name → 1-D array of length N.
        name: the split's name ("train", "val", "test", ...).
    """

    images: torch.Tensor
    labels: torch.Tensor
    metadata: dict[str, np.ndarray] = field(default_factory=dict)
    name: str = "train"

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.labels.shape != (n,):
            raise ValueError(f"expected labels of shape ({n},), got {describe(self.labels)}")
        for k, v in self.metadata.items():
            if np.asarray(v).shape != (n,):
                raise ValueError(
                    f"expected metadata column {k!r} of shape ({n},), got {describe(v)}"
                )

    def __len__(self) -> int:
        return int(self.images.shape[0])


class DesignDataset(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """A split paired with its design rows; items are ``(image, label, design_row)``.

    Args:
        split: the :class:`DataSplit`.
        design_rows: float tensor ``(N, K)``, row i the design row of sample i.
    """

    def __init__(self, split: DataSplit, design_rows: torch.Tensor) -> None:
        if design_rows.dim() != 2 or design_rows.shape[0] != len(split):
            raise ValueError(
                f"expected design rows of shape ({len(split)}, K), got {describe(design_rows)}"
            )
        self.split = split
        self.design_rows = design_rows

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.split.images[i], self.split.labels[i], self.design_rows[i]


def to_float_images(images: np.ndarray, scale: float) -> torch.Tensor:
    """``(n, H, W)`` integer images → float32 ``(n, 1, H, W)`` divided by ``scale``."""
    return torch.as_tensor(images, dtype=torch.float32).div_(scale).unsqueeze(1)
