"""Data sets: the synthetic experiment, real-data stand-ins and loaders for the paper's data.

One module per data set: :mod:`~metanorm.datasets.synthetic`, :mod:`~.shaded_images`,
:mod:`~.two_site_digits` (stand-ins built from :mod:`~.fashion_mnist`, :mod:`~.mnist_5k` and
:mod:`~.optdigits`), :mod:`~.gs_ppb`, :mod:`~.hvu`, :mod:`~.multisite_mri` (the paper's data, from
user-supplied files) and :mod:`~.bladderbatch`. Every loader returns raw data: images, labels and
metadata columns (:class:`DataSplit`); coding them into design rows is the experiments' job.
"""

from metanorm.datasets._base import DataSplit as DataSplit
from metanorm.datasets._base import DesignDataset as DesignDataset
from metanorm.datasets._files import DataNotFoundError as DataNotFoundError
from metanorm.datasets.bladderbatch import BladderBatch as BladderBatch
from metanorm.datasets.bladderbatch import load_bladderbatch as load_bladderbatch
from metanorm.datasets.gs_ppb import load_gs_ppb as load_gs_ppb
from metanorm.datasets.hvu import load_hvu as load_hvu
from metanorm.datasets.mri_standin import make_multisite_mri_standin as make_multisite_mri_standin
from metanorm.datasets.multisite_mri import load_multisite_mri as load_multisite_mri
from metanorm.datasets.shaded_images import make_shaded_images as make_shaded_images
from metanorm.datasets.two_site_digits import make_two_site_digits as make_two_site_digits

__all__ = [
    "BladderBatch",
    "DataNotFoundError",
    "DataSplit",
    "DesignDataset",
    "load_bladderbatch",
    "load_gs_ppb",
    "load_hvu",
    "load_multisite_mri",
    "make_multisite_mri_standin",
    "make_shaded_images",
    "make_two_site_digits",
]
