"""``metanorm reproduce STUDY``: each study's folder holds what the study function returns.

The oracle of each study is its function called directly at the same settings (same seeds, one
thread): the numbers of ``results.json`` must equal it exactly (the times aside), and
``report.md`` must be the study's report of ``results.json``.
"""

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch
from standin_layouts import needs_two_sites

from metanorm.cli import main
from metanorm_repro.experiments import get_study, list_studies, registry
from metanorm_repro.experiments.estimators import continual_report, run_continual
from metanorm_repro.experiments.failures import failures_report, rebuild_report, run_failures
from metanorm_repro.experiments.regression import (
    regression_report,
    run_diabetes,
    run_synthetic_regression,
)

_TIMES = {
    "epoch_time_s",
    "epoch_time_s_std",
    "seconds",
    "time_s",
    "train_time_s",
    "wall_time_s",
    "wall_seconds",
}


def _numbers(x):
    """``x`` without the wall-clock entries (and the machine-load ones), for equality."""
    if isinstance(x, dict):
        return {
            k: _numbers(v)
            for k, v in x.items()
            if k not in _TIMES and k not in {"load_start", "load_end", "cpu_time_s", "command"}
        }
    if isinstance(x, list | tuple):
        return [_numbers(v) for v in x]
    return x


def _json(x):
    return json.loads(json.dumps(x, allow_nan=True))


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _reproduce(name, out, *flags):
    return main(["reproduce", name, "--out", str(out), "--threads", "1", *flags])


def test_the_studies_are_registered_beside_the_experiments():
    assert {"regression-synthetic", "regression-diabetes", "failures", "continual"} <= set(
        list_studies()
    )
    assert set(list_studies()) <= set(registry.list_entries())
    assert not set(list_studies()) & set(registry.list_experiments())
    with pytest.raises(ValueError, match="is a study"):
        registry.get_experiment("failures")


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("studies") / "regression"
    before = torch.get_num_threads()
    flags = ["--seeds", "1", "--seed", "3", "--epochs", "2", "--batch-sizes", "50"]
    flags += ["--methods", "none", "mdn", "--option", "n_train=100", "--option", "n_test=100"]
    try:
        assert _reproduce("regression-synthetic", out, *flags, "--quiet") == 0
    finally:
        torch.set_num_threads(before)
    return out


