"""The one sweep: every run unit of an entry into its run folder (:func:`run_units`).

Every entry of ``metanorm reproduce`` runs as **run units**: an experiment's are its method ×
batch size × seed runs (:func:`run_sweep`), a study's what it declares
(:class:`~metanorm_repro.experiments.Study`). Each unit has its folder ``OUT/runs/...``
(:func:`unit_dir`; an experiment's ``runs/bs{B}/{method}/seed{S}/``, see
:mod:`metanorm_repro.experiments.runner`). Units that must run together form one task: the
methods of one seed and batch size train in round robin, one epoch each in turn, on the same
data, so their epoch times are measured side by side under the same load (on a shared machine
compare the ratios, the report's per-epoch paired ratio, not absolute times).

The sweep is built in ``OUT.partial`` beside ``OUT`` and takes ``OUT``'s place only once every unit
(and the report) is written, so an existing ``OUT`` stays intact and readable until then, and a
folder never mixes two sweeps. ``OUT.partial/sweep.json`` records what the sweep is (the entry,
its settings, its units); an interrupted sweep continues with ``resume=True`` (finished units
are kept, units that had not finished start again). Ctrl-C or SIGTERM stops the worker processes
and raises :class:`SweepInterrupted` (an experiment's sweep first reports the completed runs).

While it runs, the sweep holds a lock on ``OUT`` (``OUT.lock``, :class:`~metanorm_repro.experiments.
_io.FolderLock`): a second sweep on the same folder is refused. Worker processes (``jobs > 1``)
run tasks in private folders under ``OUT.jobs`` and die with the main process; only the main
process moves finished units into ``OUT.partial``. Before running, the folders are checked for
writability and free space (an estimate of what the units write). Every experiment run folder
ends with a manifest of its files' SHA-256
(:func:`~metanorm_repro.experiments.runner.verify_run`): a run whose files changed is trained
again on resume, and refused before the report. ``docs/reliability.md`` has the details.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import Any

from tqdm.auto import tqdm

from metanorm_repro.experiments import _io
from metanorm_repro.experiments.config import RunConfig
from metanorm_repro.experiments.registry import (
    Experiment,
    Study,
    get_experiment,
    install_payload,
    list_entries,
    worker_payload,
)
from metanorm_repro.experiments.runner import Run, epoch_summary, load_result, prepare_run

__all__ = [
    "MANIFEST",
    "RECORD",
    "SweepInterrupted",
    "bar_options",
    "experiment_study",
    "run_dir",
    "run_sweep",
    "run_units",
    "unit_dir",
]

#: The file, in a sweep's folder, that says which sweep it holds.
MANIFEST = "sweep.json"

# settings that may differ between an interrupted sweep and its resumption (they change
# neither a unit's record nor the summary's numbers)
_RESUMABLE = ("threads", "progress", "jobs", "plots")


class SweepInterrupted(KeyboardInterrupt):
    """A sweep stopped by Ctrl-C (SIGINT) or SIGTERM, after its workers were stopped.

    Attributes:
        folder: the folder holding the completed runs (``OUT.partial``); resume with
            ``run_sweep(..., resume=True)``.
        results: the results of the runs that completed, in run order.
        total: the number of runs of the whole sweep.
        signal_name: ``"SIGINT"`` or ``"SIGTERM"``.
        report: what the ``report`` callback returned for the completed runs (``None`` when
            there was no callback or no completed run).
    """

    def __init__(
        self,
        folder: Path,
        results: list[dict[str, Any]],
        total: int,
        signal_name: str,
        report: Any = None,
    ) -> None:
        super().__init__(f"{signal_name}: {len(results)} of {total} runs complete in {folder}")
        self.folder, self.results, self.total = folder, results, total
        self.signal_name, self.report = signal_name, report


class _Terminated(Exception):
    """SIGTERM, raised in the main thread by the handler :func:`_stop_on_sigterm` installs."""


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_dir(out_dir: str | os.PathLike[str], method: str, batch_size: int, seed: int) -> Path:
    """The folder of one run of a sweep."""
    return Path(out_dir) / "runs" / f"bs{batch_size}" / method / f"seed{seed}"


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _same_run(result: dict[str, Any], config: RunConfig) -> bool:
    found = dict(result["config"])
    wanted = config.to_dict()
    for key in _RESUMABLE:
        found.pop(key, None)
        wanted.pop(key, None)
    return found == wanted


# what a run writes besides its checkpoint and test features (config, epochs.csv, final.json:
# generous), and a sweep's report and plots
_RUN_EXTRA_BYTES = 1 << 20
_REPORT_BYTES = 16 << 20


def _run_bytes(configs: list[RunConfig]) -> dict[str, int]:
    """An estimate of the bytes one run of each method writes, from its model and test split.

    The checkpoint is the model's ``state_dict``; the test features are measured on two test
    samples (float32, uncompressed: an upper bound of the compressed file).
    """
    import torch

    first = configs[0]
    prepared = prepare_run(first)
    test, rows = prepared.splits[2], prepared.rows[2]
    n_test = len(test)
    sizes: dict[str, int] = {}
    for method in dict.fromkeys(c.method for c in configs):
        model = (
            prepared.model
            if method == first.method
            else prepared.experiment.make_model(
                method, prepared.design, first.replace(method=method)
            )
        )
        state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                model.eval()
                _, features = model(test.images[:2], rows[:2])
            per_sample = int(features[0].numel()) * 4
        except Exception:  # an estimate only: fall back on the input's size
            per_sample = int(test.images[0].numel()) * 4
        metric = int(prepared.metrics[2].size) * 8
        sizes[method] = state + n_test * (per_sample + 16) + metric + _RUN_EXTRA_BYTES
    return sizes


def _preflight(out: Path, work: Path, need: int | None, count: int) -> None:
    """Checks, before running, that the sweep can write its units and take ``out``'s place.

    Raises:
        OSError: naming the folder: ``work`` or ``out``'s parent takes no new file, a folder of
            ``out`` (replaced at the end) does not let its entries be deleted, or the free space
            is below ``need`` bytes, the estimate of what the ``count`` units to run write
            (``ENOSPC``).
    """
    _io.check_writable(work)
    _io.check_writable(out.parent)
    if out.is_dir() and any(out.iterdir()):
        _io.check_deletable(out)
    if not count or need is None:
        return
    need += _REPORT_BYTES
    free = shutil.disk_usage(work).free
    if need > free:
        mib = 1 << 20
        raise OSError(
            errno.ENOSPC,
            f"not enough free space: about {need / mib:.1f} MiB needed for {count} run(s), "
            f"{free / mib:.1f} MiB free",
            str(work),
        )


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuses an ``out`` that holds results unless ``overwrite``; checks it can be written."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(
            f"{out} already holds results; pass --overwrite to replace them (they stay "
            "intact until the new run is complete), or choose another --out"
        )
    _io.check_writable(out.parent)


def _differences(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What an interrupted sweep's manifest ``found`` has otherwise than ``wanted``."""
    out = []
    if found.get("study") != wanted["study"]:
        out.append(f"{found.get('study')!r} (asked: {wanted['study']!r})")
    f_set, w_set = dict(found.get("settings") or {}), wanted["settings"]
    for key in sorted(set(f_set) | set(w_set)):
        if key not in _RESUMABLE and f_set.get(key) != w_set.get(key):
            out.append(f"{key} {f_set.get(key)!r} (asked: {w_set.get(key)!r})")
    if not out and found.get("units") != wanted["units"]:
        out.append("the run units")
    return out


