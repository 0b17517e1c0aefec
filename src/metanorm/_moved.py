"""Clear errors for the modules that moved from the library to the reproduction harness.

The experiments, models, stand-in data sets and the ``reproduce`` command are the separate package
``metanorm_repro`` (``pip install ./repro`` from the repository). Importing one of their old
names raises a :class:`ModuleNotFoundError` that says where it went and how to install it,
instead of Python's bare "No module named ...".
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

#: Old module name -> its home in the harness.
MOVED_MODULES: dict[str, str] = {
    "metanorm.experiments": "metanorm_repro.experiments",
    "metanorm.models": "metanorm_repro.models",
    "metanorm.cli.reproduce": "metanorm_repro.cli",
    **{
        f"metanorm.datasets.{name}": f"metanorm_repro.datasets.{name}"
        for name in (
            "bladderbatch",
            "fashion_mnist",
            "mnist_5k",
            "mri_standin",
            "optdigits",
            "shaded_images",
            "shifting",
            "synthetic",
            "synthetic_regression",
            "two_site_digits",
        )
    },
}

#: Names that ``metanorm.datasets`` exported and that now live in ``metanorm_repro.datasets``.
MOVED_DATASET_NAMES: frozenset[str] = frozenset(
    {
        "BladderBatch",
        "load_bladderbatch",
        "make_multisite_mri_standin",
        "make_shaded_images",
        "make_two_site_digits",
    }
)


def moved_message(old: str, new: str) -> str:
    """The message for an import of ``old``, which is now ``new`` in the harness."""
    try:
        installed = importlib.util.find_spec("metanorm_repro") is not None
    except ImportError:
        installed = False
    if installed:
        how = f"import {new} instead"
    else:
        how = (
            f"install the harness from the metanorm repository (pip install ./repro), "
            f"then import {new}"
        )
    return (
        f"{old} moved out of the metanorm library into the reproduction harness, the separate "
        f"package metanorm-repro: {how}"
    )


class _MovedToHarness(importlib.abc.MetaPathFinder):
    """Last on ``sys.meta_path``: reached only when no other finder has the module."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> None:
        for old, new in MOVED_MODULES.items():
            if fullname == old or fullname.startswith(old + "."):
                raise ModuleNotFoundError(
                    moved_message(fullname, new + fullname[len(old) :]), name=fullname
                )
        return None


def install() -> None:
    """Appends the finder to ``sys.meta_path`` once."""
    if not any(isinstance(f, _MovedToHarness) for f in sys.meta_path):
        sys.meta_path.append(_MovedToHarness())
