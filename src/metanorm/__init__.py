"""metanorm: Metadata Normalization (MDN, CVPR 2021) for PyTorch.

Regress metadata (scanner, site, skin shade...) out of a network's features, batch by batch, and
measure how much metadata the features still encode.
"""

from importlib.metadata import PackageNotFoundError, version

from metanorm import _moved
from metanorm import design as design
from metanorm import linalg as linalg
from metanorm import metrics as metrics
from metanorm import nn as nn
from metanorm._probe import ProbeRecord as ProbeRecord
from metanorm._probe import ProbeResult as ProbeResult
from metanorm._probe import plot_probe as plot_probe
from metanorm._probe import probe as probe
from metanorm.design import Design as Design
from metanorm.design import DesignBuilder as DesignBuilder
from metanorm.design import make_design as make_design
from metanorm.nn import MetadataNorm as MetadataNorm
from metanorm.nn import MetadataSequential as MetadataSequential

_moved.install()

try:
    __version__ = version("metanorm")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "Design",
    "DesignBuilder",
    "MetadataNorm",
    "MetadataSequential",
    "ProbeRecord",
    "ProbeResult",
    "__version__",
    "design",
    "linalg",
    "make_design",
    "metrics",
    "nn",
    "plot_probe",
    "probe",
]
