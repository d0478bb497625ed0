"""BatchNorm monitoring without a Trainer: :class:`BatchNormRecorder` and the machinery behind it (torch only).

- :mod:`~bn_lightning.monitoring.recorder`: :class:`BatchNormRecorder`, the plain object any loop drives
  (``rec.step()`` after each training step), and :class:`Record`;
- :mod:`~bn_lightning.monitoring.statistics`: :class:`Statistics`, what a record computes (the extension point);
  :mod:`~bn_lightning.monitoring.activations` (:class:`MonitorStats`) and :mod:`~bn_lightning.monitoring.drift`
  (:class:`DriftStats`, the health checks) are the two sets the package ships;
- :mod:`~bn_lightning.monitoring.hooks`: :class:`LayerHooks`, the forward hooks and their stashes, shared per model
  through :mod:`~bn_lightning.monitoring.registry`; :class:`LayerBatch`, one step's stashes packed;
- the helpers :mod:`~bn_lightning.monitoring.discovery` (:func:`find_batchnorm_layers`),
  :mod:`~bn_lightning.monitoring.recovery` (batch statistics from the running-stat update),
  :mod:`~bn_lightning.monitoring.sampling` (bounded samples), :mod:`~bn_lightning.monitoring.packing` (many small
  tensors in one gather), :mod:`~bn_lightning.monitoring.reduction` (one collective across ranks).

The Lightning callbacks (:mod:`bn_lightning.callbacks`) and the Fabric callbacks (:mod:`bn_lightning.fabric`) are
thin users of :class:`BatchNormRecorder`.
"""

from bn_lightning.health import BatchNormHealthError
from bn_lightning.monitoring.activations import MonitorStats, sample_flat
from bn_lightning.monitoring.discovery import find_batchnorm_layers
from bn_lightning.monitoring.drift import ACTIONS, DriftStats, gaussian_kl
from bn_lightning.monitoring.hooks import LayerBatch, LayerHooks
from bn_lightning.monitoring.recorder import BatchNormRecorder, Record
from bn_lightning.monitoring.reduction import REDUCTIONS, reduce_across_ranks
from bn_lightning.monitoring.statistics import Statistics

__all__ = [
    "ACTIONS",
    "REDUCTIONS",
    "BatchNormHealthError",
    "BatchNormRecorder",
    "DriftStats",
    "LayerBatch",
    "LayerHooks",
    "MonitorStats",
    "Record",
    "Statistics",
    "find_batchnorm_layers",
    "gaussian_kl",
    "reduce_across_ranks",
    "sample_flat",
]