def test_regression_synthetic_equals_the_function(synthetic_run, one_thread):
    out = synthetic_run
    got = json.loads((out / "results.json").read_text())
    want = run_synthetic_regression(
        n_train=100,
        n_test=100,
        methods=["none", "mdn"],
        epochs=2,
        batch_sizes=[50],
        seeds=1,
        seed=3,
    )
    assert _numbers(got["rows"]) == _numbers(_json(want["rows"]))
    assert _numbers(got["runs"]) == _numbers(_json(want["runs"]))
    assert got["bounds"] == _json(want["bounds"])
    assert (out / "report.md").read_text().startswith(regression_report(got))
    assert (out / "r2_vs_dcor2.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    files = report[report.index("## Files") :].splitlines()  # the experiments' Files section
    units = len(got["runs"])
    assert files[2] == f"- `runs/`: one folder per run unit ({units}), each with `record.json`"
    assert (
        files[3]
        == (
            "- `results.json`: the results, unrounded; `run.json`: the command, the settings and the "
            "wall time"
        )
        and "- `r2_vs_dcor2.png`" in files
    )
    run = json.loads((out / "run.json").read_text())
    assert run["name"] == "regression-synthetic" and run["settings"]["n_train"] == 100
    assert run["settings"]["seed"] == 3 and run["settings"]["batch_sizes"] == [50]


def test_regression_diabetes_equals_the_function(tmp_path, one_thread):
    flags = ["--epochs", "2", "--methods", "none", "mdn", "--option", "folds=2"]
    assert _reproduce("regression-diabetes", tmp_path / "d", *flags) == 0
    got = json.loads((tmp_path / "d" / "results.json").read_text())
    want = run_diabetes(folds=2, epochs=2, methods=["none", "mdn"])
    assert _numbers(got["rows"]) == _numbers(_json(want["rows"]))
    assert (tmp_path / "d" / "report.md").read_text().startswith(regression_report(got))


def test_continual_equals_the_function(tmp_path, one_thread):
    flags = ["--epochs", "1", "--batch-sizes", "4", "--n-per-class", "4"]
    flags += ["--n-eval-per-class", "4", "--methods", "none", "rmdn", "--quiet"]
    flags += ["--option", "associations=[1, -1]", "--option", "rmdn_reset=covariance"]
    assert _reproduce("continual", tmp_path / "c", *flags) == 0
    got = json.loads((tmp_path / "c" / "results.json").read_text())
    want = run_continual(
        None,
        methods=["none", "rmdn"],
        associations=[1, -1],
        n_per_class=4,
        n_eval_per_class=4,
        epochs_per_stage=1,
        batch_size=4,
        rmdn_reset="covariance",
        progress=False,
    )
    assert _numbers(got) == _numbers(_json(want))
    assert got["settings"]["epochs_per_stage"] == 1 and got["settings"]["batch_size"] == 4
    assert (tmp_path / "c" / "report.md").read_text().startswith(continual_report(got))


def test_continual_resumes_with_the_same_numbers(tmp_path, monkeypatch, one_thread):
    flags = ["--epochs", "1", "--batch-sizes", "4", "--n-per-class", "4", "--seed", "2"]
    flags += ["--n-eval-per-class", "4", "--methods", "none", "rmdn", "pmdn"]
    flags += ["--option", "associations=[1, -1]"]
    assert _reproduce("continual", tmp_path / "whole", *flags, "--quiet") == 0
    out = tmp_path / "r"
    before, after = _interrupt_then_resume(monkeypatch, "continual", out, flags, 2)
    assert before == [{"method": "none"}, {"method": "rmdn"}] and after == [{"method": "pmdn"}]
    want = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert _numbers(json.loads((out / "results.json").read_text())) == _numbers(want)
    assert list(want["methods"]) == ["none", "rmdn", "pmdn"]
    assert (out / "runs" / "rmdn" / "record.json").is_file()


@needs_two_sites
def test_failures_equals_the_function(tmp_path, one_thread):
    flags = ["--seeds", "1", "--epochs", "1", "--methods", "mdn", "--jobs", "1", "--quiet"]
    assert _reproduce("failures", tmp_path / "f", *flags, "--option", 'studies=["two-site"]') == 0
    got = json.loads((tmp_path / "f" / "results.json").read_text())
    want = run_failures(
        tmp_path / "direct",
        studies=["two-site"],
        methods=["mdn"],
        seeds=1,
        epochs=1,
        progress=False,
    )
    assert _numbers(got["studies"]) == _numbers(_json(want["studies"]))
    assert got["command"].startswith("metanorm reproduce failures")
    assert (tmp_path / "f" / "report.md").read_text().startswith(failures_report(got))
    standin = tmp_path / "f" / "runs" / "standin-two-site"
    assert (standin / "report.md").is_file()  # the stand-in's sweep report
    assert (standin / "bs32" / "mdn" / "seed0" / "manifest.json").is_file()  # one run unit
    rebuilt = rebuild_report(tmp_path / "f")  # from the run folders of the new layout
    assert _numbers(rebuilt["studies"]) == _numbers(got["studies"])


def test_running_beta_resumes_with_the_same_numbers(tmp_path, monkeypatch, one_thread):
    from metanorm_repro.experiments import running_beta

    # small sets (fast): 150 training images in batches of 64, the test set of 100 per class
    splits = running_beta.make_synthetic_splits
    monkeypatch.setattr(
        running_beta, "make_synthetic_splits", lambda n, seed: splits(100, seed=seed)
    )
    monkeypatch.setitem(running_beta.SETTINGS, "200", (64, 150))
    flags = ["--epochs", "1", "--seeds", "2", "--option", "eval_epochs=[1]"]
    flags += ["--option", 'settings=["200"]', "--option", 'models=["mdn-linear"]']
    assert _reproduce("running-beta", tmp_path / "whole", *flags, "--quiet") == 0
    out = tmp_path / "r"
    before, after = _interrupt_then_resume(monkeypatch, "running-beta", out, flags, 1)
    unit = {"model": "mdn-linear", "setting": "200"}
    assert before == [{**unit, "seed": 0}] and after == [{**unit, "seed": 1}]
    got = json.loads((out / "results.json").read_text())
    want = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert _numbers(got) == _numbers(want)
    assert {r["seed"] for r in got["rows"]} == {0, 1} and len(got["rows"]) == 2 * 6
    assert (out / "runs" / "model-mdn-linear" / "setting-200" / "seed1" / "record.json").is_file()


@needs_two_sites
def test_failures_resumes_with_the_same_numbers(tmp_path, monkeypatch, one_thread):
    flags = ["--seeds", "1", "--epochs", "1", "--methods", "mdn", "--jobs", "1"]
    flags += ["--option", 'studies=["two-site", "contrast"]', "--n-per-class", "20"]
    flags += ["--n-eval-per-class", "20"]
    assert _reproduce("failures", tmp_path / "whole", *flags, "--quiet") == 0
    out = tmp_path / "r"
    before, after = _interrupt_then_resume(monkeypatch, "failures", out, flags, 1)
    # a run unit: stand-in × seed × method; the methods of a stand-in and seed train together
    two_site = [
        {"standin": "two-site", "bs": 32, "method": m, "seed": 0} for m in ("batchnorm", "mdn")
    ]
    contrast = [{**u, "standin": "contrast", "bs": 128} for u in two_site]
    assert before == [two_site] and after == [contrast]
    got = json.loads((out / "results.json").read_text())
    want = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert _numbers(got["studies"]) == _numbers(want["studies"])
    assert list(got["studies"]) == ["two-site", "contrast"]


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--lr-schedule", "cosine"], r"study 'continual' takes no --lr-schedule; it takes "),
        (["--resume"], r"nothing to resume"),
        (["--no-plots"], r"takes no --no-plots"),
        (["--option", "nope=1"], r"unknown --option key\(s\) \['nope'\] for 'continual'"),
        (["--batch-sizes", "4", "8"], r"takes one value for --batch-sizes"),
        (["--paper"], r"has no --paper settings"),
    ],
)
def test_a_flag_the_study_does_not_take_is_one_clear_line(tmp_path, capsys, flags, match):
    assert _reproduce("continual", tmp_path / "x", *flags) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("metanorm reproduce: error:")
    assert re.search(match, err), err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_or_failed_run_leaves_the_old_folder_intact(
    synthetic_run, tmp_path, monkeypatch, capsys, stop
):
    out = tmp_path / "regression"
    shutil.copytree(synthetic_run, out)
    before = _snapshot(out)
    study = get_study("regression-synthetic")
    reached = []

    def run_unit(settings, unit, folder):
        reached.append(unit)
        raise stop("stopped")

    monkeypatch.setitem(
        registry._ENTRIES, study.name, dataclasses.replace(study, run_unit=run_unit)
    )
    args = ["reproduce", study.name, "--out", str(out), "--overwrite", "--quiet"]
    args += ["--seeds", "1", "--epochs", "1", "--methods", "none", "--batch-sizes", "50"]
    if stop is KeyboardInterrupt:
        assert main(args) == 130
        assert "interrupted (SIGINT)" in capsys.readouterr().err
    else:
        with pytest.raises(RuntimeError, match="stopped"):
            main(args)
    assert reached == [{"seed": 0, "batch_size": 50, "method": "none"}]
    assert _snapshot(out) == before
    partial = out.with_name("regression.partial")
    # an interruption keeps the (empty) run for --resume; a failure with no unit done leaves none
    assert partial.exists() == (stop is KeyboardInterrupt)
    assert not out.with_name("regression.old").exists()


