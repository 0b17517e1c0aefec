"""Every method × batch size × seed of an experiment: :func:`run_sweep`.

Runs go to ``OUT/runs/bs{B}/{method}/seed{S}/`` (see :mod:`metanorm_repro.experiments.runner`).
Within a seed and batch size the methods train in round robin, one epoch each in turn, on the same
data, so
their epoch times are measured side by side under the same load: on a shared machine compare the
ratios (the report's per-epoch paired ratio), not absolute times.

The sweep is built in ``OUT.partial`` beside ``OUT`` and takes ``OUT``'s place only once every run
(and the report, when one is asked for) is written, so an existing ``OUT`` stays intact and
readable until then, and a folder never mixes two sweeps. ``OUT.partial/sweep.json`` records what
the sweep is; an interrupted sweep continues with ``resume=True`` (completed runs are kept, runs
that had not finished start again). Ctrl-C or SIGTERM stops the worker processes and raises
:class:`SweepInterrupted`, after the report of the completed runs.

While it runs, the sweep holds a lock on ``OUT`` (``OUT.lock``, :class:`~metanorm_repro.experiments.
_io.FolderLock`): a second sweep on the same folder is refused. Worker processes (``jobs > 1``)
train in private folders under ``OUT.jobs`` and die with the main process; only the main process
moves finished runs into ``OUT.partial``. Before training, the folders are checked for
writability and free space (an estimate of what the sweep writes). Every run folder ends with a
manifest of its files' SHA-256 (:func:`~metanorm_repro.experiments.runner.verify_run`): a run whose
files changed is trained again on resume, and refused before the report. ``docs/reliability.md``
has the details.

:func:`run_units` is the same sweep for a study's run units
(:class:`~metanorm_repro.experiments.Study`): the same ``OUT.partial``, ``sweep.json``, lock,
swap into ``OUT``, ``--resume`` and Ctrl-C handling, with one folder per unit
(:func:`unit_dir`) holding the unit's ``record.json`` and any files it wrote.
"""

from __future__ import annotations

import ctypes
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
from metanorm_repro.experiments.registry import get_experiment, install_payload, worker_payload
from metanorm_repro.experiments.runner import (
    Run,
    RunCorrupted,
    check_run_dir,
    epoch_summary,
    load_result,
    prepare_run,
    verify_run,
)

__all__ = [
    "MANIFEST",
    "RECORD",
    "SweepInterrupted",
    "run_dir",
    "run_sweep",
    "run_units",
    "unit_dir",
]

#: The file, in a sweep's folder, that says which sweep it holds.
MANIFEST = "sweep.json"

# RunConfig fields that may differ between an interrupted sweep and its resumption
_RESUMABLE_DIFFERENCES = ("threads",)


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


