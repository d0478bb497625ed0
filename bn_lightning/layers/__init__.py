"""BatchNorm layers built on :mod:`bn_lightning.functional`.

Plain (:class:`BatchNorm1d`/2d/3d, :class:`BatchNormXd`), synchronised (:class:`SyncBatchNorm`), frozen, ghost and
renorm variants, and the name -> class map used by configs (:func:`get_batchnorm_class`).
"""

from bn_lightning.layers.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormXd,
    ScratchBatchNormMixin,
    has_batch_stats,
)
from bn_lightning.layers.factory import BATCHNORM_IMPLS, get_batchnorm_class, resolve_impl
from bn_lightning.layers.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, FrozenBatchNormBase
from bn_lightning.layers.ghost import GhostBatchNorm1d, GhostBatchNorm2d
from bn_lightning.layers.renorm import BatchRenorm1d, BatchRenorm2d
from bn_lightning.layers.sync import ProcessGroupReducer, SyncBatchNorm

__all__ = [
    "BATCHNORM_IMPLS",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormXd",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormBase",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "ProcessGroupReducer",
    "ScratchBatchNormMixin",
    "SyncBatchNorm",
    "get_batchnorm_class",
    "has_batch_stats",
    "resolve_impl",
]
