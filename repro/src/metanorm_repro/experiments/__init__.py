"""Experiments: the training engine, the runner, the registry and the reports.

- :func:`train_one_epoch` / :func:`evaluate`: the loop, as plain functions;
- :func:`prepare_run`: one configuration's data, designs and model, without training;
- :func:`run_experiment`: one configuration into one run folder;
- :func:`get_entry` / :func:`register_experiment` / :func:`register_study`: experiments and
  studies (:class:`Study`: run units, how to run one, how to summarise them) by name, one
  registry;
- :func:`run_study`: what ``metanorm reproduce NAME`` runs for every entry, an experiment
  through :func:`experiment_study` (its runs as run units): the units into their run folders
  (:func:`run_units`, the one sweep), then ``results.json``, ``report.md``
  (:func:`study_report`, ending in :func:`files_section`) and ``run.json``
  (:func:`write_run_record`);
- :func:`run_sweep` and :func:`write_report`: an experiment's every method × batch size × seed
  and its report, from Python (:func:`summarize_sweep`, :func:`sweep_report`).
"""

from metanorm_repro.experiments.config import RunConfig as RunConfig
from metanorm_repro.experiments.engine import evaluate as evaluate
from metanorm_repro.experiments.engine import predict as predict
from metanorm_repro.experiments.engine import train_one_epoch as train_one_epoch
from metanorm_repro.experiments.registry import Check as Check
from metanorm_repro.experiments.registry import Entry as Entry
from metanorm_repro.experiments.registry import Experiment as Experiment
from metanorm_repro.experiments.registry import Study as Study
from metanorm_repro.experiments.registry import get_entry as get_entry
from metanorm_repro.experiments.registry import get_experiment as get_experiment
from metanorm_repro.experiments.registry import get_study as get_study
from metanorm_repro.experiments.registry import list_entries as list_entries
from metanorm_repro.experiments.registry import list_experiments as list_experiments
from metanorm_repro.experiments.registry import list_studies as list_studies
from metanorm_repro.experiments.registry import load_source as load_source
from metanorm_repro.experiments.registry import register_experiment as register_experiment
from metanorm_repro.experiments.registry import register_study as register_study
from metanorm_repro.experiments.report import files_section as files_section
from metanorm_repro.experiments.report import study_report as study_report
from metanorm_repro.experiments.report import summarize as summarize
from metanorm_repro.experiments.report import summarize_sweep as summarize_sweep
from metanorm_repro.experiments.report import sweep_report as sweep_report
from metanorm_repro.experiments.report import write_report as write_report
from metanorm_repro.experiments.report import write_run_record as write_run_record
from metanorm_repro.experiments.runner import PreparedRun as PreparedRun
from metanorm_repro.experiments.runner import prepare_run as prepare_run
from metanorm_repro.experiments.runner import run_experiment as run_experiment
from metanorm_repro.experiments.studies import StudyInterrupted as StudyInterrupted
from metanorm_repro.experiments.studies import run_study as run_study
from metanorm_repro.experiments.sweep import SweepInterrupted as SweepInterrupted
from metanorm_repro.experiments.sweep import experiment_study as experiment_study
from metanorm_repro.experiments.sweep import run_sweep as run_sweep
from metanorm_repro.experiments.sweep import run_units as run_units

__all__ = [
    "Check",
    "Entry",
    "Experiment",
    "PreparedRun",
    "RunConfig",
    "Study",
    "StudyInterrupted",
    "SweepInterrupted",
    "evaluate",
    "experiment_study",
    "files_section",
    "get_entry",
    "get_experiment",
    "get_study",
    "list_entries",
    "list_experiments",
    "list_studies",
    "load_source",
    "predict",
    "prepare_run",
    "register_experiment",
    "register_study",
    "run_experiment",
    "run_study",
    "run_sweep",
    "run_units",
    "study_report",
    "summarize",
    "summarize_sweep",
    "sweep_report",
    "train_one_epoch",
    "write_report",
    "write_run_record",
]
