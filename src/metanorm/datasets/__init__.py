"""Loaders for your copy of the paper's data sets: images or volumes, labels and metadata columns.

:func:`load_multisite_mri` (NIfTI volumes and a participants table, ``metanorm[mri]``),
:func:`load_hvu` (pre-extracted video features and the HVU annotations) and :func:`load_gs_ppb`
(face images and the GS-PPB table, ``metanorm[images]``) read the files a user has, in documented
layouts, and return raw data per split (:class:`DataSplit`): images, labels and metadata
columns. Coding the metadata into design rows is :func:`metanorm.design.make_design`'s job;
:class:`DesignDataset` pairs images, labels and design rows for a ``DataLoader``.

The stand-ins and generators of the reproduction harness (the synthetic task, the shaded and
two-site digits, the 3-D multi-site stand-in, bladderbatch) live in ``metanorm_repro.datasets``
(``pip install ./repro`` from the repository).
"""

from typing import Any

from metanorm._moved import MOVED_DATASET_NAMES, moved_message
from metanorm.datasets._base import DataSplit as DataSplit
from metanorm.datasets._base import DesignDataset as DesignDataset
from metanorm.datasets._files import DataNotFoundError as DataNotFoundError
from metanorm.datasets.gs_ppb import load_gs_ppb as load_gs_ppb
from metanorm.datasets.hvu import load_hvu as load_hvu
from metanorm.datasets.multisite_mri import load_multisite_mri as load_multisite_mri

__all__ = [
    "DataNotFoundError",
    "DataSplit",
    "DesignDataset",
    "load_gs_ppb",
    "load_hvu",
    "load_multisite_mri",
]


def __getattr__(name: str) -> Any:
    if name in MOVED_DATASET_NAMES:
        raise ImportError(
            moved_message(f"metanorm.datasets.{name}", f"metanorm_repro.datasets.{name}")
        )
    raise AttributeError(f"module 'metanorm.datasets' has no attribute {name!r}")