def _prepare_folder(out: Path, manifest: dict[str, Any], *, overwrite: bool, resume: bool) -> Path:
    """Checks ``out`` and ``OUT.partial`` for a new or resumed sweep; returns ``OUT.partial``."""
    work = _io.partial_dir(out)
    _io.recover_swap(out, lambda p: bool((_read_manifest(p) or {}).get("complete")))
    if resume:
        found = _read_manifest(work) if work.is_dir() else None
        if found is None:
            raise FileNotFoundError(
                f"nothing to resume: {work} holds no interrupted sweep (the sweep at {out} is "
                "complete, or never started); run without --resume"
            )
        if "units" not in found or "settings" not in found:
            raise ValueError(
                f"the interrupted sweep in {work} was written by an earlier version of metanorm "
                "(its sweep.json has no run units) and cannot be resumed; pass --overwrite to "
                "start again"
            )
        diff = _differences(found, manifest)
        if diff:
            raise ValueError(
                f"the interrupted sweep in {work} differs from the one asked for: "
                f"{'; '.join(diff)}; resume with the same settings, or pass --overwrite to "
                "start again"
            )
        if out.is_dir() and any(out.iterdir()) and not found.get("overwrite"):
            raise FileExistsError(
                f"{out} already holds a run and the interrupted sweep was not started with "
                "--overwrite; choose another --out"
            )
        manifest["overwrite"] = found.get("overwrite", False)
        return work
    if work.exists():
        if not overwrite:
            raise FileExistsError(
                f"{work} holds an interrupted sweep: pass --resume to continue it, or "
                "--overwrite to start again"
            )
        shutil.rmtree(work)
    _check_out(out, overwrite)
    work.mkdir(parents=True)
    _io.write_json(work / MANIFEST, manifest)
    return work


