r"""Where MDN fails today: every method on the two stand-ins where MDN does not help.

On the project's own stand-ins MDN removes an additive shade but neither a multiplicative one
(``shaded-fashion-mnist`` with ``shade_mode=contrast``) nor the scanner style of
``two-site-digits``. This runner trains every alternative to MDN (``docs/alternatives.md``) and
every candidate fix (:mod:`metanorm_repro.models.interaction_norms`) on both, through the
experiments' own sweep (:func:`~metanorm_repro.experiments.run_sweep`: same data, seeds and
round-robin timing as
``metanorm reproduce``), and writes one report::

    metanorm reproduce failures --out runs/mdn-failures

``OUT/<study>/`` holds each study's sweep (its run folders and ``report.md``, as ``metanorm
reproduce`` writes them); ``OUT/results.json`` and ``OUT/report.md`` the comparison, written
atomically: per study and method, mean ± std over seeds of the reversed-test bAcc
(``test_reversed``), of the within-class dcor² between the penultimate features and the
confounder on the independent test set (bias-corrected, mean over the classes) and of the epoch
time; the paired differences from BatchNorm (same seed, same data) and whether the method
raises the reversed bAcc while lowering the dcor² (on average, and on every seed).
``docs/failures.md`` holds the measured study.

Examples::

    >>> STUDIES["contrast"].experiment, STUDIES["contrast"].options
    ('shaded-fashion-mnist', {'shade_mode': 'contrast'})
    >>> from metanorm_repro.experiments import get_study
    >>> get_study("failures").settings["methods"][0]
    'batchnorm'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metanorm_repro.experiments import _io
from metanorm_repro.experiments.config import RunConfig
from metanorm_repro.experiments.registry import get_experiment
from metanorm_repro.experiments.report import write_report
from metanorm_repro.experiments.runner import load_result
from metanorm_repro.experiments.sweep import run_dir, run_sweep, unit_dir
from metanorm_repro.models.methods import method_display_name as norm_display_name

__all__ = [
    "STUDIES",
    "Study",
    "failures_report",
    "failures_unit",
    "main",
    "rebuild_report",
    "run_failures",
    "standin_result",
    "standin_sweep",
    "summarize",
]


def _default_methods() -> list[str]:
    """The default run's methods of the ``failures`` study (its spec's ``settings``)."""
    from metanorm_repro.experiments.studies import builtin_study

    return list(builtin_study("failures").settings["methods"])


def __getattr__(name: str) -> Any:
    # METHODS was the failures study's method list, now in its spec
    if name != "METHODS":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        "metanorm_repro.experiments.failures.METHODS is deprecated: the methods of the "
        "failures study are get_study('failures').settings['methods'] (the default run's) and "
        ".methods (accepted)",
        DeprecationWarning,
        stacklevel=2,
    )
    return tuple(_default_methods())


#: The split whose bAcc is the headline (the confounder's association with the label reversed).
REVERSED = "test_reversed"


@dataclass(frozen=True)
class Study:
    """One stand-in of the study: a registered experiment and its settings.

    Attributes:
        experiment: the registered experiment's name.
        title: the study's name in the report.
        batch_size: training batch size.
        epochs: training epochs.
        n_per_class: training samples per class (used by the shaded experiments only).
        n_eval_per_class: validation and test samples per class (shaded experiments only;
            ``None``: the experiment's).
        lr: Adam's learning rate.
        options: the experiment's run options (``RunConfig.options``).
    """

    experiment: str
    title: str
    batch_size: int
    epochs: int
    n_per_class: int = 1000
    n_eval_per_class: int | None = None
    lr: float = 1e-3
    options: dict[str, Any] = field(default_factory=dict)


#: The two stand-ins, by name (``--studies``).
STUDIES: dict[str, Study] = {
    "contrast": Study(
        "shaded-fashion-mnist",
        "Multiplicative shade: shaded-fashion-mnist, shade_mode=contrast",
        batch_size=128,
        epochs=8,
        n_per_class=500,
        n_eval_per_class=250,
        options={"shade_mode": "contrast"},
    ),
    "two-site": Study(
        "two-site-digits",
        "Scanner style: two-site-digits",
        batch_size=32,
        epochs=30,
    ),
}


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its finished children (the workers)."""
    import resource

    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return float(own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)), float(np.nanstd(arr, ddof=1)) if len(arr) > 1 else 0.0


def _class_mean(per_class: dict[str, Any]) -> float:
    vals = [float(v) for v in per_class.values() if v is not None and v == v]
    return float(np.mean(vals)) if vals else float("nan")


