"""Every method × batch size × seed of an experiment: :func:`run_sweep`.

Runs go to ``OUT/runs/bs{B}/{method}/seed{S}/`` (see :mod:`metanorm.experiments.runner`). Within a
seed and batch size the methods train in round robin, one epoch each in turn, on the same data, so
their epoch times are measured side by side under the same load: on a shared machine compare the
ratios (the report's per-epoch paired ratio), not absolute times.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from metanorm.experiments.config import RunConfig
from metanorm.experiments.registry import get_experiment
from metanorm.experiments.runner import Run, check_run_dir, epoch_summary

__all__ = ["run_dir", "run_sweep"]


def run_dir(out_dir: str | os.PathLike[str], method: str, batch_size: int, seed: int) -> Path:
    """The folder of one run of a sweep."""
    return Path(out_dir) / "runs" / f"bs{batch_size}" / method / f"seed{seed}"


def run_sweep(
    base: RunConfig,
    out_dir: str | os.PathLike[str],
    *,
    methods: Sequence[str] | None = None,
    batch_sizes: Sequence[int] = (200,),
    seeds: Sequence[int] = (0,),
    overwrite: bool = False,
    progress: bool = True,
    jobs: int = 1,
) -> list[dict[str, Any]]:
    """Runs ``base`` for every method, batch size and seed.

    Args:
        base: the shared configuration (its ``method``, ``batch_size`` and ``seed`` are replaced).
        out_dir: the sweep's folder; an existing non-empty one is refused unless ``overwrite``.
        methods: methods to run. Default: the experiment's methods.
        batch_sizes: training batch sizes. Default: ``(200,)``.
        seeds: seeds. Default: ``(0,)``.
        overwrite: replace the files of existing runs. Default: ``False``.
        progress: show progress bars. Default: ``True``.
        jobs: processes; the (seed, batch size) groups are shared out among them (set
            ``base.threads`` so that ``jobs × threads`` fits the cores). Default: 1.

    Returns:
        The :func:`run_experiment` results, in run order.
    """
    experiment = get_experiment(base.experiment)
    methods = list(experiment.methods if methods is None else methods)
    bad = [m for m in methods if m not in experiment.methods]
    if bad or not methods:
        raise ValueError(f"expected methods among {experiment.methods}, got {methods}")
    if not batch_sizes or not seeds:
        raise ValueError(
            f"expected at least one batch size and one seed, got {batch_sizes}, {seeds}"
        )
    if (
        len(set(methods)) != len(methods)
        or len(set(batch_sizes)) != len(batch_sizes)
        or len(set(seeds)) != len(seeds)
    ):
        raise ValueError("methods, batch sizes and seeds must not repeat")
    check_run_dir(out_dir, overwrite)
    groups = [
        [base.replace(method=m, batch_size=int(b), seed=int(s)) for m in methods]
        for s in seeds
        for b in batch_sizes
    ]
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"expected jobs to be a positive int, got {jobs!r}")
    jobs = min(jobs, len(groups))
    out = str(out_dir)
    if jobs == 1:
        results: list[dict[str, Any]] = []
        for group in groups:
            results.extend(_run_group(group, out, overwrite, progress, 0))
        return results
    # one process per (seed, batch size) group; "spawn" starts clean interpreters (no forked
    # OpenMP state), so experiments must be registered by a module in EXPERIMENT_MODULES
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [
            pool.submit(_run_group, g, out, overwrite, progress, i % jobs)
            for i, g in enumerate(groups)
        ]
        return [r for f in futures for r in f.result()]


def _run_group(
    group: list[RunConfig], out_dir: str, overwrite: bool, progress: bool, position: int
) -> list[dict[str, Any]]:
    """Trains the methods of one (seed, batch size) group in round robin; returns their results."""
    runs = [
        Run(c, run_dir(out_dir, c.method, c.batch_size, c.seed), overwrite=overwrite) for c in group
    ]
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
    return [r.finish() for r in runs]
