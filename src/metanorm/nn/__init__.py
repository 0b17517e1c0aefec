"""Neural-network layers: the MDN estimators on one base, and the containers that feed them.

Every estimator subclasses one base (``metanorm.nn._base``) and has a synchronised class
(:class:`SyncMetadataNorm`, ...) and a lazy one (:class:`LazyMetadataNorm`, ...).
"""

from metanorm.nn import functional as functional
from metanorm.nn import scope as scope
from metanorm.nn import utils as utils
from metanorm.nn.container import MetadataSequential as MetadataSequential
from metanorm.nn.container import takes_metadata as takes_metadata
from metanorm.nn.convert import convert_metadata_norm as convert_metadata_norm
from metanorm.nn.functional import NonFiniteEstimateError as NonFiniteEstimateError
from metanorm.nn.functional import metadata_norm as metadata_norm
from metanorm.nn.location_scale import (
    LazyMetadataLocationScaleNorm as LazyMetadataLocationScaleNorm,
)
from metanorm.nn.location_scale import MetadataLocationScaleNorm as MetadataLocationScaleNorm
from metanorm.nn.metadata_norm import LazyMetadataNorm as LazyMetadataNorm
from metanorm.nn.metadata_norm import MetadataNorm as MetadataNorm
from metanorm.nn.penalty import LazyPenaltyMetadataNorm as LazyPenaltyMetadataNorm
from metanorm.nn.penalty import PenaltyMetadataNorm as PenaltyMetadataNorm
from metanorm.nn.penalty import split_parameters as split_parameters
from metanorm.nn.recursive import LazyRecursiveMetadataNorm as LazyRecursiveMetadataNorm
from metanorm.nn.recursive import RecursiveMetadataNorm as RecursiveMetadataNorm
from metanorm.nn.scale import LazyMetadataScaleNorm as LazyMetadataScaleNorm
from metanorm.nn.scale import MetadataScaleNorm as MetadataScaleNorm
from metanorm.nn.scope import MetadataModel as MetadataModel
from metanorm.nn.scope import current_metadata as current_metadata
from metanorm.nn.scope import metadata_scope as metadata_scope
from metanorm.nn.sync import SyncMetadataLocationScaleNorm as SyncMetadataLocationScaleNorm
from metanorm.nn.sync import SyncMetadataNorm as SyncMetadataNorm
from metanorm.nn.sync import SyncMetadataScaleNorm as SyncMetadataScaleNorm
from metanorm.nn.sync import SyncPenaltyMetadataNorm as SyncPenaltyMetadataNorm
from metanorm.nn.sync import SyncRecursiveMetadataNorm as SyncRecursiveMetadataNorm
from metanorm.nn.sync import global_design_statistics as global_design_statistics
from metanorm.nn.sync import revert_sync_metadata_norm as revert_sync_metadata_norm

__all__ = [
    "LazyMetadataLocationScaleNorm",
    "LazyMetadataNorm",
    "LazyMetadataScaleNorm",
    "LazyPenaltyMetadataNorm",
    "LazyRecursiveMetadataNorm",
    "MetadataLocationScaleNorm",
    "MetadataModel",
    "MetadataNorm",
    "MetadataScaleNorm",
    "MetadataSequential",
    "NonFiniteEstimateError",
    "PenaltyMetadataNorm",
    "RecursiveMetadataNorm",
    "SyncMetadataLocationScaleNorm",
    "SyncMetadataNorm",
    "SyncMetadataScaleNorm",
    "SyncPenaltyMetadataNorm",
    "SyncRecursiveMetadataNorm",
    "convert_metadata_norm",
    "current_metadata",
    "functional",
    "global_design_statistics",
    "metadata_norm",
    "metadata_scope",
    "revert_sync_metadata_norm",
    "scope",
    "split_parameters",
    "takes_metadata",
    "utils",
]
