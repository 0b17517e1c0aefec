"""Every method × batch size × seed of an experiment: :func:`run_sweep`.

Runs go to ``OUT/runs/bs{B}/{method}/seed{S}/`` (see :mod:`metanorm.experiments.runner`). Within a
seed and batch size the methods run one after another on the same data, so their epoch times are
measured under the same conditions (compare ratios, not absolute times, on a shared machine).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from metanorm.experiments.config import RunConfig
from metanorm.experiments.registry import get_experiment
from metanorm.experiments.runner import check_run_dir, run_experiment

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
    configs = [
        base.replace(method=m, batch_size=int(b), seed=int(s))
        for s in seeds
        for b in batch_sizes
        for m in methods
    ]
    results = []
    with tqdm(configs, desc="runs", unit="run", disable=not progress, dynamic_ncols=True) as bar:
        for cfg in bar:
            bar.set_postfix_str(f"{cfg.method} bs={cfg.batch_size} seed={cfg.seed}")
            results.append(
                run_experiment(
                    cfg,
                    run_dir(out_dir, cfg.method, cfg.batch_size, cfg.seed),
                    overwrite=overwrite,
                    progress=progress,
                )
            )
    return results
