"""The studies run by ``metanorm reproduce NAME``, and the runner that writes their folders.

Each :class:`~metanorm_repro.experiments.Study` here declares its run units, runs one unit with
the code of its study function, and summarises the units' records into what the function
returns; its settings are that function's keyword arguments with their defaults, so
``metanorm reproduce NAME`` at the same settings returns the same numbers:

=========================  ======================================================================
``regression-synthetic``   ``run_regression("synthetic")``: MDN and the alternatives on a
                           regression target; a unit: seed × batch size × method
``regression-diabetes``    the same on scikit-learn's diabetes data, in K-fold cross-validation;
                           a unit: fold × model × method
``failures``               ``run_failures``: every method on the two stand-ins where MDN fails;
                           a unit: stand-in × seed × method
``continual``              ``run_continual``: stages with a shifting confounder, trained one
                           after another; a unit: one method
``running-beta``           ``run_running_beta``: the running-β policies after a short training;
                           a unit: model × setting × seed
``bladderbatch``           ``compare``: batch corrections of the bladderbatch microarrays; a
                           unit: one correction
=========================  ======================================================================

:func:`~metanorm_repro.experiments.run_study` runs the units (``sweep.run_units``: one
folder ``OUT/runs/...`` per unit with its ``record.json``, ``--resume`` after an interruption,
``--jobs``), then writes
``results.json`` (the summary), ``report.md`` (the study's tables, then its files and plots) and
``run.json`` (the study, the command line, the settings and the wall time). The folder is built
in ``OUT.partial`` and takes the place of ``OUT`` only once it is complete: an interrupted or
failed run leaves the previous ``OUT`` as it was. ``STUDIES`` is registered by the registry's
loader (``registry.BUILTIN_SOURCES``), not by importing this module.

Examples::

    >>> from metanorm_repro.experiments import get_study
    >>> get_study("continual").settings["epochs_per_stage"], get_study("continual").flags["epochs"]
    (4, 'epochs_per_stage')
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from metanorm_repro.experiments import _io
from metanorm_repro.experiments.registry import Study
from metanorm_repro.experiments.report import study_report, write_run_record

__all__ = ["STUDIES", "StudyInterrupted", "builtin_study", "run_study"]


class StudyInterrupted(Exception):
    """A study stopped by Ctrl-C or SIGTERM; its output folder is as it was before.

    Attributes:
        out: the output folder (unchanged).
        signal_name: ``"SIGINT"`` or ``"SIGTERM"``.
        done: the run units finished (kept in ``OUT.partial`` for ``--resume``; 0 for a study
            without run units).
        total: the study's run units (0 for a study without run units).
        report: the report of the finished units in ``OUT.partial`` (a study with
            ``partial``, e.g. an experiment's sweep), or ``None``.
    """

    def __init__(
        self,
        out: Path,
        signal_name: str,
        done: int = 0,
        total: int = 0,
        report: Path | None = None,
    ) -> None:
        resumable = f" ({done} of {total} run units finished: --resume continues)" if done else ""
        super().__init__(f"{signal_name}: the run was stopped; {out} is unchanged{resumable}")
        self.out = out
        self.signal_name = signal_name
        self.done, self.total = done, total
        self.report = report


def _defaults(fn: Callable[..., Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """The keyword arguments of ``fn`` with their defaults (tuples as lists), less ``drop``."""
    out = {}
    for name, p in inspect.signature(fn).parameters.items():
        if p.default is inspect.Parameter.empty or name in drop:
            continue
        out[name] = list(p.default) if isinstance(p.default, tuple) else p.default
    return out


def _regression_config(task: str, settings: dict[str, Any]) -> dict[str, Any]:
    from metanorm_repro.experiments.regression import diabetes_config, synthetic_regression_config

    kwargs = {k: v for k, v in settings.items() if k not in ("threads", "plots")}
    make = synthetic_regression_config if task == "synthetic" else diabetes_config
    return make(**kwargs)


def _regression_units(task: str, settings: dict[str, Any]) -> list[dict[str, Any]]:
    from metanorm_repro.experiments.regression import diabetes_units, synthetic_regression_units

    units = synthetic_regression_units if task == "synthetic" else diabetes_units
    return units(_regression_config(task, settings))


def _regression_unit(
    task: str, settings: dict[str, Any], unit: dict[str, Any], folder: Path
) -> dict[str, Any]:
    from metanorm_repro.experiments.regression import diabetes_unit, synthetic_regression_unit

    torch.set_num_threads(int(settings["threads"]))
    run = synthetic_regression_unit if task == "synthetic" else diabetes_unit
    return run(_regression_config(task, settings), unit)


def _regression_summary(
    task: str, settings: dict[str, Any], records: list[dict[str, Any]], folder: Path
) -> dict[str, Any]:
    from metanorm_repro.experiments.regression import (
        summarize_diabetes,
        summarize_synthetic_regression,
        write_plot,
    )

    config = _regression_config(task, settings)
    if task == "diabetes":
        return summarize_diabetes(config, records)
    result = summarize_synthetic_regression(config, records)
    if settings.get("plots"):
        write_plot(result, folder)
    return result


def _regression_report(result: dict[str, Any]) -> str:
    from metanorm_repro.experiments.regression import regression_report

    return regression_report(result)


def _failures_names(settings: dict[str, Any]) -> list[str]:
    from metanorm_repro.experiments.failures import STUDIES as STANDINS

    names, seeds = list(settings["studies"]), settings["seeds"]
    unknown = [s for s in names if s not in STANDINS]
    if unknown or not names:
        raise ValueError(f"expected studies among {list(STANDINS)}, got {names}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"expected seeds to be a positive int, got {seeds!r}")
    return names


def _failures_sweep(settings: dict[str, Any], name: str) -> tuple[Study, dict[str, Any], dict]:
    """Stand-in ``name``'s sweep: its experiment's study, that study's settings, the shown ones."""
    from metanorm_repro.experiments.failures import standin_sweep
    from metanorm_repro.experiments.registry import get_experiment
    from metanorm_repro.experiments.sweep import experiment_study

    s = settings
    methods = ["batchnorm", *[m for m in s["methods"] if m != "batchnorm"]]
    seeds = list(range(s["seed"], s["seed"] + s["seeds"]))
    base, shown = standin_sweep(
        name,
        methods=methods,
        seeds=seeds,
        epochs=s["epochs"],
        n_per_class=s["n_per_class"],
        n_eval_per_class=s["n_eval_per_class"],
        threads=s["threads"],
    )
    study = experiment_study(get_experiment(base.experiment))
    given = base.to_dict()
    for key in ("method", "batch_size", "seed"):
        given.pop(key)
    given |= {"methods": methods, "batch_sizes": [base.batch_size], "seeds": seeds, "plots": False}
    return study, study.resolve(given), shown


def _failures_units(settings: dict[str, Any]) -> list[dict[str, Any]]:
    units = []
    for name in _failures_names(settings):
        study, sweep, _ = _failures_sweep(settings, name)
        assert study.units is not None
        units += [{"standin": name, **u} for u in study.units(sweep)]
    return units


def _failures_group(unit: dict[str, Any]) -> tuple[str, int]:
    return unit["standin"], unit["seed"]


def _inner(unit: dict[str, Any]) -> dict[str, Any]:
    """A failures unit as a unit of its stand-in's experiment (without ``standin``)."""
    return {k: v for k, v in unit.items() if k != "standin"}


def _failures_run_group(
    settings: dict[str, Any], units: list[dict[str, Any]], folders: list[Path]
) -> list[dict[str, Any]]:
    study, sweep, _ = _failures_sweep(settings, units[0]["standin"])
    assert study.run_group is not None
    return study.run_group(sweep, [_inner(u) for u in units], folders)


def _failures_read(
    settings: dict[str, Any], unit: dict[str, Any], folder: Path
) -> dict[str, Any] | None:
    study, sweep, _ = _failures_sweep(settings, unit["standin"])
    assert study.read_record is not None
    return study.read_record(sweep, _inner(unit), folder)


def _failures_bytes(settings: dict[str, Any], units: list[dict[str, Any]]) -> int:
    total = 0
    for name in dict.fromkeys(u["standin"] for u in units):
        study, sweep, _ = _failures_sweep(settings, name)
        assert study.estimate_bytes is not None
        total += study.estimate_bytes(sweep, [_inner(u) for u in units if u["standin"] == name])
    return total


def _failures_summary(
    settings: dict[str, Any], records: list[dict[str, Any]], folder: Path
) -> dict[str, Any]:
    """Each stand-in's rows (and its sweep's own report in ``runs/standin-NAME/``)."""
    import platform

    from metanorm_repro.experiments.failures import standin_result
    from metanorm_repro.experiments.registry import get_experiment
    from metanorm_repro.experiments.report import write_report

    units = _failures_units(settings)
    studies = {}
    for name in _failures_names(settings):
        _, sweep, shown = _failures_sweep(settings, name)
        results = [r for u, r in zip(units, records, strict=True) if u["standin"] == name]
        write_report(
            folder / "runs" / f"standin-{name}",
            get_experiment(sweep["experiment"]),
            results,
            settings=shown,
            plots=False,
        )
        studies[name] = standin_result(name, shown, results)
    return {
        "command": "",
        "cpus": os.cpu_count(),
        "threads": settings["threads"],
        "platform": platform.platform(),
        "studies": studies,
        "wall_time_s": None,
    }


def _failures_report(result: dict[str, Any]) -> str:
    from metanorm_repro.experiments.failures import failures_report

    return failures_report(result)


def _continual_settings(settings: dict[str, Any]) -> dict[str, Any]:
    from metanorm_repro.experiments.estimators import continual_settings

    return continual_settings(
        **{k: v for k, v in settings.items() if k not in ("threads", "progress")}
    )


def _continual_units(settings: dict[str, Any]) -> list[dict[str, Any]]:
    _continual_settings(settings)  # checked before any unit runs
    return [{"method": m} for m in settings["methods"]]


def _continual_unit(settings: dict[str, Any], unit: dict[str, Any], folder: Path) -> dict[str, Any]:
    from metanorm_repro.experiments.estimators import continual_unit

    if settings.get("threads") is not None:
        torch.set_num_threads(int(settings["threads"]))
    progress = bool(settings.get("progress"))
    return continual_unit(_continual_settings(settings), unit["method"], progress=progress)


def _continual_summary(
    settings: dict[str, Any], records: list[dict[str, Any]], folder: Path
) -> dict[str, Any]:
    methods = {m: r for m, r in zip(settings["methods"], records, strict=True)}
    return {"settings": _continual_settings(settings), "methods": methods}


def _continual_report(result: dict[str, Any]) -> str:
    from metanorm_repro.experiments.estimators import continual_report

    return continual_report(result)


def _bladderbatch_units(settings: dict[str, Any]) -> list[dict[str, Any]]:
    if settings["genes"] < 2 or settings["folds"] < 2 or settings["repeats"] < 1:
        raise ValueError(
            f"expected genes >= 2, folds >= 2 and repeats >= 1, got {settings['genes']}, "
            f"{settings['folds']}, {settings['repeats']}"
        )
    # the methods were checked with the settings (Study.resolve); None: every correction
    methods = settings["methods"] or builtin_study("bladderbatch").methods or ()
    return [{"method": m} for m in methods]


@functools.lru_cache(maxsize=1)
def _bladderbatch_data(path: str | None, data_root: str | None) -> Any:
    """The data set, loaded once per process (the units of a run share it; read-only)."""
    from metanorm_repro.datasets import load_bladderbatch

    return load_bladderbatch(path)


def _bladderbatch_unit(
    settings: dict[str, Any], unit: dict[str, Any], folder: Path
) -> dict[str, Any]:
    from metanorm_repro.experiments.bladderbatch import compare

    s = {k: v for k, v in settings.items() if k not in ("data", "methods")}
    data = _bladderbatch_data(settings["data"], os.environ.get("METANORM_DATA"))
    record: dict[str, Any] = compare(data, methods=[unit["method"]], **s)[unit["method"]]
    return {**record, "n_arrays_loaded": int(data.expression.shape[0])}


def _bladderbatch_summary(
    settings: dict[str, Any], records: list[dict[str, Any]], folder: Path
) -> dict[str, Any]:
    methods = {}
    for unit, r in zip(_bladderbatch_units(settings), records, strict=True):
        methods[unit["method"]] = {k: v for k, v in r.items() if k != "n_arrays_loaded"}
    return {
        "settings": {**settings, "n_arrays": records[0]["n_arrays_loaded"]},
        "methods": methods,
    }


def _bladderbatch_report(result: dict[str, Any]) -> str:
    from metanorm_repro.experiments.bladderbatch import to_markdown

    s = result["settings"]
    return (
        "# Batch correction on bladderbatch\n\n"
        f"{s['n_arrays']} arrays, top {s['genes']} variable genes, "
        f"{s['repeats']}×{s['folds']}-fold CV, seed {s['seed']}.\n\n"
        + to_markdown(result["methods"])
    )


def _running_beta_config(settings: dict[str, Any]) -> dict[str, Any]:
    seed, seeds = settings["seed"], settings["seeds"]
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"expected seeds to be a positive int, got {seeds!r}")
    return {
        "models": list(settings["models"]),
        "settings": list(settings["settings"]),
        "seeds": list(range(seed, seed + seeds)),
        "eval_epochs": list(settings["eval_epochs"]),
        "epochs": settings["epochs"],
        "threads": settings["threads"],
    }


