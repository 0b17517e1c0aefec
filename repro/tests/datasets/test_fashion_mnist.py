import gzip
from pathlib import Path

import numpy as np
import pytest
from standin_layouts import needs_fashion

from metanorm.datasets import DataNotFoundError
from metanorm_repro.datasets.fashion_mnist import load_fashion_mnist, read_idx


def write_idx(path: Path, arr: np.ndarray, compress: bool) -> None:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    data = header + arr.tobytes()
    if compress:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    write_idx(tmp_path / "x", images, compress)
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), images)
    ints = np.arange(6, dtype=">i4").reshape(2, 3)
    write_idx(tmp_path / "i", ints, compress)
    out = read_idx(tmp_path / "i")
    np.testing.assert_array_equal(out, np.arange(6).reshape(2, 3))
    assert out.dtype.byteorder in ("=", "|", "<")


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="IDX"):
        read_idx(tmp_path / "bad")
    arr = np.zeros((3, 2), dtype=np.uint8)
    header = bytes([0, 0, 0x08, 2]) + np.array((3, 3), dtype=">u4").tobytes()
    (tmp_path / "short").write_bytes(header + arr.tobytes())
    with pytest.raises(ValueError, match="bytes"):
        read_idx(tmp_path / "short")
    with pytest.raises(DataNotFoundError):
        read_idx(tmp_path / "nothing")


def test_fashion_mnist_from_explicit_folder(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=12).astype(np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images, True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, False)
    x, y = load_fashion_mnist("test", tmp_path)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    assert y.dtype == np.int64


def test_fashion_mnist_missing_names_install_and_folder(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_fashion_mnist("train", tmp_path)
    msg = str(err.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg
    assert str(tmp_path) in msg and "train-images-idx3-ubyte" in msg
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", tmp_path)


@needs_fashion
def test_fashion_mnist_installed():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 1000))
