"""RunningStatDrift: how far the running statistics (what eval uses) are from the batches, and health checks.

Provides :class:`RunningStatDrift` and :class:`BatchNormHealthError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from bn_lightning.callbacks.base import BatchNormCallbackBase
from bn_lightning.callbacks.recorder import LayerBatch
from bn_lightning.health import CHECKS, HealthChecks
from bn_lightning.layers import SyncBatchNorm
from bn_lightning.validation import check_choice

__all__ = ["CHECKS", "BatchNormHealthError", "RunningStatDrift", "gaussian_kl"]

ACTIONS = ("warn", "raise", "ignore")


class BatchNormHealthError(RuntimeError):
    """Raised by :class:`RunningStatDrift` for a failed health check whose action is ``"raise"``."""


def gaussian_kl(mean0: Tensor, var0: Tensor, mean1: Tensor, var1: Tensor) -> Tensor:
    """Elementwise ``KL( N(mean0, var0) || N(mean1, var1) )`` in nats.

    Example::

        >>> float(gaussian_kl(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.0), torch.tensor(1.0)))
        0.0
        >>> round(float(gaussian_kl(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(0.0), torch.tensor(1.0))), 3)
        0.5
    """
    return 0.5 * (torch.log(var1 / var0) + (var0 + (mean0 - mean1) ** 2) / var1 - 1)


class RunningStatDrift(BatchNormCallbackBase):
    """Measure the drift between batch and running statistics per BN layer, and check BN health.

    Every ``log_every_n_steps`` training batches, per BN layer ``<layer>`` with running statistics:

    - ``bn/<layer>/drift_kl``: mean over channels of ``KL( N(mu_B, var_B + eps) || N(mu_R, var_R + eps) )``, batch
      statistics ``B`` of this step against the running statistics ``R`` as they were BEFORE this batch updated them
      (what eval would have used); ``drift_kl_max``: its maximum over channels;
    - ``rm_velocity``, ``rv_velocity``: relative change ``||R_now - R_prev|| / ||R_prev||`` of running_mean and
      running_var since the previous record;
    - ``batch_size``: the smallest per-device batch (input dim 0) across ranks;
    - ``collapsed_frac``: fraction of channels with batch variance <= ``collapse_var``;
    - ``nonfinite_running``: number of NaN/inf entries in the running statistics;
    - ``nonfinite_batch``: number of channels whose batch statistics are NaN/inf (the input to the layer held them);
    - under DDP: ``rank_disagreement``: max over channels and ranks of ``|R_rank - mean_ranks(R)| / std``, with
      ``std = sqrt(mean_ranks(running_var) + eps)``: without SyncBatchNorm each rank ends with its own running
      statistics, the silent cause of rank-dependent evaluation.

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
        self.actions = {check: "warn" for check in CHECKS}
        owner = type(self).__name__
        for check, action in dict(actions or {}).items():
            check_choice(owner, "a health check in actions", check, CHECKS)
            self.actions[check] = check_choice(owner, f"actions[{check!r}]", action, ACTIONS)
        checks = HealthChecks(min_batch_size, max_drift_kl, collapse_var, max_collapsed_frac, drift_warmup_steps)
        self.min_batch_size = checks.min_batch_size
        self.max_drift_kl = checks.max_drift_kl
        self.collapse_var = checks.collapse_var
        self.max_collapsed_frac = checks.max_collapsed_frac
        self.drift_warmup_steps = checks.drift_warmup_steps
        self._previous_dict: dict[str, tuple[Tensor, Tensor]] = {}
        # the running statistics at the previous record, packed like LayerBatch.running, and which rows hold them;
        # while set, they are the truth and _previous_dict is stale
        self._previous_stack: tuple[Tensor, Tensor] | None = None
        self._max_channels = 0
        self.alerts: dict[str, dict[str, int]] = {check: {} for check in CHECKS}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        previous = self._previous  # by name: the layers may differ from the previous fit's
        super().on_fit_start(trainer, pl_module)
        self._max_channels = max((m.num_features for m in self._layers.values()), default=0)
        device = pl_module.device
        self._previous = {k: (rm.to(device), rv.to(device)) for k, (rm, rv) in previous.items()}

    @property
    def _previous(self) -> dict[str, tuple[Tensor, Tensor]]:
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

    @_previous.setter
    def _previous(self, value: dict[str, tuple[Tensor, Tensor]]) -> None:
        self._previous_stack = None
        self._previous_dict = dict(value)

    def _previous_packed(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The previous record's running statistics ``(L, 2, W)`` (zero-padded) and which rows hold them."""
        if self._previous_stack is None:
            stack = torch.zeros_like(like)
            valid = torch.zeros(like.shape[0], dtype=torch.bool, device=like.device)
            for i, name in enumerate(self._layers):
                prev = self._previous_dict.get(name)
                if prev is not None:
                    stack[i, 0, : prev[0].numel()] = prev[0]
                    stack[i, 1, : prev[1].numel()] = prev[1]
                    valid[i] = True
            self._previous_stack = (stack, valid)
        return self._previous_stack

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

    DERIVED = ("rank_disagreement",)

    @override
    def derive(self, per_rank: Tensor) -> Tensor:
        k, width = len(self.STATS), self._max_channels
        rm = per_rank[:, :, k : k + width]  # (world, layers, channels), NaN-padded
        rv = per_rank[:, :, k + width : k + 2 * width]
        eps = torch.tensor([m.eps for m in self._layers.values()], device=rm.device).view(1, -1, 1)
        std = (rv.mean(0, keepdim=True) + eps).sqrt()
        spread = ((rm - rm.mean(0, keepdim=True)).abs() / std).nan_to_num(nan=-1.0).amax(dim=(0, 2))
        return torch.where(spread >= 0, spread, float("nan")).unsqueeze(1)

    @override
    def on_record(self, trainer, values, extras, step) -> None:  # type: ignore[override]
        checks = self.checks
        for layer, stats in values.items():
            self._check(trainer, checks, layer, step, stats)

    @property
    def checks(self) -> HealthChecks:
        """The health checks with this callback's current thresholds."""
        return HealthChecks(
            self.min_batch_size, self.max_drift_kl, self.collapse_var, self.max_collapsed_frac, self.drift_warmup_steps
        )

    def _check(self, trainer: pl.Trainer, checks: HealthChecks, layer: str, step: int, stats: dict[str, float]) -> None:
        if "batch_size" not in stats:  # layer without running statistics
            return
        synchronised = isinstance(self._layers.get(layer), (nn.SyncBatchNorm, SyncBatchNorm))
        alerts = checks.evaluate(stats, self.batches_seen, synchronised, trainer.world_size)
        for alert in alerts:
            count = self.alerts[alert.check].get(layer, 0) + 1
            self.alerts[alert.check][layer] = count
            action = self.actions[alert.check]
            message = alert.message(layer, step)
            if action == "raise":
                raise BatchNormHealthError(message)
            if action == "warn" and count == 1:
                rank_zero_warn(message + " (further alerts of this kind for this layer are counted, not printed)")

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["previous"] = {k: (rm.cpu(), rv.cpu()) for k, (rm, rv) in self._previous.items()}
        state["alerts"] = {check: dict(counts) for check, counts in self.alerts.items()}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._previous = dict(state_dict.get("previous", {}))
        alerts = state_dict.get("alerts", {})
        self.alerts = {check: dict(alerts.get(check, {})) for check in CHECKS}
