"""``metanorm reproduce NAME``: run a registered experiment's sweep and write its report."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import textwrap
from typing import Any

#: The exit status of a sweep stopped by Ctrl-C or SIGTERM (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130

#: The exit status of a sweep stopped by a file system error (read-only folder, full disk): 2,
#: as for the other errors a user can fix.
EXIT_OS_ERROR = 2


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {v}")
    return v


def _option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


#: The flags a study may take, by their ``argparse`` dest (the setting of the same name, unless
#: the study's ``flags`` names another); ``no_plots`` sets ``plots``.
STUDY_FLAGS: dict[str, str] = {
    "seeds": "--seeds",
    "seed": "--seed",
    "epochs": "--epochs",
    "lr": "--lr",
    "methods": "--methods",
    "batch_sizes": "--batch-sizes",
    "n_per_class": "--n-per-class",
    "n_eval_per_class": "--n-eval-per-class",
    "jobs": "--jobs",
    "threads": "--threads",
    "no_plots": "--no-plots",
    "data": "--data",
}

#: The flags of the sweeps that no study takes.
_SWEEP_ONLY: dict[str, str] = {
    "lr_schedule": "--lr-schedule",
    "refit_running_beta": "--refit-running-beta",
    "device": "--device",
    "resume": "--resume",
    "strict": "--strict",
}


def _study_setting(study: Any, dest: str) -> str:
    """The setting a flag sets in ``study`` (``no_plots``: ``plots``)."""
    return study.flags.get(dest, "plots" if dest == "no_plots" else dest)


#: The flags of the sweep that every study with run units takes (not settings of the study).
UNIT_FLAGS: dict[str, str] = {"jobs": "--jobs", "resume": "--resume"}


def _study_takes(study: Any) -> tuple[list[str], list[str]]:
    """The flags and the ``--option`` keys of a study."""
    flags = [f for d, f in STUDY_FLAGS.items() if _study_setting(study, d) in study.settings]
    if study.has_units:
        flags += [f for f in UNIT_FLAGS.values() if f not in flags]
    return flags, list(study.settings)


def _studies_help() -> list[str]:
    from metanorm_repro.experiments import get_study, list_studies

    lines = [
        "",
        "studies (NAME): each writes OUT/report.md, OUT/results.json and OUT/run.json; a study "
        "with --resume among its flags also writes one folder per run unit under OUT/runs/ "
        "(--jobs J runs J units at a time; default 1):",
    ]
    for name in list_studies():
        study = get_study(name)
        flags, keys = _study_takes(study)
        lines.append(f"  {name}")
        if study.methods is not None:
            default = set(study.settings.get("methods") or study.methods)
            methods = " ".join(f"{m}{'*' if m in default else ''}" for m in study.methods)
            lines += textwrap.wrap(
                f"methods: {methods}",
                width=90,
                initial_indent="      ",
                subsequent_indent="        ",
            )
        lines += textwrap.wrap(
            f"flags: {' '.join(flags) or '(none)'}; --option keys: {' '.join(keys)}",
            width=90,
            initial_indent="      ",
            subsequent_indent="        ",
        )
    return lines


def _experiments_help() -> str:
    """The epilog of ``reproduce --help``: every experiment, its methods and its options."""
    from metanorm_repro.experiments import get_experiment, list_experiments

    lines = ["experiments (NAME), their methods (--methods; * run by default) and --option keys:"]
    for name in list_experiments():
        e = get_experiment(name)
        default = set(e.defaults.get("methods", e.methods))
        methods = " ".join(f"{m}{'*' if m in default else ''}" for m in e.methods)
        lines.append(f"  {name}")
        lines.append(f"      methods: {methods}")
        if e.options is not None:
            keys = " ".join(k for k in e.options if k != "data") or "(none)"
            lines += textwrap.wrap(
                f"options: {keys}", width=90, initial_indent="      ", subsequent_indent="        "
            )
    return "\n".join(lines + _studies_help())


def register(sub: Any) -> None:
    """Adds the ``reproduce`` subcommand."""
    description = (
        "Trains every method of a registered experiment (one run per method, batch size and "
        "seed), then writes OUT/report.md (a table beside the authors' figures and PASS/FAIL "
        "checks), OUT/results.json, OUT/run.json, OUT/summary.csv, PNG plots, and one folder "
        "per run under OUT/runs/. "
        "Defaults are the experiment's quick CPU settings; --paper gives the paper's settings; "
        "explicit options override both. 'metanorm reproduce synthetic' is the main job."
    )
    folders = (
        "The sweep is built in OUT.partial and replaces OUT only when complete: with "
        "--overwrite the previous results stay intact until then. Ctrl-C or SIGTERM stops the "
        "workers, writes the report of the completed runs into OUT.partial and exits with "
        "status 130; --resume continues from there."
    )
    p = sub.add_parser(
        "reproduce",
        help="run one of the paper's experiments (every method) and write report.md",
        description=textwrap.fill(description, 90) + "\n\n" + textwrap.fill(folders, 90),
        epilog=_experiments_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("experiment", metavar="NAME", help="experiment name, e.g. synthetic")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/NAME)")
    p.add_argument(
        "--methods",
        nargs="+",
        metavar="M",
        help="methods to run, names of the methods table (metanorm_repro.models.methods.METHODS; "
        "default: the experiment's; "
        "synthetic: none (or baseline), batchnorm (bn), groupnorm (gn), mdn-linear, mdn-conv; "
        "the real-data experiments: batchnorm, mdn). synthetic-compare and the real-data "
        "experiments also take the alternatives concat, concat-input, brnet, brnet-cond, dann, "
        "dann-cond, groupdro; the real-data experiments also none, mdn-all, mdn-cw, mdn-poly, "
        "mdn-scale, mdn+brnet-cond",
    )
    p.add_argument(
        "--batch-sizes",
        nargs="+",
        type=_positive_int,
        metavar="B",
        help="training batch sizes, a sweep (default: the experiment's, 200 128 for "
        "synthetic); they need not divide the training set size",
    )
    p.add_argument(
        "--seeds",
        type=_positive_int,
        metavar="N",
        help="number of seeds, 0..N-1 (mean ± std in the report; default: 1)",
    )
    p.add_argument("--seed", type=int, metavar="S", help="first seed (default: 0)")
    p.add_argument("--epochs", type=_positive_int, metavar="E", help="training epochs")
    p.add_argument("--lr", type=_positive_float, metavar="LR", help="Adam learning rate")
    p.add_argument(
        "--lr-schedule",
        choices=("constant", "cosine"),
        help="learning-rate schedule over the epochs: constant, or cosine decay from --lr "
        "towards 0, stepped per epoch (default: the experiment's; synthetic: cosine, "
        "constant with --paper)",
    )
    p.add_argument(
        "--refit-running-beta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after each epoch, refit the MDN layers' running β on the training set, layer by "
        "layer, for evaluation (default: the experiment's; synthetic: on, off with --paper)",
    )
    p.add_argument(
        "--n-per-class",
        type=_positive_int,
        metavar="N",
        help="training samples per class (synthetic: per split)",
    )
    p.add_argument(
        "--n-eval-per-class",
        type=_positive_int,
        metavar="N",
        help="validation and test samples per class (synthetic; default: the experiment's, or "
        "--n-per-class when that is given)",
    )
    p.add_argument(
        "--paper",
        action="store_true",
        help="the paper's settings (synthetic: 200 epochs, lr 1e-4, batch 200, "
        "n = 1000; hours on a CPU)",
    )
    p.add_argument(
        "--data",
        metavar="PATH",
        help="data folder: required by gs-ppb, hvu and multisite-mri (the error names the "
        "layout), optional for shaded-* (another copy of the source's files)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        type=_option,
        metavar="KEY=VALUE",
        help="an experiment option (RunConfig.options; VALUE read as JSON when it parses, else "
        "as text), repeatable; e.g. shade_mode=contrast, noise=0.1, 'classes=[1, 7]'",
    )
    p.add_argument("--device", help="torch device (default: cpu)")
    p.add_argument(
        "--jobs",
        type=_positive_int,
        metavar="J",
        help="processes: the (seed, batch size) groups are shared out among them "
        "(default: as many as groups, at most the CPU count); a study's run units (default: 1)",
    )
    p.add_argument(
        "--threads",
        type=_positive_int,
        metavar="T",
        help="torch CPU threads per process (default: CPU count // jobs)",
    )
    replace = p.add_mutually_exclusive_group()
    replace.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output folder (kept intact until the new sweep is complete), "
        "or discard an interrupted sweep",
    )
    replace.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted sweep or study of --out (same settings): completed runs "
        "are kept, unfinished ones start again",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a check of the report fails"
    )
    p.add_argument(
        "--experiment-module",
        action="append",
        default=[],
        metavar="MODULE[:ATTR]",
        help="load experiments or studies from MODULE (it registers them when imported) or "
        "register MODULE:ATTR (an Experiment, a Study or a list of them) before looking up "
        "NAME; repeatable. Installed packages add theirs through the entry-point group "
        "metanorm_repro.experiments",
    )
    p.set_defaults(func=run)


def _cli_words(message: str) -> str:
    """Rewrites the Python argument names of a library message as the flags that set them."""
    message = re.sub(r"\bpass (?:path|root)= (?:the |to the )?", "pass --data PATH, the ", message)
    message = re.sub(r"options\[['\"]data['\"]\]", "--data PATH", message)
    message = re.sub(r"\bpass (\w+)=", r"pass --option \1=", message)
    return re.sub(r"\blower ([a-z]+_[a-z_]+)\b", r"lower --option \1=...", message)


def _resume_command(argv: list[str]) -> str:
    """The command line that resumes this one: ``--overwrite`` dropped, ``--resume`` added."""
    kept = [a for a in argv if a not in ("--overwrite", "--resume")]
    return "metanorm " + " ".join(shlex.quote(a) for a in [*kept, "--resume"])


def run(args: argparse.Namespace) -> int:
    """Runs the sweep and writes the report; returns 0 (1 with --strict and a failed check).

    On Ctrl-C or SIGTERM: the report of the completed runs, one line saying how to resume, and
    :data:`EXIT_INTERRUPTED`. A file system error (a read-only folder, a full disk) is one line
    naming the path and the cause, with :data:`EXIT_OS_ERROR`; the previous results in ``--out``
    are intact. Another sweep on the same ``--out`` is refused the same way as other errors.
    """
    try:
        return _run(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        if exc.args and isinstance(exc.args[0], str):
            exc.args = (_cli_words(exc.args[0]), *exc.args[1:])
        raise
    except OSError as exc:
        if exc.errno is None:  # a message of ours (e.g. FileExistsError): main prints it
            raise
        from metanorm_repro.experiments._io import describe_oserror

        print(f"metanorm reproduce: error: {describe_oserror(exc)}", file=sys.stderr)
        return EXIT_OS_ERROR


def _command(argv_tail: list[str], name: str) -> tuple[list[str], str]:
    argv = sys.argv[1:] if sys.argv[1:2] == ["reproduce"] else ["reproduce", name, *argv_tail]
    return argv, "metanorm " + " ".join(shlex.quote(a) for a in argv)


def _coerce(study: Any, setting: str, flag: str, value: Any) -> Any:
    """A flag's value as the setting takes it (a one-item list for a single number)."""
    default = study.settings[setting]
    if isinstance(value, list) and isinstance(default, int) and not isinstance(default, bool):
        if len(value) != 1:
            raise ValueError(
                f"study {study.name!r} takes one value for {flag} (its setting {setting}), got "
                f"{value}"
            )
        return value[0]
    return value