def _running_beta_units(settings: dict[str, Any]) -> list[dict[str, Any]]:
    from metanorm_repro.experiments.running_beta import running_beta_units

    return running_beta_units(_running_beta_config(settings))


def _running_beta_unit(
    settings: dict[str, Any], unit: dict[str, Any], folder: Path
) -> dict[str, Any]:
    from metanorm_repro.experiments.running_beta import running_beta_unit

    start = time.perf_counter()
    record = running_beta_unit(_running_beta_config(settings), unit, bool(settings["progress"]))
    return {**record, "wall_time_s": time.perf_counter() - start}


def _running_beta_summary(
    settings: dict[str, Any], records: list[dict[str, Any]], folder: Path
) -> dict[str, Any]:
    rows = [row for r in records for row in r["rows"]]
    return {
        "settings": _running_beta_config(settings),
        "rows": rows,
        "wall_time_s": sum(r["wall_time_s"] for r in records),
    }


def _running_beta_report(result: dict[str, Any]) -> str:
    from metanorm_repro.experiments.running_beta import running_beta_report

    return running_beta_report(result)


#: The methods the regression studies accept (``"mdn-linear"``: the paper's name of ``"mdn"``).
_REGRESSION_METHODS = (
    "none",
    "mdn",
    "mdn-linear",
    "concat",
    "brnet",
    "brnet-cond",
    "dann",
    "dann-cond",
    "groupdro",
)
#: The regression studies' default run, in report order.
_REGRESSION_DEFAULT = (
    "none",
    "mdn",
    "concat",
    "brnet",
    "brnet-cond",
    "dann",
    "dann-cond",
    "groupdro",
)


