"""BatchNormGuard: no non-finite batch and no skipped optimizer step leaves a trace in the running statistics.

Provides :class:`BatchNormGuard`, :class:`BatchNormNonFiniteError` and :class:`StepWatcher` (whether the optimizer
steps Lightning attempted in a batch really happened; :class:`~bn_lightning.callbacks.AccumulateBatchNormStats`
uses it too).

Why: a BN layer folds every training batch into its running statistics during the FORWARD pass, before anyone knows
whether the batch is any good. One batch with a NaN or an infinity (a corrupt sample, an overflow) makes the running
mean or variance NaN for good (pytorch#90342): the model evaluates to NaN although training recovers. And when the
optimizer step is skipped (AMP's GradScaler found inf/NaN gradients; ``training_step`` returned ``None``), the weights
stay as they were but the statistics have moved on, towards activations of a step that never happened.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

from bn_lightning import distributed
from bn_lightning.guards import StatSnapshot, all_finite, stat_layers
from bn_lightning.validation import check_bool, check_choice

__all__ = ["NONFINITE_ACTIONS", "BatchNormGuard", "BatchNormNonFiniteError", "StepWatcher"]

#: what :class:`BatchNormGuard` does with a batch whose statistics are not finite
NONFINITE_ACTIONS = ("skip", "raise")


class BatchNormNonFiniteError(FloatingPointError):
    """A training batch gave non-finite BN statistics; the message names the layers and the step.

    Attributes:
        layers: qualified names of the layers (empty on a rank that only followed another rank's decision).
        step: ``trainer.global_step`` when that batch started (the optimizer step it belongs to).
    """

    def __init__(self, message: str, layers: list[str], step: int) -> None:
        super().__init__(message)
        self.layers = layers
        self.step = step


class StepWatcher:
    """Counts, per training batch, the optimizer steps Lightning attempted and those that really ran.

    Lightning calls ``on_before_optimizer_step`` right before every step it attempts (:meth:`attempted`); a
    post-step hook on each optimizer (:meth:`attach`) counts the steps that ran. AMP's GradScaler does not call
    ``optimizer.step()`` when it found inf/NaN gradients, and Lightning does not either with AMP when
    ``training_step`` returned ``None``: those attempts stay unmatched, and :attr:`skipped` says so. Costs no host
    read.

    Example::

        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> watcher = StepWatcher()
        >>> watcher.attach([opt])
        >>> watcher.begin_batch(); watcher.attempted(); opt.step()
        >>> watcher.skipped, watcher.steps
        (False, 1)
        >>> watcher.begin_batch(); watcher.attempted()  # a scaler that found inf never calls opt.step()
        >>> watcher.skipped
        True
        >>> watcher.detach()
    """

    def __init__(self, on_step: Any = None) -> None:
        self.on_step = on_step
        self.attempts = 0
        self.steps = 0
        self._handles: list[Any] = []

    def attach(self, optimizers: list[Optimizer]) -> None:
        """Register the post-step hook on every optimizer (any previous registration is removed first)."""
        self.detach()
        self._handles = [opt.register_step_post_hook(self._stepped) for opt in optimizers]

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def begin_batch(self) -> None:
        """Start counting a new batch."""
        self.attempts = 0
        self.steps = 0

    def attempted(self) -> None:
        """Lightning is about to step an optimizer (call from ``on_before_optimizer_step``)."""
        self.attempts += 1

    @property
    def skipped(self) -> bool:
        """Whether a step attempted in this batch did not run."""
        return self.steps < self.attempts

    def _stepped(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self.steps += 1
        if self.on_step is not None:
            self.on_step()


class BatchNormGuard(Callback):
    """Keep non-finite batches and skipped optimizer steps out of the BN running statistics.

    Before every training batch the state of every layer with running statistics (:func:`bn_lightning.guards
    .stat_layers`: torch's BN layers and bn_lightning's, SyncBatchNorm, Ghost, Renorm) is copied in place (one
    foreach copy, no allocation); after the batch:

    - **non-finite statistics**: if a running mean or variance is no longer finite (one packed ``isfinite`` over all
      layers, one host read per batch), the batch's statistics were not finite. ``nonfinite="skip"`` restores every
      layer to its state before the batch (all layers: the running statistics stay those of one consistent set of
      batches, and ``num_batches_tracked`` agrees across layers) and warns, once per layer, naming the layer and the
      step; ``nonfinite="raise"`` restores them too, then raises :class:`BatchNormNonFiniteError` naming them.
      Layers already non-finite when training starts are reported once and not watched.
    - **skipped steps** (``rollback_skipped_steps=True``): when Lightning attempted an optimizer step that did not
      run (AMP's GradScaler found inf/NaN gradients), the running-stat updates of every batch since the last step
      (the whole accumulation window) are rolled back; a batch whose ``training_step`` returned ``None`` (automatic
      optimisation: Lightning trains nothing on it) is rolled back too.

    Under DDP the ranks decide together: a batch is skipped (or raises) on every rank when it was non-finite on any,
    with one one-element all-reduce per batch. With SyncBatchNorm the statistics are identical on every rank anyway;
    with local BN a rank's statistics are its own, but skipping on all ranks keeps their ``num_batches_tracked``
    (and so ``momentum=None``'s averages) in step, and ``raise`` must happen on every rank or the others hang in the
    next collective. A skipped optimizer step is the same on every rank (gradients are all-reduced).

    With :class:`~bn_lightning.callbacks.AccumulateBatchNormStats` the statistics reach the buffers once per optimizer
    step, merged over the window: a non-finite micro-batch then keeps the whole window's update out, and the step
    named is the step that closed the window.

    Cost: per batch, one copy of the BN buffers and one packed finite check with one host read (``scripts/
    bench_guard.py``).

    Args:
        nonfinite: ``"skip"`` or ``"raise"``.
        rollback_skipped_steps: roll back the running-stat updates of skipped optimizer steps and of batches whose
            ``training_step`` returned ``None``.

    Raises:
        ValueError: for a ``nonfinite`` not in :data:`NONFINITE_ACTIONS`.
        TypeError: for a ``rollback_skipped_steps`` that is not a bool.

    Example::

        >>> guard = BatchNormGuard(nonfinite="skip")
        >>> guard.skipped_batches, guard.rolled_back_steps
        (0, 0)
    """

    def __init__(self, nonfinite: str = "skip", rollback_skipped_steps: bool = True) -> None:
        self.nonfinite = check_choice("BatchNormGuard", "nonfinite", nonfinite, NONFINITE_ACTIONS)
        self.rollback_skipped_steps = check_bool("BatchNormGuard", "rollback_skipped_steps", rollback_skipped_steps)
        #: batches whose non-finite statistics were kept out
        self.skipped_batches = 0
        #: skipped optimizer steps (and ``None`` batches) whose updates were rolled back
        self.rolled_back_steps = 0
        self._watcher = StepWatcher()
        self._batch: StatSnapshot | None = None
        self._window: StatSnapshot | None = None
        self._window_open = False
        self._ignored: set[str] = set()
        self._watched: list[torch.Tensor] = []  # the running means and variances checked after every batch
        self._warned: set[str] = set()
        self._merging = False
        self._step = 0

    # ------------------------------------------------------------------ hooks

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from bn_lightning.callbacks.accumulate import AccumulateBatchNormStats  # it imports StepWatcher from here

        layers = stat_layers(pl_module)
        self._batch = StatSnapshot(layers)
        self._ignored = set(self._batch.nonfinite_layers())
        if self._ignored:
            rank_zero_warn(
                f"BatchNormGuard: the running statistics of {sorted(self._ignored)} are already non-finite when "
                "training starts; these layers are not watched"
            )
        self._watched = self._batch.floating(self._ignored)
        accumulating = trainer.accumulate_grad_batches > 1
        self._window = StatSnapshot(layers, take=False) if accumulating and self.rollback_skipped_steps else None
        self._window_open = False
        self._merging = accumulating and any(isinstance(cb, AccumulateBatchNormStats) for cb in trainer.callbacks)
        self._watcher.attach(list(trainer.optimizers))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._batch is None:
            return
        self._step = trainer.global_step  # the step this batch trains (global_step moves on once it ran)
        self._batch.take()
        if self._window is not None and not self._window_open:
            self._window.take()
            self._window_open = True
        self._watcher.begin_batch()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._watcher.attempted()

    @override
    def on_train_batch_end(  # type: ignore[override]
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._batch is None:
            return
        self._check_finite(trainer, batch_idx)
        if self.rollback_skipped_steps:
            self._roll_back_skipped(pl_module, outputs)
        if self._watcher.attempts:
            self._window_open = False

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._release()

    # ------------------------------------------------------------------ the checks

    def _check_finite(self, trainer: pl.Trainer, batch_idx: int) -> None:
        assert self._batch is not None
        bad = ~all_finite(self._watched)
        if distributed.world_size() > 1:
            flag = bad.to(torch.float32).reshape(1)
            distributed.all_reduce_sum(flag)
            bad = flag[0] > 0
        if not bool(bad):  # the one host read per batch
            return
        layers = [name for name in self._batch.nonfinite_layers() if name not in self._ignored]
        self._batch.restore()
        self.skipped_batches += 1
        where = f"at global step {self._step} (epoch {trainer.current_epoch}, batch {batch_idx})"
        seen = f"in layer(s) {layers}" if layers else f"on another rank (rank {trainer.global_rank} saw none)"
        if self.nonfinite == "raise":
            raise BatchNormNonFiniteError(
                f"BatchNormGuard: non-finite batch statistics {seen} {where}; the running statistics were restored "
                "to their values before the batch",
                layers,
                self._step,
            )
        new = [name for name in layers or [""] if name not in self._warned]  # "": another rank's layers
        self._warned.update(new)
        if new:
            shown = f"in layer(s) {new}" if layers else seen
            rank_zero_warn(
                f"BatchNormGuard: non-finite batch statistics {shown} {where}: the batch was kept out of the running "
                "statistics (warned once per layer)",
                category=RuntimeWarning,
            )

    def _roll_back_skipped(self, pl_module: pl.LightningModule, outputs: Any) -> None:
        assert self._batch is not None
        if self._watcher.skipped:
            (self._window or self._batch).restore()
            self.rolled_back_steps += 1
        elif pl_module.automatic_optimization and not outputs and not self._merging:
            # training_step returned None: Lightning trained nothing on this batch (AccumulateBatchNormStats, when
            # merging, already leaves such a micro-batch out, and its buffers hold the window's update)
            self._batch.restore()
            self.rolled_back_steps += 1

    def _release(self) -> None:
        self._watcher.detach()
        self._batch = self._window = None
        self._watched = []

    # ------------------------------------------------------------------ checkpoints

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(nonfinite=self.nonfinite, rollback_skipped_steps=self.rollback_skipped_steps)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_batches": self.skipped_batches, "rolled_back_steps": self.rolled_back_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_batches = int(state_dict.get("skipped_batches", 0))
        self.rolled_back_steps = int(state_dict.get("rolled_back_steps", 0))