# --------------------------------------------------------------------------------------------
# An experiment's runs as run units: method × batch size × seed, grouped by (seed, batch size)
# --------------------------------------------------------------------------------------------

_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))


def _config(settings: Mapping[str, Any], unit: Mapping[str, Any]) -> RunConfig:
    fields = {k: settings[k] for k in _CONFIG_FIELDS if k in settings}
    fields["options"] = dict(fields.get("options") or {})
    return RunConfig(**fields).replace(
        method=unit["method"], batch_size=unit["bs"], seed=unit["seed"]
    )


def _experiment_units(settings: dict[str, Any]) -> list[dict[str, Any]]:
    # the options are checked here, before any run starts (an unknown key or a bad value)
    get_experiment(settings["experiment"]).resolve(settings["options"])
    return [
        {"bs": b, "method": m, "seed": s}
        for s in settings["seeds"]
        for b in settings["batch_sizes"]
        for m in settings["methods"]
    ]


def _experiment_group(unit: dict[str, Any]) -> tuple[int, int]:
    return unit["seed"], unit["bs"]


def _experiment_group_run(
    settings: dict[str, Any], units: list[dict[str, Any]], folders: list[Path]
) -> list[dict[str, Any]]:
    """Trains the methods of one (seed, batch size) group in round robin, then finishes them."""
    runs = [Run(_config(settings, u), f) for u, f in zip(units, folders, strict=True)]
    first = runs[0].config
    with tqdm(
        total=sum(r.config.epochs for r in runs),
        desc=f"bs={first.batch_size} seed={first.seed}",
        unit="epoch",
        dynamic_ncols=True,
        **bar_options(),
    ) as bar:
        # round robin: epoch e of every method, then epoch e + 1: the methods' epoch times are
        # measured side by side, under the same load
        while not all(r.done for r in runs):
            for r in runs:
                if r.done:
                    continue
                row = r.train_epoch()
                bar.update(1)
                bar.set_postfix_str(f"{r.config.method} epoch {row['epoch']}: {epoch_summary(row)}")
    return [r.finish() for r in runs]


def _experiment_read(
    settings: dict[str, Any], unit: dict[str, Any], folder: Path
) -> dict[str, Any] | None:
    result = load_result(folder)  # RunCorrupted (a ValueError) names a changed file
    if result is None or not _same_run(result, _config(settings, unit)):
        return None
    return result


def _experiment_bytes(settings: dict[str, Any], units: list[dict[str, Any]]) -> int:
    configs = [_config(settings, u) for u in units]
    per_method = _run_bytes(configs)
    return sum(per_method[c.method] for c in configs)


#: The settings every experiment's sweep starts from; its ``defaults`` (or, with ``--paper``,
#: its ``paper`` settings) replace them, key by key. ``seeds`` there is a count from 0.
SWEEP_DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "lr": 1e-3,
    "lr_schedule": "constant",
    "refit_running_beta": False,
    "n_per_class": 1000,
    "batch_sizes": [200],
    "seeds": 1,
}