def _run_study(study: Any, args: argparse.Namespace) -> int:
    """``metanorm reproduce STUDY``: the settings from the flags, then :func:`run_study`."""
    flags, keys = _study_takes(study)
    for dest, flag in {**STUDY_FLAGS, **_SWEEP_ONLY}.items():
        value = getattr(args, dest)
        if value is None or value is False or value == []:
            continue
        if flag not in flags:
            raise ValueError(
                f"study {study.name!r} takes no {flag}; it takes {' '.join(flags) or 'no flag'} "
                f"and --option keys {', '.join(keys)}"
            )
    given: dict[str, Any] = {}
    for dest, flag in STUDY_FLAGS.items():
        value = getattr(args, dest)
        if value is None or value is False:
            continue
        if (
            study.has_units
            and dest in UNIT_FLAGS
            and _study_setting(study, dest) not in (study.settings)
        ):
            continue  # the sweep's, not a setting
        setting = _study_setting(study, dest)
        given[setting] = False if dest == "no_plots" else _coerce(study, setting, flag, value)
    unknown = sorted({k for k, _ in args.option} - set(study.settings))
    if unknown:
        raise ValueError(
            f"unknown --option key(s) {unknown} for {study.name!r}; valid keys: {', '.join(keys)}"
        )
    given.update(dict(args.option))
    if args.quiet and "progress" in study.settings:
        given["progress"] = False
    jobs = 1 if args.jobs is None or "jobs" in study.settings else args.jobs
    result, out = _run_entry(study, given, args, jobs)
    if result is None:
        return EXIT_INTERRUPTED
    print(study.report(result), end="")
    print(f"report: {os.path.join(out, 'report.md')}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from metanorm_repro.experiments.registry import Experiment, get_entry, load_source
    from metanorm_repro.experiments.sweep import experiment_study

    for source in args.experiment_module:
        try:
            load_source(source)
        except ImportError as exc:  # one line, as the other errors a user can fix
            raise ValueError(f"--experiment-module {source}: {exc}") from None
    entry = get_entry(args.experiment)
    if not isinstance(entry, Experiment):
        return _run_study(entry, args)
    experiment = entry
    study = experiment_study(experiment)
    if args.paper and not study.paper:
        raise ValueError(f"experiment {experiment.name!r} has no --paper settings; drop --paper")
    if experiment.options is not None:
        unknown = sorted({k for k, _ in args.option} - set(experiment.options))
        if unknown:
            valid = ", ".join(k for k in experiment.options if k != "data") or "none"
            raise ValueError(
                f"unknown --option key(s) {unknown} for {experiment.name!r}; valid keys: {valid}"
            )
    start = study.resolve({}, paper=args.paper)  # the defaults, or the paper's settings
    options = dict(start["options"])
    if args.n_per_class is not None:
        options.pop("n_eval_per_class", None)  # the splits follow the asked size
    if args.n_eval_per_class is not None:
        options["n_eval_per_class"] = args.n_eval_per_class
    options.update(dict(args.option))
    if args.data is not None:
        options["data"] = os.fspath(args.data)
    given: dict[str, Any] = {"options": options, "plots": not args.no_plots}
    for key in ("epochs", "lr", "lr_schedule", "refit_running_beta", "n_per_class", "device"):
        value = getattr(args, key)
        if value is not None:
            given[key] = value
    if args.batch_sizes is not None:
        given["batch_sizes"] = args.batch_sizes
    if args.methods:
        given["methods"] = args.methods
    first = 0 if args.seed is None else args.seed
    given["seeds"] = list(range(first, first + (args.seeds or len(start["seeds"]))))
    cores = os.cpu_count() or 1
    n_groups = len(given["seeds"]) * len(given.get("batch_sizes", start["batch_sizes"]))
    jobs = args.jobs or max(1, min(n_groups, cores))
    given["threads"] = args.threads or max(1, cores // jobs)
    result, out = _run_entry(study, given, args, jobs)
    if result is None:
        return EXIT_INTERRUPTED
    from metanorm_repro.experiments.report import results_table, timing_lines

    print(results_table(result["rows"]))
    for c in result["checks"]:
        print(f"{'PASS' if c['passed'] else 'FAIL'} {c['name']}: {c['detail']}")
    for line in timing_lines(result["rows"]):
        print(f"timing (information){line[1:]}")
    print(f"report: {os.path.join(out, 'report.md')}")
    return 1 if args.strict and not result["passed"] else 0


def _run_entry(
    study: Any, given: dict[str, Any], args: argparse.Namespace, jobs: int
) -> tuple[dict[str, Any] | None, str]:
    """Resolves ``given`` and runs ``study`` into ``--out``: ``(result, out)``.

    The result is ``None`` when Ctrl-C or SIGTERM stopped the run (one line said so).
    """
    from metanorm_repro.experiments.studies import StudyInterrupted, run_study

    settings = study.resolve(given, paper=args.paper)
    out = args.out or f"runs/{study.name}"
    argv, command = _command([], study.name)
    try:
        result = run_study(
            study,
            settings,
            out,
            overwrite=args.overwrite,
            command=command,
            resume=bool(args.resume),
            jobs=jobs,
            progress=not args.quiet,
        )
    except StudyInterrupted as stop:
        _interrupted(stop, argv)
        return None, out
    return result, out


def _interrupted(stop: Any, argv: list[str]) -> None:
    """The one line of an interrupted run: what finished, where its report is, how to resume."""
    where = f", report of those: {stop.report}" if stop.report is not None else ""
    resume = f"; resume with: {_resume_command(argv)}" if stop.total else ""
    print(
        f"metanorm reproduce: interrupted ({stop.signal_name}): {stop.done} of {stop.total} "
        f"run units complete{where}; {stop.out} is unchanged{resume}",
        file=sys.stderr,
    )
