"""The UCI optical digits (8×8) bundled with scikit-learn.

The UCI optical digits (8×8) bundled with scikit-learn (``pip install scikit-learn``, in
``<sklearn>/datasets/data/digits.csv.gz``, the file ``sklearn.datasets.load_digits`` reads);
scikit-learn is located, never imported. A missing file raises a
:class:`~metanorm.datasets.DataNotFoundError` naming the install command.
"""

from __future__ import annotations

import os

import numpy as np

from metanorm.datasets._files import find_package_file, read_packaged_csv

__all__ = ["load_optdigits"]

OPTDIGITS_INSTALL = "pip install scikit-learn"
#: The packaged file: (package, path inside it).
PACKAGED_FILE = ("sklearn", "datasets/data/digits.csv.gz")


def load_optdigits(path: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loads the UCI optical digits (1797 images, 8×8, values 0–16) bundled with scikit-learn.

    Args:
        path: the CSV (``.csv`` or ``.csv.gz``; 65 columns, 64 pixels then the label, no header).
            Default: ``sklearn/datasets/data/digits.csv.gz`` in the installed scikit-learn,
            located without importing it (the file ``sklearn.datasets.load_digits`` reads).

    Returns:
        ``(images, labels)``: float32 ``(1797, 8, 8)`` in [0, 16] and int64 ``(1797,)``.

    Raises:
        DataNotFoundError: the file is missing (the message names the install command).
    """
    m = read_packaged_csv(
        path,
        "optdigits",
        find_package_file(*PACKAGED_FILE) if path is None else None,
        "/".join(PACKAGED_FILE),
        f"scikit-learn is not installed in this Python; install it with `{OPTDIGITS_INSTALL}` "
        "(or `pip install metanorm[sklearn]`)",
        65,
        "64 pixels + label",
    )
    return m[:, :64].astype(np.float32).reshape(-1, 8, 8), m[:, 64].astype(np.int64)
