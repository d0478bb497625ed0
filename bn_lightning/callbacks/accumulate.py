"""AccumulateBatchNormStats: under gradient accumulation, update the running statistics once per optimizer step.

Provides :class:`AccumulateBatchNormStats`.

Why: with ``Trainer(accumulate_grad_batches=k)`` every micro-batch moves the running statistics by ``momentum``, so
they follow k small batches per optimizer step instead of the one large batch the step trains on (Lightning#17446):
with ``momentum=0.1`` and k=4 they forget four times faster, they weight the window's last micro-batch most, and
``momentum=None`` (a cumulative average) counts k times too many batches. This callback merges the k micro-batches'
statistics exactly (:func:`bn_lightning.functional.merge_stats`) and applies ONE update per optimizer step, equal (to
float rounding) to the update one batch k times as large would give.

What it does not change: each micro-batch is still NORMALISED with its own statistics, as BN does; a small
micro-batch normalises with noisy statistics whatever the running ones are. For that part synchronise more samples
per normalisation (``bn=sync``, :class:`bn_lightning.SyncBatchNorm` across devices) or correct towards the running
statistics (``bn=renorm``, Batch Renormalization).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from bn_lightning import distributed
from bn_lightning.callbacks.guard import StepWatcher
from bn_lightning.functional import BatchStats, batch_stats, merge_stats, update_running_stats
from bn_lightning.guards import StatSnapshot, is_guarded, stat_layers
from bn_lightning.layers import has_batch_stats

__all__ = ["AccumulateBatchNormStats"]


class AccumulateBatchNormStats(Callback):
    """With ``accumulate_grad_batches=k``, one running-statistics update per optimizer step, from all k micro-batches.

    How: before every micro-batch the layers' state is copied; a forward hook on every layer with running
    statistics (torch's BN layers and bn_lightning's, SyncBatchNorm, Ghost, Renorm) takes the batch statistics the
    layer just normalised with and puts the running statistics back as they were, so they do not move during the
    window (evaluation between micro-batches, and Batch Renormalization's correction, see those of the last
    optimizer step). The statistics of a micro-batch count once Lightning runs its backward (a micro-batch whose
    ``training_step`` returned ``None`` trains nothing and is left out); when the optimizer step runs, each layer's
    micro-batch statistics are merged exactly (float64) and folded in with ONE update, with the layer's own
    ``momentum`` (``None``: a cumulative average over optimizer steps; ``num_batches_tracked`` counts optimizer
    steps). A step that does not run (AMP's GradScaler found inf/NaN gradients) folds in nothing. The last, shorter
    window of an epoch merges the micro-batches it has.

    Where the statistics come from: bn_lightning's layers keep them (``last_batch_stats``, free; for SyncBatchNorm
    those of the whole process group, so every rank folds in the same update); torch's layers run their forward with
    ``momentum=0.0`` (set in a forward pre-hook that runs before any other, put back in the forward hook), and their
    statistics are computed from the input (one pass, :func:`bn_lightning.functional.batch_stats`). So a monitor
    (:class:`~bn_lightning.callbacks.BatchNormMonitor`, :class:`~bn_lightning.callbacks.RunningStatDrift`) that
    recovers batch statistics from the running-stat update sees no update and reads the input instead. Torch's
    ``nn.SyncBatchNorm`` under DDP runs with ``momentum=1.0``, which writes the group's batch mean and unbiased
    variance into its buffers, counted as ``world_size`` times the local batch (ranks with equal batch sizes). Ghost
    BN folds in its micro-batches' union, once per step. Forward passes inside :func:`bn_lightning.no_stat_update`
    are ignored.

    With ``accumulate_grad_batches=1`` the callback does nothing. Statistics of a window cut by a checkpoint and a
    resume are lost (the window restarts).

    Example::

        >>> cb = AccumulateBatchNormStats()
        >>> cb.updates
        0
    """

    def __init__(self) -> None:
        #: optimizer steps whose merged statistics were folded in
        self.updates = 0
        self._watcher = StepWatcher(on_step=self._apply)
        self._layers: dict[str, nn.Module] = {}
        self._snapshot: StatSnapshot | None = None
        self._handles: list[Any] = []
        self._momenta: dict[int, Any] = {}
        self._pending: dict[str, list[BatchStats]] = {}
        self._window: dict[str, list[BatchStats]] = {}
        self._backward_seen = False

    # ------------------------------------------------------------------ hooks

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()
        if trainer.accumulate_grad_batches <= 1:
            return
        self._layers = stat_layers(pl_module)
        self._snapshot = StatSnapshot(self._layers)
        for name, layer in self._layers.items():
            # first of the pre-hooks: a recorder's pre-hook must already see the momentum the forward runs with
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook, prepend=True))
            self._handles.append(layer.register_forward_hook(self._make_hook(name)))
        self._watcher.attach(list(trainer.optimizers))
        self._window = {}

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._snapshot is None:
            return
        self._snapshot.take()
        self._pending = {}
        self._backward_seen = False
        self._watcher.begin_batch()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._backward_seen = True

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._watcher.attempted()

    @override
    def on_train_batch_end(  # type: ignore[override]
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._snapshot is None:
            return
        self._commit()
        if self._watcher.skipped:
            self._window = {}  # the step did not run: its statistics never reach the running statistics

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()

    # ------------------------------------------------------------------ forward hooks

    def _pre_hook(self, layer: nn.Module, args: Any) -> None:
        if layer.training and layer.track_running_stats and not has_batch_stats(layer) and not is_guarded(layer):
            self._momenta[id(layer)] = layer.momentum
            # torch's SyncBatchNorm writes the group's batch mean and unbiased variance into its buffers with 1.0;
            # other layers leave them as they are with 0.0, and the statistics come from the input
            layer.momentum = 1.0 if _group_stats_only(layer) else 0.0

    def _make_hook(self, name: str) -> Any:
        def hook(layer: nn.Module, args: Any, output: Any) -> None:
            momentum = self._momenta.pop(id(layer), _UNSET)
            if momentum is not _UNSET:
                layer.momentum = momentum
            if not layer.training or not layer.track_running_stats or is_guarded(layer):
                return
            if momentum is _UNSET:
                stats = layer.last_batch_stats
            elif _group_stats_only(layer):
                stats = _written_stats(layer, args[0])
            else:
                stats = batch_stats(args[0].detach())
            if stats is not None:  # detached: a window must not keep the micro-batches' autograd graphs alive
                stats = BatchStats(*(t.detach() if isinstance(t, Tensor) else t for t in stats))
                self._pending.setdefault(name, []).append(stats)
            assert self._snapshot is not None
            self._snapshot.restore([name], kept=False)

        return hook

    # ------------------------------------------------------------------ the window

    def _commit(self) -> None:
        """Move this micro-batch's statistics into the window if Lightning ran its backward, else drop them."""
        if self._backward_seen:
            for name, stats in self._pending.items():
                self._window.setdefault(name, []).extend(stats)
        self._pending = {}

    def _apply(self) -> None:
        """The optimizer step ran: fold each layer's merged window statistics into its running statistics."""
        self._commit()
        for name, stats in self._window.items():
            layer = self._layers[name]
            merged = merge_stats(
                torch.stack([s.mean.detach().double() for s in stats]),
                torch.stack([s.var.detach().double() for s in stats]),
                torch.stack([torch.as_tensor(s.count, dtype=torch.float64).detach().reshape(()) for s in stats]),
            )
            update_running_stats(
                layer.running_mean, layer.running_var, merged, layer.momentum, layer.num_batches_tracked
            )
        if self._window:
            self.updates += 1
        self._window = {}
        self._backward_seen = False  # forwards after the step belong to the next window

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in self._layers.values():
            momentum = self._momenta.pop(id(layer), _UNSET)
            if momentum is not _UNSET:
                layer.momentum = momentum
        self._watcher.detach()
        self._snapshot = None
        self._window = {}
        self._pending = {}

    # ------------------------------------------------------------------ checkpoints

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = int(state_dict.get("updates", 0))


_UNSET = object()


def _group_stats_only(layer: nn.Module) -> bool:
    """Whether the layer's batch statistics are those of a process group, which only its buffers can tell."""
    return isinstance(layer, nn.SyncBatchNorm) and distributed.is_distributed()


def _written_stats(layer: nn.Module, x: Tensor) -> BatchStats:
    """The batch statistics torch's SyncBatchNorm, run with ``momentum=1.0``, just wrote into its buffers."""
    count = x.numel() // max(x.shape[1], 1) * distributed.world_size(layer.process_group)
    n = float(count)
    var = layer.running_var.detach().double() * ((n - 1) / n if n > 1 else 1.0)
    return BatchStats(layer.running_mean.detach().double().clone(), var, count)
