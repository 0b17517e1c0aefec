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

A :class:`Study` is the general entry, for what one experiment's sweep does not fit (several
data sets, a regression task, continual learning): it declares its run units (e.g. method ×
seed × fold), how to run one, and how to summarise their records into its report. An
experiment runs as a study too (``sweep.experiment_study``: its runs are the units), so both
go through the same runner, sweep, output folder (one run folder per unit, resumable) and
report format; an :class:`Experiment` is the short way to declare a classification sweep.
Experiments and studies share one registry (one name space):
:func:`get_entry` / :func:`list_entries` return both kinds; :func:`get_experiment` /
:func:`list_experiments` the sweep experiments only (what
:func:`~metanorm_repro.experiments.run_sweep` drives), :func:`get_study` / :func:`list_studies`
the studies only.

Where entries come from (loaded lazily, once, by the look-ups):

- the built-in entries, named as objects (``module:attr``) in :data:`BUILTIN_SOURCES` and
  registered by the loader on the first lookup (importing a harness module registers nothing);
- installed packages, through the entry-point group :data:`ENTRY_POINT_GROUP`
  (``metanorm_repro.experiments``): each entry point names a module (imported: it registers its
  entries itself) or an object (``module:attr``: an :class:`Experiment`, a :class:`Study`, or an
  iterable of them, registered by the loader);
- :func:`load_source` (``metanorm reproduce --experiment-module MODULE[:ATTR]``), the same two
  shapes from the command line;
- :func:`register_experiment` / :func:`register_study` called directly.

A sweep run with several processes (``--jobs``) hands its workers the sources loaded here and the
entry it runs (``worker_payload``, ``install_payload``), so an entry registered by any of
these ways reaches them.

Examples::

    >>> from metanorm_repro.experiments import get_entry, list_studies
    >>> "failures" in list_studies(), type(get_entry("synthetic")).__name__
    (True, 'Experiment')
