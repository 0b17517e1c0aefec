"""File helpers shared by the real-data readers and loaders: missing-data errors, splitting."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["DataNotFoundError", "as_path", "split_indices", "stratified_split"]


class DataNotFoundError(FileNotFoundError):
    """A data file or folder is missing; the message says what, where, and how to get it."""


def as_path(path: str | os.PathLike[str], what: str) -> Path:
    """Validates a user-given path argument and returns it as a :class:`~pathlib.Path`."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"expected {what} to be a path (str or os.PathLike), got {path!r}")
    return Path(path).expanduser()


def split_indices(n: int, fractions: Sequence[float], rng: np.random.Generator) -> list[np.ndarray]:
    """Randomly partitions ``range(n)`` into parts of the given fractions (the last takes the rest).

    Args:
        n: number of items.
        fractions: one fraction per part; must be positive and sum to 1 (±1e-6).
        rng: the random generator.

    Returns:
        One sorted index array per part.
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or fr.size == 0 or (fr <= 0).any() or abs(float(fr.sum()) - 1.0) > 1e-6:
        raise ValueError(f"expected positive split fractions summing to 1, got {list(fractions)}")
    perm = rng.permutation(n)
    bounds = np.round(np.cumsum(fr)[:-1] * n).astype(int)
    return [np.sort(p) for p in np.split(perm, bounds)]


def stratified_split(
    strata: np.ndarray, fractions: Sequence[float], rng: np.random.Generator
) -> list[np.ndarray]:
    """Like :func:`split_indices`, but splits every stratum (e.g. label × group) separately.

    Args:
        strata: ``(n,)`` array of stratum keys (any hashable values).
        fractions: one fraction per part, summing to 1.
        rng: the random generator.

    Returns:
        One sorted index array per part; each part holds about ``fraction`` of every stratum.
    """
    strata = np.asarray(strata)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    _, codes = np.unique(strata.astype(str), return_inverse=True)
    for code in np.unique(codes):
        members = np.flatnonzero(codes == code)
        for j, idx in enumerate(split_indices(len(members), fractions, rng)):
            parts[j].append(members[idx])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=int) for p in parts]
