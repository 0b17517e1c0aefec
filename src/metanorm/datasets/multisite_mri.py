"""Multi-site structural MRI from user-supplied files.

NIfTI volumes and a participants CSV
(diagnosis = label; site, age, sex = metadata), read with nibabel (``pip install nibabel``,
extra ``metanorm[mri]``).

Splits: when the CSV has a ``split`` column (values ``train``/``val``/``test``) it decides;
otherwise the rows are split at random (seeded), stratified on label × the main metadata column.
Nothing downloads: a missing file raises :class:`~metanorm.datasets.DataNotFoundError` naming the
file and where it was looked for; a missing column raises ``ValueError`` naming the column, the
file and the columns it has.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from metanorm.datasets._base import DataSplit
from metanorm.datasets._files import FRACTIONS, DataNotFoundError, build_splits, data_root
from metanorm.datasets._tables import assign_splits, encode_labels, read_table

__all__ = ["load_multisite_mri", "read_nifti"]


def read_nifti(path: Path) -> np.ndarray:
    """Reads a NIfTI volume (``.nii``/``.nii.gz``) with nibabel; float32 ``(D, H, W)``.

    4-D volumes with one frame are squeezed; more frames are an error.

    Raises:
        ImportError: nibabel is not installed (the message names the install command).
    """
    try:
        import nibabel
    except ImportError as err:
        raise ImportError(
            "reading NIfTI volumes needs nibabel: `pip install nibabel` "
            "(or `pip install metanorm[mri]`)"
        ) from err
    img: Any = nibabel.load(str(path))
    vol = np.asarray(img.get_fdata(dtype=np.float32))
    if vol.ndim == 4 and vol.shape[3] == 1:
        vol = vol[..., 0]
    if vol.ndim != 3:
        raise ValueError(f"expected a 3-D volume in {path}, got shape {vol.shape}")
    return vol


def _resize_volume(vol: np.ndarray, shape: tuple[int, int, int], normalize: bool) -> np.ndarray:
    t = torch.as_tensor(vol, dtype=torch.float32)[None, None]
    if tuple(vol.shape) != shape:
        t = F.interpolate(t, size=shape, mode="trilinear", align_corners=False)
    if normalize:
        sd = t.std()
        t = (t - t.mean()) / (sd if float(sd) > 0 else 1.0)
    return t[0].numpy()


def load_multisite_mri(
    root: str | os.PathLike[str],
    *,
    participants_file: str = "participants.csv",
    volume_dir: str = "volumes",
    subject_column: str = "subject",
    label_column: str = "diagnosis",
    site_column: str = "site",
    age_column: str = "age",
    sex_column: str = "sex",
    path_column: str = "path",
    split_column: str = "split",
    volume_shape: Sequence[int] = (32, 32, 32),
    normalize: bool = True,
    fractions: Sequence[float] = FRACTIONS,
    seed: int = 0,
) -> dict[str, DataSplit]:
    """Loads multi-site structural MRI: NIfTI volumes and a participants table.

    Layout (names configurable)::

        ROOT/
          participants.csv             subject,diagnosis,site,age,sex[,path][,split]
          volumes/<subject>.nii.gz     one 3-D T1 volume per subject (.nii.gz or .nii)

    An optional ``path`` column gives each volume's file relative to ``ROOT`` instead. The label
    is ``diagnosis`` (values sorted: label k = k-th value); ``site`` (scanner) and ``sex`` are
    categorical metadata, ``age`` continuous. Volumes are resampled (trilinear) to
    ``volume_shape`` and, with ``normalize``, z-scored per volume.

    Args:
        root: the folder.
        participants_file: the participants CSV's name inside ``root``.
        volume_dir: the folder of ``<subject>.nii[.gz]`` volumes.
        subject_column: column of subject ids.
        label_column: column of the label (diagnosis).
        site_column: column of the site / scanner.
        age_column: column of the age (a number).
        sex_column: column of the sex.
        path_column: optional column of volume paths relative to ``root``.
        split_column: optional column (``train``/``val``/``test``); when absent, a seeded random
            split stratified on diagnosis × site.
        volume_shape: ``(D, H, W)`` after resampling. Default: ``(32, 32, 32)``.
        normalize: z-score each volume. Default: ``True``.
        fractions: train/val/test fractions of the random split.
        seed: seed of the random split.

    Returns:
        ``{"train", "val", "test"}`` → :class:`DataSplit`: volumes float32 ``(n, 1, D, H, W)``,
        labels int64, metadata ``{"site": str, "age": float64, "sex": str, <label_column>: raw
        label strings, "subject": str}``.

    Raises:
        DataNotFoundError: the folder, the participants file or a volume is missing.
        ValueError: a column is missing, an age is not a number, a volume is not 3-D.
        ImportError: nibabel is not installed.
    """
    shape = tuple(int(s) for s in volume_shape)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ValueError(f"expected volume_shape (D, H, W) of positive ints, got {volume_shape}")
    base = data_root(root, "multi-site MRI")
    table_path = base / participants_file
    required = [subject_column, label_column, site_column, age_column, sex_column]
    table = read_table(table_path, required, "MRI participants")
    subjects = table[subject_column]
    paths: list[Path | None] = []
    if path_column in table:
        paths = [base / p for p in table[path_column]]
        where = f"the {path_column!r} column's paths under {base}"
    else:
        vdir = base / volume_dir
        where = f"{vdir}/<subject>.nii.gz or .nii"
        for s in subjects:
            cands = [vdir / f"{s}.nii.gz", vdir / f"{s}.nii"]
            paths.append(next((c for c in cands if c.is_file()), None))
    missing = [s for s, p in zip(subjects, paths, strict=True) if p is None or not p.is_file()]
    if missing:
        raise DataNotFoundError(
            f"{len(missing)} MRI volume(s) of subjects listed in {table_path} not found: looked "
            f"in {where}; missing e.g. {missing[:3]}"
        )
    ages = np.zeros(len(subjects))
    for i, a in enumerate(table[age_column]):
        try:
            ages[i] = float(a)
        except ValueError:
            ages[i] = np.nan
        if not np.isfinite(ages[i]):
            raise ValueError(
                f"column {age_column!r} of {table_path}, subject {subjects[i]!r}: expected a "
                f"number, got {a!r}"
            )
    for col in (site_column, sex_column):
        blanks = [subjects[i] for i, v in enumerate(table[col]) if v == ""]
        if blanks:
            raise ValueError(f"column {col!r} of {table_path} is empty for subjects {blanks[:5]}")
    labels, _ = encode_labels(table[label_column], label_column, table_path)
    vols = np.stack([_resize_volume(read_nifti(p), shape, normalize) for p in paths if p])
    site = np.array(table[site_column], dtype=object)
    strata = np.array([f"{a}|{b}" for a, b in zip(labels, site, strict=True)])
    index = assign_splits(table, split_column, strata, fractions, seed, table_path)
    metadata = {
        "site": site,
        "age": ages,
        "sex": np.array(table[sex_column], dtype=object),
        label_column: np.array(table[label_column], dtype=object),
        "subject": np.array(subjects, dtype=object),
    }
    return build_splits(index, torch.as_tensor(vols), labels, metadata)
