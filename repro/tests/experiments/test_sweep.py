"""The one sweep: an experiment's runs and a study's grouped units, in one and two processes."""

import json
import warnings

import pytest

from metanorm_repro.experiments import (
    RunConfig,
    Study,
    StudyInterrupted,
    SweepInterrupted,
    experiment_study,
    get_experiment,
    run_study,
    run_sweep,
    run_units,
)
from metanorm_repro.experiments.sweep import SWEEP_DEFAULTS


def test_sweep_in_two_processes(tmp_path):
    base = RunConfig(epochs=1, n_per_class=10, threads=1)
    results = run_sweep(
        base,
        tmp_path / "s",
        methods=["none", "mdn-linear"],
        batch_sizes=[8, 6],
        progress=False,
        jobs=2,
    )
    assert [(r["final"]["batch_size"], r["final"]["method"]) for r in results] == [
        (8, "none"),
        (8, "mdn-linear"),
        (6, "none"),
        (6, "mdn-linear"),
    ]
    for r in results:
        assert (
            tmp_path
            / "s"
            / "runs"
            / f"bs{r['final']['batch_size']}"
            / r["final"]["method"]
            / "seed0"
            / "final.json"
        ).is_file()
    with pytest.raises(ValueError, match="jobs"):
        run_sweep(base, tmp_path / "t", jobs=0)


# --------------------------------------------------------------------------------------------
# The one sweep (run_units) with grouped units that record themselves, as an experiment's do
# --------------------------------------------------------------------------------------------

# tasks run so far in this process (the grouped study below appends to it)
TASKS: list[list[int]] = []