def _experiment_settings(experiment: Experiment, given: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting of an experiment's sweep: :data:`SWEEP_DEFAULTS`, then ``given``."""
    settings = RunConfig(experiment=experiment.name, device="cpu").to_dict()
    for key in ("method", "batch_size", "seed"):
        settings.pop(key)
    settings |= {"methods": list(experiment.methods), "plots": True, "paper": False}
    for key, value in {**SWEEP_DEFAULTS, **given}.items():
        if key == "seeds" and isinstance(value, int):
            value = list(range(value))
        settings[key] = dict(value) if isinstance(value, Mapping) else value
    return settings


def _experiment_summary(
    settings: dict[str, Any], records: list[dict[str, Any]], folder: Path
) -> dict[str, Any]:
    from metanorm_repro.experiments.report import summarize_sweep

    experiment = get_experiment(settings["experiment"])
    result = summarize_sweep(experiment, records, folder, plots=bool(settings.get("plots", True)))
    return {**result, "settings": settings, "command": "", "wall_time_s": None}


def _experiment_report(result: dict[str, Any]) -> str:
    from metanorm_repro.experiments.report import sweep_report

    return sweep_report(get_experiment(result["experiment"]), result)


def experiment_study(experiment: Experiment) -> Study:
    """An experiment as the entry ``metanorm reproduce NAME`` runs: its sweep's run units.

    The units are its runs, ``{"bs", "method", "seed"}`` for every seed, batch size and method
    (folders ``runs/bs{B}/{method}/seed{S}/``), the methods of one seed and batch size forming
    one task (trained in round robin). Its settings are the :class:`RunConfig` fields of the
    runs (less ``method``, ``batch_size`` and ``seed``), ``methods``, ``batch_sizes``,
    ``seeds`` (a list), ``plots`` and ``paper``; their defaults are ``sweep.SWEEP_DEFAULTS``
    with the experiment's ``defaults``, and ``--paper`` gives its ``paper`` settings instead.
    The summary is the report's table, checks and intervals (``report.summarize_sweep``).

    Examples::

        >>> from metanorm_repro.experiments import get_experiment
        >>> study = experiment_study(get_experiment("synthetic"))
        >>> study.settings["batch_sizes"], study.paper["epochs"], study.units(study.settings)[0]
        ([200, 128], 200, {'bs': 200, 'method': 'none', 'seed': 0})
    """
    paper = {}
    if experiment.paper:
        paper = _experiment_settings(experiment, experiment.paper) | {"paper": True}
    return Study(
        name=experiment.name,
        description=experiment.description,
        report=_experiment_report,
        settings=_experiment_settings(experiment, experiment.defaults),
        paper=paper,
        methods=experiment.methods,
        units=_experiment_units,
        group=_experiment_group,
        run_group=_experiment_group_run,
        summarize=_experiment_summary,
        read_record=_experiment_read,
        estimate_bytes=_experiment_bytes,
        partial=True,
    )


def run_sweep(
    base: RunConfig,
    out_dir: str | os.PathLike[str],
    *,
    methods: Sequence[str] | None = None,
    batch_sizes: Sequence[int] = (200,),
    seeds: Sequence[int] = (0,),
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    jobs: int = 1,
    report: Callable[[Path, list[dict[str, Any]]], Any] | None = None,
) -> list[dict[str, Any]]:
    """Runs ``base`` for every method, batch size and seed.

    The runs are the run units of :func:`run_units` (``{"bs", "method", "seed"}``, in the
    folders ``runs/bs{B}/{method}/seed{S}``); the methods of one seed and batch size are one
    task, trained in round robin.

    Args:
        base: the shared configuration (its ``method``, ``batch_size`` and ``seed`` are replaced).
        out_dir: the sweep's folder; an existing non-empty one is refused unless ``overwrite``.
        methods: methods to run. Default: the experiment's methods.
        batch_sizes: training batch sizes. Default: ``(200,)``.
        seeds: seeds. Default: ``(0,)``.
        overwrite: replace an existing ``out_dir`` (it stays intact until the new sweep is
            complete) or discard an interrupted sweep. Default: ``False``.
        resume: continue the interrupted sweep of ``out_dir`` (same settings): completed runs
            are kept, the others run (again) from the start. Default: ``False``.
        progress: show progress bars. Default: ``True``.
        jobs: processes; the (seed, batch size) groups are shared out among them (set
            ``base.threads`` so that ``jobs × threads`` fits the cores). Default: 1.
        report: ``report(folder, results)``, called once every run is complete, before the
            folder takes ``out_dir``'s place (e.g. to write the report into it), and on an
            interruption with the completed runs. Default: ``None``.

    Returns:
        The :func:`run_experiment` results, in run order (``out_dir`` in their paths).

    Raises:
        SweepInterrupted: on Ctrl-C or SIGTERM, once the workers are stopped.
        FileExistsError: ``out_dir`` holds a run and neither ``overwrite`` nor ``resume``.
        FileNotFoundError: ``resume`` without an interrupted sweep.
        ValueError: bad arguments, or ``resume`` with settings other than the interrupted
            sweep's.
    """
    experiment = get_experiment(base.experiment)
    methods = experiment.check_methods(
        experiment.methods if methods is None else methods, spellings=False
    )
    if not batch_sizes or not seeds:
        raise ValueError(
            f"expected at least one batch size and one seed, got {batch_sizes}, {seeds}"
        )
    if len(set(batch_sizes)) != len(batch_sizes) or len(set(seeds)) != len(seeds):
        raise ValueError("batch sizes and seeds must not repeat")
    settings = base.to_dict()
    for key in ("method", "batch_size", "seed"):
        settings.pop(key)
    settings |= {
        "methods": methods,
        "batch_sizes": [int(b) for b in batch_sizes],
        "seeds": [int(s) for s in seeds],
    }
    out = Path(out_dir)

    def finish(folder: Path, records: list[dict[str, Any]]) -> None:
        if report is not None:
            report(folder, records)

    results = run_units(
        experiment_study(experiment),
        settings,
        out,
        overwrite=overwrite,
        resume=resume,
        jobs=jobs,
        progress=progress,
        finish=finish,
        interrupted=report,
    )
    for r in results:  # the runs were read in OUT.partial, which is now OUT
        r["out_dir"] = str(out / Path(r["out_dir"]).relative_to(_io.partial_dir(out)))
    return results


# the lock descriptor a worker inherited: kept open (so held) until the worker exits
_INHERITED_LOCK: int | None = None

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class _InheritedFd:
    """A descriptor that a spawned worker inherits (the same open file: the same ``flock``)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        from multiprocessing import reduction

        # while a process is being spawned, DupFd adds the descriptor to those it passes on
        return _detach, (reduction.DupFd(self.fd),)


def _detach(dup: Any) -> int:
    return int(dup.detach())


def _die_with_parent(parent: int) -> None:
    """Makes this worker end when the process ``parent`` does, even on its ``kill -9``.

    Linux: the kernel sends SIGTERM at the parent's death (``PR_SET_PDEATHSIG``); the parent
    may have died before that was set, so ``getppid`` is checked after. Elsewhere a thread
    polls ``getppid`` twice a second.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            ok = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) == 0
        except (OSError, AttributeError):
            ok = False
        if ok:
            if os.getppid() != parent:  # the parent died before the signal was set
                os._exit(1)
            return

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, name="metanorm-parent-watch", daemon=True).start()


