"""Loaders for the paper's own data sets, from files the user supplies (nothing downloads).

Each loader reads one documented on-disk layout (see the README section "Data for the paper's
experiments") and returns ``{"train", "val", "test"}`` → :class:`~metanorm.datasets.DataSplit`.
A missing file raises :class:`~metanorm.datasets._files.DataNotFoundError` naming the file and
where it was looked for; a missing column raises ``ValueError`` naming the column, the file and
the columns it has.

- :func:`load_gs_ppb`: face images + a metadata CSV (gender = label, Fitzpatrick skin type 1–6 =
  metadata). Images are read with Pillow (``pip install pillow``; it comes with matplotlib).
- :func:`load_hvu`: clip-level features (one ``.npy`` per clip, or one matrix) + an annotation CSV
  of action tags (labels) and scene tags (multi-hot metadata).
- :func:`load_multisite_mri`: NIfTI volumes + a participants CSV (diagnosis = label; site, age,
  sex = metadata), read with nibabel (``pip install nibabel``, extra ``metanorm[mri]``).

Splits: when the CSV has a ``split`` column (values ``train``/``val``/``test``) it decides;
otherwise the rows are split at random (seeded), stratified on label × the main metadata column.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from metanorm.datasets._base import DataSplit
from metanorm.datasets._files import DataNotFoundError, as_path
from metanorm.datasets._tables import assign_splits, encode_labels, read_table

__all__ = ["load_gs_ppb", "load_hvu", "load_multisite_mri", "read_image", "read_nifti"]

_FRACTIONS = (0.6, 0.2, 0.2)


def _root(root: str | os.PathLike[str], what: str) -> Path:
    p = as_path(root, "root")
    if not p.is_dir():
        raise DataNotFoundError(f"{what} folder not found: looked for {p}")
    return p


def _build_splits(
    index: dict[str, np.ndarray],
    images: torch.Tensor,
    labels: np.ndarray,
    metadata: dict[str, np.ndarray],
) -> dict[str, DataSplit]:
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


# --------------------------------------------------------------------------------------------
# GS-PPB
# --------------------------------------------------------------------------------------------


def read_image(path: Path, size: int, grayscale: bool = False) -> np.ndarray:
    """Reads one image with Pillow, resized to ``size×size``; float32 ``(C, size, size)`` in [0, 1].

    Raises:
        ImportError: Pillow is not installed (the message names the install command).
    """
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - Pillow comes with matplotlib
        raise ImportError(
            "reading face images needs Pillow: `pip install pillow` (it comes with "
            "`pip install metanorm[plots]`)"
        ) from err
    with Image.open(path) as raw:
        im = raw.convert("L" if grayscale else "RGB").resize(
            (size, size), Image.Resampling.BILINEAR
        )
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_gs_ppb(
    root: str | os.PathLike[str],
    *,
    metadata_file: str = "metadata.csv",
    image_dir: str = "images",
    filename_column: str = "filename",
    label_column: str = "gender",
    skin_column: str = "skin_type",
    split_column: str = "split",
    image_size: int = 64,
    grayscale: bool = False,
    fractions: Sequence[float] = _FRACTIONS,
    seed: int = 0,
) -> dict[str, DataSplit]:
    """Loads the Gender Shades Pilot Parliaments Benchmark (GS-PPB) from a folder.

    Layout (names configurable)::

        ROOT/
          metadata.csv        filename,gender,skin_type[,split]
          images/<filename>   any format Pillow reads (jpg, png, ...)

    ``gender`` is the label (its values sorted: label k = k-th value, e.g. female = 0, male = 1),
    ``skin_type`` the Fitzpatrick type, an integer 1–6 (the experiment treats it as categorical or
    ordinal). Images are resized to ``image_size`` (no crop), RGB unless ``grayscale``.

    Args:
        root: the folder.
        metadata_file: the metadata CSV's name inside ``root``.
        image_dir: the image folder's name inside ``root``.
        filename_column: column of image file names (relative to ``image_dir``).
        label_column: column of the label (gender).
        skin_column: column of the Fitzpatrick skin type.
        split_column: optional column (``train``/``val``/``test``); when absent, a seeded random
            split stratified on gender × skin type with ``fractions``.
        image_size: side of the resized images. Default: 64.
        grayscale: read one channel instead of RGB. Default: ``False``.
        fractions: train/val/test fractions of the random split. Default: ``(0.6, 0.2, 0.2)``.
        seed: seed of the random split.

    Returns:
        ``{"train", "val", "test"}`` → :class:`DataSplit`: images float32 ``(n, 3 or 1, S, S)``
        in [0, 1], labels int64, metadata ``{"skin_type": int64 1..6, <label_column>: the raw
        label strings, "filename": str}``.

    Raises:
        DataNotFoundError: the folder, the metadata file or an image is missing.
        ValueError: a column is missing, or a skin type is not an integer in 1..6.
    """
    base = _root(root, "GS-PPB")
    meta_path = base / metadata_file
    table = read_table(meta_path, [filename_column, label_column, skin_column], "GS-PPB metadata")
    image_root = base / image_dir
    if not image_root.is_dir():
        raise DataNotFoundError(f"GS-PPB image folder not found: looked for {image_root}")
    names = table[filename_column]
    paths = [image_root / n for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataNotFoundError(
            f"{len(missing)} GS-PPB image(s) listed in {meta_path} not found under {image_root}, "
            f"e.g. {missing[:3]}"
        )
    labels, _ = encode_labels(table[label_column], label_column, meta_path)
    skin = _parse_skin_types(table[skin_column], skin_column, meta_path)
    images = torch.as_tensor(np.stack([read_image(p, image_size, grayscale) for p in paths]))
    strata = np.array([f"{a}|{b}" for a, b in zip(labels, skin, strict=True)])
    index = assign_splits(table, split_column, strata, fractions, seed, meta_path)
    metadata = {
        "skin_type": skin,
        label_column: np.array(table[label_column], dtype=object),
        "filename": np.array(names, dtype=object),
    }
    return _build_splits(index, images, labels, metadata)


def _parse_skin_types(values: list[str], column: str, path: Path) -> np.ndarray:
    out = np.zeros(len(values), dtype=np.int64)
    for i, v in enumerate(values):
        try:
            f = float(v)
        except ValueError:
            f = float("nan")
        if not (f.is_integer() and 1 <= f <= 6):
            raise ValueError(
                f"column {column!r} of {path}, data row {i + 1}: expected a Fitzpatrick skin type "
                f"(integer 1-6), got {v!r}"
            )
        out[i] = int(f)
    return out


# --------------------------------------------------------------------------------------------
# HVU
# --------------------------------------------------------------------------------------------


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
    fractions: Sequence[float] = _FRACTIONS,
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
    base = _root(root, "HVU")
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
    return _build_splits(index, x, labels, metadata)


# --------------------------------------------------------------------------------------------
# Multi-site MRI
# --------------------------------------------------------------------------------------------


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
    fractions: Sequence[float] = _FRACTIONS,
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
    base = _root(root, "multi-site MRI")
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
    return _build_splits(index, torch.as_tensor(vols), labels, metadata)