def _interrupt_then_resume(monkeypatch, name, out, flags, stop_after):
    """Runs study ``name`` into ``out``, stopped by Ctrl-C after ``stop_after`` units, then
    resumed; returns the units run before and after the stop."""
    study = get_study(name)
    calls: list = []
    limit = [stop_after]

    def run_unit(settings, unit, folder):
        if len(calls) == limit[0]:
            raise KeyboardInterrupt
        calls.append(unit)
        return study.run_unit(settings, unit, folder)

    def run_group(settings, units, folders):  # a study whose units run in groups: per group
        if len(calls) == limit[0]:
            raise KeyboardInterrupt
        calls.append(units)
        return study.run_group(settings, units, folders)

    patched = {"run_group": run_group} if study.run_group else {"run_unit": run_unit}
    monkeypatch.setitem(registry._ENTRIES, name, dataclasses.replace(study, **patched))
    assert _reproduce(name, out, *flags, "--quiet") == 130
    assert not out.exists()
    partial = out.with_name(out.name + ".partial")
    done = sum(map(len, calls)) if study.run_group else stop_after
    marker = "manifest.json" if study.read_record else "record.json"
    assert len(list(partial.rglob(marker))) == done
    first = list(calls)
    calls.clear()
    limit[0] = -1
    assert _reproduce(name, out, *flags, "--quiet") == 2  # neither --resume nor --overwrite
    assert _reproduce(name, out, *flags, "--quiet", "--resume") == 0
    assert not partial.exists()
    return first, list(calls)


def test_regression_synthetic_resumes_with_the_same_numbers(synthetic_run, tmp_path, monkeypatch):
    flags = ["--seeds", "1", "--seed", "3", "--epochs", "2", "--batch-sizes", "50"]
    flags += ["--methods", "none", "mdn", "--option", "n_train=100", "--option", "n_test=100"]
    out = tmp_path / "r"
    before, after = _interrupt_then_resume(monkeypatch, "regression-synthetic", out, flags, 1)
    assert before == [{"seed": 3, "batch_size": 50, "method": "none"}]
    assert after == [{"seed": 3, "batch_size": 50, "method": "mdn"}]  # "none" not run again
    want = json.loads((synthetic_run / "results.json").read_text())
    assert _numbers(json.loads((out / "results.json").read_text())) == _numbers(want)
    assert (out / "runs" / "seed3" / "batch_size50" / "mdn" / "record.json").is_file()
    assert json.loads((out / "sweep.json").read_text())["complete"] is True


