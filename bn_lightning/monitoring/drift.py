"""How far the running statistics (what eval uses) are from the batches, and BN health: :class:`DriftStats`.

Provides :class:`DriftStats` (the statistic set of RunningStatDrift and of a
:class:`~bn_lightning.monitoring.BatchNormRecorder` with ``drift=True``), :func:`gaussian_kl` and :data:`ACTIONS`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from bn_lightning import distributed
from bn_lightning.health import CHECKS, BatchNormHealthError, HealthChecks
from bn_lightning.layers import SyncBatchNorm
from bn_lightning.monitoring.hooks import LayerBatch
from bn_lightning.monitoring.statistics import Statistics
from bn_lightning.validation import check_choice

__all__ = ["ACTIONS", "DriftStats", "gaussian_kl"]

#: what a failed health check does
ACTIONS = ("warn", "raise", "ignore")


def gaussian_kl(mean0: Tensor, var0: Tensor, mean1: Tensor, var1: Tensor) -> Tensor:
    """Elementwise ``KL( N(mean0, var0) || N(mean1, var1) )`` in nats.

    Example::

        >>> float(gaussian_kl(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.0), torch.tensor(1.0)))
        0.0
        >>> round(float(gaussian_kl(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0.0), torch.tensor(1.0))), 3)
        0.5
    """
    return 0.5 * (torch.log(var1 / var0) + (var0 + (mean0 - mean1) ** 2) / var1 - 1)


def _warn_on_rank_zero(message: str) -> None:
    if not distributed.is_distributed() or dist.get_rank() == 0:
        warnings.warn(message, UserWarning, stacklevel=4)


class DriftStats(Statistics):
    """The drift between batch and running statistics per BN layer, and the BN health checks.

    Per BN layer ``<layer>`` with running statistics:

    - ``drift_kl``: mean over channels of ``KL( N(mu_B, var_B + eps) || N(mu_R, var_R + eps) )``, batch statistics
      ``B`` of the step against the running statistics ``R`` as they were BEFORE this batch updated them (what eval
      would have used); ``drift_kl_max``: its maximum over channels;
    - ``rm_velocity``, ``rv_velocity``: relative change ``||R_now - R_prev|| / ||R_prev||`` of running_mean and
      running_var since the previous record;
    - ``batch_size``: the smallest per-device batch (input dim 0) across ranks;
    - ``collapsed_frac``: fraction of channels with batch variance <= ``collapse_var``;
    - ``nonfinite_running``: number of NaN/inf entries in the running statistics;
    - ``nonfinite_batch``: number of channels whose batch statistics are NaN/inf (the input to the layer held them);
    - under DDP: ``rank_disagreement``: max over channels and ranks of ``|R_rank - mean_ranks(R)| / std``, with
      ``std = sqrt(mean_ranks(running_var) + eps)``: without SyncBatchNorm each rank ends with its own running
      statistics, the silent cause of rank-dependent evaluation.

    :meth:`observe` runs the :class:`~bn_lightning.health.HealthChecks` on every record: ``nonfinite``,
    ``small_batch`` (for a SyncBatchNorm, all ranks' samples), ``collapse``, ``drift``. Each check's action is
    ``"warn"`` (default; once per layer and check, on rank zero), ``"raise"``
    (:class:`~bn_lightning.health.BatchNormHealthError` on every rank alike, since the values are reduced first) or
    ``"ignore"``; :attr:`alerts` counts the failures per check and layer.

    Args:
        actions: check name -> ``"warn"`` | ``"raise"`` | ``"ignore"``; unnamed checks warn.
        min_batch_size: per-device batches smaller than this fail ``small_batch``.
        max_drift_kl: ``drift_kl`` above this (nats) fails ``drift``.
        collapse_var: a channel whose batch variance is at most this counts as collapsed.
        max_collapsed_frac: more collapsed channels than this fraction fail ``collapse``.
        drift_warmup_steps: the ``drift`` check starts after this many training steps.
        owner: the name errors about the arguments start with.

    Raises:
        ValueError: an unknown check or action, or a threshold out of its range.

    Example::

        >>> stats = DriftStats(actions={"nonfinite": "raise"}, min_batch_size=4)
        >>> stats.actions["nonfinite"], stats.actions["drift"], stats.checks.min_batch_size
        ('raise', 'warn', 4)
    """

    STATS = {
        "drift_kl": "mean",
        "drift_kl_max": "max",
        "rm_velocity": "mean",
        "rv_velocity": "mean",
        "batch_size": "min",
        "collapsed_frac": "mean",
        "nonfinite_running": "max",
        "nonfinite_batch": "max",
    }
    DERIVED = ("rank_disagreement",)

    def __init__(
        self,
        actions: Mapping[str, str] | None = None,
        min_batch_size: int = 8,
        max_drift_kl: float = 0.5,
        collapse_var: float = 1e-6,
        max_collapsed_frac: float = 0.5,
        drift_warmup_steps: int = 100,
        owner: str = "DriftStats",
    ) -> None:
        self.actions = {check: "warn" for check in CHECKS}
        for check, action in dict(actions or {}).items():
            check_choice(owner, "a health check in actions", check, CHECKS)
            self.actions[check] = check_choice(owner, f"actions[{check!r}]", action, ACTIONS)
        checks = HealthChecks(min_batch_size, max_drift_kl, collapse_var, max_collapsed_frac, drift_warmup_steps)
        self.min_batch_size = checks.min_batch_size
        self.max_drift_kl = checks.max_drift_kl
        self.collapse_var = checks.collapse_var
        self.max_collapsed_frac = checks.max_collapsed_frac
        self.drift_warmup_steps = checks.drift_warmup_steps
        self.alerts: dict[str, dict[str, int]] = {check: {} for check in CHECKS}
        self._layers: dict[str, _BatchNorm] = {}
        self._max_channels = 0
        self._previous_dict: dict[str, tuple[Tensor, Tensor]] = {}
        # the running statistics at the previous record, packed like LayerBatch.running, and which rows hold them;
        # while set, they are the truth and _previous_dict is stale
        self._previous_stack: tuple[Tensor, Tensor] | None = None

    @property
    def checks(self) -> HealthChecks:
        """The health checks with the current thresholds."""
        return HealthChecks(
            self.min_batch_size, self.max_drift_kl, self.collapse_var, self.max_collapsed_frac, self.drift_warmup_steps
        )

    # ------------------------------------------------------------------ the running statistics of the last record

    @property
    def previous(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Layer -> (running_mean, running_var) at the previous record."""
        if self._previous_stack is not None:
            stack, valid = self._previous_stack
            self._previous_stack = None
            self._previous_dict = {
                name: (stack[i, 0, : m.num_features].clone(), stack[i, 1, : m.num_features].clone())
                for (i, (name, m)), ok in zip(enumerate(self._layers.items()), valid.tolist(), strict=True)
                if ok
            }
        return self._previous_dict

    @previous.setter
    def previous(self, value: dict[str, tuple[Tensor, Tensor]]) -> None:
        self._previous_stack = None
        self._previous_dict = dict(value)

    def _previous_packed(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The previous record's running statistics ``(L, 2, W)`` (zero-padded) and which rows hold them."""
        if self._previous_stack is None:
            stack = torch.zeros_like(like)
            valid = torch.zeros(like.shape[0], dtype=torch.bool, device=like.device)
            for i, name in enumerate(self._layers):
                prev = self._previous_dict.get(name)
                if prev is not None:  # loaded from a checkpoint: may live on another device
                    stack[i, 0, : prev[0].numel()] = prev[0].to(like.device)
                    stack[i, 1, : prev[1].numel()] = prev[1].to(like.device)
                    valid[i] = True
            self._previous_stack = (stack, valid)
        return self._previous_stack

    # ------------------------------------------------------------------ Statistics

    @override
    def watch(self, layers: dict[str, _BatchNorm], device: torch.device) -> None:
        previous = self.previous  # by name: the layers may differ from the previous ones
        self._layers = dict(layers)
        self._max_channels = max((m.num_features for m in layers.values()), default=0)
        self.previous = {k: (rm.to(device), rv.to(device)) for k, (rm, rv) in previous.items()}

    @override
    def extra_width(self) -> int:
        # every rank's running_mean and running_var (padded to the widest layer) ride in the same all-gather
        return 2 * self._max_channels

    @override
    def compute(self, batch: LayerBatch) -> Tensor:
        mean, var, mask, n, eps = batch.mean, batch.var, batch.mask, batch.channels, batch.eps
        rm0, rv0 = batch.before[:, 0], batch.before[:, 1]
        running = batch.running
        rm, rv = running[:, 0], running[:, 1]
        nan = torch.full((), float("nan"), device=mean.device)
        # padding is 0 everywhere: the KL of two N(0, eps) is 0, norms and sums are unchanged
        kl = gaussian_kl(mean, var + eps, rm0, rv0 + eps)
        prev, had = self._previous_packed(running)
        velocity = (running - prev).norm(dim=2) / prev.norm(dim=2).clamp(min=1e-12)
        velocity = torch.where(had.unsqueeze(1), velocity, nan)
        columns = [
            kl.sum(1) / n,
            torch.where(mask, kl, -torch.inf).amax(1),
            velocity[:, 0],
            velocity[:, 1],
            batch.batch,
            ((var <= self.collapse_var) & mask).sum(1) / n,
            (~torch.isfinite(running)).sum((1, 2)),
            ((~torch.isfinite(mean) | ~torch.isfinite(var)) & mask).sum(1),
        ]
        values = torch.stack([c.float() for c in columns], dim=1)
        rows = torch.cat([values, torch.where(mask, rm, nan), torch.where(mask, rv, nan)], dim=1)
        # layers without running statistics (or that did not run) have nothing that drifts
        ok = batch.ran & batch.tracked
        self._previous_stack = (torch.where(ok.view(-1, 1, 1), running, prev), had | ok)
        return torch.where(ok.unsqueeze(1), rows, nan)

    @override
    def derive(self, per_rank: Tensor) -> Tensor:
        k, width = len(self.STATS), self._max_channels
        rm = per_rank[:, :, k : k + width]  # (world, layers, channels), NaN-padded
        rv = per_rank[:, :, k + width : k + 2 * width]
        eps = torch.tensor([m.eps for m in self._layers.values()], device=rm.device).view(1, -1, 1)
        std = (rv.mean(0, keepdim=True) + eps).sqrt()
        spread = ((rm - rm.mean(0, keepdim=True)).abs() / std).nan_to_num(nan=-1.0).amax(dim=(0, 2))
        return torch.where(spread >= 0, spread, float("nan")).unsqueeze(1)

    def observe(
        self, values: dict[str, dict[str, float]], extras: dict[str, list[float]], step: int, seen: int
    ) -> None:
        """Run the health checks on every layer's record (see the class docstring for what each action does)."""
        checks, world = self.checks, distributed.world_size()
        for layer, stats in values.items():
            if "batch_size" not in stats:  # layer without running statistics
                continue
            synchronised = isinstance(self._layers.get(layer), (nn.SyncBatchNorm, SyncBatchNorm))
            for alert in checks.evaluate(stats, seen, synchronised, world):
                count = self.alerts[alert.check].get(layer, 0) + 1
                self.alerts[alert.check][layer] = count
                action = self.actions[alert.check]
                message = alert.message(layer, step)
                if action == "raise":
                    raise BatchNormHealthError(message)
                if action == "warn" and count == 1:
                    _warn_on_rank_zero(
                        message + " (further alerts of this kind for this layer are counted, not printed)"
                    )

    # ------------------------------------------------------------------ checkpoints

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "previous": {k: (rm.cpu(), rv.cpu()) for k, (rm, rv) in self.previous.items()},
            "alerts": {check: dict(counts) for check, counts in self.alerts.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.previous = dict(state_dict.get("previous", {}))
        alerts = state_dict.get("alerts", {})
        self.alerts = {check: dict(alerts.get(check, {})) for check in CHECKS}
