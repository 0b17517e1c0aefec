import numpy as np
import pytest
from standin_layouts import needs_sklearn

from metanorm.datasets import DataNotFoundError
from metanorm_repro.datasets import optdigits
from metanorm_repro.datasets.optdigits import load_optdigits


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
    monkeypatch.setattr(optdigits, "find_package_file", lambda *a: None)
    with pytest.raises(DataNotFoundError, match=r"sklearn/datasets/data/digits\.csv\.gz"):
        load_optdigits()


def _write(path, matrix):
    np.savetxt(path, matrix, fmt="%d", delimiter=",")
    return path


@needs_sklearn
def test_optdigits_matches_sklearn():
    from sklearn.datasets import load_digits

    x, y = load_optdigits()
    ref = load_digits()
    np.testing.assert_array_equal(x, ref.images.astype(np.float32))
    np.testing.assert_array_equal(y, ref.target)


def test_optdigits_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(optdigits, "find_package_file", lambda *a: None)
    with pytest.raises(DataNotFoundError, match="pip install scikit-learn"):
        load_optdigits()
    with pytest.raises(DataNotFoundError, match=r"nope\.csv"):
        load_optdigits(tmp_path / "nope.csv")
