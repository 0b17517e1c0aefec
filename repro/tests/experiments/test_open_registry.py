"""The registry is open: entries from other modules, entry points and the command line.

This module registers an experiment when imported (as a user's package would); the sweep's
worker processes, which start as fresh interpreters, must find it too.
"""

import dataclasses
import json
from importlib.metadata import EntryPoint

import pytest

from metanorm.cli import main
from metanorm_repro.experiments import (
    RunConfig,
    Study,
    get_entry,
    get_experiment,
    register_experiment,
    registry,
    run_sweep,
)

USER = register_experiment(
    dataclasses.replace(
        get_experiment("synthetic"),
        name="user-tiny-synthetic",
        description="the synthetic experiment, registered by a module outside the harness",
    ),
    replace=True,
)


def _square_units(settings):
    return [{"i": i} for i in range(settings["n"])]


def _square(settings, unit, folder):
    return {"square": unit["i"] ** 2}


def _mean_of_squares(settings, records, folder):
    n = settings["n"]
    return {"n": n, "mean": sum(r["square"] for r in records) / n}


def _mean_report(result):
    return f"# Mean of squares\n\nn = {result['n']}: {result['mean']:.4f}\n"


#: A study as another package would export it (``module:attr``): one run unit per i.
PLUGIN = Study(
    name="user-mean-of-squares",
    description="the mean of i² for i < n",
    units=_square_units,
    run_unit=_square,
    summarize=_mean_of_squares,
    report=_mean_report,
    settings={"n": 10},
)


def test_a_user_experiment_reaches_the_sweep_workers(tmp_path):
    sources, entries = registry.worker_payload([USER.name])
    assert __name__ in sources and [e.name for e in entries] == [USER.name]
    base = RunConfig(experiment=USER.name, epochs=1, n_per_class=8, threads=1)
    results = run_sweep(
        base,
        tmp_path / "s",
        methods=["mdn-linear"],
        batch_sizes=[8, 4],
        progress=False,
        jobs=2,
    )
    got = [(r["final"]["batch_size"], r["final"]["method"]) for r in results]
    assert got == [(8, "mdn-linear"), (4, "mdn-linear")]  # one group per worker
    for r in results:
        final = json.loads(
            (tmp_path / "s" / r["out_dir"].split("/s/")[-1] / "final.json").read_text()
        )
        assert final["experiment"] == USER.name
        assert 0.0 <= final["test_balanced_accuracy"] <= 1.0


def test_an_entry_no_worker_can_rebuild_is_refused_before_the_sweep(monkeypatch):
    local = dataclasses.replace(USER, name="user-local", groups=lambda split: split.labels)
    monkeypatch.setitem(registry._ENTRIES, local.name, local)
    monkeypatch.setitem(registry._ORIGINS, local.name, "__main__")
    with pytest.raises(ValueError, match=r"cannot reach worker processes.*run with one job"):
        registry.worker_payload([local.name])


