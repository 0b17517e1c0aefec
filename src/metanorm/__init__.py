"""metanorm: Metadata Normalization (MDN, CVPR 2021) for PyTorch.

Regress metadata (scanner, site, skin shade...) out of a network's features, batch by batch, and
measure how much metadata the features still encode.
"""

from importlib.metadata import PackageNotFoundError, version

from metanorm import glm as glm
from metanorm import metrics as metrics
from metanorm import nn as nn
from metanorm.glm import Design as Design
from metanorm.glm import DesignBuilder as DesignBuilder
from metanorm.glm import make_design as make_design
from metanorm.nn import MetadataNorm as MetadataNorm
from metanorm.nn import MetadataSequential as MetadataSequential

try:
    __version__ = version("metanorm")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "Design",
    "DesignBuilder",
    "MetadataNorm",
    "MetadataSequential",
    "__version__",
    "glm",
    "make_design",
    "metrics",
    "nn",
]
