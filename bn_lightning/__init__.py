"""bn_lightning: the BatchNorm toolkit for PyTorch Lightning.

Flat re-exports of the public API; see the README for a tour.
"""

from bn_lightning import functional
from bn_lightning.callbacks.precise_bn import recalibrate_bn
from bn_lightning.config import BatchNormPolicy, FreezePolicy, PreciseBNPolicy
from bn_lightning.convert import bn_param_groups, convert_batchnorm, convert_sync_batchnorm, revert_sync_batchnorm
from bn_lightning.layers import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm1d,
    BatchRenorm2d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    SyncBatchNorm,
    get_batchnorm_class,
    set_gloo_event_loop_policy,
)
from bn_lightning.module import BatchNormModule, ClassificationModule

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormModule",
    "BatchNormPolicy",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "ClassificationModule",
    "FreezePolicy",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "PreciseBNPolicy",
    "SyncBatchNorm",
    "__version__",
    "bn_param_groups",
    "convert_batchnorm",
    "convert_sync_batchnorm",
    "functional",
    "get_batchnorm_class",
    "recalibrate_bn",
    "revert_sync_batchnorm",
    "set_gloo_event_loop_policy",
]