def _manifest(
    base: RunConfig, methods: list[str], batch_sizes: list[int], seeds: list[int], overwrite: bool
) -> dict[str, Any]:
    config = base.to_dict()
    for k in ("method", "batch_size", "seed"):
        config.pop(k)
    return {
        "experiment": base.experiment,
        "config": config,
        "methods": methods,
        "batch_sizes": batch_sizes,
        "seeds": seeds,
        "overwrite": overwrite,
        "complete": False,
    }


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    import json

    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _differences(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    out = []
    for key in ("experiment", "methods", "batch_sizes", "seeds"):
        if found.get(key) != wanted[key]:
            out.append(f"{key} {found.get(key)!r} (asked: {wanted[key]!r})")
    f_cfg, w_cfg = dict(found.get("config") or {}), wanted["config"]
    for key in sorted(set(f_cfg) | set(w_cfg)):
        if key not in _RESUMABLE_DIFFERENCES and f_cfg.get(key) != w_cfg.get(key):
            out.append(f"{key} {f_cfg.get(key)!r} (asked: {w_cfg.get(key)!r})")
    return out


def _same_run(result: dict[str, Any], config: RunConfig) -> bool:
    found = dict(result["config"])
    wanted = config.to_dict()
    for key in _RESUMABLE_DIFFERENCES:
        found.pop(key, None)
        wanted.pop(key, None)
    return found == wanted


def _completed(
    work: Path, configs: list[RunConfig], *, strict: bool = False
) -> dict[int, dict[str, Any]]:
    """``{index in configs: result}`` of the runs of ``work`` that finished (``manifest.json``).

    A run whose files differ from its manifest raises :class:`RunCorrupted` when ``strict``;
    otherwise it counts as unfinished, with a warning naming the file.
    """
    done: dict[int, dict[str, Any]] = {}
    for i, c in enumerate(configs):
        try:
            result = load_result(run_dir(work, c.method, c.batch_size, c.seed))
        except RunCorrupted as exc:
            if strict:
                raise
            warnings.warn(f"{exc}: the run is trained again", stacklevel=3)
            continue
        if result is not None and _same_run(result, c):
            done[i] = result
    return done


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


def _preflight(out: Path, work: Path, todo: list[RunConfig]) -> None:
    """Checks, before training, that the sweep can write its runs and take ``out``'s place.

    Raises:
        OSError: naming the folder: ``work`` or ``out``'s parent takes no new file, a folder of
            ``out`` (replaced at the end) does not let its entries be deleted, or the free space
            is below the estimate of what the sweep writes (``ENOSPC``).
    """
    _io.check_writable(work)
    _io.check_writable(out.parent)
    if out.is_dir() and any(out.iterdir()):
        _io.check_deletable(out)
    if not todo:
        return
    per_method = _run_bytes(todo)
    need = sum(per_method[c.method] for c in todo) + _REPORT_BYTES
    free = shutil.disk_usage(work).free
    if need > free:
        mib = 1 << 20
        raise OSError(
            errno.ENOSPC,
            f"not enough free space: about {need / mib:.1f} MiB needed for {len(todo)} run(s), "
            f"{free / mib:.1f} MiB free",
            str(work),
        )


def _prepare_folder(
    out: Path,
    manifest: dict[str, Any],
    *,
    overwrite: bool,
    resume: bool,
    kind: str = "sweep",
    differences: Callable[[dict[str, Any], dict[str, Any]], list[str]] = _differences,
    check_out: Callable[[Path, bool], Any] = check_run_dir,
) -> Path:
    """Checks ``out`` and ``OUT.partial`` for a new or resumed ``kind``; returns ``OUT.partial``.

    ``differences(found, wanted)`` lists what a resumed manifest may not change;
    ``check_out(out, overwrite)`` refuses an ``out`` that holds something else.
    """
    work = _io.partial_dir(out)
    _io.recover_swap(out, lambda p: bool((_read_manifest(p) or {}).get("complete")))
    if resume:
        found = _read_manifest(work) if work.is_dir() else None
        if found is None:
            raise FileNotFoundError(
                f"nothing to resume: {work} holds no interrupted {kind} (the {kind} at {out} is "
                "complete, or never started); run without --resume"
            )
        diff = differences(found, manifest)
        if diff:
            raise ValueError(
                f"the interrupted {kind} in {work} differs from the one asked for: "
                f"{'; '.join(diff)}; resume with the same settings, or pass --overwrite to "
                "start again"
            )
        if out.is_dir() and any(out.iterdir()) and not found.get("overwrite"):
            raise FileExistsError(
                f"{out} already holds a run and the interrupted {kind} was not started with "
                "--overwrite; choose another --out"
            )
        manifest["overwrite"] = found.get("overwrite", False)
        return work
    if work.exists():
        if not overwrite:
            raise FileExistsError(
                f"{work} holds an interrupted {kind}: pass --resume to continue it, or "
                "--overwrite to start again"
            )
        shutil.rmtree(work)
    check_out(out, overwrite)
    work.mkdir(parents=True)
    _io.write_json(work / MANIFEST, manifest)
    return work


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
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"expected jobs to be a positive int, got {jobs!r}")
    if overwrite and resume:
        raise ValueError("pass overwrite or resume, not both")
    experiment.check_options(base.options)
    sizes, seed_list = [int(b) for b in batch_sizes], [int(s) for s in seeds]
    out = Path(out_dir)
    lock = _io.FolderLock(out).acquire()
    try:
        return _sweep(
            base, out, methods, sizes, seed_list, overwrite, resume, progress, jobs, report, lock
        )
    finally:
        lock.release()


