"""The bias probe of a sweep's Baseline and MDN models, for the report (``probe.png``).

For the first seed at the largest batch size, the Baseline (``"none"``) and every MDN method of
the sweep (a method whose layers take the design) are rebuilt from their run folders (the
configuration and ``checkpoint.pt``) and probed with :func:`metanorm.probe` on the validation
split: per module, the within-class dcor² of the output against the confounder's design columns
and the held-out partial R² of a linear probe. The figure is :func:`metanorm.plot_probe`'s, one
line per model; ``probe.json`` holds the records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

import metanorm as mn
from metanorm.datasets import DesignDataset
from metanorm.design import Design
from metanorm_repro.experiments import _io
from metanorm_repro.experiments.config import RunConfig
from metanorm_repro.experiments.registry import Experiment
from metanorm_repro.experiments.runner import EVAL_BATCH, prepare_run
from metanorm_repro.models.methods import get_method, method_display_name

__all__ = ["PROBE_SAMPLES", "confounder_design_columns", "probe_runs"]

#: Validation samples the probe reads per model (the first ones of the validation split).
PROBE_SAMPLES = 1000


def confounder_design_columns(design: Design, confounder: str) -> list[int]:
    """The design columns that code ``confounder`` (its own column, or its one-hot levels).

    A name ending in ``*`` (a multi-hot tag pattern) stands for every column starting with the
    rest of it.

    Examples::

        >>> import numpy as np
        >>> d = Design(np.ones((2, 4)), ("y", "site=b", "site=c", "intercept"), keep=(0,))
        >>> confounder_design_columns(d, "site")
        [1, 2]
    """
    if confounder.endswith("*"):
        prefix = confounder[:-1]
        return [k for k, c in enumerate(design.columns) if c.startswith(prefix)]
    return [
        k for k, c in enumerate(design.columns) if c == confounder or c.startswith(confounder + "=")
    ]


def _probed_methods(results: Sequence[dict[str, Any]]) -> list[str]:
    methods: list[str] = []
    for r in results:
        m = r["final"]["method"]
        if m not in methods and (m == "none" or get_method(m).needs_design):
            methods.append(m)
    return methods


def probe_runs(
    out_dir: str | Path, runs: Sequence[dict[str, Any]], experiment: Experiment
) -> list[str]:
    """Probes the Baseline and MDN runs of a sweep; writes ``probe.png`` and ``probe.json``.

    Args:
        out_dir: the sweep's folder.
        runs: the results (``load_result``: ``config``, ``final``, ``out_dir``) of one seed and
            batch size, one per method (:func:`~metanorm_repro.experiments.plots.first_runs`).
        experiment: the sweep's experiment.

    Returns:
        The file names written (``[]`` when the sweep has neither a Baseline nor an MDN run).

    Raises:
        ImportError: without matplotlib.
    """
    bs, seed = int(runs[0]["final"]["batch_size"]), int(runs[0]["final"]["seed"])
    order = _probed_methods(runs)
    if not order:
        return []
    probed: list[mn.ProbeResult] = []
    for method in order:
        r = next(r for r in runs if r["final"]["method"] == method)
        run = prepare_run(RunConfig.from_dict(r["config"]).replace(device="cpu"))
        checkpoint = torch.load(Path(r["out_dir"]) / "checkpoint.pt", weights_only=True)
        run.model.load_state_dict(checkpoint["model"])
        columns = confounder_design_columns(run.design, experiment.confounder)
        if not columns:
            return []
        val = DataLoader(DesignDataset(run.splits[1], run.rows[1]), batch_size=EVAL_BATCH)
        probed.append(
            mn.probe(
                run.model,
                val,
                metadata=columns,
                call=lambda model, batch: model(batch[0], batch[2]),
                max_samples=PROBE_SAMPLES,
                label=method_display_name(method),
            )
        )
    out = Path(out_dir)
    mn.plot_probe(probed, out / "probe.png")
    _io.write_json(
        out / "probe.json",
        {
            "batch_size": bs,
            "seed": seed,
            "split": "val",
            "max_samples": PROBE_SAMPLES,
            "confounder": experiment.confounder,
            "models": {
                res.label: [dataclasses.asdict(rec) for rec in res.records] for res in probed
            },
        },
    )
    return ["probe.png", "probe.json"]
