"""Data sets: the synthetic experiment, real-data stand-ins and loaders for the paper's data."""

from metanorm.datasets._base import DataSplit as DataSplit
from metanorm.datasets._base import DesignDataset as DesignDataset
from metanorm.datasets.bladderbatch import BladderBatch as BladderBatch
from metanorm.datasets.bladderbatch import load_bladderbatch as load_bladderbatch

__all__ = ["BladderBatch", "DataSplit", "DesignDataset", "load_bladderbatch"]
