"""The report of a run of ``metanorm reproduce``, one format for every entry.

Every output folder holds ``runs/`` (one folder per run unit), ``results.json`` (the results,
unrounded), ``report.md`` (a title, the entry's tables, then the same ``## Files`` section:
:func:`files_section`) and ``run.json`` (the entry, the command line, the settings and the wall
time: :func:`write_run_record`), plus the entry's plots. For an experiment's sweep,
:func:`summarize` turns run results into one row per (batch size, method), averaged over seeds,
and :func:`write_report` writes the report with the authors' figures, the PASS/FAIL checks,
``summary.csv`` (the table) and the PNG plots (:mod:`metanorm_repro.experiments.plots`; skipped
with a note when matplotlib is missing).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metanorm_repro.experiments import _io
from metanorm_repro.experiments.registry import Check, Experiment, Study
from metanorm_repro.models.methods import method_display_name

__all__ = [
    "files_section",
    "group_table",
    "results_table",
    "study_report",
    "summarize",
    "summarize_sweep",
    "sweep_report",
    "write_report",
    "write_run_record",
]

#: The file of an output folder that records the run: the entry, command, settings, wall time.
RUN_RECORD = "run.json"


def files_section(runs: str, plots: Sequence[str] = (), more: Sequence[str] = ()) -> list[str]:
    """The last section of every report: the run folders, the result files and the plots.

    Args:
        runs: what ``runs/`` holds (markdown, one line).
        plots: the file names of the plots.
        more: further lines about files of this entry (markdown).
    """
    lines = [
        "## Files",
        "",
        f"- {runs}",
        "- `results.json`: the results, unrounded; `run.json`: the command, the settings and "
        "the wall time",
    ]
    lines += [f"- {line}" for line in more]
    lines += [f"- `{name}`" for name in plots]
    return lines


def write_run_record(
    folder: str | os.PathLike[str],
    name: str,
    *,
    command: str,
    settings: dict[str, Any],
    wall_time_s: float | None,
) -> Path:
    """Writes ``run.json``: the entry's ``name``, the command line, the settings, the wall time."""
    return _io.write_json(
        Path(folder) / RUN_RECORD,
        {"name": name, "command": command, "settings": settings, "wall_time_s": wall_time_s},
    )