def _studies() -> tuple[Study, ...]:
    from metanorm_repro.experiments.estimators import run_continual
    from metanorm_repro.experiments.failures import run_failures
    from metanorm_repro.experiments.real import METHODS as REAL_METHODS
    from metanorm_repro.experiments.regression import run_diabetes, run_synthetic_regression
    from metanorm_repro.experiments.running_beta import run_running_beta

    return (
        Study(
            name="regression-synthetic",
            description="MDN and the alternatives to MDN on the synthetic regression task "
            "(target kept in the design), against none: test MSE and R² beside the exact "
            "bounds, within-target-bin dcor², one plot (R² against dcor²).",
            units=functools.partial(_regression_units, "synthetic"),
            run_unit=functools.partial(_regression_unit, "synthetic"),
            summarize=functools.partial(_regression_summary, "synthetic"),
            report=_regression_report,
            methods=_REGRESSION_METHODS,
            settings={
                **_defaults(run_synthetic_regression, ("law",)),
                "methods": list(_REGRESSION_DEFAULT),
                "threads": 1,
                "plots": True,
            },
        ),
        Study(
            name="regression-diabetes",
            description="A linear model (with and without MetadataResidualizer) and an MLP "
            "(every method) on scikit-learn's diabetes data, age and sex as metadata, in K-fold "
            "cross-validation: pooled R² and within-target-bin dcor².",
            units=functools.partial(_regression_units, "diabetes"),
            run_unit=functools.partial(_regression_unit, "diabetes"),
            summarize=functools.partial(_regression_summary, "diabetes"),
            report=_regression_report,
            methods=_REGRESSION_METHODS,
            settings={
                **_defaults(run_diabetes),
                "methods": list(_REGRESSION_DEFAULT),
                "threads": 1,
            },
        ),
        Study(
            name="failures",
            description="Every method (MDN, the candidate fixes, the alternatives) on the "
            "stand-ins where MDN fails: shaded-fashion-mnist with a contrast shade, and "
            "two-site-digits; a run unit: stand-in × seed × method (the methods of one "
            "stand-in and seed trained in round robin), in OUT/runs/standin-<name>/.",
            units=_failures_units,
            group=_failures_group,
            run_group=_failures_run_group,
            read_record=_failures_read,
            estimate_bytes=_failures_bytes,
            summarize=_failures_summary,
            report=_failures_report,
            # any method of the real-data experiments (the stand-ins run as them)
            methods=REAL_METHODS,
            settings={
                **_defaults(run_failures, ("overwrite", "command", "jobs", "progress")),
                # the baseline first, then MDN, the candidate fixes and the alternatives
                "methods": [
                    "batchnorm",
                    "mdn",
                    "mdn-all",
                    "mdn-cw",
                    "mdn-poly",
                    "mdn-scale",
                    "mdn+brnet-cond",
                    "concat",
                    "brnet",
                    "brnet-cond",
                    "dann",
                    "dann-cond",
                    "groupdro",
                ],
            },
        ),
        Study(
            name="continual",
            description="Continual learning with a shifting confounder: five stages trained "
            "one after another (MDN, R-MDN, PMDN, the baseline); bAcc and dcor² matrices.",
            units=_continual_units,
            run_unit=_continual_unit,
            summarize=_continual_summary,
            report=_continual_report,
            methods=(
                "none",
                "mdn-linear",
                "rmdn",
                "pmdn",
                "mdn-conv",
                "rmdn-conv",
                "pmdn-conv",
            ),
            settings={
                **_defaults(run_continual, ("out_dir",)),
                "methods": ["none", "mdn-linear", "rmdn"],
            },
            flags={"epochs": "epochs_per_stage", "batch_sizes": "batch_size"},
        ),
        Study(
            name="running-beta",
            description="The running-β policies of MetadataNorm after a short training on the "
            "paper's synthetic task (EMA variants, cumulative average, refit), for batch sizes "
            "with and without a last batch of m <= K samples: test bAcc, dcor², β error.",
            units=_running_beta_units,
            run_unit=_running_beta_unit,
            summarize=_running_beta_summary,
            report=_running_beta_report,
            settings=_defaults(run_running_beta),
        ),
        Study(
            name="bladderbatch",
            description="Batch correction on the bladderbatch microarrays (none, "
            "MetadataResidualizer, CorrelationRemover, ComBat): batch left (dcor² within tissue "
            "status) and biology left (cross-validated cancer-vs-normal bAcc). Needs the data "
            "(--data) and the compare extra.",
            units=_bladderbatch_units,
            run_unit=_bladderbatch_unit,
            summarize=_bladderbatch_summary,
            report=_bladderbatch_report,
            # the names of the table bladderbatch.METHODS (not imported here: pandas and
            # scikit-learn are an extra)
            methods=("none", "residualizer", "correlation_remover", "combat"),
            # the keyword arguments of bladderbatch.compare (methods None: every correction)
            settings={
                "genes": 1000,
                "folds": 5,
                "repeats": 10,
                "seed": 0,
                "methods": None,
                "data": None,
            },
        ),
    )


