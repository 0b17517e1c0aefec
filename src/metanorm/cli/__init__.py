"""The ``metanorm`` command line: one console script, one module per subcommand.

Each module named in :data:`COMMANDS` defines ``register(subparsers)``, which adds its parser and
sets ``func`` to a handler ``(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from metanorm import __version__

__all__ = ["COMMANDS", "build_parser", "main"]

#: Subcommand modules under ``metanorm.cli``, in the order ``--help`` lists them.
COMMANDS: tuple[str, ...] = ("reproduce", "dcor", "demo")


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="metanorm",
        description="Metadata Normalization (MDN): remove metadata effects from features, "
        "measure what is left, reproduce the paper's experiments.",
    )
    parser.add_argument("--version", action="version", version=f"metanorm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
