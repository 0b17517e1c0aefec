#!/usr/bin/env python
"""Compares two output folders of ``metanorm reproduce`` number by number.

Every ``*.json`` file of BEFORE is read beside the file of the same path in AFTER, and every
number in it is compared exactly, except fields that measure time, load or the environment
(their keys contain ``time``, ``second``, ``wall``, ``cpu``, ``load``, ``date``, ``version``,
``command``, ``path``, ...). Prints one line per folder: files, numbers compared, differences
(the first few listed). Exit status 1 when a number differs or a file is missing.

    python scripts/compare_runs.py runs_before runs_after synthetic failures

compares ``runs_before/synthetic`` with ``runs_after/synthetic``, and so on; with no folder
names, BEFORE and AFTER themselves.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

SKIP = re.compile(
    r"time|second|wall|cpu|elapsed|load|date|host|environment|pid|started|finished|version|"
    r"path|out_dir|sha256|bytes|python|torch|platform|command|argv|created|overwrite|_at$",
    re.IGNORECASE,
)


def _walk(a: Any, b: Any, where: str, diffs: list[str], count: list[int]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if SKIP.search(str(k)):
                continue
            if k not in a or k not in b:
                diffs.append(f"{where}.{k}: only in {'AFTER' if k in b else 'BEFORE'}")
            else:
                _walk(a[k], b[k], f"{where}.{k}", diffs, count)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append(f"{where}: {len(a)} items vs {len(b)}")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _walk(x, y, f"{where}[{i}]", diffs, count)
    else:
        if isinstance(a, int | float) and not isinstance(a, bool):
            count[0] += 1
        if a != b and not (a != a and b != b):  # NaN equals NaN here
            diffs.append(f"{where}: {a!r} vs {b!r}")


def compare(before: Path, after: Path) -> tuple[int, int, list[str]]:
    """Returns (JSON files, numbers compared, differences) of two folders."""
    files = sorted(p.relative_to(before) for p in before.rglob("*.json"))
    diffs: list[str] = []
    count = [0]
    for f in files:
        if not (after / f).is_file():
            diffs.append(f"{f}: missing in AFTER")
            continue
        _walk(
            json.loads((before / f).read_text()),
            json.loads((after / f).read_text()),
            str(f),
            diffs,
            count,
        )
    return len(files), count[0], diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("names", nargs="*", help="sub-folders to compare (default: the folders)")
    a = p.parse_args(argv)
    status = 0
    for name in a.names or [""]:
        files, numbers, diffs = compare(a.before / name, a.after / name)
        print(
            f"{name or a.before}: {files} JSON files, {numbers} numbers compared, "
            f"{len(diffs)} differences"
        )
        for d in diffs[:8]:
            print("   ", d)
        status |= bool(diffs) or files == 0
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
