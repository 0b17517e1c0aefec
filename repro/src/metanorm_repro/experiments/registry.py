"""Experiments by name: what data, which model, which metadata, what the paper reported.

An :class:`Experiment` is everything :func:`metanorm_repro.experiments.run_experiment` and
``metanorm reproduce NAME`` need to drive a data set through the same engine and report:

- ``make_splits(config) -> (train, val, test, *more_tests)``:
  :class:`~metanorm.datasets.DataSplit` s whose ``metadata`` hold the columns named below; splits
  after the third are further test sets (e.g. ``test_reversed``), evaluated and reported under
  their :attr:`~metanorm.datasets.DataSplit.name`;
- ``make_model(method, design, config) -> nn.Module``: a model whose ``forward(x, metadata)``
  returns ``(logits, features)`` (1 logit: binary cross-entropy; C logits: cross-entropy), built
  for a normalization ``method`` with the training ``design`` (for MDN layers);
- the design's metadata columns (the label is always the first, kept, column ``y``), which of
  them are categorical, and the ``confounder`` column whose dependence on the features dcor²
  measures (per class). A column name ending in ``*`` stands for every metadata column of the
  training split that starts with the rest of it (``"scene=*"``: HVU's multi-hot scene tags);
  a categorical confounder enters dcor² one-hot coded (every training level), so dcor² is
  measured against a matrix;
- defaults for the quick run and the paper's settings, the authors' figures, and the checks the
  report prints as PASS/FAIL;
- optionally ``configure(options) -> {field: value}``: the fields that depend on the run's
  options (:attr:`RunConfig.options`), applied by :meth:`Experiment.resolve` (e.g. gs-ppb's
  ``skin_type="ordinal"`` makes the skin type a numeric design column).

Register a new experiment with :func:`register_experiment` in a module listed in
:data:`EXPERIMENT_MODULES` (imported lazily by :func:`get_experiment`).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

if TYPE_CHECKING:
    from metanorm.design import Design
    from metanorm_repro.datasets import DataSplit
    from metanorm_repro.experiments.config import RunConfig

__all__ = [
    "EXPERIMENT_MODULES",
    "Check",
    "Experiment",
    "get_experiment",
    "list_experiments",
    "register_experiment",
]

#: Modules that register experiments when imported.
EXPERIMENT_MODULES: tuple[str, ...] = (
    "metanorm_repro.experiments.synthetic",
    "metanorm_repro.experiments.real",
    "metanorm_repro.experiments.estimators",
)


@dataclass(frozen=True)
class Check:
    """One PASS/FAIL line of a report."""

    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class Experiment:
    """A registered experiment; see the module docstring.

    Attributes:
        name: the name ``metanorm reproduce NAME`` takes.
        description: one paragraph for the report and ``--help``.
        make_splits: ``config -> (train, val, test, *more_tests)``.
        make_model: ``(method, design, config) -> model``.
        methods: the methods run by default (the baseline ``"none"`` first).
        metadata_columns: metadata columns of the design, after the kept label ``y`` (``*``
            patterns allowed, see the module docstring).
        confounder: metadata column (or ``*`` pattern) for the bias metric (dcor² per class).
        categorical: metadata columns to one-hot code (in the design and in the metric).
        standardize: standardise the continuous **metadata** columns with the training mean and
            standard deviation. Default ``False``. The label is never standardised
            (:mod:`metanorm_repro.experiments.coding`; ``docs/experiments.md`` says why).
        groups: ``split -> labels`` of the groups for the per-group accuracy (e.g. confounder
            bins); ``None``: the confounder column itself (no per-group accuracy for a ``*``
            pattern).
        defaults: :class:`RunConfig` fields of the default run, plus ``batch_sizes`` and
            ``seeds`` (the sweep) and optionally ``methods`` (default: all of ``methods``).
        paper: the same for the paper's settings (``--paper``).
        reference: markdown with the authors' figures, printed in the report.
        checks: ``summary rows -> [Check]``; the bars the report grades. ``None``: no checks.
        configure: ``options -> {field: value}``, the fields that depend on the run's options
            (see :meth:`resolve`); ``None``: none do.
        options: the keys :attr:`RunConfig.options` may hold (:meth:`check_options`); ``None``:
            not declared, any key passes.
    """

    name: str
    description: str
    make_splits: Callable[[RunConfig], Sequence[DataSplit]]
    make_model: Callable[[str, Design, RunConfig], nn.Module]
    methods: tuple[str, ...]
    metadata_columns: tuple[str, ...]
    confounder: str
    categorical: tuple[str, ...] = ()
    standardize: bool = False
    groups: Callable[[DataSplit], np.ndarray] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, Any] = field(default_factory=dict)
    reference: str = ""
    checks: Callable[[Sequence[dict[str, Any]]], list[Check]] | None = None
    configure: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    options: tuple[str, ...] | None = None

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raises ``ValueError`` listing the valid keys when ``options`` holds an unknown one."""
        if self.options is None:
            return
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(
                f"experiment {self.name!r} has no option(s) {unknown}; valid keys: "
                f"{sorted(self.options)}"
            )

    def resolve(self, options: Mapping[str, Any]) -> Experiment:
        """The experiment for a run with these options (:attr:`RunConfig.options`).

        Returns:
            ``self`` with the fields :attr:`configure` gives for ``options`` replaced (``self``
            itself when there is no ``configure``).

        Raises:
            ValueError: an unknown option (:meth:`check_options`), or an option with a value the
                experiment does not accept.
        """
        self.check_options(options)
        if self.configure is None:
            return self
        return dataclasses.replace(self, **self.configure(options))


_EXPERIMENTS: dict[str, Experiment] = {}


def register_experiment(experiment: Experiment, *, replace: bool = False) -> Experiment:
    """Registers ``experiment`` under its name (an existing name needs ``replace=True``)."""
    if experiment.name in _EXPERIMENTS and not replace:
        raise ValueError(f"an experiment named {experiment.name!r} is already registered")
    if experiment.confounder not in experiment.metadata_columns:
        raise ValueError(
            f"the confounder {experiment.confounder!r} must be one of the metadata columns "
            f"{experiment.metadata_columns}"
        )
    _EXPERIMENTS[experiment.name] = experiment
    return experiment


def _load_all() -> None:
    for module in EXPERIMENT_MODULES:
        importlib.import_module(module)


def list_experiments() -> list[str]:
    """Names of the registered experiments, sorted."""
    _load_all()
    return sorted(_EXPERIMENTS)


def get_experiment(name: str) -> Experiment:
    """The experiment registered as ``name``; ``ValueError`` listing the known names otherwise."""
    _load_all()
    if name not in _EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; registered: {sorted(_EXPERIMENTS)}")
    return _EXPERIMENTS[name]