"""

from __future__ import annotations

import dataclasses
import importlib
import pickle
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
from torch import nn

if TYPE_CHECKING:
    from metanorm.datasets import DataSplit
    from metanorm.design import Design
    from metanorm_repro.experiments.config import RunConfig

__all__ = [
    "BUILTIN_SOURCES",
    "ENTRY_POINT_GROUP",
    "EXPERIMENT_MODULES",
    "Check",
    "Entry",
    "Experiment",
    "Study",
    "check_methods",
    "get_entry",
    "get_experiment",
    "get_study",
    "install_payload",
    "list_entries",
    "list_experiments",
    "list_studies",
    "load_source",
    "register_experiment",
    "register_study",
    "worker_payload",
]

#: The modules that hold the built-in experiments (each as a tuple ``EXPERIMENTS``).
EXPERIMENT_MODULES: tuple[str, ...] = (
    "metanorm_repro.experiments.synthetic",
    "metanorm_repro.experiments.real",
    "metanorm_repro.experiments.estimators",
)

#: The built-in entries as objects (``module:attr``), registered by the loader.
BUILTIN_SOURCES: tuple[str, ...] = (
    *(f"{module}:EXPERIMENTS" for module in EXPERIMENT_MODULES),
    "metanorm_repro.experiments.studies:STUDIES",
)

#: The entry-point group through which installed packages add experiments and studies.
ENTRY_POINT_GROUP = "metanorm_repro.experiments"


def check_methods(
    name: str, methods: Sequence[str], accepted: Sequence[str], *, spellings: bool = True
) -> list[str]:
    """The methods of a run of the entry ``name``, each one of its ``accepted`` methods.

    The one check of the methods of a run, for experiments (:meth:`Experiment.check_methods`)
    and studies (:meth:`Study.resolve`). The command line's other spellings of a method
    (``"baseline"``, ``"bn"``, ``"gn"``; :data:`metanorm_repro.models.methods.METHOD_ALIASES`)
    are taken for the method's name unless ``spellings`` is false.

    Returns:
        ``methods`` as a list, other spellings replaced by the methods' names.

    Raises:
        ValueError: no method, a method that is not accepted, or one given twice; the message
            names the accepted ones.

    Examples:
        >>> check_methods("demo", ["baseline", "mdn"], ("none", "mdn"))
        ['none', 'mdn']
        >>> check_methods("demo", ["bn"], ("none", "mdn"))
        Traceback (most recent call last):
        ...
        ValueError: unknown method(s) ['bn'] for 'demo'; expected among ['none', 'mdn']
    """
    from metanorm_repro.models.methods import METHOD_ALIASES

    given = list(methods)
    aliases = METHOD_ALIASES if spellings else {}
    names = [m if m in accepted else aliases.get(m, m) for m in given]
    unknown = [g for g, m in zip(given, names, strict=True) if m not in accepted]
    if unknown or not names:
        raise ValueError(
            f"unknown method(s) {unknown or given} for {name!r}; expected among {list(accepted)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"the methods of {name!r} must not repeat, got {given}")
    return names


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
        methods: the methods the experiment accepts (the baseline ``"none"`` first); the default
            run's are ``defaults["methods"]`` (all of them when absent).
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

    def check_methods(self, methods: Sequence[str], *, spellings: bool = True) -> list[str]:
        """``methods`` checked against :attr:`methods` (``registry.check_methods``).

        Raises:
            ValueError: a method the experiment does not accept; the message names those it does.
        """
        return check_methods(self.name, methods, self.methods, spellings=spellings)

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


@dataclass(frozen=True, kw_only=True)
class Study:
    """A registered study: run units, a summary and a report, run by ``metanorm reproduce NAME``.

    A study declares its **run units** (e.g. method × seed × batch size, method × fold, one
    stand-in each), how to run one, and how to summarise their records into its result:

    - ``units(settings) -> [unit]``: each unit a small dict of names to ints or strings (e.g.
      ``{"seed": 0, "batch_size": 200, "method": "mdn"}``), in the order the report lists them;
    - ``run_unit(settings, unit, folder) -> record``: runs one unit from scratch (seeding what
      it draws from), returns its JSON-serialisable record (written to ``folder/record.json``);
      ``folder`` is the unit's own, empty folder for any further files it writes (e.g. a sweep).
      Units are independent, so they run in any order, in several processes (``--jobs``), and a
      resumed study runs only those that had not finished;
    - ``summarize(settings, records, folder) -> result``: the result from the records (in unit
      order), written to ``results.json``; it may write plots into ``folder``.

    Units that must run together (e.g. the methods of one seed and batch size, trained in
    round robin so that their epoch times are measured side by side) give ``group(unit) ->
    key`` and ``run_group(settings, units, folders) -> records`` instead of ``run_unit``: the
    units of one key run as one task, in unit order. A study whose units write their own
    completion marker (e.g. a run folder with a manifest of its files' SHA-256) gives
    ``read_record(settings, unit, folder) -> record | None``: the record of a finished unit read
    back from its folder (``None``: not finished; a ``ValueError`` naming a changed file: the
    unit runs again on resume, and the run is refused before its report); ``record.json`` is
    then not written. ``estimate_bytes(settings, units) -> bytes`` lets the sweep refuse, before
    running anything, a disk without room for the units. A study whose ``summarize`` also
    takes the records of some of the units sets ``partial``: an interrupted run then writes the
    report of the finished units into ``OUT.partial``.

    ``metanorm reproduce NAME`` resolves the settings (:meth:`resolve`: :attr:`settings`, then
    :attr:`paper` with ``--paper``, then the flags and ``--option KEY=VALUE``) and runs the units
    through :func:`~metanorm_repro.experiments.run_study`: each unit's record goes to its own run
    folder ``OUT/runs/...`` as soon as it finishes, so an interrupted study resumes
    (``--resume``); the result, ``report.md`` and ``run.json`` follow, and the folder takes
    ``OUT``'s place only when complete.

    A study may instead give ``run(settings, folder) -> result``, which runs everything at once
    (no run units: no resume, one process); this shape is deprecated.

    Attributes:
        name: the name ``metanorm reproduce NAME`` takes (one name space with the experiments).
        description: one paragraph for ``--help``.
        report: ``result -> markdown``, the body of the report.
        settings: every setting the study takes, with its default value.
        flags: command-line flags whose setting is named otherwise, as ``{flag's dest: setting}``
            (e.g. ``{"epochs": "epochs_per_stage"}``); other flags set the setting of their own
            name (``--batch-sizes``: ``batch_sizes``).
        paper: the settings ``--paper`` gives (empty: the study has none).
        methods: the methods the study accepts in its setting ``"methods"`` (checked by
            :meth:`resolve`; a ``None`` setting stands for the default run's); the default run's
            are ``settings["methods"]``. ``None``: the study takes no methods, or does not
            declare them.
        units: ``settings -> [unit]``, see above.
        run_unit: ``(settings, unit, folder) -> record``, see above.
        summarize: ``(settings, records, folder) -> result``, see above.
        group: ``unit -> key``: units of one key run together (with ``run_group``).
        run_group: ``(settings, units, folders) -> [record]``: runs the units of one group.
        read_record: ``(settings, unit, folder) -> record | None``, see above.
        estimate_bytes: ``(settings, units) -> int``: about what the units write.
        partial: ``summarize`` takes the records of any subset of the units (see above).
        run: ``(settings, folder) -> result``: the whole study at once (deprecated; ``None``
            when the study has run units).
    """

    name: str
    description: str
    report: Callable[[dict[str, Any]], str]
    settings: dict[str, Any]
    flags: dict[str, str] = field(default_factory=dict)
    paper: dict[str, Any] = field(default_factory=dict)
    methods: tuple[str, ...] | None = None
    units: Callable[[dict[str, Any]], Sequence[Mapping[str, Any]]] | None = None
    run_unit: Callable[[dict[str, Any], dict[str, Any], Path], dict[str, Any]] | None = None
    summarize: Callable[[dict[str, Any], list[dict[str, Any]], Path], dict[str, Any]] | None = None
    group: Callable[[dict[str, Any]], Any] | None = None
    run_group: (
        Callable[[dict[str, Any], list[dict[str, Any]], list[Path]], list[dict[str, Any]]] | None
    ) = None
    read_record: Callable[[dict[str, Any], dict[str, Any], Path], dict[str, Any] | None] | None = (
        None
    )
    estimate_bytes: Callable[[dict[str, Any], list[dict[str, Any]]], int] | None = None
    partial: bool = False
    run: Callable[[dict[str, Any], Path], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        runs = self.run_unit if self.run_group is None else self.run_group
        parts = (self.units, runs, self.summarize)
        if all(p is None for p in parts) == (self.run is None) or (
            self.run is None and any(p is None for p in parts)
        ):
            raise ValueError(
                f"study {self.name!r}: expected units, run_unit (or group and run_group) and "
                "summarize (or, deprecated, run alone)"
            )
        if (self.group is None) != (self.run_group is None) or (
            self.run_group is not None and self.run_unit is not None
        ):
            raise ValueError(
                f"study {self.name!r}: expected either run_unit, or group with run_group"
            )
        if self.run is not None:
            warnings.warn(
                f"study {self.name!r} is given as one run function: declare its run units "
                "instead (units, run_unit, summarize), which gives it per-unit run folders, "
                "--resume and --jobs; Study(run=...) is deprecated",
                DeprecationWarning,
                stacklevel=3,
            )

    @property
    def has_units(self) -> bool:
        """Whether the study runs as run units (resumable, ``--jobs``)."""
        return self.units is not None

    def resolve(self, given: Mapping[str, Any], *, paper: bool = False) -> dict[str, Any]:
        """The settings of a run: the defaults, the paper's (``paper``), then ``given``.

        Raises:
            ValueError: a key of ``given`` that is not a setting (the message lists them),
                ``paper`` for a study without paper settings, or a method the study does not
                accept (``registry.check_methods``; the message names those it does).
        """
        unknown = sorted(set(given) - set(self.settings))
        if unknown:
            raise ValueError(
                f"study {self.name!r} has no setting(s) {unknown}; it takes: "
                f"{', '.join(self.settings)}"
            )
        if paper and not self.paper:
            raise ValueError(f"study {self.name!r} has no --paper settings; drop --paper")
        settings = {**self.settings, **(self.paper if paper else {}), **given}
        if self.methods is not None and settings.get("methods") is not None:
            settings["methods"] = check_methods(self.name, settings["methods"], self.methods)
        return settings


#: An entry of the registry: a sweep experiment or a study.
Entry: TypeAlias = Experiment | Study

_ENTRIES: dict[str, Entry] = {}
# where each entry came from: a module (or module:attr) a fresh process can load again
_ORIGINS: dict[str, str] = {}
# sources loaded by load_source beyond the built-in ones (handed to sweep workers)
_EXTRA_SOURCES: list[str] = []
_LOADED = False
_BUILTIN = set(EXPERIMENT_MODULES) | set(BUILTIN_SOURCES)


def _caller_module() -> str:
    """The module that called the public ``register_*`` function (two frames up)."""
    return str(sys._getframe(2).f_globals.get("__name__", ""))


def _register(entry: Entry, replace: bool, origin: str) -> None:
    if entry.name in _ENTRIES and not replace and _ENTRIES[entry.name] is not entry:
        kind = type(_ENTRIES[entry.name]).__name__.lower()
        raise ValueError(f"an entry named {entry.name!r} is already registered (a {kind})")
    _ENTRIES[entry.name] = entry
    _ORIGINS[entry.name] = origin


def register_experiment(experiment: Experiment, *, replace: bool = False) -> Experiment:
    """Registers ``experiment`` under its name (an existing name needs ``replace=True``)."""
    if not isinstance(experiment, Experiment):
        raise TypeError(f"expected an Experiment, got {type(experiment).__name__}")
    if experiment.confounder not in experiment.metadata_columns:
        raise ValueError(
            f"the confounder {experiment.confounder!r} must be one of the metadata columns "
            f"{experiment.metadata_columns}"
        )
    _register(experiment, replace, _caller_module())
    return experiment


def register_study(study: Study, *, replace: bool = False) -> Study:
    """Registers ``study`` under its name (an existing name needs ``replace=True``)."""
    if not isinstance(study, Study):
        raise TypeError(f"expected a Study, got {type(study).__name__}")
    _register(study, replace, _caller_module())
    return study


def _register_object(obj: Any, source: str) -> list[str]:
    items = [obj] if isinstance(obj, Experiment | Study) else obj
    if isinstance(items, Mapping):
        items = list(items.values())
    if not isinstance(items, Iterable) or isinstance(items, str | bytes):
        raise TypeError(
            f"{source} must be an Experiment, a Study or an iterable of them, got "
            f"{type(obj).__name__}"
        )
    names = []
    for item in items:
        if isinstance(item, Experiment):
            register_experiment(item, replace=_ORIGINS.get(item.name) == source)
        elif isinstance(item, Study):
            register_study(item, replace=_ORIGINS.get(item.name) == source)
        else:
            raise TypeError(
                f"{source} must hold Experiments or Studies, got a {type(item).__name__}"
            )
        _ORIGINS[item.name] = source
        names.append(item.name)
    return names


def load_source(source: str) -> list[str]:
    """Loads experiments or studies from ``source``: ``"module"`` or ``"module:attr"``.

    A module is imported (it registers its entries itself); ``module:attr`` is an
    :class:`Experiment`, a :class:`Study`, or an iterable (or mapping) of them, registered here.
    A source loaded once is not loaded again. Sweep workers load the same sources
    (``worker_payload``).

    Returns:
        The names registered from ``source`` (for a plain module: the names new since the call).

    Raises:
        ImportError: the module cannot be imported (the message names it).
        TypeError: ``attr`` is not an entry or an iterable of entries.
        ValueError: a name is already registered by another source.
    """
    if not isinstance(source, str) or not source.strip(":"):
        raise ValueError(f"expected 'module' or 'module:attr', got {source!r}")
    module_name, _, attr = source.partition(":")
    before = set(_ENTRIES)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import the experiment module {module_name!r}: {exc}") from exc
    if attr:
        obj: Any = module
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
        names = _register_object(obj, source)
    else:
        names = sorted(set(_ENTRIES) - before)
    if source not in _BUILTIN and source not in _EXTRA_SOURCES:
        _EXTRA_SOURCES.append(source)
    return names


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for source in BUILTIN_SOURCES:
        load_source(source)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            load_source(ep.value)
        except Exception as exc:  # a broken plugin must not take the other entries down
            warnings.warn(
                f"the experiments of entry point {ep.name!r} ({ep.value}) could not be "
                f"loaded: {exc}",
                stacklevel=2,
            )


def list_entries() -> list[str]:
    """Names of every registered entry (experiments and studies), sorted."""
    _load_all()
    return sorted(_ENTRIES)


def get_entry(name: str) -> Entry:
    """The experiment or study registered as ``name``; ``ValueError`` listing the names else."""
    _load_all()
    if name not in _ENTRIES:
        raise ValueError(f"unknown experiment {name!r}; registered: {sorted(_ENTRIES)}")
    return _ENTRIES[name]


def list_experiments() -> list[str]:
    """Names of the registered sweep experiments (not the studies), sorted."""
    _load_all()
    return sorted(n for n, e in _ENTRIES.items() if isinstance(e, Experiment))


def get_experiment(name: str) -> Experiment:
    """The experiment registered as ``name``; ``ValueError`` listing the known names otherwise.

    A study's name is refused too (it has no sweep): run it with :func:`get_study`'s runner.
    """
    entry = get_entry(name)
    if not isinstance(entry, Experiment):
        raise ValueError(
            f"{name!r} is a study, not a sweep experiment: run it with 'metanorm reproduce "
            f"{name}'; experiments: {list_experiments()}"
        )
    return entry


def list_studies() -> list[str]:
    """Names of the registered studies, sorted."""
    _load_all()
    return sorted(n for n, e in _ENTRIES.items() if isinstance(e, Study))


def get_study(name: str) -> Study:
    """The study registered as ``name``; ``ValueError`` naming the studies otherwise."""
    entry = get_entry(name)
    if not isinstance(entry, Study):
        raise ValueError(f"{name!r} is not a study; studies: {list_studies()}")
    return entry


def worker_payload(names: Sequence[str]) -> tuple[tuple[str, ...], tuple[Entry, ...]]:
    """What a fresh process needs to find the entries ``names``: sources to load, entries.

    The sources are those loaded by :func:`load_source` beyond the built-in ones, and the
    modules that registered ``names`` (when importable by name); the entries are those of
    ``names`` that pickle (a spawned process gets them by value).

    Raises:
        ValueError: an entry that a fresh process can neither import nor unpickle (e.g.
            registered from an interactive session with a local function); the message says
            what to do.
    """
    sources = list(_EXTRA_SOURCES)
    entries: list[Entry] = []
    for name in names:
        entry = get_entry(name)
        origin = _ORIGINS.get(name, "")
        importable = origin not in ("", "__main__", "__mp_main__")
        if importable and origin not in _BUILTIN and origin not in sources:
            sources.append(origin)
        try:
            pickle.dumps(entry)
        except Exception as exc:
            if not importable:
                raise ValueError(
                    f"the experiment {name!r} cannot reach worker processes: it was "
                    f"registered by {origin or 'unknown code'} and does not pickle ({exc}); "
                    "register it in an importable module (or pass --experiment-module), "
                    "or run with one job"
                ) from None
            continue
        if origin not in _BUILTIN:
            entries.append(entry)
    return tuple(sources), tuple(entries)


def install_payload(sources: Sequence[str], entries: Sequence[Entry]) -> None:
    """Loads ``sources``, registers ``entries`` (replacing): the other end of ``worker_payload``."""
    if not sources and not entries:  # built-in entries only: loaded lazily, as needed
        return
    _load_all()
    for source in sources:
        load_source(source)
    for entry in entries:
        _register(entry, True, _ORIGINS.get(entry.name, ""))