def _sweep(
    base: RunConfig,
    out: Path,
    methods: list[str],
    sizes: list[int],
    seed_list: list[int],
    overwrite: bool,
    resume: bool,
    progress: bool,
    jobs: int,
    report: Callable[[Path, list[dict[str, Any]]], Any] | None,
    lock: _io.FolderLock,
) -> list[dict[str, Any]]:
    """:func:`run_sweep` once its arguments are checked and ``out`` is locked."""
    scratch = _io.scratch_dir(out)
    if scratch.exists():  # left by a sweep that was killed (we hold the lock: none runs)
        shutil.rmtree(scratch)
    work = _prepare_folder(
        out,
        _manifest(base, methods, sizes, seed_list, overwrite),
        overwrite=overwrite,
        resume=resume,
    )
    configs = [
        base.replace(method=m, batch_size=b, seed=s)
        for s in seed_list
        for b in sizes
        for m in methods
    ]
    try:
        done = _completed(work, configs) if resume else {}
        todo = [i for i in range(len(configs)) if i not in done]
        _preflight(out, work, [configs[i] for i in todo])
        for i in todo:  # a run that had not finished starts again from an empty folder
            c = configs[i]
            folder = run_dir(work, c.method, c.batch_size, c.seed)
            if folder.exists():
                shutil.rmtree(folder)
        groups: list[list[RunConfig]] = []
        for s in seed_list:
            for b in sizes:
                group = [
                    configs[i] for i in todo if (configs[i].seed, configs[i].batch_size) == (s, b)
                ]
                if group:
                    groups.append(group)
        with _stop_on_sigterm():
            _execute(groups, work, scratch, progress, min(jobs, max(1, len(groups))), lock)
    except (KeyboardInterrupt, _Terminated) as exc:
        name = "SIGTERM" if isinstance(exc, _Terminated) else "SIGINT"
        completed = [r for _, r in sorted(_completed(work, configs).items())]
        made = None
        if report is not None and completed:
            try:
                made = report(work, completed)
            except Exception as err:  # the interruption is what the caller must hear about
                warnings.warn(f"the report of the completed runs failed: {err}", stacklevel=2)
        raise SweepInterrupted(work, completed, len(configs), name, made) from None
    except BaseException:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nothing = not _completed(work, configs)
        if nothing:  # nothing worth resuming (e.g. bad data): no trace
            shutil.rmtree(work, ignore_errors=True)
        raise
    final = _completed(work, configs, strict=True)  # a changed file is refused, named
    missing = [configs[i] for i in range(len(configs)) if i not in final]
    if missing:  # pragma: no cover - every run either finished or raised
        raise RuntimeError(f"runs without results: {missing}")
    results = [final[i] for i in range(len(configs))]
    if report is not None:
        report(work, results)
    manifest = _read_manifest(work) or {}
    _io.write_json(work / MANIFEST, manifest | {"complete": True})
    _io.swap_in(work, out)
    prefix = str(work)
    for r in results:
        if r["out_dir"].startswith(prefix):
            r["out_dir"] = str(out) + r["out_dir"][len(prefix) :]
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


def _move_in(group: list[RunConfig], private: Path, work: Path) -> None:
    """Moves the complete runs of ``group`` from a worker's private folder into ``work``."""
    for c in group:
        src = run_dir(private, c.method, c.batch_size, c.seed)
        try:
            complete = verify_run(src)
        except RunCorrupted:
            complete = False
        if not complete:
            continue
        dst = run_dir(work, c.method, c.batch_size, c.seed)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(src, dst)


def _execute(
    groups: list[list[RunConfig]],
    work: Path,
    scratch: Path,
    progress: bool,
    jobs: int,
    lock: _io.FolderLock,
) -> None:
    """Runs the groups, in this process (``jobs == 1``) or in ``jobs`` worker processes.

    Workers train in private folders under ``scratch``; this process moves each finished run
    into ``work``, so nothing reaches ``work`` once this process is gone.
    """
    if jobs == 1:
        for group in groups:
            _run_group(group, str(work), progress, 0)
        return
    scratch.mkdir(parents=True, exist_ok=True)
    privates = [
        Path(tempfile.mkdtemp(prefix=f"bs{g[0].batch_size}-seed{g[0].seed}-", dir=scratch))
        for g in groups
    ]
    # one process per (seed, batch size) group; "spawn" starts clean interpreters (no forked
    # OpenMP state): they get the sources and entries that registered the sweep's experiment.
    # The workers ignore SIGINT (Ctrl-C reaches the whole process group): this process stops them.
    payload = worker_payload(sorted({c.experiment for g in groups for c in g}))
    ctx = multiprocessing.get_context("spawn")
    pool = _start_pool(ctx, jobs, lock, payload)
    pending: list[Any] = []
    started = _worker_pids(pool)
    try:
        pending = [
            (g, d, pool.apply_async(_run_group, (g, str(d), progress, i % jobs)))
            for i, (g, d) in enumerate(zip(groups, privates, strict=True))
        ]
        left = list(pending)
        while left:
            for item in [x for x in left if x[2].ready()]:
                g, d, p = item
                p.get()  # re-raises a worker's error
                _move_in(g, d, work)
                shutil.rmtree(d, ignore_errors=True)
                left.remove(item)
            if left:
                left[0][2].wait(0.2)
                _check_workers(pool, started)
    except BaseException:
        pool.terminate()
        pool.join()
        for g, d, _ in pending:  # runs that finished before the stop are kept
            with suppress(OSError):
                _move_in(g, d, work)
        shutil.rmtree(scratch, ignore_errors=True)
        # the traceback keeps this frame alive: drop the pool here, so that its locks are
        # released now (not left to the resource tracker's "leaked semaphore" warning at exit)
        del pending, pool
        raise
    pool.close()
    pool.join()
    shutil.rmtree(scratch, ignore_errors=True)


