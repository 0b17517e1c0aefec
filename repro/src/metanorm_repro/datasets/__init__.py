"""Data sets of the reproduction harness: the synthetic task, stand-ins and their sources.

Generators and stand-ins: :mod:`~metanorm_repro.datasets.synthetic` (the paper's synthetic task),
:mod:`~.synthetic_regression`, :mod:`~.shaded_images`, :mod:`~.two_site_digits` (built from
:mod:`~.fashion_mnist`, :mod:`~.mnist_5k` and :mod:`~.optdigits`), :mod:`~.mri_standin` (3-D
multi-site volumes), :mod:`~.shifting` and :mod:`~.bladderbatch`. The loaders of the paper's own
data sets (GS-PPB, HVU, multi-site MRI) are part of the library, :mod:`metanorm.datasets`
(re-exported here for convenience, documented there). Every loader returns raw data: images,
labels and metadata columns (:class:`~metanorm.datasets.DataSplit`); coding them into design
rows is the experiments' job.
"""

from metanorm.datasets import DataNotFoundError as DataNotFoundError
from metanorm.datasets import DataSplit as DataSplit
from metanorm.datasets import DesignDataset as DesignDataset
from metanorm.datasets import load_gs_ppb as load_gs_ppb
from metanorm.datasets import load_hvu as load_hvu
from metanorm.datasets import load_multisite_mri as load_multisite_mri
from metanorm_repro.datasets.bladderbatch import BladderBatch as BladderBatch
from metanorm_repro.datasets.bladderbatch import load_bladderbatch as load_bladderbatch
from metanorm_repro.datasets.mri_standin import (
    make_multisite_mri_standin as make_multisite_mri_standin,
)
from metanorm_repro.datasets.shaded_images import make_shaded_images as make_shaded_images
from metanorm_repro.datasets.two_site_digits import make_two_site_digits as make_two_site_digits

__all__ = [
    "BladderBatch",
    "load_bladderbatch",
    "make_multisite_mri_standin",
    "make_shaded_images",
    "make_two_site_digits",
]