def _worker_init(
    parent: int,
    lock_fd: int | None,
    payload: tuple[Sequence[str], Sequence[Any]] = ((), ()),
) -> None:
    """Sets up a worker: it dies with its parent and ignores Ctrl-C (its parent stops it).

    It keeps the inherited lock descriptor open (the lock lasts until the last worker exits),
    registers the entries its parent passed
    (:func:`~metanorm_repro.experiments.registry.worker_payload`: a spawned process has only the
    built-in ones) and gives tqdm a thread lock.

    tqdm's default lock is a multiprocessing one; a worker stopped by SIGTERM would leave it to
    the resource tracker's "leaked semaphore" warning (the workers share no lock anyway).
    """
    global _INHERITED_LOCK
    _die_with_parent(parent)
    _INHERITED_LOCK = lock_fd
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    install_payload(*payload)
    tqdm.set_lock(threading.RLock())


def _start_pool(
    ctx: Any, jobs: int, lock: _io.FolderLock, payload: tuple[Sequence[str], Sequence[Any]]
) -> Any:
    """``jobs`` workers (:func:`_worker_init`) that inherit the folder lock and get ``payload``.

    SIGINT is ignored while they start, so that they start ignoring it (Ctrl-C reaches the
    whole process group; this process stops them).
    """
    fd = lock.fileno()
    initargs = (os.getpid(), None if fd is None else _InheritedFd(fd), payload)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
    try:
        return ctx.Pool(processes=jobs, initializer=_worker_init, initargs=initargs)
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)


def _worker_pids(pool: Any) -> set[int]:
    """The process ids of a pool's current workers."""
    return {p.pid for p in getattr(pool, "_pool", ()) if p.pid is not None}


def _check_workers(pool: Any, started: set[int]) -> None:
    """Raises if a worker of ``pool`` died: the pool would replace it and wait forever.

    ``multiprocessing.Pool`` starts a new worker in place of one that exits (an initializer
    that fails, a task it cannot unpickle, a kill) and never delivers the lost task's result;
    a worker that is not one of those ``started`` is such a replacement.
    """
    if _worker_pids(pool) - started:
        raise RuntimeError(
            "a worker process exited before finishing its work (it could not load the "
            "experiment's module, ran out of memory or was killed); the finished runs are "
            "kept: run again with --jobs 1 to see the error, or --resume to continue"
        )


# --------------------------------------------------------------------------------------------
# Run units: their folders and records, and the sweep that runs them
# --------------------------------------------------------------------------------------------

#: The file, in a unit's run folder, holding the unit and its record (unless the study reads
#: its record from its own files: ``Study.read_record``).
RECORD = "record.json"

_UNIT_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def unit_dir(out_dir: str | os.PathLike[str], unit: Mapping[str, Any]) -> Path:
    """The run folder of one unit of a study: ``OUT/runs/<key><value>/...`` in the unit's order.

    An int or float value is written after its key (``seed3``), a string after its key and a
    hyphen (``model-mlp``), except a ``method``, written alone (as in an experiment's
    ``runs/bs200/mdn/seed0``).

    Raises:
        ValueError: an empty unit, a value that is not an int, a float or a plain string
            (letters, digits, ``_.+-``).
    """
    if not unit:
        raise ValueError("expected a unit with at least one key, got {}")
    parts = []
    for key, value in unit.items():
        text = str(value)
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(
                f"expected the values of a unit to be ints, floats or strings, got {key}={value!r}"
            )
        if not _UNIT_VALUE.fullmatch(text) or not _UNIT_VALUE.fullmatch(str(key)):
            raise ValueError(
                f"expected unit keys and values of letters, digits and _.+- only, got "
                f"{key}={value!r}"
            )
        if key == "method":
            parts.append(text)
        elif isinstance(value, str):
            parts.append(f"{key}-{text}")
        else:
            parts.append(f"{key}{text}")
    return Path(out_dir) / "runs" / Path(*parts)