#: The built-in studies (registered by the registry's loader).
STUDIES: tuple[Study, ...] = _studies()


def builtin_study(name: str) -> Study:
    """The built-in study ``name`` as this module defines it (whatever the registry holds).

    Raises:
        ValueError: ``name`` is not a built-in study (the message names them).
    """
    for study in STUDIES:
        if study.name == name:
            return study
    raise ValueError(f"no built-in study {name!r}; built-in: {[s.name for s in STUDIES]}")


def _complete(folder: Path) -> bool:
    return (folder / "run.json").is_file()


def run_study(
    study: Study,
    settings: Mapping[str, Any],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    command: str = "",
    resume: bool = False,
    jobs: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs ``study`` at ``settings`` and writes its folder ``out`` atomically.

    A study with run units (``Study.units``) runs through ``sweep.run_units``: each unit's
    record goes to its run folder ``OUT.partial/runs/...`` as it finishes (``jobs``
    processes), an interrupted run
    continues with ``resume=True`` (finished units are not run again), and once every unit is
    done the records are summarised (``study.summarize``) into ``results.json``, ``report.md``
    (``study_report``) and ``run.json``, and the folder takes ``out``'s place.

    A study given as one ``run`` function (deprecated) runs at once:

    ``study.run(settings, OUT.partial)`` runs in a new ``OUT.partial``; then ``results.json``
    (its result; a ``"command"`` key of the result is set to ``command``), ``report.md``
    (``study.report(result)``) and ``run.json`` (the study, ``command``, the settings and the
    wall time) are written there, and the folder takes ``out``'s place
    (``swap_in``). ``out`` is locked meanwhile
    (``FolderLock``).

    Args:
        study: the study.
        settings: every setting, e.g. ``study.resolve(given)``.
        out: the output folder.
        overwrite: replace an existing non-empty ``out`` (intact until the new run is complete).
            Default: ``False``.
        command: the command line, recorded in ``run.json``.
        resume: continue the interrupted run of ``out`` (a study with run units only).
        jobs: processes running units at the same time (a study with run units only).
        progress: show a progress bar over the units.

    Returns:
        The study's result.

    Raises:
        StudyInterrupted: Ctrl-C or SIGTERM; ``out`` unchanged (a study with run units keeps
            its finished units in ``OUT.partial`` for ``resume``; otherwise it is deleted).
        FileExistsError: ``out`` holds results and neither ``overwrite`` nor ``resume``.
        ValueError: ``resume`` or ``jobs > 1`` for a study without run units.
    """
    from metanorm_repro.experiments.sweep import SweepInterrupted, _stop_on_sigterm, _Terminated

    # unknown keys and methods are refused, named; other spellings of a method take its name
    settings = study.resolve(dict(settings))
    out = Path(out)
    if study.has_units:
        return _run_units(
            study,
            settings,
            out,
            overwrite=overwrite,
            command=command,
            resume=resume,
            jobs=jobs,
            progress=progress,
        )
    if resume or jobs != 1:
        raise ValueError(
            f"study {study.name!r} runs in one piece: it takes neither --resume nor --jobs"
        )
    lock = _io.FolderLock(out).acquire()
    try:
        _io.recover_swap(out, _complete)
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            raise FileExistsError(
                f"{out} already holds results; pass --overwrite to replace them (they stay "
                "intact until the new run is complete), or choose another --out"
            )
        work = _io.partial_dir(out)
        if work.exists():  # left by an interrupted study (studies do not resume)
            shutil.rmtree(work)
        work.mkdir(parents=True)
        start = time.perf_counter()
        try:
            with _stop_on_sigterm():
                assert study.run is not None
                result = study.run(dict(settings), work)
                _write_outputs(study, result, work, settings, command, start, 0)
        except (KeyboardInterrupt, _Terminated, SweepInterrupted) as exc:
            shutil.rmtree(work, ignore_errors=True)
            name = (
                exc.signal_name
                if isinstance(exc, SweepInterrupted)
                else "SIGTERM"
                if isinstance(exc, _Terminated)
                else "SIGINT"
            )
            raise StudyInterrupted(out, name) from None
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        _io.swap_in(work, out)
        return result
    finally:
        lock.release()


def _write_outputs(
    study: Study,
    result: dict[str, Any],
    folder: Path,
    settings: dict[str, Any],
    command: str,
    start: float,
    units: int,
) -> None:
    """Writes ``results.json``, ``report.md`` and ``run.json`` of a run started at ``start``.

    The ``"command"`` and ``"wall_time_s"`` entries of ``result``, where it has them, are set.
    """
    if "command" in result:
        result["command"] = command
    if "wall_time_s" in result:
        result["wall_time_s"] = time.perf_counter() - start
    _io.write_json(folder / "results.json", result)
    _io.write_text(folder / "report.md", study_report(study, result, folder, units))
    write_run_record(
        folder,
        study.name,
        command=command,
        settings=settings,
        wall_time_s=time.perf_counter() - start,
    )


def _run_units(
    study: Study,
    settings: dict[str, Any],
    out: Path,
    *,
    overwrite: bool,
    command: str,
    resume: bool,
    jobs: int,
    progress: bool,
) -> dict[str, Any]:
    """:func:`run_study` for a study with run units."""
    from metanorm_repro.experiments.sweep import SweepInterrupted, run_units

    assert study.summarize is not None
    summarize = study.summarize
    start = time.perf_counter()
    made: dict[str, Any] = {}

    def finish(folder: Path, records: list[dict[str, Any]]) -> None:
        result = summarize(dict(settings), records, folder)
        _write_outputs(study, result, folder, settings, command, start, len(records))
        made["result"] = result

    def interrupted(folder: Path, records: list[dict[str, Any]]) -> Path:
        finish(folder, records)
        return folder / "report.md"

    try:
        run_units(
            study,
            settings,
            out,
            overwrite=overwrite,
            resume=resume,
            jobs=jobs,
            progress=progress,
            finish=finish,
            interrupted=interrupted if study.partial else None,
        )
    except SweepInterrupted as stop:
        raise StudyInterrupted(
            out, stop.signal_name, len(stop.results), stop.total, stop.report
        ) from None
    return made["result"]
