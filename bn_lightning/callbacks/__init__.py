"""Lightning callbacks that watch and repair BatchNorm; add them to any ``Trainer``.

Watch: :class:`BatchNormMonitor` (activation statistics), :class:`RunningStatDrift` (running-stat drift, health).
Repair: :class:`PreciseBN` / :func:`recalibrate_bn` (population statistics, also of averaged weights),
:class:`BatchNormGap` (what the running statistics cost), :class:`BatchNormFreeze` (freezing done right),
:class:`BackboneFinetuning` (fine-tuning with a frozen backbone).
Guard: :class:`BatchNormGuard` (non-finite batches, skipped steps), :class:`AccumulateBatchNormStats` (one update per
optimizer step), :class:`SyncBatchNormBuffers` (the same statistics on every rank).

One callback per module; the watching callbacks are Lightning adapters of
:class:`~bn_lightning.monitoring.BatchNormRecorder` (the hooks, the statistics, the reduction across ranks live in
:mod:`bn_lightning.monitoring`, torch only): :mod:`~bn_lightning.callbacks.base` holds
:class:`BatchNormCallbackBase`, the abstract base (when to record under Lightning's cadence and gradient
accumulation, logging, checkpoints); :mod:`~bn_lightning.callbacks.discovery` gives :func:`find_batchnorm_layers`.
"""

from bn_lightning.callbacks.accumulate import AccumulateBatchNormStats
from bn_lightning.callbacks.base import BatchNormCallbackBase
from bn_lightning.callbacks.discovery import find_batchnorm_layers
from bn_lightning.callbacks.drift import BatchNormHealthError, RunningStatDrift
from bn_lightning.callbacks.finetuning import BackboneFinetuning
from bn_lightning.callbacks.freeze import BatchNormFreeze
from bn_lightning.callbacks.gap import BatchNormGap
from bn_lightning.callbacks.guard import BatchNormGuard, BatchNormNonFiniteError
from bn_lightning.callbacks.monitor import BatchNormMonitor
from bn_lightning.callbacks.precise_bn import PreciseBN
from bn_lightning.callbacks.sync_buffers import SyncBatchNormBuffers
from bn_lightning.precise_bn import recalibrate_bn

__all__ = [
    "AccumulateBatchNormStats",
    "BackboneFinetuning",
    "BatchNormCallbackBase",
    "BatchNormFreeze",
    "BatchNormGap",
    "BatchNormGuard",
    "BatchNormHealthError",
    "BatchNormMonitor",
    "BatchNormNonFiniteError",
    "PreciseBN",
    "RunningStatDrift",
    "SyncBatchNormBuffers",
    "find_batchnorm_layers",
    "recalibrate_bn",
]
