"""SyncBatchNormBuffers: every rank's BN running statistics made identical at chosen moments of ``fit``.

Provides :class:`SyncBatchNormBuffers` and :data:`SYNC_WHEN`. The work is :func:`bn_lightning.sync_running_stats`
(torch only, one collective for all layers); the callback picks the moment.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from bn_lightning.sync_stats import REDUCE, sync_running_stats
from bn_lightning.validation import check_choice

__all__ = ["SYNC_WHEN", "SyncBatchNormBuffers"]

#: when :class:`SyncBatchNormBuffers` synchronises
SYNC_WHEN = ("before_validation", "epoch_end", "before_save")


class SyncBatchNormBuffers(Callback):
    """Make every rank's BN running statistics identical, so that evaluation and checkpoints don't depend on the rank.

    Under DDP, BN layers that do not synchronise their batch statistics update their running statistics from the
    rank's own batches, and ranks drift apart (``RunningStatDrift`` reports it as ``rank_disagreement``). With
    ``broadcast_buffers=True`` (DDP's default) rank zero's buffers overwrite the others' at the next forward, so
    what the other ranks accumulated is thrown away, and between that forward and the next the ranks still differ;
    with ``broadcast_buffers=False`` they never agree. This callback makes them agree with ONE collective for all
    layers (:func:`bn_lightning.sync_running_stats`):

    - ``reduce="mean"``: the mixture of the ranks' statistics: the mean of the running means, and the mean of the
      running variances plus the variance of the running means across ranks; ``num_batches_tracked`` the largest;
    - ``reduce="broadcast"``: rank zero's buffers, bit for bit.

    Works with torch's BN layers and bn_lightning's (SyncBatchNorm's already agree: syncing them changes nothing);
    layers without running statistics and frozen layers are skipped. Without a process group it does nothing.

    Args:
        reduce: ``"mean"`` or ``"broadcast"`` (see above).
        when: ``"before_validation"``: when every validation run starts (in ``fit`` and ``trainer.validate``, not
            the sanity check), so every rank evaluates the same statistics; ``"epoch_end"``: at the end of every
            training epoch (after that epoch's validation, before a checkpoint saved at epoch end);
            ``"before_save"``: whenever a checkpoint is saved (in ``on_save_checkpoint``; the checkpoint's
            ``state_dict`` gets the synchronised values; weights-only checkpoints do not call it: use
            ``"epoch_end"`` with those).

    Raises:
        ValueError: ``reduce`` not in :data:`bn_lightning.sync_stats.REDUCE` or ``when`` not in :data:`SYNC_WHEN`.

    Example::

        >>> cb = SyncBatchNormBuffers(reduce="mean", when="epoch_end")
        >>> cb.reduce, cb.when, cb.syncs
        ('mean', 'epoch_end', 0)
        >>> SyncBatchNormBuffers(reduce="median")
        Traceback (most recent call last):
        ...
        ValueError: SyncBatchNormBuffers: reduce must be one of ('mean', 'broadcast'), got 'median'
    """

    def __init__(self, reduce: str = "mean", when: str = "before_validation") -> None:
        self.reduce = check_choice("SyncBatchNormBuffers", "reduce", reduce, REDUCE)
        self.when = check_choice("SyncBatchNormBuffers", "when", when, SYNC_WHEN)
        #: how many times the buffers were synchronised (with more than one rank)
        self.syncs = 0

    def _sync(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        if trainer.world_size < 2:
            return []
        names = sync_running_stats(pl_module, self.reduce)
        self.syncs += 1
        return names

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "before_validation" and not trainer.sanity_checking:
            self._sync(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "epoch_end":
            self._sync(trainer, pl_module)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.when != "before_save":
            return
        names = self._sync(trainer, pl_module)
        state = checkpoint.get("state_dict")
        if not names or not isinstance(state, dict):
            return
        # the state dict was taken before this hook; a strategy may have copied the tensors: put the values in
        modules = dict(pl_module.named_modules())
        for name in names:
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                full = f"{name}.{key}" if name else key
                buf = getattr(modules[name], key, None)
                if buf is not None and full in state:
                    state[full] = buf.detach().to(device=state[full].device, copy=True)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(reduce=self.reduce, when=self.when)