def _units(settings):
    return [{"g": i // 2, "i": i} for i in range(settings["n"])]


def _group(unit):
    return unit["g"]


def _run_group(settings, units, folders):
    TASKS.append([u["i"] for u in units])
    if settings.get("stop_at") == units[0]["g"]:
        raise KeyboardInterrupt
    for u, folder in zip(units, folders, strict=True):
        (folder / "value.json").write_text(json.dumps({"i": u["i"], "square": u["i"] ** 2}))
    return [{} for _ in units]  # read back from the folders (read_record)


def _read(settings, unit, folder):
    try:
        data = json.loads((folder / "value.json").read_text())
    except FileNotFoundError:
        return None
    if data["i"] != unit["i"]:
        raise ValueError(f"{folder / 'value.json'}: changed")
    return data


def _summary(settings, records, folder):
    return {"n": len(records), "total": sum(r["square"] for r in records)}


def _report(result):
    return f"# grouped\n\ntotal {result['total']}\n"


GROUPED = Study(
    name="grouped",
    description="units in pairs, each writing its own file",
    report=_report,
    settings={"n": 6, "stop_at": None},
    units=_units,
    group=_group,
    run_group=_run_group,
    read_record=_read,
    summarize=_summary,
    partial=True,
)


def test_grouped_units_run_as_tasks_and_record_themselves(tmp_path):
    TASKS.clear()
    out = tmp_path / "g"
    result = run_study(GROUPED, {}, out, progress=False)
    assert result == {"n": 6, "total": sum(i * i for i in range(6))}
    assert TASKS == [[0, 1], [2, 3], [4, 5]]  # one task per group, units in order
    assert (out / "runs" / "g1" / "i3" / "value.json").is_file()
    assert not list(out.rglob("record.json"))  # the units' own files are their records
    report = (out / "report.md").read_text()
    assert report.startswith("# grouped") and "each with the files it wrote" in report
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["complete"] and len(sweep["units"]) == 6


def test_an_interrupted_grouped_run_reports_its_finished_units_and_resumes(tmp_path):
    out = tmp_path / "g"
    TASKS.clear()
    with pytest.raises(StudyInterrupted) as info:
        run_study(GROUPED, {"stop_at": 1}, out, progress=False)
    assert info.value.done == 2 and info.value.total == 6
    partial = out.with_name("g.partial")
    assert json.loads((partial / "results.json").read_text())["n"] == 2  # the partial report
    assert info.value.report == partial / "report.md" and not out.exists()
    # a file of a finished unit changed: that unit runs again on resume, with a warning
    (partial / "runs" / "g0" / "i1" / "value.json").write_text(json.dumps({"i": 99}))
    TASKS.clear()
    # the interrupted run's settings (stop_at) may not change on resume
    with pytest.raises(ValueError, match="stop_at 1"):
        run_study(GROUPED, {"stop_at": None}, out, resume=True, progress=False)
    with (
        pytest.warns(UserWarning, match=r"value\.json: changed: the unit runs again"),
        pytest.raises(StudyInterrupted),  # stops again at group 1: nothing else ran
    ):
        run_study(GROUPED, {"stop_at": 1}, out, resume=True, progress=False)
    assert TASKS == [[1], [2, 3]]  # only the changed unit of group 0, then group 1 again


def test_a_changed_file_is_refused_before_the_report(tmp_path, monkeypatch):
    def change_then_read(settings, unit, folder):
        if unit["i"] == 5 and (folder / "value.json").is_file():
            (folder / "value.json").write_text(json.dumps({"i": -1}))
        return _read(settings, unit, folder)

    study = Study(**{**GROUPED.__dict__, "read_record": change_then_read})
    with pytest.raises(ValueError, match=r"value\.json: changed"):
        run_units(study, {"n": 6}, tmp_path / "c", progress=False, finish=lambda f, r: None)
    assert not (tmp_path / "c").exists()


def test_grouped_units_in_two_processes_equal_one(tmp_path):
    one = run_study(GROUPED, {}, tmp_path / "one", progress=False)
    two = run_study(GROUPED, {}, tmp_path / "two", progress=False, jobs=2)
    assert one == two
    assert sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.json")) == (
        sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.json"))
    )


def test_a_study_runs_either_units_or_groups():
    with pytest.raises(ValueError, match="either run_unit, or group with run_group"):
        Study(**{**GROUPED.__dict__, "group": None})
    with pytest.raises(ValueError, match="either run_unit, or group with run_group"):
        Study(**{**GROUPED.__dict__, "run_unit": lambda s, u, f: {}})


def test_an_experiment_as_a_study_resolves_its_settings_in_one_place():
    study = experiment_study(get_experiment("synthetic"))
    s = study.settings
    assert s["epochs"] == 5 and s["lr_schedule"] == "cosine" and s["batch_sizes"] == [200, 128]
    assert s["seeds"] == [0] and s["options"] == {"n_eval_per_class": 1000} and not s["paper"]
    assert s["methods"] == ["none", "batchnorm", "groupnorm", "mdn-linear", "mdn-conv"]
    assert s["momentum"] == 0.1 and s["device"] == "cpu"  # the RunConfig fields' defaults
    paper = study.resolve({}, paper=True)
    # the paper's settings replace the quick ones; what they do not name is SWEEP_DEFAULTS'
    assert paper["epochs"] == 200 and paper["lr"] == 1e-4 and paper["batch_sizes"] == [200]
    assert paper["options"] == {} and paper["paper"] and not paper["refit_running_beta"]
    assert SWEEP_DEFAULTS["n_per_class"] == 1000 == paper["n_per_class"]
    units = study.units(s)
    assert units[:2] == [
        {"bs": 200, "method": "none", "seed": 0},
        {"bs": 200, "method": "batchnorm", "seed": 0},
    ]
    assert len(units) == 10 and {study.group(u) for u in units} == {(0, 200), (0, 128)}
    assert study.resolve({"methods": ["baseline", "bn"]})["methods"] == ["none", "batchnorm"]
    with pytest.raises(ValueError, match="unknown method"):
        study.resolve({"methods": ["nope"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        experiment_study(get_experiment("synthetic-compare"))  # no --paper: no paper settings
    assert experiment_study(get_experiment("synthetic-compare")).paper == {}
    assert SweepInterrupted.__mro__[1] is KeyboardInterrupt


def test_a_sweep_interrupted_by_an_earlier_version_is_refused_by_name(tmp_path):
    out = tmp_path / "old"
    partial = out.with_name("old.partial")
    partial.mkdir()
    old = {"experiment": "grouped", "config": {}, "methods": [], "complete": False}
    (partial / "sweep.json").write_text(json.dumps(old))  # the format before run units
    with pytest.raises(ValueError, match=r"written by an earlier version .* pass --overwrite"):
        run_study(GROUPED, {}, out, resume=True, progress=False)
    assert run_study(GROUPED, {}, out, overwrite=True, progress=False)["n"] == 6


def test_plots_and_threads_may_change_on_resume(tmp_path):
    study = Study(**{**GROUPED.__dict__, "settings": {"n": 6, "stop_at": None, "plots": True}})

    def stop_at_group_1(settings, units, folders):
        if units[0]["g"] == 1:
            raise KeyboardInterrupt
        return _run_group(settings, units, folders)

    out = tmp_path / "p"
    with pytest.raises(StudyInterrupted):
        run_study(
            Study(**{**study.__dict__, "run_group": stop_at_group_1}), {}, out, progress=False
        )
    resumed = run_study(study, {"plots": False}, out, resume=True, progress=False)
    assert (
        resumed["n"] == 6
        and json.loads((out / "run.json").read_text())["settings"]["plots"] is False
    )