def _per_run(final: dict[str, Any]) -> dict[str, float]:
    splits = final["eval_splits"]
    reversed_split = splits.get(REVERSED, splits[next(iter(splits))])
    return {
        "reversed_bacc": float(reversed_split["balanced_accuracy"]),
        "test_bacc": float(final["test_balanced_accuracy"]),
        "dcor2": _class_mean(final["test_dcor2"]),
        "epoch_time_s": float(final["epoch_time_s_median"]),
    }


def summarize(
    results: Sequence[dict[str, Any]], baseline: str = "batchnorm"
) -> list[dict[str, Any]]:
    """One row per method of one study's sweep results, with the paired differences.

    Args:
        results: :func:`~metanorm_repro.experiments.run_sweep`'s results (one batch size).
        baseline: the method the differences are taken from. Default: ``"batchnorm"``.

    Returns:
        Rows in run order: ``method``, ``display``, ``seeds``, and for each metric ``m`` of
        ``reversed_bacc``, ``test_bacc``, ``dcor2`` (the test set's within-class dcor², mean over
        the classes) and ``epoch_time_s``: ``m`` and ``m_std`` over seeds; for ``reversed_bacc``
        and ``dcor2`` also ``d_m`` and ``d_m_std`` (the method minus the baseline, same seed)
        and ``m_seeds_better`` (seeds on which the difference has the wanted sign: bAcc up,
        dcor² down); ``raises_bacc``, ``lowers_dcor2`` (the mean differences' signs) and
        ``both`` (both, on average), ``both_seeds`` (the seeds on which both hold) and
        ``both_every_seed``.
    """
    runs: dict[str, dict[int, dict[str, float]]] = {}
    for r in results:
        f = r["final"]
        runs.setdefault(f["method"], {})[int(f["seed"])] = _per_run(f)
    base = runs.get(baseline, {})
    rows: list[dict[str, Any]] = []
    for method, by_seed in runs.items():
        row: dict[str, Any] = {
            "method": method,
            "display": norm_display_name(method),
            "seeds": len(by_seed),
        }
        for key in ("reversed_bacc", "test_bacc", "dcor2", "epoch_time_s"):
            row[key], row[f"{key}_std"] = _mean_std([v[key] for v in by_seed.values()])
        both_seeds = [
            s
            for s, v in by_seed.items()
            if s in base
            and v["reversed_bacc"] > base[s]["reversed_bacc"]
            and v["dcor2"] < base[s]["dcor2"]
        ]
        row["both_seeds"] = len(both_seeds)
        for key, sign in (("reversed_bacc", 1.0), ("dcor2", -1.0)):
            diffs = [v[key] - base[s][key] for s, v in by_seed.items() if s in base]
            if diffs:
                row[f"d_{key}"], row[f"d_{key}_std"] = _mean_std(diffs)
                row[f"{key}_seeds_better"] = int(sum(sign * d > 0 for d in diffs))
            else:
                row[f"d_{key}"] = row[f"d_{key}_std"] = float("nan")
                row[f"{key}_seeds_better"] = 0
        row["raises_bacc"] = bool(row["d_reversed_bacc"] > 0)
        row["lowers_dcor2"] = bool(row["d_dcor2"] < 0)
        row["both"] = bool(row["raises_bacc"] and row["lowers_dcor2"] and method != baseline)
        row["both_every_seed"] = bool(row["both"] and row["both_seeds"] == len(by_seed))
        rows.append(row)
    return rows


def _fmt(mean: float, std: float, seeds: int, digits: int = 3, signed: bool = False) -> str:
    if mean != mean:
        return "n/a"
    m = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return f"{m} ± {std:.{digits}f}" if seeds > 1 else m


def _table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        "| method | reversed bAcc | Δ vs BatchNorm | test bAcc | within-class dcor² | "
        "Δ vs BatchNorm | epoch time (s) | bAcc ↑ and dcor² ↓ |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        n = r["seeds"]
        if r["method"] == "batchnorm":
            verdict, d_b, d_d = "(baseline)", "—", "—"
        else:
            verdict = (
                f"**yes** ({r['both_seeds']}/{n})"
                if r["both_every_seed"]
                else f"on average ({r['both_seeds']}/{n})"
                if r["both"]
                else f"no ({r['both_seeds']}/{n})"
            )
            d_b = (
                _fmt(r["d_reversed_bacc"], r["d_reversed_bacc_std"], n, signed=True)
                + f" ({r['reversed_bacc_seeds_better']}/{n})"
            )
            d_d = (
                _fmt(r["d_dcor2"], r["d_dcor2_std"], n, signed=True)
                + f" ({r['dcor2_seeds_better']}/{n})"
            )
        lines.append(
            f"| {r['display']} | {_fmt(r['reversed_bacc'], r['reversed_bacc_std'], n)} | {d_b} | "
            f"{_fmt(r['test_bacc'], r['test_bacc_std'], n)} | "
            f"{_fmt(r['dcor2'], r['dcor2_std'], n)} | {d_d} | "
            f"{_fmt(r['epoch_time_s'], r['epoch_time_s_std'], n, digits=2)} | {verdict} |"
        )
    return "\n".join(lines)


