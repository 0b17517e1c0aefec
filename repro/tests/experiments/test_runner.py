"""One run: run_experiment's folder, overwrite rules and bad configurations."""

import pytest

from metanorm.cli import main
from metanorm_repro.experiments import (
    RunConfig,
    get_experiment,
    run_experiment,
)


def test_run_experiment_overwrite(tmp_path):
    cfg = RunConfig(method="mdn-linear", batch_size=7, epochs=1, n_per_class=10, threads=1)
    out = tmp_path / "run"
    res = run_experiment(cfg, out, progress=False)
    assert len(res["history"]) == 1 and (out / "final.json").is_file()
    with pytest.raises(FileExistsError, match="overwrite"):
        run_experiment(cfg, out, progress=False)
    res2 = run_experiment(cfg.replace(epochs=2), out, overwrite=True, progress=False)
    assert len(res2["history"]) == 2
    # same seed, same configuration: the same numbers
    res3 = run_experiment(cfg, tmp_path / "again", progress=False)
    assert res3["final"]["test_balanced_accuracy"] == res["final"]["test_balanced_accuracy"]
    assert res3["history"][0]["train_loss"] == pytest.approx(res["history"][0]["train_loss"])


def test_bad_configurations(tmp_path, capsys):
    with pytest.raises(ValueError, match="batch_size"):
        RunConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        RunConfig(lr=-1.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        RunConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="unknown experiment"):
        get_experiment("nope")
    with pytest.raises(
        ValueError, match=r"unknown method\(s\) \[.dropout.\] for .synthetic.; expected among"
    ):
        run_experiment(RunConfig(method="dropout"), tmp_path / "x")
    assert main(["reproduce", "synthetic", "--out", str(tmp_path / "y"), "--methods", "foo"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    assert main(["reproduce", "nope", "--out", str(tmp_path / "z")]) == 2
