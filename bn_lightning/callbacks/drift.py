"""RunningStatDrift: how far the running statistics (what eval uses) are from the batches, and health checks.

Provides :class:`RunningStatDrift`, the Lightning adapter of :class:`~bn_lightning.monitoring.DriftStats`; re-exports
:class:`~bn_lightning.health.BatchNormHealthError` and :func:`~bn_lightning.monitoring.gaussian_kl`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from bn_lightning.callbacks.base import BatchNormCallbackBase, delegated
from bn_lightning.health import CHECKS, BatchNormHealthError, HealthChecks
from bn_lightning.monitoring import DriftStats, LayerBatch, gaussian_kl

__all__ = ["CHECKS", "BatchNormHealthError", "RunningStatDrift", "gaussian_kl"]


class RunningStatDrift(BatchNormCallbackBase):
    """Measure the drift between batch and running statistics per BN layer, and check BN health.

    Every ``log_every_n_steps`` training batches, per BN layer ``<layer>`` with running statistics:
    ``bn/<layer>/drift_kl`` (KL of the batch statistics against the running statistics as they were before the batch),
    ``drift_kl_max``, ``rm_velocity``, ``rv_velocity``, ``batch_size``, ``collapsed_frac``, ``nonfinite_running``,
    ``nonfinite_batch`` and, under DDP, ``rank_disagreement``: each is defined in
    :class:`~bn_lightning.monitoring.DriftStats`, the statistic set this callback records.

    Health checks (:class:`~bn_lightning.health.HealthChecks`), with messages naming the layer and the
    step, what was seen and what to do: ``nonfinite`` (non-finite batch or running statistics), ``small_batch``
    (per-device batch below ``min_batch_size``; for a SyncBatchNorm, all ranks' samples), ``collapse`` (more than
    ``max_collapsed_frac`` of the channels collapsed), ``drift`` (``drift_kl`` above ``max_drift_kl``). Each check's
    action is ``"warn"`` (default; once per layer and check), ``"raise"`` (:class:`BatchNormHealthError` on every rank
    alike, since the values are reduced first) or ``"ignore"``. Alert counts are kept in checkpoints.

    Args:
        log_every_n_steps: record every this many training batches; ``None``: the Trainer's ``log_every_n_steps``.
        include: ``fnmatch`` patterns of BN layer names to watch.
        exclude: patterns of BN layer names to skip.
        actions: check name -> ``"warn"`` | ``"raise"`` | ``"ignore"``; unnamed checks warn.
        min_batch_size: per-device batches smaller than this fail ``small_batch``.
        max_drift_kl: ``drift_kl`` above this (nats) fails ``drift``.
        collapse_var: a channel whose batch variance is at most this counts as collapsed.
        max_collapsed_frac: more collapsed channels than this fraction fail ``collapse``.
        drift_warmup_steps: the ``drift`` check starts after this many training batches (running statistics start
            at 0 and 1 and need about ``3 / momentum`` batches to catch up; ``drift_kl`` is logged from the start).
        prefix: metric key prefix.

    Example::

        >>> from bn_lightning.callbacks import RunningStatDrift
        >>> cb = RunningStatDrift(actions={"nonfinite": "raise"}, min_batch_size=4)
        >>> cb.actions["nonfinite"], cb.actions["drift"]
        ('raise', 'warn')
    """

    STATS = DriftStats.STATS
    DERIVED = DriftStats.DERIVED

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        actions: Mapping[str, str] | None = None,
        min_batch_size: int = 8,
        max_drift_kl: float = 0.5,
        collapse_var: float = 1e-6,
        max_collapsed_frac: float = 0.5,
        drift_warmup_steps: int = 100,
        prefix: str = "bn",
    ) -> None:
        super().__init__(log_every_n_steps, include, exclude, prefix)
        #: the statistic set this callback records (and whose health checks it runs)
        self.stats = DriftStats(
            actions,
            min_batch_size,
            max_drift_kl,
            collapse_var,
            max_collapsed_frac,
            drift_warmup_steps,
            owner=type(self).__name__,
        )

    actions = delegated("actions")
    alerts = delegated("alerts")
    min_batch_size = delegated("min_batch_size")
    max_drift_kl = delegated("max_drift_kl")
    collapse_var = delegated("collapse_var")
    max_collapsed_frac = delegated("max_collapsed_frac")
    drift_warmup_steps = delegated("drift_warmup_steps")
    _previous = delegated("previous")

    @property
    def checks(self) -> HealthChecks:
        """The health checks with this callback's current thresholds."""
        return self.stats.checks

    @override
    def watch(self, layers: dict[str, _BatchNorm], device: torch.device) -> None:
        self.stats.watch(layers, device)

    @override
    def extra_width(self) -> int:
        return self.stats.extra_width()

    @override
    def compute(self, batch: LayerBatch) -> Tensor:
        return self.stats.compute(batch)

    @override
    def derive(self, per_rank: Tensor) -> Tensor:
        return self.stats.derive(per_rank)

    @override
    def on_record(self, trainer, values, extras, step) -> None:  # type: ignore[override]
        self.stats.observe(values, extras, step, self.batches_seen)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self.stats.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.stats.load_state_dict(state_dict)
