"""The 'where MDN fails' study runner, end to end on tiny settings."""

import json

import numpy as np
import pytest
import torch
from standin_layouts import needs_fashion, needs_two_sites

from metanorm_repro.experiments import get_study
from metanorm_repro.experiments.failures import STUDIES, main, run_failures, summarize
from metanorm_repro.experiments.real import METHODS as REAL_METHODS


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models train faster on one thread (and do not contend with other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _final(method, seed, reversed_bacc, dcor2):
    return {
        "final": {
            "method": method,
            "seed": seed,
            "test_balanced_accuracy": 0.5,
            "test_dcor2": {"0": dcor2, "1": None},
            "eval_splits": {
                "test": {"balanced_accuracy": 0.5},
                "test_reversed": {"balanced_accuracy": reversed_bacc},
            },
            "epoch_time_s_median": 1.0,
        }
    }


def test_summarize_pairs_seeds_with_the_baseline():
    results = [
        _final("batchnorm", 0, 0.60, 0.50),
        _final("batchnorm", 1, 0.70, 0.40),
        _final("mdn", 0, 0.65, 0.20),
        _final("mdn", 1, 0.68, 0.10),
        _final("concat", 0, 0.50, 0.60),
        _final("concat", 1, 0.60, 0.30),
    ]
    rows = {r["method"]: r for r in summarize(results)}
    mdn = rows["mdn"]
    np.testing.assert_allclose(mdn["d_reversed_bacc"], np.mean([0.05, -0.02]))
    np.testing.assert_allclose(mdn["d_reversed_bacc_std"], np.std([0.05, -0.02], ddof=1))
    np.testing.assert_allclose(mdn["d_dcor2"], -0.3)  # a None class is skipped
    assert mdn["reversed_bacc_seeds_better"] == 1 and mdn["dcor2_seeds_better"] == 2
    assert mdn["both"] and not rows["concat"]["both"] and not rows["batchnorm"]["both"]
    assert mdn["both_seeds"] == 1 and not mdn["both_every_seed"]  # seed 1: bAcc fell
    assert rows["concat"]["dcor2_seeds_better"] == 1  # 0.6 > 0.5, 0.3 < 0.4


def test_every_study_method_is_a_real_experiment_method():
    methods = get_study("failures").settings["methods"]
    assert set(methods) <= set(REAL_METHODS) and methods[0] == "batchnorm"
    assert STUDIES["contrast"].options == {"shade_mode": "contrast"}
    with pytest.raises(ValueError, match="studies"):
        run_failures("unused", studies=["nope"])


@needs_fashion
@needs_two_sites
def test_tiny_study_end_to_end(tmp_path, capsys):
    out = tmp_path / "failures"
    code = main(
        [
            "--out",
            str(out),
            "--methods",
            "dann",
            "--seeds",
            "2",
            "--epochs",
            "1",
            "--n-per-class",
            "20",
            "--n-eval-per-class",
            "20",
            "--jobs",
            "1",
            "--quiet",
        ]
    )
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert "Where MDN fails" in report and "DANN" in report and "load average" in report
    assert report in capsys.readouterr().out
    for name in STUDIES:
        rows = {r["method"]: r for r in result["studies"][name]["rows"]}
        assert list(rows) == ["batchnorm", "dann"]  # the baseline added
        # the oracle: the run folders' own final.json files
        for method, row in rows.items():
            finals = [
                json.loads(
                    (
                        out
                        / name
                        / "runs"
                        / f"bs{STUDIES[name].batch_size}"
                        / method
                        / f"seed{s}"
                        / "final.json"
                    ).read_text()
                )
                for s in (0, 1)
            ]
            rev = [f["eval_splits"]["test_reversed"]["balanced_accuracy"] for f in finals]
            np.testing.assert_allclose(row["reversed_bacc"], np.mean(rev))
            base = [
                json.loads(
                    (
                        out
                        / name
                        / "runs"
                        / f"bs{STUDIES[name].batch_size}"
                        / "batchnorm"
                        / f"seed{s}"
                        / "final.json"
                    ).read_text()
                )
                for s in (0, 1)
            ]
            dc = [np.mean([v for v in f["test_dcor2"].values() if v is not None]) for f in finals]
            dc0 = [np.mean([v for v in f["test_dcor2"].values() if v is not None]) for f in base]
            np.testing.assert_allclose(row["d_dcor2"], np.mean(np.subtract(dc, dc0)), atol=1e-12)
        assert (out / name / "report.md").exists()  # each study's own sweep report
    (out / "report.md").write_text("stale")
    assert main(["--out", str(out), "--report-only"]) == 0  # rebuilt from the run folders
    assert (out / "report.md").read_text() == report
    with pytest.raises(FileExistsError):
        run_failures(out, studies=["two-site"], methods=["mdn"], seeds=1, epochs=1)