def test_experiment_module_flag_registers_a_study(tmp_path, capsys):
    out = tmp_path / "m"
    argv = ["reproduce", PLUGIN.name, "--experiment-module", f"{__name__}:PLUGIN"]
    assert main([*argv, "--out", str(out), "--option", "n=4"]) == 0
    assert (out / "report.md").read_text().startswith("# Mean of squares\n\nn = 4: 3.5000\n")
    assert json.loads((out / "results.json").read_text()) == {"n": 4, "mean": 3.5}
    assert "n = 4: 3.5000" in capsys.readouterr().out  # the report, printed
    record = json.loads((out / "runs" / "i3" / "record.json").read_text())
    assert record == {"unit": {"i": 3}, "record": {"square": 9}}
    assert main([*argv, "--out", str(tmp_path / "e"), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "takes no --epochs; it takes --jobs --resume and --option keys n" in err
    bad = ["reproduce", PLUGIN.name, "--experiment-module", "no_such_module_xyz"]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert (
        "--experiment-module no_such_module_xyz: cannot import" in err
        and len(err.splitlines()) == 1
    )


def test_entry_points_add_entries(monkeypatch):
    ep = EntryPoint(name="user", value=f"{__name__}:PLUGIN", group=registry.ENTRY_POINT_GROUP)
    broken = EntryPoint(name="broken", value="no_such_module_xyz", group=registry.ENTRY_POINT_GROUP)

    def entry_points(group):
        assert group == registry.ENTRY_POINT_GROUP
        return [ep, broken]

    monkeypatch.setattr(registry, "entry_points", entry_points)
    monkeypatch.setattr(registry, "_LOADED", False)
    monkeypatch.delitem(registry._ENTRIES, PLUGIN.name, raising=False)
    with pytest.warns(UserWarning, match=r"entry point .broken.*no_such_module_xyz"):
        assert get_entry(PLUGIN.name) is PLUGIN
    assert "synthetic" in registry.list_experiments()  # the built-in ones are still there


def test_bad_sources_are_named():
    with pytest.raises(ImportError, match="no_such_module_xyz"):
        registry.load_source("no_such_module_xyz")
    with pytest.raises(ValueError, match="has no attribute 'NOPE'"):
        registry.load_source(f"{__name__}:NOPE")
    with pytest.raises(TypeError, match="an Experiment, a Study or an iterable"):
        registry.load_source(f"{__name__}:_MEAN")
    with pytest.raises(ValueError, match="already registered"):
        registry.register_experiment(dataclasses.replace(USER))


_MEAN = 3.5


def test_a_user_study_reaches_the_unit_workers(tmp_path):
    out = tmp_path / "j"
    argv = ["reproduce", PLUGIN.name, "--experiment-module", f"{__name__}:PLUGIN"]
    assert main([*argv, "--out", str(out), "--option", "n=3", "--jobs", "2", "--quiet"]) == 0
    assert json.loads((out / "results.json").read_text()) == {"n": 3, "mean": 5 / 3}
    assert sorted(p.parent.name for p in (out / "runs").rglob("record.json")) == ["i0", "i1", "i2"]


def _legacy_run(settings, folder):
    return {"n": settings["n"], "mean": 1.0}


def test_a_study_given_as_one_run_function_still_runs_deprecated(tmp_path):
    with pytest.warns(DeprecationWarning, match="declare its run units"):
        legacy = Study(
            name="user-legacy",
            description="one function",
            run=_legacy_run,
            report=_mean_report,
            settings={"n": 2},
        )
    from metanorm_repro.experiments import run_study

    assert run_study(legacy, {"n": 2}, tmp_path / "l", progress=False)["mean"] == 1.0
    assert (tmp_path / "l" / "run.json").is_file() and not (tmp_path / "l" / "runs").exists()
    with pytest.raises(ValueError, match="neither --resume nor --jobs"):
        run_study(legacy, {"n": 2}, tmp_path / "m", jobs=2)
    with pytest.raises(ValueError, match="expected units, run_unit"):
        Study(name="x", description="", report=_mean_report, settings={}, units=_square_units)


def test_importing_an_experiment_module_registers_nothing():
    # the built-in entries are objects the loader registers on the first lookup, not an
    # import side effect of their modules
    import subprocess
    import sys

    code = (
        "from metanorm_repro.experiments import registry\n"
        "import metanorm_repro.experiments.synthetic as s, metanorm_repro.experiments.real\n"
        "import metanorm_repro.experiments.estimators, metanorm_repro.experiments.studies\n"
        "assert registry._ENTRIES == {}, sorted(registry._ENTRIES)\n"
        "assert registry.get_experiment('synthetic') is s.SYNTHETIC\n"
        "names = registry.list_entries()\n"
        "for want in ('synthetic', 'synthetic-compare', 'synthetic-batch', 'multisite-mri',\n"
        "             'continual', 'failures'):\n"
        "    assert want in names, names\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_study_declares_its_methods_and_refuses_others_by_name(capsys):
    from metanorm_repro.experiments import get_study

    for name in ("regression-synthetic", "regression-diabetes", "continual", "failures"):
        study = get_study(name)
        assert set(study.settings["methods"]) <= set(study.methods), name
    assert get_study("running-beta").methods is None
    continual = get_study("continual")
    # other spellings take the method's name; unknown methods are named with the accepted ones
    assert continual.resolve({"methods": ["baseline", "rmdn"]})["methods"] == ["none", "rmdn"]
    with pytest.raises(ValueError, match=r"\['groupdro'\] for 'continual'; expected among"):
        continual.resolve({"methods": ["none", "groupdro"]})
    with pytest.raises(ValueError, match="must not repeat"):
        continual.resolve({"methods": ["rmdn", "rmdn"]})
    # the same check on the command line, before anything runs
    argv = ["reproduce", "continual", "--methods", "none", "pmdn-all", "--out", "unused"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown method(s) ['pmdn-all'] for 'continual'" in err and "rmdn-conv" in err


def test_the_old_method_lists_are_deprecated_aliases_of_the_specs():
    from metanorm_repro.experiments import (
        estimators,
        failures,
        get_experiment,
        get_study,
        regression,
    )

    batch = get_experiment("synthetic-batch")
    expected = {
        (estimators, "METHODS"): batch.methods,
        (estimators, "BATCH_METHODS"): tuple(batch.defaults["methods"]),
        (estimators, "CONTINUAL_METHODS"): tuple(get_study("continual").settings["methods"]),
        (regression, "METHODS"): tuple(get_study("regression-synthetic").settings["methods"]),
        (failures, "METHODS"): tuple(get_study("failures").settings["methods"]),
    }
    for (module, name), value in expected.items():
        with pytest.warns(DeprecationWarning, match=name):
            assert getattr(module, name) == value
    with pytest.warns(DeprecationWarning):
        assert estimators.CONTINUAL_METHODS == ("none", "mdn-linear", "rmdn")  # the old value
    with pytest.raises(AttributeError):
        regression.NOT_A_LIST  # noqa: B018


_VANISHING = """
from metanorm_repro.experiments import Study

def _units(settings):
    return [{"i": i} for i in range(4)]

def _run(settings, unit, folder):
    return {"i": unit["i"]}

def _summary(settings, records, folder):
    return {"n": len(records)}

def _report(result):
    return "# r"

STUDY = Study(name="vanishing-study", description="d", units=_units, run_unit=_run,
              summarize=_summary, report=_report, settings={})
"""

_VANISH_AND_RUN = """
import pathlib, shutil, sys
folder = pathlib.Path(sys.argv[1])
sys.path.insert(0, str(folder))
from metanorm_repro.experiments import registry
registry.load_source("vanishing_study:STUDY")
shutil.rmtree(folder / "__pycache__", ignore_errors=True)
(folder / "vanishing_study.py").unlink()  # the workers cannot import it any more
from metanorm.cli import main
sys.exit(main(["reproduce", "vanishing-study", "--jobs", "2", "--out", str(folder / "out")]))
"""


def test_workers_that_cannot_start_fail_the_run_instead_of_hanging(tmp_path):
    # multiprocessing.Pool replaces a worker whose initializer fails and waits forever for
    # the lost task; the sweep sees the replacement and stops with an error
    import subprocess
    import sys

    (tmp_path / "vanishing_study.py").write_text(_VANISHING)
    proc = subprocess.run(
        [sys.executable, "-c", _VANISH_AND_RUN, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode != 0
    assert "a worker process exited before finishing its work" in proc.stderr, proc.stderr[-3000:]