def _plain(x: Any) -> Any:
    """``x`` with numpy/torch scalars and tuples made JSON types; NaN kept (as JSON's ``NaN``)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return x


def _write_record(folder: Path, unit: dict[str, Any], record: dict[str, Any]) -> None:
    text = json.dumps({"unit": unit, "record": _plain(record)}, indent=1, allow_nan=True)
    _io.write_text(folder / RECORD, text + "\n")


def _read_record(folder: Path, unit: dict[str, Any]) -> dict[str, Any] | None:
    """The record of ``unit`` in its folder, or ``None`` when it has not finished."""
    try:
        data = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("unit") != unit:
        return None
    record = data.get("record")
    return record if isinstance(record, dict) else None


# the worker slot and progress flag of the task this process runs (``bar_options``)
_TASK: dict[str, Any] = {"position": 0, "disable": False}


def bar_options() -> dict[str, Any]:
    """``position`` and ``disable`` for the progress bar of the task this process runs.

    Tasks running at once in several workers (``jobs > 1``) get one line each; ``disable`` is
    ``True`` when the sweep runs without progress bars.
    """
    return dict(_TASK)


def _run_task(
    study: Study,
    settings: dict[str, Any],
    units: list[dict[str, Any]],
    folders: list[str],
    progress: bool,
    position: int,
) -> list[dict[str, Any]]:
    """Runs one task (a unit, or a group of units) into ``folders``; returns the records."""
    _TASK.update(position=position, disable=not progress)
    paths = [Path(f) for f in folders]
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
    if study.run_group is not None:
        records = study.run_group(dict(settings), [dict(u) for u in units], paths)
    else:
        assert study.run_unit is not None
        records = [study.run_unit(dict(settings), dict(units[0]), paths[0])]
    if not isinstance(records, list) or len(records) != len(units):
        raise TypeError(
            f"study {study.name!r}: expected a list of {len(units)} record(s) from a task, got "
            f"{type(records).__name__}"
        )
    for record in records:
        if not isinstance(record, dict):
            raise TypeError(
                f"study {study.name!r}: a unit's record must be a dict, got {type(record).__name__}"
            )
    return [_plain(r) for r in records]


def _tasks(study: Study, units: list[dict[str, Any]], todo: list[int]) -> list[list[int]]:
    """The units ``todo`` as tasks: one unit each, or the units of one ``study.group`` key."""
    if study.group is None:
        return [[i] for i in todo]
    groups: dict[Any, list[int]] = {}
    for i in todo:
        groups.setdefault(study.group(units[i]), []).append(i)
    return list(groups.values())


class _Units:
    """The units of one sweep in its folder ``work``: where they go and which are finished."""

    def __init__(
        self, study: Study, settings: dict[str, Any], units: list[dict[str, Any]], work: Path
    ) -> None:
        self.study, self.settings, self.units, self.work = study, settings, units, work

    def folder(self, i: int, root: Path | None = None) -> Path:
        return unit_dir(self.work if root is None else root, self.units[i])

    def read(self, i: int, root: Path | None = None, *, strict: bool = False) -> Any:
        """The record of unit ``i`` in ``root`` (default: ``work``), ``None`` if unfinished.

        A unit whose files changed (the study's ``read_record`` raises a ``ValueError``) raises
        when ``strict``; otherwise it counts as unfinished, with a warning naming the file.
        """
        folder = self.folder(i, root)
        if self.study.read_record is None:
            return _read_record(folder, self.units[i])
        try:
            return self.study.read_record(dict(self.settings), dict(self.units[i]), folder)
        except ValueError as exc:
            if strict:
                raise
            warnings.warn(f"{exc}: the unit runs again", stacklevel=4)
            return None

    def finished(self, *, strict: bool = False) -> dict[int, dict[str, Any]]:
        found = {i: self.read(i, strict=strict) for i in range(len(self.units))}
        return {i: r for i, r in found.items() if r is not None}

    def keep(self, i: int, record: dict[str, Any], root: Path | None = None) -> None:
        """Makes unit ``i`` finished in ``work``: its folder moved from ``root``, its record."""
        folder = self.folder(i)
        if root is not None:
            folder.parent.mkdir(parents=True, exist_ok=True)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(self.folder(i, root), folder)
        if self.study.read_record is None:
            _write_record(folder, self.units[i], record)


def run_units(
    study: Study,
    settings: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    resume: bool = False,
    jobs: int = 1,
    progress: bool = True,
    finish: Callable[[Path, list[dict[str, Any]]], None],
    interrupted: Callable[[Path, list[dict[str, Any]]], Any] | None = None,
) -> list[dict[str, Any]]:
    """Runs every unit of ``study`` into its run folder: the one sweep of every entry.

    The units' folders (``sweep.unit_dir``) are built in ``OUT.partial``, each unit's record kept
    there as soon as it finishes (``record.json``, or the study's own files with
    ``read_record``); ``OUT.partial/sweep.json`` records the study, its settings and its units.
    Once every unit is done, ``finish(folder, records)`` writes the result and the report into
    the folder, which then takes ``OUT``'s place (``OUT`` stays intact until then). ``OUT`` is
    locked meanwhile (``OUT.lock``); before anything runs, the folders are checked for
    writability and, with ``study.estimate_bytes``, free space.

    Args:
        study: a :class:`~metanorm_repro.experiments.Study` with run units.
        settings: every setting of the study.
        out_dir: the output folder.
        overwrite: replace an existing ``out_dir`` or discard an interrupted run.
        resume: continue the interrupted run of ``out_dir`` (same settings but ``threads``,
            ``jobs`` and ``progress``): finished units are not run again.
        jobs: processes running tasks (units, or groups of units) at the same time; spawned,
            so ``settings`` and the study must pickle (module-level functions do). Workers write
            in private folders under ``OUT.jobs``; only this process moves finished units into
            ``OUT.partial``.
        progress: show progress bars.
        finish: called with the folder and the records, in unit order.
        interrupted: called with the folder and the finished units' records on Ctrl-C or
            SIGTERM (e.g. to report them); what it returns is :attr:`SweepInterrupted.report`.

    Returns:
        The records, in unit order (as read back from their files).

    Raises:
        SweepInterrupted: on Ctrl-C or SIGTERM, once the workers are stopped; the finished units
            are kept in ``OUT.partial`` for ``resume``.
        FileExistsError: ``out_dir`` holds results and neither ``overwrite`` nor ``resume``.
        FileNotFoundError: ``resume`` without an interrupted run.
        ValueError: bad arguments, or ``resume`` with other settings.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"expected jobs to be a positive int, got {jobs!r}")
    if overwrite and resume:
        raise ValueError("pass overwrite or resume, not both")
    if study.units is None:
        raise ValueError(f"study {study.name!r} has no run units (it runs in one piece)")
    plain: dict[str, Any] = json.loads(json.dumps(_plain(dict(settings)), allow_nan=True))
    units = [dict(u) for u in study.units(plain)]
    if not units:
        raise ValueError(f"study {study.name!r} has no run unit at these settings")
    folders = [unit_dir("", u) for u in units]
    if len(set(folders)) != len(folders):
        raise ValueError(f"study {study.name!r}: two run units share a folder: {units}")
    out = Path(out_dir)
    manifest = {
        "study": study.name,
        "settings": plain,
        "units": json.loads(json.dumps(units)),
        "overwrite": overwrite,
        "complete": False,
    }
    lock = _io.FolderLock(out).acquire()
    try:
        scratch = _io.scratch_dir(out)
        if scratch.exists():  # left by a sweep that was killed (we hold the lock: none runs)
            shutil.rmtree(scratch)
        work = _prepare_folder(out, manifest, overwrite=overwrite, resume=resume)
        state = _Units(study, plain, manifest["units"], work)
        try:
            done = state.finished() if resume else {}
            todo = [i for i in range(len(units)) if i not in done]
            need = None
            if study.estimate_bytes is not None and todo:
                need = int(study.estimate_bytes(dict(plain), [state.units[i] for i in todo]))
            _preflight(out, work, need, len(todo))
            for i in todo:  # a unit that had not finished starts again from an empty folder
                if state.folder(i).exists():
                    shutil.rmtree(state.folder(i))
            with _stop_on_sigterm():
                _execute(state, _tasks(study, state.units, todo), len(done), jobs, progress, lock)
        except (KeyboardInterrupt, _Terminated) as exc:
            name = "SIGTERM" if isinstance(exc, _Terminated) else "SIGINT"
            completed = [r for _, r in sorted(state.finished().items())]
            made = None
            if interrupted is not None and completed:
                try:
                    made = interrupted(work, completed)
                except Exception as err:  # the interruption is what the caller must hear about
                    warnings.warn(f"the report of the completed runs failed: {err}", stacklevel=2)
            raise SweepInterrupted(work, completed, len(units), name, made) from None
        except BaseException:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                nothing = not state.finished()
            if nothing:  # nothing worth resuming (e.g. bad data): no trace
                shutil.rmtree(work, ignore_errors=True)
            raise
        records = state.finished(strict=True)  # a changed file is refused, named
        if len(records) != len(units):  # pragma: no cover - every unit finished or raised
            raise RuntimeError(f"run units without records in {work}")
        ordered = [records[i] for i in range(len(units))]
        finish(work, ordered)
        _io.write_json(work / MANIFEST, manifest | {"complete": True})
        _io.swap_in(work, out)
        return ordered
    finally:
        lock.release()


