"""Experiments: the training engine, the runner, the registry and the reports.

- :func:`train_one_epoch` / :func:`evaluate`: the loop, as plain functions;
- :func:`prepare_run`: one configuration's data, designs and model, without training;
- :func:`run_experiment`: one configuration into one run folder;
- :func:`run_sweep` and :func:`write_report`: every method × batch size × seed, and the report
  (``metanorm reproduce NAME``);
- :func:`get_experiment` / :func:`register_experiment`: experiments by name.
"""

from metanorm_repro.experiments.config import RunConfig as RunConfig
from metanorm_repro.experiments.engine import evaluate as evaluate
from metanorm_repro.experiments.engine import predict as predict
from metanorm_repro.experiments.engine import train_one_epoch as train_one_epoch
from metanorm_repro.experiments.registry import Check as Check
from metanorm_repro.experiments.registry import Experiment as Experiment
from metanorm_repro.experiments.registry import get_experiment as get_experiment
from metanorm_repro.experiments.registry import list_experiments as list_experiments
from metanorm_repro.experiments.registry import register_experiment as register_experiment
from metanorm_repro.experiments.report import summarize as summarize
from metanorm_repro.experiments.report import write_report as write_report
from metanorm_repro.experiments.runner import PreparedRun as PreparedRun
from metanorm_repro.experiments.runner import prepare_run as prepare_run
from metanorm_repro.experiments.runner import run_experiment as run_experiment
from metanorm_repro.experiments.sweep import SweepInterrupted as SweepInterrupted
from metanorm_repro.experiments.sweep import run_sweep as run_sweep

__all__ = [
    "Check",
    "Experiment",
    "PreparedRun",
    "RunConfig",
    "SweepInterrupted",
    "evaluate",
    "get_experiment",
    "list_experiments",
    "predict",
    "prepare_run",
    "register_experiment",
    "run_experiment",
    "run_sweep",
    "summarize",
    "train_one_epoch",
    "write_report",
]
