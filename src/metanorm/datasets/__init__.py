"""Data sets: the synthetic experiment, real-data stand-ins and loaders for the paper's data."""

from metanorm.datasets._base import DataSplit as DataSplit
from metanorm.datasets._base import DesignDataset as DesignDataset

__all__ = ["DataSplit", "DesignDataset"]