def _mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    # None: a metric undefined for a run (JSON null, e.g. dcor² where the metadata are constant
    # within a class); it makes the mean NaN, shown as "n/a"
    arr = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarize(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (batch size, method), mean and std over seeds.

    Row keys: ``method``, ``batch_size``, ``seeds``, ``test_bacc`` (+ ``_std``), ``val_bacc``
    (+ ``_std``; the last epoch's), ``val_dcor2_<class>`` (+ ``_std``; the last epoch's),
    ``test_dcor2_<class>`` (+ ``_std``), ``test_mean_dcor2`` (+ ``_std``: per run the mean
    over the classes of the test dcor², then the mean and std over seeds; what the plot of bAcc
    against dcor² shows), ``test_recall_<class>``, ``test_group_accuracy_<group>``; for every
    further test split ``<split>`` (e.g. ``test_reversed``): ``<split>_bacc`` (+ ``_std``),
    ``<split>_dcor2_<class>`` (+ ``_std``), ``<split>_group_accuracy_<group>``;
    ``epoch_time_s`` (the median epoch time of a run, averaged over seeds) and ``time_ratio``
    (the median over epochs of the method's epoch time over the baseline's same epoch, at the same
    batch size and seed, averaged over seeds; the baseline is ``none`` when it ran, else
    ``batchnorm``; ``None`` without a baseline).
    """
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in results:
        f = r["final"]
        groups.setdefault((int(f["batch_size"]), f["method"]), []).append(f)
    rows: list[dict[str, Any]] = []
    for (bs, method), finals in groups.items():
        row: dict[str, Any] = {"method": method, "batch_size": bs, "seeds": len(finals)}
        row["test_bacc"], row["test_bacc_std"] = _mean_std(
            [f["test_balanced_accuracy"] for f in finals]
        )
        row["val_bacc"], row["val_bacc_std"] = _mean_std(
            [f.get("val_balanced_accuracy") for f in finals]
        )
        for key, src in (("val_dcor2", "val_dcor2"), ("test_dcor2", "test_dcor2")):
            for c in finals[0][src]:
                row[f"{key}_{c}"], row[f"{key}_{c}_std"] = _mean_std([f[src][c] for f in finals])
        row["test_mean_dcor2"], row["test_mean_dcor2_std"] = _mean_std(
            [_class_mean(f["test_dcor2"]) for f in finals]
        )
        for c in finals[0]["test_recall"]:
            row[f"test_recall_{c}"] = _mean_std([f["test_recall"][c] for f in finals])[0]
        for g in finals[0].get("test_group_accuracy", {}):
            row[f"test_group_accuracy_{g}"] = _mean_std(
                [f["test_group_accuracy"][g] for f in finals]
            )[0]
        for split in _extra_splits(finals[0]):
            evs = [f["eval_splits"][split] for f in finals]
            row[f"{split}_bacc"], row[f"{split}_bacc_std"] = _mean_std(
                [e["balanced_accuracy"] for e in evs]
            )
            for c in evs[0]["dcor2"]:
                row[f"{split}_dcor2_{c}"], row[f"{split}_dcor2_{c}_std"] = _mean_std(
                    [e["dcor2"][c] for e in evs]
                )
            for g in evs[0].get("group_accuracy", {}):
                row[f"{split}_group_accuracy_{g}"] = _mean_std(
                    [e["group_accuracy"][g] for e in evs]
                )[0]
        row["epoch_time_s"] = _mean_std([f["epoch_time_s_median"] for f in finals])[0]
        rows.append(row)
    # epoch-time ratio to the baseline: per seed, the median over epochs of the paired ratio
    # (epoch e of the method over epoch e of the baseline, trained side by side), then the mean
    times: dict[tuple[int, int, str], list[float]] = {}
    for r in results:
        f = r["final"]
        hist = r.get("history") or []
        times[(int(f["batch_size"]), int(f["seed"]), f["method"])] = [
            float(h["epoch_time_s"]) for h in hist
        ] or [float(f["epoch_time_s_median"])]
    # the baseline: "none" (synthetic), else BatchNorm (the usual model of the real-data ones)
    baseline = "none" if any(k[2] == "none" for k in times) else "batchnorm"
    for row in rows:
        ratios = []
        for (bs, seed, method), t in times.items():
            base = times.get((bs, seed, baseline))
            if method == row["method"] and bs == row["batch_size"] and base:
                n = min(len(t), len(base))
                ratios.append(float(np.median(np.asarray(t[:n]) / np.asarray(base[:n]))))
        row["time_ratio"] = float(np.mean(ratios)) if ratios else None
    return rows


def _class_mean(per_class: dict[str, float | None]) -> float:
    """The mean over the classes of a per-class metric, skipping undefined (None/NaN) ones."""
    vals = [v for v in per_class.values() if v is not None and v == v]
    return float(np.mean(vals)) if vals else float("nan")


def _extra_splits(final: dict[str, Any]) -> list[str]:
    """Names of the test splits after the first (``final["eval_splits"]`` is in split order)."""
    return list(final.get("eval_splits", {}))[1:]


def _splits_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [k[: -len("_bacc")] for k in rows[0] if k.endswith("_bacc") and k != "val_bacc"][1:]


def _num(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or v != v else f"{v:.{digits}f}"


def _fmt(mean: float, std: float, seeds: int, digits: int = 3) -> str:
    if mean != mean:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def _classes(rows: Sequence[dict[str, Any]], prefix: str) -> list[str]:
    return [k[len(prefix) :] for k in rows[0] if k.startswith(prefix) and not k.endswith("_std")]


def results_table(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown table of :func:`summarize` rows."""
    classes = _classes(rows, "val_dcor2_")
    extra = _splits_of(rows)
    cs = " / ".join(classes)
    head = ["method", "batch", "val bAcc", "test bAcc"] + [f"{s} bAcc" for s in extra]
    head += [f"val dcor² class {c}" for c in classes] + [f"test dcor² {cs}"]
    head += [f"{s} dcor² {cs}" for s in extra] + ["epoch time (s)", "× Baseline time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        n = r["seeds"]
        cells = [
            method_display_name(r["method"]),
            str(r["batch_size"]),
            _fmt(r["val_bacc"], r["val_bacc_std"], n),
            _fmt(r["test_bacc"], r["test_bacc_std"], n),
        ]
        cells += [_fmt(r[f"{s}_bacc"], r[f"{s}_bacc_std"], n) for s in extra]
        cells += [_fmt(r[f"val_dcor2_{c}"], r[f"val_dcor2_{c}_std"], n) for c in classes]
        cells.append(" / ".join(_num(r.get(f"test_dcor2_{c}")) for c in classes))
        for s in extra:
            cells.append(" / ".join(_num(r.get(f"{s}_dcor2_{c}")) for c in classes))
        cells.append(f"{r['epoch_time_s']:.2f}")
        cells.append("—" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def interval_table(finals: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the 95 % test intervals of the first seed's runs.

    Args:
        finals: the result's ``"intervals"`` (:func:`summarize_sweep`): per run of the first
            seed, its method, batch size, seed, test bAcc and dCor² and their intervals.
    """
    if not finals:
        return ""
    first = int(finals[0]["seed"])
    classes = list(finals[0]["test_intervals"]["dcor2"])
    head = [
        "method",
        "batch",
        "test bAcc [95 %]",
        *[f"test dcor² class {c} [95 %]" for c in classes],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(value: float | None, iv: list[float] | None) -> str:
        if iv is None or value is None or value != value:
            return "n/a"
        return f"{value:.3f} [{iv[0]:.3f}, {iv[1]:.3f}]"

    for f in finals:
        iv = f["test_intervals"]
        cells = [method_display_name(f["method"]), str(f["batch_size"])]
        cells.append(cell(f["test_balanced_accuracy"], iv["balanced_accuracy"]))
        cells += [cell(f["test_dcor2"].get(c), iv["dcor2"].get(c)) for c in classes]
        lines.append("| " + " | ".join(cells) + " |")
    res = finals[0]["test_intervals"]["resamples"]
    lines += [
        "",
        f"Seed {first}'s runs. bAcc: percentile bootstrap, {res['balanced_accuracy']} resamples "
        f"within classes; dcor²: subsampling, {res['dcor2']} half-samples without repeats (a "
        "bootstrap's repeated rows bias distance statistics); resampling seed 0.",
    ]
    return "\n".join(lines)


def timing_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per method with a paired epoch-time ratio: information, never a PASS/FAIL check."""
    return [
        f"- {method_display_name(r['method'])} bs={r['batch_size']}: epoch "
        f"{r['epoch_time_s']:.2f} s, {r['time_ratio']:.2f}× the Baseline's"
        for r in rows
        if r.get("time_ratio") is not None and r["method"] != "none"
    ]


def group_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the accuracy per group (e.g. confounder bin, site) on every test split."""
    groups = _classes(rows, "test_group_accuracy_")
    if not groups:
        return ""
    splits = ["test", *_splits_of(rows)]
    head = ["method", "batch", "split", *groups]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for s in splits:
            cells = [method_display_name(r["method"]), str(r["batch_size"]), s]
            cells += [_num(r.get(f"{s}_group_accuracy_{g}")) for g in groups]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize_sweep(
    experiment: Experiment,
    results: Sequence[dict[str, Any]],
    folder: str | os.PathLike[str],
    *,
    plots: bool = True,
) -> dict[str, Any]:
    """The result of an experiment's sweep: its table, checks and intervals; the plots, the CSV.

    Writes ``summary.csv`` (the table, unrounded) and, with ``plots``, the PNG plots into
    ``folder``.

    Returns:
        ``{"experiment", "rows", "checks", "passed", "intervals", "plots", "plot_note"}``:
        the summary rows (one per batch size and method, mean and std over seeds), the checks
        as dicts (``name``, ``passed``, ``detail``), whether all passed, the first seed's test
        intervals, the plot files and why plots were skipped (``""`` when they were not).
    """
    if not results:
        raise ValueError("expected at least one run result, got none")
    out = Path(folder)
    rows = sorted(
        summarize(results),
        key=lambda r: (
            -r["batch_size"],
            experiment.methods.index(r["method"]) if r["method"] in experiment.methods else 99,
        ),
    )
    checks: list[Check] = experiment.checks(rows) if experiment.checks else []
    plot_files: list[str] = []
    plot_note = ""
    if plots:
        try:
            from metanorm_repro.experiments import plots as _plots

            plot_files = _plots.plot_all(out, results, experiment, rows)
        except ModuleNotFoundError as exc:
            plot_note = (
                f"Plots skipped: {exc}. Install the plots extra "
                "(`pip install 'metanorm[plots]'`) to get them."
            )
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    _io.write_csv(out / "summary.csv", rows, cols)
    return {
        "experiment": experiment.name,
        "rows": rows,
        "checks": [dataclasses.asdict(c) for c in checks],
        "passed": all(c.passed for c in checks),
        "intervals": _first_seed_intervals(results),
        "plots": plot_files,
        "plot_note": plot_note,
    }


def sweep_report(experiment: Experiment, result: dict[str, Any]) -> str:
    """The body of an experiment's ``report.md`` (all but the Files section) from its result.

    ``result`` is :func:`summarize_sweep`'s, with ``"command"``, ``"settings"`` and
    ``"wall_time_s"`` added (each optional).
    """
    rows, plot_files, plot_note = result["rows"], result["plots"], result.get("plot_note", "")
    checks = [Check(**c) for c in result["checks"]]
    passed = all(c.passed for c in checks)
    command, s = result.get("command") or "", result.get("settings") or {}
    wall_time_s = result.get("wall_time_s")
    lines = [f"# metanorm reproduce {experiment.name}", "", experiment.description, ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += ["Settings: " + ", ".join(f"{k} = {v}" for k, v in s.items()), ""]
    if wall_time_s is not None:
        lines += [
            f"Wall time: {wall_time_s / 60:.1f} min; written "
            f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC.",
            "",
        ]
    n_seeds = max(r["seeds"] for r in rows)
    lines += [
        "## Results" + (f" (mean ± std over {n_seeds} seeds)" if n_seeds > 1 else " (one seed)"),
        "",
        "Test bAcc: balanced accuracy on the test set after the last epoch (val bAcc: on the "
        "validation set; further test splits, if any, in their own columns). dcor²: "
        "bias-corrected squared distance correlation between the features (the hidden fc layer, "
        f"after its norm, before the ReLU) and the confounder `{experiment.confounder}` (one-hot "
        "or multi-hot columns for categorical or tag metadata) within each class, on the "
        "validation set after the last epoch (and on each test set); n/a where the metadata are "
        "constant within a class. Epoch time: median wall-clock time of a "
        "training epoch (evaluation excluded). × Baseline time: the median over epochs of the "
        "method's epoch time over the Baseline's same epoch (the methods train in round robin, "
        "one epoch each in turn, so each pair is measured under the same load).",
        "",
        results_table(rows),
        "",
    ]
    intervals = interval_table(result.get("intervals") or [])
    if intervals:
        lines += ["## 95 % intervals", "", intervals, ""]
    if experiment.reference:
        lines += ["## The authors' figures", "", experiment.reference, ""]
    if checks:
        lines += [
            f"## Checks: {'PASS' if passed else 'FAIL'} "
            f"({sum(c.passed for c in checks)}/{len(checks)})",
            "",
        ]
        lines += [f"- {'PASS' if c.passed else 'FAIL'} {c.name}: {c.detail}" for c in checks]
        lines.append("")
    timing = timing_lines(rows)
    if timing:
        lines += [
            "## Timing (information, not a check)",
            "",
            "Epoch times depend on the machine and on what else runs on it, so they are reported, "
            "never graded: the methods train in round robin and each ratio pairs epochs measured "
            "under the same load.",
            "",
            *timing,
            "",
        ]
    gt = group_table(rows)
    if gt:
        lines += ["## Accuracy per group on each test split", "", gt, ""]
    if plot_files or plot_note:
        lines += ["## Plots", ""]
        if "probe.png" in plot_files:
            lines += [
                "`probe.png`: where the confounder lives in the Baseline and MDN models, module "
                "by module (first seed, largest batch size, the first "
                "validation samples): the within-class dcor² of each module's output and the "
                "held-out partial R² of a linear probe predicting the confounder with the class "
                "regressed out (`metanorm.probe`); the numbers are in `probe.json`.",
                "",
            ]
        lines += [f"![{f}]({f})" for f in plot_files]
        if plot_note:
            lines.append(plot_note)
        lines.append("")
    lines += [
        "Each run folder `runs/bs{B}/{method}/seed{S}/` holds `config.json` (the resolved "
        "configuration), `epochs.csv` (per-epoch metrics), `final.json` (test metrics), "
        "`checkpoint.pt`, `test_features.npz` and `manifest.json` (the files' SHA-256).",
        "",
    ]
    return "\n".join(lines)


def write_report(
    out_dir: str | os.PathLike[str],
    experiment: Experiment,
    results: Sequence[dict[str, Any]],
    *,
    command: str = "",
    settings: dict[str, Any] | None = None,
    wall_time_s: float | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Writes ``report.md``, ``results.json``, ``run.json``, ``summary.csv`` and the plots.

    The same files and report as ``metanorm reproduce NAME`` writes for the sweep's runs
    (:func:`summarize_sweep`, :func:`sweep_report`, :func:`study_report`).

    Returns:
        ``{"rows": summary rows, "checks": [Check], "passed": bool, "plots": [file names],
        "report": path}``.
    """
    from metanorm_repro.experiments.sweep import experiment_study

    out = Path(out_dir)
    result = summarize_sweep(experiment, results, out, plots=plots)
    result |= {"settings": settings or {}, "command": command, "wall_time_s": wall_time_s}
    _io.write_json(out / "results.json", result)
    study = experiment_study(experiment)
    report = _io.write_text(out / "report.md", study_report(study, result, out, len(results)))
    write_run_record(
        out, experiment.name, command=command, settings=settings or {}, wall_time_s=wall_time_s
    )
    return {
        "rows": result["rows"],
        "checks": [Check(**c) for c in result["checks"]],
        "passed": result["passed"],
        "plots": result["plots"],
        "report": str(report),
    }


def study_report(study: Study, result: dict[str, Any], folder: Path, units: int = 0) -> str:
    """The ``report.md`` of an entry: its own body (``study.report(result)``), then the files.

    Every ``report.md`` (an experiment's or a study's) has this shape: the title and tables,
    then the ``## Files`` section (:func:`files_section`) naming the run folders (``runs/``, one
    per run unit), ``results.json``, ``run.json`` and the other files of ``folder`` (plots,
    tables).
    """
    body = study.report(result).rstrip("\n")
    skip = {"report.md", "results.json", RUN_RECORD, "sweep.json"}
    others = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in skip)
    if not units:
        runs = "no `runs/`: the study runs in one piece"
    elif study.read_record is None:
        runs = f"`runs/`: one folder per run unit ({units}), each with `record.json`"
    else:
        runs = f"`runs/`: one folder per run unit ({units}), each with the files it wrote"
    return body + "\n\n" + "\n".join(files_section(runs, others)) + "\n"


def _first_seed_intervals(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The test intervals of the first seed's runs (method, batch size, estimates, intervals)."""
    finals = [r["final"] for r in results if "test_intervals" in r["final"]]
    if not finals:
        return []
    first = min(int(f["seed"]) for f in finals)
    keys = ("method", "batch_size", "seed", "test_balanced_accuracy", "test_dcor2")
    return [{k: f[k] for k in (*keys, "test_intervals")} for f in finals if int(f["seed"]) == first]
