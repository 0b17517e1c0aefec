"""HVU clip features from user-supplied files.

Holistic Video Understanding (HVU): clip-level features (one ``.npy`` per clip, or one
matrix) and an annotation CSV of action tags (labels) and scene tags (multi-hot
metadata).

Splits: when the CSV has a ``split`` column (values ``train``/``val``/``test``) it decides;
otherwise the rows are split at random (seeded), stratified on label × the main metadata column.
Nothing downloads: a missing file raises :class:`~metanorm.datasets.DataNotFoundError` naming the
file and where it was looked for; a missing column raises ``ValueError`` naming the column, the
file and the columns it has.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from metanorm.datasets._base import DataSplit
from metanorm.datasets._files import FRACTIONS, DataNotFoundError, build_splits, data_root
from metanorm.datasets._tables import assign_splits, encode_labels, read_table

__all__ = ["load_hvu"]


def _split_tags(cell: str, sep: str) -> list[str]:
    return [t.strip() for t in cell.split(sep) if t.strip()]


def _read_hvu_features(
    base: Path, clips: list[str], feature_dir: str, matrix_file: str, index_file: str
) -> tuple[list[np.ndarray | None], str]:
    """Per-clip features (None when the clip has none) and a description of where they came from."""
    matrix_path, index_path = base / matrix_file, base / index_file
    if matrix_path.is_file():
        if not index_path.is_file():
            raise DataNotFoundError(
                f"HVU feature matrix {matrix_path} found but not its row index: looked for "
                f"{index_path} (one clip id per line, in the matrix's row order)"
            )
        mat = np.load(matrix_path, mmap_mode="r")
        ids = [ln.strip() for ln in index_path.read_text().splitlines() if ln.strip()]
        if mat.ndim != 2 or mat.shape[0] != len(ids):
            raise ValueError(
                f"HVU feature matrix {matrix_path} has shape {mat.shape}; expected "
                f"({len(ids)}, D), one row per line of {index_path}"
            )
        row = {c: i for i, c in enumerate(ids)}
        feats: list[np.ndarray | None] = [
            np.asarray(mat[row[c]], dtype=np.float32) if c in row else None for c in clips
        ]
        return feats, f"{matrix_path} (rows named in {index_path})"
    fdir = base / feature_dir
    if not fdir.is_dir():
        raise DataNotFoundError(
            f"HVU features not found: looked for the folder {fdir} (one <clip_id>.npy per clip) "
            f"and for the matrix {matrix_path} with its index {index_path}"
        )
    out: list[np.ndarray | None] = []
    for c in clips:
        p = fdir / f"{c}.npy"
        if not p.is_file():
            out.append(None)
            continue
        a = np.load(p)
        if a.ndim == 2:  # (segments, D): average over time, as clip-level features usually are
            a = a.mean(axis=0)
        if a.ndim != 1:
            raise ValueError(f"HVU feature file {p}: expected shape (D,) or (T, D), got {a.shape}")
        out.append(a.astype(np.float32))
    return out, f"{fdir}/<clip_id>.npy"


def load_hvu(
    root: str | os.PathLike[str],
    *,
    annotations_file: str = "annotations.csv",
    feature_dir: str = "features",
    matrix_file: str = "features.npy",
    index_file: str = "features_clips.txt",
    clip_column: str = "clip_id",
    action_column: str = "action_tags",
    scene_column: str = "scene_tags",
    split_column: str = "split",
    separator: str = "|",
    num_actions: int | None = None,
    min_scene_count: int = 5,
    on_missing: str = "raise",
    fractions: Sequence[float] = FRACTIONS,
    seed: int = 0,
) -> dict[str, DataSplit]:
    """Loads clip-level features of the Holistic Video Understanding (HVU) data set.

    Layout (names configurable)::

        ROOT/
          annotations.csv          clip_id,action_tags,scene_tags[,split]
                                   tags separated by "|", e.g. "skiing|snow sports"
          features/<clip_id>.npy   one clip's features, shape (D,) or (T, D) (averaged over T)
        or, instead of features/:
          features.npy             (n_clips, D) matrix
          features_clips.txt       its row order, one clip id per line

    Labels are the clips' **first** action tag (the primary action; HVU's action tags are
    multi-label, single-label training uses the first). With ``num_actions`` only the most
    frequent primary actions are kept (clips of other actions are dropped). Scene tags become
    multi-hot metadata columns ``"scene=<tag>"`` (0/1 float), one per scene that occurs in at least
    ``min_scene_count`` training clips and not in all of them (a constant column would make the
    design singular).

    Args:
        root: the folder.
        annotations_file: the annotation CSV's name inside ``root``.
        feature_dir: the folder of per-clip ``.npy`` files.
        matrix_file: the single feature matrix (used instead of ``feature_dir`` when present).
        index_file: the matrix's row index (one clip id per line).
        clip_column: column of clip ids.
        action_column: column of action tags (labels).
        scene_column: column of scene tags (metadata).
        split_column: optional column (``train``/``val``/``test``); when absent, a seeded random
            split stratified on the label.
        separator: tag separator inside a cell. Default: ``"|"``.
        num_actions: keep the k most frequent primary actions. Default: all.
        min_scene_count: fewest training clips a scene needs to become a column. Default: 5.
        on_missing: a clip without features: ``"raise"`` (default) or ``"drop"`` it.
        fractions: train/val/test fractions of the random split.
        seed: seed of the random split.

    Returns:
        ``{"train", "val", "test"}`` → :class:`DataSplit`: features float32 ``(n, D)``, labels
        int64 (sorted action names), metadata ``{"scene=<tag>": float64 0/1 ..., "action":
        the primary action, "clip_id": str}``.

    Raises:
        DataNotFoundError: the folder, the annotation file, or the features are missing.
        ValueError: a column is missing, a clip has no action tag, feature widths differ.
    """
    if on_missing not in ("raise", "drop"):
        raise ValueError(f"expected on_missing 'raise' or 'drop', got {on_missing!r}")
    base = data_root(root, "HVU")
    ann_path = base / annotations_file
    table = read_table(ann_path, [clip_column, action_column, scene_column], "HVU annotation")
    clips = table[clip_column]
    actions = [_split_tags(c, separator) for c in table[action_column]]
    no_action = [clips[i] for i, a in enumerate(actions) if not a]
    if no_action:
        raise ValueError(
            f"{len(no_action)} clip(s) in {ann_path} have no tag in column {action_column!r}, "
            f"e.g. {no_action[:3]}"
        )
    primary = [a[0] for a in actions]
    keep = np.ones(len(clips), dtype=bool)
    if num_actions is not None:
        if isinstance(num_actions, bool) or not isinstance(num_actions, int) or num_actions < 2:
            raise ValueError(f"expected num_actions to be an int >= 2 or None, got {num_actions!r}")
        top = {a for a, _ in Counter(primary).most_common(num_actions)}
        keep &= np.array([p in top for p in primary])
    feats, where = _read_hvu_features(base, clips, feature_dir, matrix_file, index_file)
    absent = [clips[i] for i in range(len(clips)) if keep[i] and feats[i] is None]
    if absent and on_missing == "raise":
        raise DataNotFoundError(
            f"{len(absent)} clip(s) of {ann_path} have no features in {where}, e.g. {absent[:3]} "
            f"(pass on_missing='drop' to skip them)"
        )
    keep &= np.array([f is not None for f in feats])
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        raise ValueError(f"no clip of {ann_path} is left to load (features or actions filtered)")
    widths = {feats[i].shape[0] for i in rows}  # type: ignore[union-attr]
    if len(widths) != 1:
        raise ValueError(f"HVU features in {where} have different widths {sorted(widths)}")
    x = torch.as_tensor(np.stack([feats[i] for i in rows]))  # type: ignore[misc]
    sub = {k: [v[i] for i in rows] for k, v in table.items()}
    labels, _ = encode_labels([primary[i] for i in rows], action_column, ann_path)
    index = assign_splits(sub, split_column, labels.astype(str), fractions, seed, ann_path)
    scenes = [set(_split_tags(table[scene_column][i], separator)) for i in rows]
    train_counts = Counter(t for i in index["train"] for t in scenes[i])
    n_train = index["train"].size
    vocab = sorted(t for t, c in train_counts.items() if min_scene_count <= c < n_train)
    metadata: dict[str, np.ndarray] = {
        f"scene={t}": np.array([float(t in s) for s in scenes]) for t in vocab
    }
    metadata["action"] = np.array([primary[i] for i in rows], dtype=object)
    metadata["clip_id"] = np.array(sub[clip_column], dtype=object)
    return build_splits(index, x, labels, metadata)