def _run_group(group: list[RunConfig], out_dir: str, progress: bool, position: int) -> None:
    """Trains the methods of one (seed, batch size) group in round robin, then finishes them."""
    runs = [Run(c, run_dir(out_dir, c.method, c.batch_size, c.seed)) for c in group]
    first = group[0]
    with tqdm(
        total=sum(c.epochs for c in group),
        desc=f"bs={first.batch_size} seed={first.seed}",
        unit="epoch",
        disable=not progress,
        dynamic_ncols=True,
        position=position,
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
    for r in runs:
        r.finish()


# --------------------------------------------------------------------------------------------
# The run units of a study
# --------------------------------------------------------------------------------------------

#: The file, in a study unit's run folder, holding the unit and its record.
RECORD = "record.json"

# study settings that may differ between an interrupted study and its resumption (they change
# neither a unit's record nor the summary's numbers)
_STUDY_RESUMABLE = ("threads", "progress", "jobs")

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


def _study_differences(found: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    out = []
    if found.get("study") != wanted["study"]:
        out.append(f"study {found.get('study')!r} (asked: {wanted['study']!r})")
    if found.get("units") != wanted["units"]:
        out.append("the run units")
    f_set, w_set = dict(found.get("settings") or {}), wanted["settings"]
    for key in sorted(set(f_set) | set(w_set)):
        if key not in _STUDY_RESUMABLE and f_set.get(key) != w_set.get(key):
            out.append(f"{key} {f_set.get(key)!r} (asked: {w_set.get(key)!r})")
    return out


def _run_unit(
    study: Any, settings: dict[str, Any], unit: dict[str, Any], folder: str
) -> dict[str, Any]:
    Path(folder).mkdir(parents=True, exist_ok=True)
    record = study.run_unit(dict(settings), dict(unit), Path(folder))
    if not isinstance(record, dict):
        raise TypeError(
            f"study {study.name!r}: run_unit must return a dict, got {type(record).__name__}"
        )
    return _plain(record)


def run_units(
    study: Any,
    settings: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    resume: bool = False,
    jobs: int = 1,
    progress: bool = True,
    finish: Callable[[Path, list[dict[str, Any]]], None],
) -> list[dict[str, Any]]:
    """Runs every unit of ``study`` into its run folder; the sweep of a study.

    The units' folders (:func:`unit_dir`) are built in ``OUT.partial``, each record written
    there as soon as its unit finishes; ``OUT.partial/sweep.json`` records the study, its
    settings and its units. Once every unit is done, ``finish(folder, records)`` writes the
    result and the report into the folder, which then takes ``OUT``'s place (``OUT`` stays
    intact until then). ``OUT`` is locked meanwhile.

    Args:
        study: a :class:`~metanorm_repro.experiments.Study` with run units.
        settings: every setting of the study.
        out_dir: the output folder.
        overwrite: replace an existing ``out_dir`` or discard an interrupted run.
        resume: continue the interrupted run of ``out_dir`` (same settings but ``threads``,
            ``jobs`` and ``progress``): finished units are not run again.
        jobs: processes running units at the same time (spawned, so ``settings`` and the
            study must pickle: module-level functions do).
        progress: show a progress bar.
        finish: called with the folder and the records, in unit order.

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
        work = _prepare_folder(
            out,
            manifest,
            overwrite=overwrite,
            resume=resume,
            kind="run",
            differences=_study_differences,
            check_out=_check_study_out,
        )
        units = manifest["units"]

        def finished() -> dict[int, dict[str, Any]]:
            found = {i: _read_record(unit_dir(work, u), u) for i, u in enumerate(units)}
            return {i: r for i, r in found.items() if r is not None}

        try:
            done = finished() if resume else {}
            todo = [i for i in range(len(units)) if i not in done]
            for i in todo:  # a unit that had not finished starts again from an empty folder
                if unit_dir(work, units[i]).exists():
                    shutil.rmtree(unit_dir(work, units[i]))
            with _stop_on_sigterm():
                _execute_units(study, plain, units, todo, work, jobs, progress, lock)
        except (KeyboardInterrupt, _Terminated) as exc:
            name = "SIGTERM" if isinstance(exc, _Terminated) else "SIGINT"
            completed = [r for _, r in sorted(finished().items())]
            raise SweepInterrupted(work, completed, len(units), name) from None
        except BaseException:
            if not finished():  # nothing worth resuming: no trace
                shutil.rmtree(work, ignore_errors=True)
            raise
        records = finished()
        if len(records) != len(units):  # pragma: no cover - every unit finished or raised
            raise RuntimeError(f"run units without records in {work}")
        ordered = [records[i] for i in range(len(units))]
        finish(work, ordered)
        _io.write_json(work / MANIFEST, manifest | {"complete": True})
        _io.swap_in(work, out)
        return ordered
    finally:
        lock.release()


def _check_study_out(out: Path, overwrite: bool) -> None:
    """Refuses an ``out`` that holds results unless ``overwrite``; checks it can be written."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(
            f"{out} already holds results; pass --overwrite to replace them (they stay "
            "intact until the new run is complete), or choose another --out"
        )
    _io.check_writable(out.parent)


def _execute_units(
    study: Any,
    settings: dict[str, Any],
    units: list[dict[str, Any]],
    todo: list[int],
    work: Path,
    jobs: int,
    progress: bool,
    lock: _io.FolderLock,
) -> None:
    """Runs the units ``todo``, in this process or in ``jobs`` workers; writes each record.

    Only this process writes into ``work``: a worker returns its record.
    """
    bar = tqdm(
        total=len(units),
        initial=len(units) - len(todo),
        desc=study.name,
        unit="unit",
        disable=not progress,
        dynamic_ncols=True,
    )
    with bar:
        jobs = min(jobs, max(1, len(todo)))
        if jobs == 1:
            for i in todo:
                folder = unit_dir(work, units[i])
                record = _run_unit(study, settings, units[i], str(folder))
                _write_record(folder, units[i], record)
                bar.update(1)
            return
        # workers write a unit's files in a private folder under OUT.jobs; this process moves it
        # into place with the record once the unit is done, so nothing reaches the run otherwise
        scratch = _io.scratch_dir(work.with_name(work.name.removesuffix(".partial")))
        if scratch.exists():  # left by a run that was killed (we hold the lock: none runs)
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True)
        privates = {i: Path(tempfile.mkdtemp(prefix="unit-", dir=scratch)) for i in todo}

        def move_in(i: int, record: dict[str, Any]) -> None:
            folder = unit_dir(work, units[i])
            folder.parent.mkdir(parents=True, exist_ok=True)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(privates[i], folder)
            _write_record(folder, units[i], record)

        ctx = multiprocessing.get_context("spawn")
        pool = _start_pool(ctx, jobs, lock, ((), ()))
        left: list[tuple[int, Any]] = []
        started = _worker_pids(pool)
        try:
            left = [
                (i, pool.apply_async(_run_unit, (study, settings, units[i], str(privates[i]))))
                for i in todo
            ]
            while left:
                for item in [x for x in left if x[1].ready()]:
                    i, p = item
                    move_in(i, p.get())
                    bar.update(1)
                    left.remove(item)
                if left:
                    left[0][1].wait(0.2)
                    _check_workers(pool, started)
        except BaseException:
            for i, p in left:  # units that finished before the stop are kept
                if p.ready() and p.successful():
                    with suppress(OSError):
                        move_in(i, p.get())
            pool.terminate()
            pool.join()
            shutil.rmtree(scratch, ignore_errors=True)
            del pool
            raise
        pool.close()
        pool.join()
        shutil.rmtree(scratch, ignore_errors=True)
