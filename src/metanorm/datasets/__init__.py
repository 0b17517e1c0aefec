"""Data sets: the synthetic experiment, real-data stand-ins and loaders for the paper's data."""

from metanorm.datasets._base import DataSplit as DataSplit
from metanorm.datasets._base import DesignDataset as DesignDataset
from metanorm.datasets._files import DataNotFoundError as DataNotFoundError
from metanorm.datasets.bladderbatch import BladderBatch as BladderBatch
from metanorm.datasets.bladderbatch import load_bladderbatch as load_bladderbatch
from metanorm.datasets.images import make_shaded_images as make_shaded_images
from metanorm.datasets.images import make_two_site_digits as make_two_site_digits
from metanorm.datasets.paper import load_gs_ppb as load_gs_ppb
from metanorm.datasets.paper import load_hvu as load_hvu
from metanorm.datasets.paper import load_multisite_mri as load_multisite_mri

__all__ = [
    "BladderBatch",
    "DataNotFoundError",
    "DataSplit",
    "DesignDataset",
    "load_bladderbatch",
    "load_gs_ppb",
    "load_hvu",
    "load_multisite_mri",
    "make_shaded_images",
    "make_two_site_digits",
]
