"""BatchNorm layers built on :mod:`bn_lightning.functional`."""

from bn_lightning.layers.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormXd, ScratchBatchNormMixin
from bn_lightning.layers.factory import BATCHNORM_IMPLS, get_batchnorm_class
from bn_lightning.layers.sync import ProcessGroupReducer, SyncBatchNorm

__all__ = [
    "BATCHNORM_IMPLS",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormXd",
    "ProcessGroupReducer",
    "ScratchBatchNormMixin",
    "SyncBatchNorm",
    "get_batchnorm_class",
]