def _payload(name: str) -> tuple[Sequence[str], Sequence[Any]]:
    """What the workers need to find the registered entry ``name`` (nothing if unregistered)."""
    return worker_payload([name]) if name in list_entries() else ((), ())


def _execute(
    state: _Units,
    tasks: list[list[int]],
    done: int,
    jobs: int,
    progress: bool,
    lock: _io.FolderLock,
) -> None:
    """Runs the tasks, in this process or in ``jobs`` workers; keeps each finished unit.

    Only this process writes into ``work``: a worker runs in a private folder under
    ``OUT.jobs`` and returns its records. A study that runs groups shows a progress bar per
    group (its own); otherwise one bar counts the units.
    """
    study, settings, units, work = state.study, state.settings, state.units, state.work
    bar = tqdm(
        total=len(units),
        initial=done,
        desc=study.name,
        unit="unit",
        disable=not progress or study.group is not None,
        dynamic_ncols=True,
    )
    with bar:
        jobs = min(jobs, max(1, len(tasks)))
        if jobs == 1:
            for task in tasks:
                folders = [str(state.folder(i)) for i in task]
                records = _run_task(study, settings, [units[i] for i in task], folders, progress, 0)
                for i, record in zip(task, records, strict=True):
                    state.keep(i, record)
                bar.update(len(task))
            return
        scratch = _io.scratch_dir(work.with_name(work.name.removesuffix(".partial")))
        scratch.mkdir(parents=True, exist_ok=True)
        privates = [Path(tempfile.mkdtemp(prefix="task-", dir=scratch)) for _ in tasks]
        # "spawn" starts clean interpreters (no forked OpenMP state): they get the sources and
        # entries that registered the study; they ignore SIGINT (Ctrl-C reaches the whole
        # process group): this process stops them
        ctx = multiprocessing.get_context("spawn")
        pool = _start_pool(ctx, jobs, lock, _payload(study.name))
        pending: list[tuple[list[int], Path, Any]] = []
        started = _worker_pids(pool)
        try:
            for n, (task, private) in enumerate(zip(tasks, privates, strict=True)):
                folders = [str(state.folder(i, private)) for i in task]
                args = (study, settings, [units[i] for i in task], folders, progress, n % jobs)
                pending.append((task, private, pool.apply_async(_run_task, args)))
            left = list(pending)
            while left:
                for item in [x for x in left if x[2].ready()]:
                    task, private, result = item
                    for i, record in zip(task, result.get(), strict=True):  # a worker's error
                        state.keep(i, record, private)
                    shutil.rmtree(private, ignore_errors=True)
                    bar.update(len(task))
                    left.remove(item)
                if left:
                    left[0][2].wait(0.2)
                    _check_workers(pool, started)
        except BaseException:
            pool.terminate()
            pool.join()
            for task, private, result in pending:  # units that finished before the stop are kept
                with suppress(OSError):
                    if private.is_dir():
                        _keep_finished(state, task, private, result)
            shutil.rmtree(scratch, ignore_errors=True)
            # the traceback keeps this frame alive: drop the pool here, so that its locks are
            # released now (not left to the resource tracker's "leaked semaphore" warning)
            del pending, pool
            raise
        pool.close()
        pool.join()
        shutil.rmtree(scratch, ignore_errors=True)


def _keep_finished(state: _Units, task: list[int], private: Path, result: Any) -> None:
    """After a stop: keeps the units of ``task`` that finished in a worker's ``private`` folder.

    A task that returned has its records; otherwise a study with ``read_record`` may still
    have finished some of its units (their folders say so).
    """
    if result.ready() and result.successful():
        for i, record in zip(task, result.get(), strict=True):
            state.keep(i, record, private)
        return
    if state.study.read_record is None:
        return
    for i in task:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            record = state.read(i, private)
        if record is not None:
            state.keep(i, record, private)