def failures_report(result: dict[str, Any]) -> str:
    """The markdown report of :func:`~metanorm_repro.experiments.failures.run_failures`'s result."""
    machine = f"{result['cpus']} CPUs, {result['threads']} thread(s) per process"
    if "load_start" in result:  # run_failures measures the machine's load and CPU time
        machine = (
            f"load average at the start / end: {result['load_start']:.1f} / "
            f"{result['load_end']:.1f} on {result['cpus']} CPUs; {result['jobs']} process(es) × "
            f"{result['threads']} thread(s); CPU time "
            f"{result.get('cpu_time_s', float('nan')) / 60:.1f} min (what an idle machine's "
            f"{result['cpus']} cores would share)"
        )
    wall = result.get("wall_time_s")
    out = [
        "# Where MDN fails today: every method on the multiplicative stand-ins",
        "",
        f"Command: `{result['command']}`  ",
        (f"Wall time: {wall / 60:.1f} min; " if wall is not None else "") + machine + ".",
        "",
        "reversed bAcc: balanced accuracy on `test_reversed` (the confounder's association with "
        "the label reversed, or only the rare (class, site) cells). within-class dcor²: "
        "bias-corrected dcor² between the penultimate features and the confounder on the "
        "independent test set, per class, mean over the classes. Δ: the method minus BatchNorm "
        "on the same seed (same data), mean ± std over seeds, (k/n): the seeds on which it has "
        "the wanted sign. Last column: does the method raise the reversed bAcc AND lower the "
        "dcor²: **yes** when both hold on every seed, *on average* when the mean differences "
        "have the right signs but some seed disagrees (k/n: the seeds on which both hold).",
    ]
    for study in result["studies"].values():
        s = study["settings"]
        out += [
            "",
            f"## {study['title']}",
            "",
            f"`{s['experiment']}`, batch {s['batch_size']}, {s['epochs']} epochs, lr {s['lr']}, "
            f"seeds {', '.join(map(str, s['seeds']))}"
            + (f", n_per_class {s['n_per_class']}" if s["experiment"].startswith("shaded") else "")
            + (f", options {s['options']}" if s["options"] else "")
            + f"; training {study['train_time_s'] / 60:.1f} min (all runs).",
            "",
            _table(study["rows"]),
        ]
        every = [r["display"] for r in study["rows"] if r["both_every_seed"]]
        mean = [r["display"] for r in study["rows"] if r["both"] and not r["both_every_seed"]]
        out += [
            "",
            "Raise the reversed bAcc while lowering the within-class dcor² vs BatchNorm, on "
            "every seed: "
            + (", ".join(every) if every else "**none**")
            + "; on average only: "
            + (", ".join(mean) if mean else "none")
            + ".",
        ]
    return "\n".join(out) + "\n"


def standin_sweep(
    name: str,
    *,
    methods: Sequence[str],
    seeds: Sequence[int],
    epochs: int | None = None,
    n_per_class: int | None = None,
    n_eval_per_class: int | None = None,
    threads: int = 1,
) -> tuple[RunConfig, dict[str, Any]]:
    """The sweep of one stand-in: its shared run configuration and the settings it reports.

    Returns:
        ``(base, settings)``: the :class:`~metanorm_repro.experiments.RunConfig` of the
        stand-in's runs (its ``method`` and ``seed`` replaced per run), and ``{"experiment",
        "batch_size", "epochs", "lr", "n_per_class", "options", "seeds", "methods"}`` for the
        report.
    """
    study = STUDIES[name]
    options = dict(study.options)
    n_eval = study.n_eval_per_class if n_eval_per_class is None else n_eval_per_class
    if n_eval is not None and study.experiment.startswith("shaded"):
        options["n_eval_per_class"] = int(n_eval)
    base = RunConfig(
        experiment=study.experiment,
        batch_size=study.batch_size,
        epochs=int(epochs or study.epochs),
        lr=study.lr,
        n_per_class=int(n_per_class or study.n_per_class),
        threads=threads,
        seed=seeds[0],
        options=options,
    )
    settings = {
        "experiment": study.experiment,
        "batch_size": study.batch_size,
        "epochs": base.epochs,
        "lr": base.lr,
        "n_per_class": base.n_per_class,
        "options": options,
        "seeds": list(seeds),
        "methods": list(methods),
    }
    return base, settings


