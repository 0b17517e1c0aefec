"""`metanorm dcor` errors a new user meets: each is one line naming the file or the flag, exit status 2."""

import numpy as np
import pytest

from metanorm.cli import main


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    feats, meta = tmp_path / "f.npy", tmp_path / "m.npy"
    np.save(feats, rng.normal(size=(12, 3)))
    np.save(meta, rng.normal(size=(12, 1)))
    return feats, meta


def test_dcor_fake_npy_names_the_file(tmp_path, pair, capsys):
    fake = tmp_path / "fake.npy"
    fake.write_text("this is not an array\n")
    assert main(["dcor", str(fake), str(pair[1])]) == 2
    err = _error(capsys)
    assert str(fake) in err and "expected a NumPy .npy array file" in err
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_bytes(b"\x00\x01garbage")
    assert main(["dcor", str(pair[0]), str(bad_pt)]) == 2
    err = _error(capsys)
    assert str(bad_pt) in err and "torch.save" in err


def test_dcor_header_only_csv(tmp_path, pair, capsys):
    header = tmp_path / "header.csv"
    header.write_text("age,sex\n")
    assert main(["dcor", str(pair[0]), str(header)]) == 2
    err = _error(capsys)
    # was: "expected the same number of columns on every row, got set()"
    assert str(header) in err and "below the header line, got none" in err and "set()" not in err


@pytest.mark.parametrize("which", [0, 1])
def test_dcor_nan_names_the_file_it_is_in(tmp_path, pair, capsys, which):
    bad = tmp_path / "nan.csv"
    bad.write_text("1.0\n2.0\nnan\n" + "1.5\n" * 9)
    files = [str(pair[0]), str(pair[1])]
    files[which] = str(bad)
    assert main(["dcor", *files]) == 2
    err = _error(capsys)
    # was: "expected y to be finite" for METADATA (the Python argument's name)
    assert str(bad) in err and "1 NaN or infinite value(s)" in err
    assert "expected x" not in err and "expected y" not in err
