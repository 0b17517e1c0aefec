"""The ``metanorm`` command line: one console script, one module per subcommand.

Each module named in :data:`COMMANDS` defines ``register(subparsers)``, which adds its parser and
sets ``func`` to a handler ``(args) -> int``. Other installed packages add subcommands through the
``metanorm.commands`` entry-point group: each entry point names such a ``register`` function. The
reproduction harness (``pip install ./repro``) adds ``metanorm reproduce`` this way.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from metanorm import __version__

__all__ = ["COMMANDS", "ENTRY_POINT_GROUP", "build_parser", "main"]

#: Subcommand modules under ``metanorm.cli``, in the order ``--help`` lists them.
COMMANDS: tuple[str, ...] = ("dcor", "demo")

#: The entry-point group through which installed packages add subcommands.
ENTRY_POINT_GROUP = "metanorm.commands"


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="metanorm",
        description="Metadata Normalization (MDN): remove metadata effects from features, "
        "measure what is left, reproduce the paper's experiments.",
    )
    parser.add_argument("--version", action="version", version=f"metanorm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plugins = sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)
    for ep in plugins:  # the harness's ``reproduce`` first, as before the split
        try:
            register = ep.load()
        except ImportError as exc:  # a broken plugin must not take the other commands down
            print(
                f"metanorm: the subcommand {ep.name!r} ({ep.value}) could not be loaded: {exc}",
                file=sys.stderr,
            )
            continue
        register(sub)
    for name in COMMANDS:
        importlib.import_module(f"metanorm.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 on success).

    Errors a user can fix (bad arguments, missing files, mismatched rows) are printed as one line
    on stderr with exit status 2, without a traceback; Ctrl-C (or SIGTERM during
    ``reproduce``) gives one line and exit status 130.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as exc:
        print(f"metanorm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"metanorm {args.command}: interrupted", file=sys.stderr)
        return 130