def standin_result(name: str, settings: dict[str, Any], results: Sequence[dict[str, Any]]) -> dict:
    """One stand-in's entry of the result: title, settings, training time, rows."""
    return {
        "title": STUDIES[name].title,
        "settings": settings,
        "train_time_s": float(sum(r["final"]["train_time_s"] for r in results)),
        "rows": summarize(results),
    }


def failures_unit(
    name: str,
    out: str | os.PathLike[str],
    *,
    methods: Sequence[str],
    seeds: Sequence[int],
    epochs: int | None = None,
    n_per_class: int | None = None,
    n_eval_per_class: int | None = None,
    jobs: int = 1,
    threads: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Runs one stand-in of :func:`run_failures`: every method, every seed.

    The stand-in's sweep (runs, report, summary) goes to ``out``
    (:func:`~metanorm_repro.experiments.run_sweep`).

    Returns:
        ``{"title", "settings", "train_time_s", "rows", "wall_time_s"}``, the stand-in's entry
        of :func:`run_failures`'s ``"studies"``.
    """
    base, settings = standin_sweep(
        name,
        methods=methods,
        seeds=seeds,
        epochs=epochs,
        n_per_class=n_per_class,
        n_eval_per_class=n_eval_per_class,
        threads=threads,
    )
    t0 = time.perf_counter()
    experiment = get_experiment(base.experiment)

    def report(work: Path, results: list[dict[str, Any]]) -> Any:
        return write_report(
            work,
            experiment,
            results,
            command=command,
            settings=settings,
            wall_time_s=time.perf_counter() - t0,
            plots=False,
        )

    results = run_sweep(
        base,
        out,
        methods=methods,
        batch_sizes=[base.batch_size],
        seeds=list(seeds),
        overwrite=overwrite,
        progress=progress,
        jobs=min(jobs, len(seeds)),
        report=report,
    )
    return {
        **standin_result(name, settings, results),
        "wall_time_s": time.perf_counter() - t0,
    }


def run_failures(
    out: str | os.PathLike[str],
    *,
    studies: Sequence[str] = tuple(STUDIES),
    methods: Sequence[str] | None = None,
    seeds: int = 3,
    seed: int = 0,
    epochs: int | None = None,
    n_per_class: int | None = None,
    n_eval_per_class: int | None = None,
    jobs: int = 1,
    threads: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Runs every method on the studies and writes ``OUT/results.json`` and ``OUT/report.md``.

    Args:
        out: the output folder (each study's sweep in ``OUT/<study>/``).
        studies: names of :data:`STUDIES`. Default: both.
        methods: registered methods accepted by the real-data experiments; ``"batchnorm"`` (the
            baseline of the differences) is added first when missing. Default: the ``failures``
            study's (``get_study("failures").settings["methods"]``).
        seeds: seeds ``seed, seed + 1, ...``. Default: 3.
        seed: the first seed. Default: 0.
        epochs: override every study's epochs. Default: the study's.
        n_per_class: override the training size of the shaded study. Default: the study's.
        n_eval_per_class: validation and test size per class of the shaded study. Default: the
            study's.
        jobs: processes of each sweep (its seeds are shared out among them). Default: 1.
        threads: torch threads per process. Default: 1.
        overwrite: replace earlier results in ``out``. Default: ``False``.
        progress: progress bars. Default: ``True``.
        command: the command line, for the report.

    Returns:
        ``{"command", "wall_time_s", "cpu_time_s", "load_start", "load_end", "cpus", "jobs",
        "threads", "studies": {name: {"title", "settings", "train_time_s", "rows",
        "wall_time_s"}}}``; ``rows`` are
        :func:`~metanorm_repro.experiments.failures.summarize`'s.

    Raises:
        ValueError: an unknown study, a bad seed count, or a method the experiments lack.
    """
    unknown = [s for s in studies if s not in STUDIES]
    if unknown or not studies:
        raise ValueError(f"expected studies among {list(STUDIES)}, got {list(studies)}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"expected seeds to be a positive int, got {seeds!r}")
    if methods is None:
        methods = _default_methods()
    methods = ["batchnorm", *[m for m in methods if m != "batchnorm"]]
    folder = Path(out)
    if not overwrite and (folder / "results.json").exists():
        raise FileExistsError(f"{folder} already holds a study; choose another out or overwrite")
    load_start = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    result: dict[str, Any] = {
        "command": command,
        "cpus": os.cpu_count(),
        "jobs": jobs,
        "threads": threads,
        "platform": platform.platform(),
        "load_start": load_start,
        "studies": {},
    }
    seed_list = list(range(seed, seed + seeds))
    for name in studies:
        result["studies"][name] = failures_unit(
            name,
            folder / name,
            methods=methods,
            seeds=seed_list,
            epochs=epochs,
            n_per_class=n_per_class,
            n_eval_per_class=n_eval_per_class,
            jobs=jobs,
            threads=threads,
            overwrite=overwrite,
            progress=progress,
            command=command,
        )
    result["wall_time_s"] = time.perf_counter() - start
    result["cpu_time_s"] = _cpu_seconds() - cpu_start
    result["load_end"] = os.getloadavg()[0]
    _io.write_json(folder / "results.json", result)
    _io.write_text(folder / "report.md", failures_report(result))
    return result


def rebuild_report(out: str | os.PathLike[str]) -> dict[str, Any]:
    """Recomputes the rows of a finished study from its run folders and rewrites the report.

    Args:
        out: the folder of a :func:`run_failures` run or of ``metanorm reproduce failures`` (its
            ``results.json`` and sweeps).

    Returns:
        The result, as :func:`run_failures` returns it, with fresh rows.
    """
    folder = Path(out)
    result: dict[str, Any] = json.loads((folder / "results.json").read_text())
    for name, study in result["studies"].items():
        s = study["settings"]
        results = []
        for method in s["methods"]:
            for seed in s["seeds"]:
                # metanorm reproduce: OUT/runs/standin-NAME/bs{B}/{method}/seed{S}; run_failures:
                # the stand-in's own sweep in OUT/NAME
                unit = {"standin": name, "bs": s["batch_size"], "method": method, "seed": seed}
                path = unit_dir(folder, unit)
                if not path.is_dir():
                    path = run_dir(folder / name, method, s["batch_size"], seed)
                r = load_result(path)
                if r is None:
                    raise FileNotFoundError(f"no complete run for {method}, seed {seed} in {name}")
                results.append(r)
        study["rows"] = summarize(results)
    _io.write_json(folder / "results.json", result)
    _io.write_text(folder / "report.md", failures_report(result))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m metanorm_repro.experiments.failures``: runs the study, prints the report."""
    p = argparse.ArgumentParser(
        prog="python -m metanorm_repro.experiments.failures",
        description="Every method (MDN, the candidate fixes, the alternatives) on the stand-ins "
        "where MDN fails: shaded-fashion-mnist with a contrast shade, and two-site digits. "
        "Writes OUT/report.md and OUT/results.json, and each study's sweep in OUT/<study>/.",
    )
    p.add_argument("--out", default="runs/mdn-failures", help="output folder")
    p.add_argument("--studies", nargs="+", default=list(STUDIES), choices=list(STUDIES))
    p.add_argument("--methods", nargs="+", default=_default_methods(), metavar="M")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default: 0)")
    p.add_argument("--epochs", type=int, help="override every study's epochs")
    p.add_argument("--n-per-class", type=int, help="training size per class (shaded study)")
    p.add_argument("--n-eval-per-class", type=int, help="val/test size per class (shaded study)")
    p.add_argument(
        "--jobs",
        type=int,
        default=3,
        help="processes per study, one per seed (default: 3: on 2 cores, 3 single-thread "
        "processes finish 3 seeds sooner than 2, which leave the third seed alone at the end)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="recompute the report of the finished study in --out from its run folders",
    )
    args = p.parse_args(argv)
    if args.report_only:
        print(failures_report(rebuild_report(args.out)))
        return 0
    import shlex
    import sys

    print(
        "note: this runner is deprecated; run 'metanorm reproduce failures' (the same study "
        "and numbers, written atomically; --option 'studies=[...]' picks the stand-ins)",
        file=sys.stderr,
    )
    shown = sys.argv[1:] if argv is None else list(argv)
    command = "python -m metanorm_repro.experiments.failures " + " ".join(map(shlex.quote, shown))
    result = run_failures(
        args.out,
        studies=args.studies,
        methods=args.methods,
        seeds=args.seeds,
        seed=args.seed,
        epochs=args.epochs,
        n_per_class=args.n_per_class,
        n_eval_per_class=args.n_eval_per_class,
        jobs=args.jobs,
        threads=args.threads,
        overwrite=args.overwrite,
        progress=not args.quiet,
        command=command.strip(),
    )
    print(failures_report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
