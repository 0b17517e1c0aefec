"""The library installs, imports and runs without the reproduction harness (``metanorm_repro``).

The harness adds ``metanorm reproduce`` through the ``metanorm.commands`` entry-point group and
depends on the library; the library never imports it. Checked statically (no module or test of
the library imports the harness) and at run time (every library module imports, and the command
line works, with the harness made unimportable).
"""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import metanorm

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = Path(metanorm.__file__).resolve().parent


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("tree", ["src/metanorm", "tests"])
def test_no_library_module_or_test_imports_the_harness(tree):
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in mods if m.split(".")[0] == "metanorm_repro")
        for path in sorted((ROOT / tree).rglob("*.py"))
        for mods in [_imported_modules(path)]
        if any(m.split(".")[0] == "metanorm_repro" for m in mods)
    }
    assert offenders == {}


SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "metanorm_repro" or name.startswith("metanorm_repro."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Absent())
    import metanorm

    skip = {"metanorm.integrations.lightning", "metanorm.integrations.anndata", "metanorm.__main__"}
    for info in pkgutil.walk_packages(metanorm.__path__, "metanorm."):
        if info.name not in skip:
            importlib.import_module(info.name)
    assert not [m for m in sys.modules if m.startswith("metanorm_repro")]

    try:
        import metanorm.experiments  # moved: the error says where to
    except ModuleNotFoundError as exc:
        assert "metanorm_repro.experiments" in str(exc) and "pip install" in str(exc), exc
    else:
        raise AssertionError("metanorm.experiments imported")

    from metanorm.cli import main
    sys.exit(main(["demo", "--help"]) if len(sys.argv) > 1 else 0)
    """
)


def test_library_imports_and_its_command_runs_without_the_harness():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    # the command line: dcor and demo work; a harness that cannot load is named, not fatal
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, "cli"], capture_output=True, text=True, timeout=300
    )
    assert "usage: metanorm demo" in done.stdout, done.stderr
    assert "Traceback" not in done.stderr
