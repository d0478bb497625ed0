"""Lightning callbacks that watch and repair BatchNorm; add them to any ``Trainer``.

Watch: :class:`BatchNormMonitor` (activation statistics), :class:`RunningStatDrift` (running-stat drift, health).
Repair: :class:`PreciseBN` / :func:`recalibrate_bn` (population statistics), :class:`BatchNormGap` (what the running
statistics cost), :class:`BatchNormFreeze` (freezing done right).
"""

from bn_lightning.callbacks._base import BatchNormCallbackBase, find_batchnorm_layers
from bn_lightning.callbacks.drift import BatchNormHealthError, RunningStatDrift
from bn_lightning.callbacks.freeze import BatchNormFreeze
from bn_lightning.callbacks.gap import BatchNormGap
from bn_lightning.callbacks.monitor import BatchNormMonitor
from bn_lightning.callbacks.precise_bn import PreciseBN, recalibrate_bn

__all__ = [
    "BatchNormCallbackBase",
    "BatchNormFreeze",
    "BatchNormGap",
    "BatchNormHealthError",
    "BatchNormMonitor",
    "PreciseBN",
    "RunningStatDrift",
    "find_batchnorm_layers",
    "recalibrate_bn",
]
