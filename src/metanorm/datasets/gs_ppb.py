"""GS-PPB faces from user-supplied files.

The Gender Shades Pilot Parliaments Benchmark (GS-PPB): face images and a metadata CSV
 (gender = label, Fitzpatrick skin type 1–6 = metadata). Images are read with
Pillow (``pip install pillow``; it comes with matplotlib).

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

import numpy as np
import torch

from metanorm.datasets._base import DataSplit
from metanorm.datasets._files import FRACTIONS, DataNotFoundError, build_splits, data_root
from metanorm.datasets._tables import assign_splits, encode_labels, read_table

__all__ = ["load_gs_ppb", "read_image"]


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
    fractions: Sequence[float] = FRACTIONS,
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
    base = data_root(root, "GS-PPB")
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
    return build_splits(index, images, labels, metadata)


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
