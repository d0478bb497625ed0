"""What the BN-watching callbacks share: layer discovery, armed hooks, one reduction and one host copy per record.

Provides :class:`BatchNormCallbackBase` (abstract) and :func:`find_batchnorm_layers`. A subclass says which per-layer
values it wants (:meth:`_layer_values`, computed on the device inside the layer's forward hook, only on steps that
record) and how each is reduced across ranks; the base stacks every layer's values into one tensor, reduces it with
ONE collective under DDP, copies it to the host ONCE, and hands plain floats to :meth:`_on_record` on every rank
(so decisions that raise are taken identically everywhere) and logs them on rank zero only.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from bn_lightning.functional import BatchStats, batch_stats
from bn_lightning.layers.batchnorm import ScratchBatchNormMixin

__all__ = ["REDUCTIONS", "BatchNormCallbackBase", "find_batchnorm_layers", "layer_batch_stats"]

REDUCTIONS = ("mean", "max", "min", "sum")
_REDUCE = {
    "mean": lambda t: t.nanmean(0),
    "sum": lambda t: t.nansum(0),
    "max": lambda t: torch.where(t.isnan(), -torch.inf, t).amax(0),
    "min": lambda t: torch.where(t.isnan(), torch.inf, t).amin(0),
}


def find_batchnorm_layers(
    module: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> dict[str, _BatchNorm]:
    """Qualified name -> BN layer (torch's, ours, SyncBatchNorm), filtered by ``fnmatch`` patterns on the name.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Sequential(nn.BatchNorm1d(4)))
        >>> list(find_batchnorm_layers(net)), list(find_batchnorm_layers(net, exclude=["2.*"]))
        (['1', '2.0'], ['1'])
    """
    found = {}
    for name, m in module.named_modules():
        if not isinstance(m, _BatchNorm):
            continue
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        found[name] = m
    return found


def layer_batch_stats(layer: _BatchNorm, x: Tensor, before: tuple[Tensor, Tensor, Tensor | None] | None) -> BatchStats:
    """The per-channel batch statistics ``layer`` just normalised ``x`` with, as cheaply as possible.

    - bn_lightning layers keep them (:attr:`~bn_lightning.layers.ScratchBatchNormMixin.last_batch_stats`): free;
    - torch layers that updated their running statistics with a factor ``f >= 0.01``: recovered from the update in
      O(channels), inverting ``running = (1 - f) * before + f * batch`` (``before`` = the buffers snapshotted by the
      pre-forward hook; relative error ~1e-7 / f);
    - otherwise (no tracking, tiny or zero momentum, ``momentum=None`` after 100 batches, eval-mode layer): computed
      from ``x``, one pass over the activation (on recording steps only).
    """
    if isinstance(layer, ScratchBatchNormMixin) and layer.last_batch_stats is not None:
        return layer.last_batch_stats
    count = x.numel() // max(x.shape[1], 1)
    if before is not None and layer.training and layer.track_running_stats and count > 1:
        rm0, rv0, nbt0 = before
        if layer.momentum is None:
            factor = 1.0 / float(nbt0 + 1) if nbt0 is not None else 0.0
        else:
            factor = float(layer.momentum)
        # inverting the update divides float32 rounding by the factor: below 1e-2 (momentum=None after 100 batches)
        # it would cost more than 1e-5 relative error, so compute from the input instead
        if factor >= 1e-2:
            mean = (layer.running_mean.float() - (1 - factor) * rm0) / factor
            unbiased = (layer.running_var.float() - (1 - factor) * rv0) / factor
            return BatchStats(mean, (unbiased * ((count - 1) / count)).clamp_(min=0), count)
    return batch_stats(x.detach())


class BatchNormCallbackBase(Callback):
    """Base of :class:`~bn_lightning.callbacks.BatchNormMonitor` and :class:`~bn_lightning.callbacks.RunningStatDrift`.

    Args:
        log_every_n_steps: record every this many training batches; ``None`` uses the Trainer's
            ``log_every_n_steps``.
        include: ``fnmatch`` patterns of BN layer names (qualified, e.g. ``"net.features.*"``) to watch.
        exclude: patterns of BN layer names to skip.
        prefix: metric key prefix; keys are ``<prefix>/<layer>/<stat>``.
    """

    #: stat name -> cross-rank reduction ("mean", "max", "min" or "sum"); set by subclasses
    STATS: dict[str, str] = {}
    #: stats computed under DDP from every rank's values (see :meth:`_derive`)
    DERIVED: tuple[str, ...] = ()

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        prefix: str = "bn",
    ) -> None:
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ValueError(f"log_every_n_steps must be a positive int or None, got {log_every_n_steps!r}")
        for arg, value in (("include", include), ("exclude", exclude)):
            if isinstance(value, str):
                raise TypeError(f"{arg} must be a sequence of name patterns, got the string {value!r}")
        self.log_every_n_steps = log_every_n_steps
        self.include = None if include is None else list(include)
        self.exclude = None if exclude is None else list(exclude)
        self.prefix = prefix
        self._layers: dict[str, _BatchNorm] = {}
        self._handles: list[Any] = []
        self._armed = False
        self._values: dict[str, Tensor] = {}
        self._snapshots: dict[str, tuple[Tensor, Tensor, Tensor | None]] = {}
        self.batches_seen = 0
        self.records = 0

    # ------------------------------------------------------------------ subclass interface

    def _needs_snapshot(self, layer: _BatchNorm) -> bool:
        """Whether the pre-forward hook must copy this layer's running buffers (O(channels)) on recording steps."""
        return layer.track_running_stats and layer.running_mean is not None

    def _layer_values(self, name: str, layer: _BatchNorm, x: Tensor, y: Tensor) -> Tensor:
        """The values of :attr:`STATS` (in order) for one layer, a 1-d tensor on the layer's device."""
        raise NotImplementedError

    def _derive(self, per_rank: Tensor) -> Tensor:
        """Under DDP: the :attr:`DERIVED` statistics ``(layers, len(DERIVED))`` of the per-rank values.

        ``per_rank`` is ``(world, layers, columns)``; computed on the device, before the host copy.
        """
        raise NotImplementedError

    def _on_record(
        self, trainer: pl.Trainer, values: dict[str, dict[str, float]], extras: dict[str, list[float]], step: int
    ) -> None:
        """Called on EVERY rank after a record.

        Receives the reduced values (layer -> stat -> float; NaN values dropped) and the extra columns (layer ->
        floats).
        """

    # ------------------------------------------------------------------ hooks

    def _pre_hook(self, name: str):
        def hook(layer: nn.Module, args: tuple) -> None:
            if self._armed and self._needs_snapshot(layer):  # type: ignore[arg-type]
                nbt = layer.num_batches_tracked
                self._snapshots[name] = (
                    layer.running_mean.detach().float().clone(),
                    layer.running_var.detach().float().clone(),
                    None if nbt is None else nbt.detach().clone(),
                )

        return hook

    def _post_hook(self, name: str):
        def hook(layer: nn.Module, args: tuple, output: Tensor) -> None:
            if not self._armed or not args or not isinstance(args[0], Tensor):
                return
            with torch.no_grad():
                self._values[name] = self._layer_values(name, layer, args[0].detach(), output.detach())  # type: ignore[arg-type]

        return hook

    def _install(self, pl_module: pl.LightningModule) -> None:
        self._remove()
        self._layers = find_batchnorm_layers(pl_module, self.include, self.exclude)
        for name, layer in self._layers.items():
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(name)))
            self._handles.append(layer.register_forward_hook(self._post_hook(name)))

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._armed = False
        self._values = {}
        self._snapshots = {}

    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the BN layers being watched (after the fit started)."""
        return list(self._layers)

    def _every(self, trainer: pl.Trainer) -> int:
        return self.log_every_n_steps or max(int(trainer.log_every_n_steps), 1)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the strategy set up the model: a LayerSync plugin has already converted the layers
        self._install(pl_module)
        if not self._layers:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"{type(self).__name__}: the model has no BatchNorm layer to watch; it will log nothing.")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning does not call teardown after an exception: without this the hooks stay on the model (armed, if
        # the exception came mid-step)
        self._remove()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self._armed = bool(self._layers) and self.batches_seen % self._every(trainer) == 0
        self._values = {}
        self._snapshots = {}

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        armed, self._armed = self._armed, False
        self.batches_seen += 1
        if not armed:
            return
        # a row for EVERY watched layer (NaN where this rank did not run it): every rank sends the same shape
        width = len(self.STATS) + self._extra_width()
        rows = []
        for name in self._layers:
            v = self._values.get(name)
            rows.append(v.float() if v is not None else torch.full((width,), float("nan"), device=pl_module.device))
        local = torch.stack(rows) if rows else torch.empty(0, width, device=pl_module.device)
        reduced, per_rank = self._reduce(trainer, local)
        names = list(self.STATS)
        if per_rank.shape[0] > 1 and self.DERIVED:  # statistics of the per-rank values, still on the device
            reduced = torch.cat([reduced[:, : len(names)], self._derive(per_rank), reduced[:, len(names) :]], dim=1)
            names += list(self.DERIVED)
        host = reduced.cpu()  # the ONE host transfer of this record
        values: dict[str, dict[str, float]] = {}
        extras: dict[str, list[float]] = {}
        for name, row in zip(self._layers, host.tolist(), strict=True):
            if all(v != v for v in row[: len(names)]):  # all NaN: no rank ran this layer in this step
                continue
            values[name] = {k: v for k, v in zip(names, row[: len(names)], strict=True) if v == v}
            extras[name] = row[len(names) :]
        step = trainer.global_step
        self.records += 1
        self._log(trainer, values, step)
        self._on_record(trainer, values, extras, step)
        self._values = {}
        self._snapshots = {}

    # ------------------------------------------------------------------ reduction and logging

    def _extra_width(self) -> int:
        """Number of extra (unnamed, summed across ranks) columns after :attr:`STATS`, e.g. histogram bins."""
        return 0

    def _reduce(self, trainer: pl.Trainer, local: Tensor) -> tuple[Tensor, Tensor]:
        """Reduce the ``(layers, columns)`` tensor across ranks with ONE all-gather; NaN entries are ignored.

        Returns the reduced tensor and the per-rank tensor ``(world, layers, columns)`` (world 1 without DDP).
        """
        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return local, local.unsqueeze(0)
        gathered = [torch.empty_like(local) for _ in range(trainer.world_size)]
        dist.all_gather(gathered, local.contiguous())
        per_rank = torch.stack(gathered)
        hows = list(self.STATS.values()) + ["sum"] * self._extra_width()
        columns = [_REDUCE[how](per_rank[:, :, j]) for j, how in enumerate(hows)]
        return (torch.stack(columns, dim=1) if columns else local), per_rank

    def _log(self, trainer: pl.Trainer, values: dict[str, dict[str, float]], step: int) -> None:
        if not trainer.is_global_zero or not trainer.loggers:
            return
        metrics = {f"{self.prefix}/{layer}/{stat}": v for layer, stats in values.items() for stat, v in stats.items()}
        if not metrics:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ checkpoints

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, include=self.include, exclude=self.exclude)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"batches_seen": self.batches_seen, "records": self.records}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_seen = int(state_dict.get("batches_seen", 0))
        self.records = int(state_dict.get("records", 0))