def test_regression_synthetic_with_two_jobs_gives_the_same_numbers(synthetic_run, tmp_path):
    flags = ["--seeds", "1", "--seed", "3", "--epochs", "2", "--batch-sizes", "50", "--jobs", "2"]
    flags += ["--methods", "none", "mdn", "--option", "n_train=100", "--option", "n_test=100"]
    before = torch.get_num_threads()
    try:
        assert _reproduce("regression-synthetic", tmp_path / "j", *flags, "--quiet") == 0
    finally:
        torch.set_num_threads(before)
    got = json.loads((tmp_path / "j" / "results.json").read_text())
    want = json.loads((synthetic_run / "results.json").read_text())
    assert _numbers(got) == _numbers(want)
    assert len(list((tmp_path / "j" / "runs").rglob("record.json"))) == 2


def test_regression_diabetes_resumes_with_the_same_numbers(tmp_path, monkeypatch, one_thread):
    flags = ["--epochs", "2", "--methods", "none", "mdn", "--option", "folds=2"]
    assert _reproduce("regression-diabetes", tmp_path / "whole", *flags, "--quiet") == 0
    out = tmp_path / "r"
    before, after = _interrupt_then_resume(monkeypatch, "regression-diabetes", out, flags, 3)
    assert (
        len(before) == 3
        and len(after) == 2 * 4 - 3
        and not set(map(str, before)) & set(map(str, after))
    )
    want = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert _numbers(json.loads((out / "results.json").read_text())) == _numbers(want)
    assert (out / "runs" / "fold1" / "model-mlp" / "mdn" / "record.json").is_file()


def test_an_existing_folder_needs_overwrite(synthetic_run, capsys):
    assert main(["reproduce", "regression-synthetic", "--out", str(synthetic_run)]) == 2
    assert "already holds results; pass --overwrite" in capsys.readouterr().err


def test_reproduce_help_lists_the_studies(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    text = capsys.readouterr().out
    for name in ("regression-synthetic", "regression-diabetes", "failures", "continual"):
        assert f"\n  {name}\n" in text
    assert np.all([k in text for k in ("epochs_per_stage", "--experiment-module")])


_SLOW_STUDY = """
import os
import time
from pathlib import Path

from metanorm_repro.experiments import Study


def units(settings):
    return [{"i": i} for i in range(settings["n"])]


def run_unit(settings, unit, folder):
    with open(settings["log"], "a") as f:
        f.write(f"{unit['i']}\\n")
    if os.environ.get("SLOW_HANG") == str(unit["i"]):
        time.sleep(120)
    return {"square": unit["i"] ** 2}


def summarize(settings, records, folder):
    return {"total": sum(r["square"] for r in records)}


SLOW = Study(
    name="user-slow",
    description="squares, one unit each",
    units=units,
    run_unit=run_unit,
    summarize=summarize,
    report=lambda result: f"total {result['total']}\\n",
    settings={"n": 4, "log": ""},
)
"""


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_killed_or_interrupted_process_resumes_without_rerunning_finished_units(
    tmp_path, monkeypatch, how
):
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "slow_study.py").write_text(_SLOW_STUDY)
    monkeypatch.syspath_prepend(str(tmp_path))
    # the source loaded here must not outlive the test (later sweeps hand their sources to
    # their workers, which could not import this one)
    for name in ("_ENTRIES", "_ORIGINS", "_EXTRA_SOURCES"):
        monkeypatch.setattr(registry, name, type(getattr(registry, name))(getattr(registry, name)))
    out, log = tmp_path / "out", tmp_path / "log.txt"
    args = ["reproduce", "user-slow", "--experiment-module", "slow_study:SLOW", "--out", str(out)]
    args += ["--option", f"log={log}", "--quiet"]
    env = dict(os.environ, SLOW_HANG="2")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *sys.path])
    code = "import sys; from metanorm.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and "2" in log.read_text().split()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL if how == "SIGKILL" else signal.SIGINT)
        rc = proc.wait(60)
    finally:
        proc.kill()
    err = proc.stderr.read().decode()
    if how == "SIGINT":
        assert rc == 130 and "interrupted (SIGINT): 2 of 4 run units complete; " in err, err
        assert err.rstrip().endswith(" --quiet --resume") and "report of those" not in err
    partial = out.with_name("out.partial")
    assert not out.exists()
    assert sorted(p.parent.name for p in partial.rglob("record.json")) == ["i0", "i1"]
    assert main(args) == 2  # an interrupted run is neither resumed nor replaced unasked
    assert main([*args, "--resume"]) == 0
    assert log.read_text().split() == ["0", "1", "2", "2", "3"]  # 0 and 1 not run again
    assert json.loads((out / "results.json").read_text()) == {"total": 0 + 1 + 4 + 9}
    assert not partial.exists()
