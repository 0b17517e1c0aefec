"""``metanorm dcor`` on .npy / .pt / .csv files, text and JSON, and its errors (exit 2)."""

import json

import numpy as np
import pytest
import torch

from metanorm.cli import main
from metanorm.metrics import distance_correlation_sqr, grouped_distance_correlation_sqr


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4))
    cf = x[:, 0] + 0.5 * rng.normal(size=60)
    cls = np.array(["a", "b"])[rng.integers(0, 2, size=60)]
    np.save(tmp_path / "feat.npy", x)
    torch.save(torch.from_numpy(cf), tmp_path / "meta.pt")
    np.savetxt(tmp_path / "meta.csv", cf[:, None], delimiter=",", header="cf", comments="")
    np.savetxt(tmp_path / "feat.csv", x, delimiter=",")
    (tmp_path / "cls.csv").write_text("label\n" + "\n".join(cls) + "\n")
    return tmp_path, x, cf, cls


def test_text_output(files, capsys):
    d, x, cf, _ = files
    assert main(["dcor", str(d / "feat.npy"), str(d / "meta.pt")]) == 0
    out = capsys.readouterr().out
    assert "biased" in out and f"{distance_correlation_sqr(x, cf):.6f}" in out


def test_json_csv_and_unbiased(files, capsys):
    d, x, cf, _ = files
    assert main(["dcor", str(d / "feat.csv"), str(d / "meta.csv"), "--unbiased", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["estimator"] == "unbiased" and res["n"] == 60
    assert res["dcor2"] == pytest.approx(distance_correlation_sqr(x, cf, unbiased=True), rel=1e-12)


def test_groups_and_pvalues(files, capsys):
    d, x, cf, cls = files
    argv = ["dcor", str(d / "feat.npy"), str(d / "meta.pt"), "--groups", str(d / "cls.csv")]
    assert main([*argv, "--json", "--permutations", "19", "--seed", "3"]) == 0
    res = json.loads(capsys.readouterr().out)
    expected = grouped_distance_correlation_sqr(x, cf, cls)
    assert res["groups"] == pytest.approx(expected, rel=1e-12)
    assert set(res["pvalues"]) == {"a", "b"} and all(0 < p <= 1 for p in res["pvalues"].values())
    assert res["permutations"] == 19
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "group a" in out and "group b" in out


def test_missing_file(files, capsys):
    d, *_ = files
    assert main(["dcor", str(d / "feat.npy"), str(d / "nope.npy")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "nope.npy" in err


def test_row_count_mismatch(files, capsys):
    d, x, *_ = files
    np.save(d / "short.npy", x[:50])
    assert main(["dcor", str(d / "short.npy"), str(d / "meta.pt")]) == 2
    assert "same number of rows, got 50" in capsys.readouterr().err
    (d / "few.csv").write_text("a\nb\n")
    assert (
        main(["dcor", str(d / "feat.npy"), str(d / "meta.pt"), "--groups", str(d / "few.csv")]) == 2
    )
    assert "LABELS to have 60 rows" in capsys.readouterr().err


def test_bad_files(files, capsys):
    d, *_ = files
    (d / "feat.txt").write_text("1\n2\n")
    assert main(["dcor", str(d / "feat.txt"), str(d / "meta.pt")]) == 2
    assert "expected a .npy" in capsys.readouterr().err
    assert main(["dcor", str(d / "cls.csv"), str(d / "meta.pt")]) == 2
    assert "numbers" in capsys.readouterr().err
    torch.save({"not": "a tensor"}, d / "dict.pt")
    assert main(["dcor", str(d / "dict.pt"), str(d / "meta.pt")]) == 2
    assert "saved tensor" in capsys.readouterr().err
    (d / "ragged.csv").write_text("1,2\n3\n")
    assert main(["dcor", str(d / "ragged.csv"), str(d / "meta.pt")]) == 2
    assert "same number of columns" in capsys.readouterr().err
    assert main(["dcor", str(d / "feat.npy"), str(d / "meta.pt"), "--permutations", "-1"]) == 2


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["dcor", "--help"])
    assert exc.value.code == 0
    assert "--unbiased" in capsys.readouterr().out


def test_text_labels_without_header(files, capsys):
    d, x, cf, cls = files
    (d / "nohead.csv").write_text("\n".join(cls) + "\n")
    argv = ["dcor", str(d / "feat.npy"), str(d / "meta.pt"), "--json"]
    assert main([*argv, "--groups", str(d / "nohead.csv")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["groups"] == pytest.approx(grouped_distance_correlation_sqr(x, cf, cls), rel=1e-12)


def test_prints_the_estimator_and_codes_text_metadata(files, tmp_path, capsys):
    d, x, _, cls = files
    (tmp_path / "site.csv").write_text("site\n" + "\n".join(cls) + "\n")
    assert main(["dcor", str(d / "feat.npy"), str(tmp_path / "site.csv"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    onehot = (cls[:, None] == np.array(["a", "b"])).astype(float)
    want = distance_correlation_sqr(x, onehot, unbiased=False)
    assert res["unbiased"] is False and res["metadata"] == "one-hot"
    assert res["dcor2"] == pytest.approx(want, rel=1e-12)
    assert main(["dcor", str(d / "feat.npy"), str(d / "meta.pt")]) == 0
    assert "unbiased=False" in capsys.readouterr().out
    assert main(["dcor", str(d / "feat.npy"), str(d / "meta.pt"), "--unbiased"]) == 0
    assert "unbiased=True" in capsys.readouterr().out


def test_categorical_codes_and_small_groups(files, tmp_path, capsys):
    d, x, _, _ = files
    codes = np.arange(60) % 3
    np.save(tmp_path / "codes.npy", codes)
    argv = ["dcor", str(d / "feat.npy"), str(tmp_path / "codes.npy"), "--json", "--unbiased"]
    assert main([*argv, "--categorical"]) == 0
    res = json.loads(capsys.readouterr().out)
    want = distance_correlation_sqr(x, np.eye(3)[codes], unbiased=True)
    assert res["metadata"] == "one-hot" and res["dcor2"] == pytest.approx(want, rel=1e-12)
    groups = np.array(["big"] * 57 + ["tiny"] * 3)
    np.save(tmp_path / "groups.npy", groups)
    with pytest.warns(UserWarning, match="tiny"):
        code = main([*argv, "--categorical", "--groups", str(tmp_path / "groups.npy")])
    assert code == 0
    res = json.loads(capsys.readouterr().out.replace("NaN", "null"))
    assert res["groups"]["tiny"] is None and res["groups"]["big"] is not None


def test_projection_method(files, capsys):
    d, x, cf, _ = files
    argv = ["dcor", str(d / "feat.npy"), str(d / "meta.pt"), "--unbiased", "--json"]
    assert main([*argv, "--method", "projection", "--projections", "8", "--seed", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    want = distance_correlation_sqr(
        x, cf, unbiased=True, method="projection", num_projections=8, seed=1
    )
    assert res["method"] == "projection" and res["dcor2"] == pytest.approx(float(want))
    assert res["standard_error"] == pytest.approx(want.standard_error)
    assert main([*argv, "--method", "projection", "--permutations", "9"]) == 2
