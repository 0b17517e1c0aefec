"""Reading the metadata tables of user-supplied data sets (CSV, standard library only)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from metanorm.datasets._files import DataNotFoundError, split_indices, stratified_split

__all__ = ["SPLIT_NAMES", "assign_splits", "encode_labels", "read_table"]

#: Values accepted in an optional split column.
SPLIT_NAMES = ("train", "val", "test")


def read_table(path: Path, required: Sequence[str], what: str) -> dict[str, list[str]]:
    """Reads a CSV file with a header row into columns of stripped strings.

    Args:
        path: the CSV file.
        required: columns that must be present.
        what: what the file is, for error messages (e.g. ``"GS-PPB metadata"``).

    Returns:
        Column name → list of cell strings, every column in the file.

    Raises:
        DataNotFoundError: the file does not exist.
        ValueError: a required column is missing, the file is empty, or a row is ragged.
    """
    if not path.is_file():
        raise DataNotFoundError(f"{what} file not found: looked for {path}")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{what} file {path} is empty: expected a header row")
        header = [h.strip() for h in header]
        rows = [r for r in reader if any(cell.strip() for cell in r)]
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{what} file {path} has no column(s) {missing}; it has columns {header}")
    cols: dict[str, list[str]] = {h: [] for h in header}
    for i, r in enumerate(rows, start=2):
        if len(r) != len(header):
            raise ValueError(
                f"{what} file {path}, line {i}: expected {len(header)} cells, got {len(r)}"
            )
        for h, cell in zip(header, r, strict=True):
            cols[h].append(cell.strip())
    if not rows:
        raise ValueError(f"{what} file {path} has a header but no rows")
    return cols


def encode_labels(values: Sequence[str], column: str, path: Path) -> tuple[np.ndarray, list[str]]:
    """Maps label strings to 0..C-1 in sorted order.

    Returns:
        ``(labels int64 (n,), class names)``; label k is ``class_names[k]``.
    """
    blanks = [i for i, v in enumerate(values) if v == ""]
    if blanks:
        raise ValueError(
            f"column {column!r} of {path} is empty in {len(blanks)} row(s) (first data row(s) "
            f"{[b + 1 for b in blanks[:5]]})"
        )
    names = sorted(set(values))
    if len(names) < 2:
        raise ValueError(f"column {column!r} of {path} has one class only ({names}); need >= 2")
    lookup = {v: k for k, v in enumerate(names)}
    return np.array([lookup[v] for v in values], dtype=np.int64), names


def assign_splits(
    table: dict[str, list[str]],
    split_column: str | None,
    strata: np.ndarray,
    fractions: Sequence[float],
    seed: int,
    path: Path,
) -> dict[str, np.ndarray]:
    """Row indices of each split: from the split column when the table has it, else drawn.

    Args:
        table: the columns from :func:`read_table`.
        split_column: name of an optional column with values ``train``/``val``/``test``. When
            the table has it, it decides; otherwise rows are split at random.
        strata: ``(n,)`` keys to stratify the random split on (e.g. label × site).
        fractions: train/val/test fractions of the random split.
        seed: seed of the random split.
        path: the table's file, for error messages.

    Returns:
        ``{"train", "val", "test"}`` → sorted int index arrays (a split may be empty only when
        the split column leaves it empty, which is an error for train).
    """
    if split_column is not None and split_column in table:
        vals = np.array(table[split_column])
        bad = sorted(set(vals.tolist()) - set(SPLIT_NAMES))
        if bad:
            raise ValueError(
                f"column {split_column!r} of {path} must hold {list(SPLIT_NAMES)}, got {bad}"
            )
        out = {s: np.flatnonzero(vals == s) for s in SPLIT_NAMES}
    else:
        if len(fractions) != 3:
            raise ValueError(f"expected three split fractions (train, val, test), got {fractions}")
        rng = np.random.default_rng(seed)
        parts = (
            stratified_split(strata, fractions, rng)
            if strata.size
            else split_indices(len(strata), fractions, rng)
        )
        out = dict(zip(SPLIT_NAMES, parts, strict=True))
    if out["train"].size == 0:
        raise ValueError(f"no training rows in {path} (check the split column or fractions)")
    return out
