"""Lightning callbacks that watch and repair BatchNorm; add them to any ``Trainer``."""

from bn_lightning.callbacks._base import BatchNormCallbackBase, find_batchnorm_layers
from bn_lightning.callbacks.drift import BatchNormHealthError, RunningStatDrift
from bn_lightning.callbacks.monitor import BatchNormMonitor

__all__ = [
    "BatchNormCallbackBase",
    "BatchNormHealthError",
    "BatchNormMonitor",
    "RunningStatDrift",
    "find_batchnorm_layers",
]
