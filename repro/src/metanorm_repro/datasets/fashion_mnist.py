"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) from its IDX files.

Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) from its IDX files, as the Debian package
``dataset-fashion-mnist`` installs them (``apt-get install -y dataset-fashion-mnist``, in
``/usr/share/datasets/fashion-mnist``); nothing downloads. A missing file raises a
:class:`~metanorm.datasets.DataNotFoundError` naming the install command.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np

from metanorm.datasets._files import DataNotFoundError, as_path

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "load_fashion_mnist", "read_idx"]

#: Where the Debian package ``dataset-fashion-mnist`` installs its files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
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
