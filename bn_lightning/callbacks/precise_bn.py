"""PreciseBN: the Lightning callback that recalibrates BN population statistics during ``fit``.

Provides :class:`PreciseBN` and :data:`WHEN`, the moments it can run at. The algorithm is
:func:`bn_lightning.precise_bn.recalibrate_bn` (torch only, also re-exported here); the callback picks the moment, the
training dataloader, the modes the model trained in, the device transfer and the precision context, and logs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import CombinedLoader, rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader
from typing_extensions import override

from bn_lightning.precise_bn import recalibrate_bn
from bn_lightning.validation import check_bool, check_callable, check_choice, check_int

__all__ = ["WHEN", "PreciseBN", "recalibrate_bn"]

#: when :class:`PreciseBN` recalibrates (also the choices of :class:`bn_lightning.policy.PreciseBNPolicy`)
WHEN = ("before_validation", "epoch_end", "fit_end")


class PreciseBN(Callback):
    """Recompute BN population statistics on training batches during ``fit``: PreciseBN (Wu & Johnson, 2021).

    Calls :func:`recalibrate_bn` with the LightningModule's own ``forward`` on ``num_batches`` batches of
    ``trainer.train_dataloader``, moved to the device by the strategy (the module's batch-transfer hooks run) and
    run in the precision plugin's forward context (autocast for mixed precision). BN layers are recalibrated in the
    modes the last training step used (frozen, eval-mode BN layers stay untouched), even though Lightning has put
    the model in eval mode at validation start; the modes are restored afterwards. The global random state is
    forked, so recalibrating does not change the data order or dropout masks of the training that follows.
    Under DDP every rank recalibrates on its shard and the ranks' statistics are merged (one collective).

    Logs ``<prefix>/precise_bn/seconds`` and ``<prefix>/precise_bn/num_samples`` to the trainer's loggers on global
    rank zero.

    Args:
        num_batches: training batches per recalibration (200 in the paper).
        when: ``"before_validation"``: before every validation run of ``fit`` (not the sanity check), so the
            validation metrics and the checkpoints chosen from them use precise statistics; ``"epoch_end"``: at the
            end of every ``every_n_epochs``-th training epoch (after that epoch's validation); ``"fit_end"``: once,
            when training ends (after the last checkpoint was saved: save the model yourself).
        every_n_epochs: for ``when="epoch_end"``: recalibrate after every this many epochs.
        forward_fn: ``forward_fn(pl_module, batch)`` runs the module on a (device) batch; default: ``pl_module(x)``
            with ``x`` the batch, or its first element for tuple/list batches. Required for dict batches, several
            training dataloaders, or a module without ``forward``.
        progress: show a progress bar on rank zero; ``None``: when the trainer shows one.
        prefix: metric key prefix.

    Raises:
        ValueError: ``num_batches`` or ``every_n_epochs`` not a positive int, ``when`` not in :data:`WHEN`.
        TypeError: ``forward_fn`` not callable, ``progress`` not a bool or ``None``.

    Example::

        >>> cb = PreciseBN(num_batches=100, when="epoch_end", every_n_epochs=2)
        >>> cb.when, cb.num_batches, cb.runs
        ('epoch_end', 100, 0)
        >>> PreciseBN(when="sometimes")
        Traceback (most recent call last):
            ...
        ValueError: PreciseBN: when must be one of ('before_validation', 'epoch_end', 'fit_end'), got 'sometimes'
    """

    def __init__(
        self,
        num_batches: int = 200,
        when: str = "before_validation",
        every_n_epochs: int = 1,
        forward_fn: Callable[[pl.LightningModule, Any], Any] | None = None,
        progress: bool | None = None,
        prefix: str = "bn",
    ) -> None:
        check_int("PreciseBN", "num_batches", num_batches)
        check_choice("PreciseBN", "when", when, WHEN)
        check_int("PreciseBN", "every_n_epochs", every_n_epochs)
        check_callable("PreciseBN", "forward_fn", forward_fn, "(pl_module, batch)", optional=True)
        check_bool("PreciseBN", "progress", progress, optional=True)
        self.num_batches = num_batches
        self.when = when
        self.every_n_epochs = every_n_epochs
        self.forward_fn = forward_fn
        self.progress = progress
        self.prefix = prefix
        self.runs = 0
        self.batches_run = 0
        self.last_info: dict[str, Any] = {}
        self._modules: list[nn.Module] = []
        self._train_modes: list[bool] | None = None
        self._has_bn = True

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if (
            stage == TrainerFn.FITTING
            and self.forward_fn is None
            and type(pl_module).forward is pl.LightningModule.forward
        ):
            raise ValueError(
                f"PreciseBN: {type(pl_module).__name__} defines no forward(); pass forward_fn(pl_module, batch)"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._modules = list(pl_module.modules())
        self._train_modes = None
        self._has_bn = any(isinstance(m, _BatchNorm) for m in self._modules)
        if not self._has_bn:
            rank_zero_warn("PreciseBN: the model has no BatchNorm layer; the callback will do nothing.")

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        # the modes training really used (after every hook that freezes layers ran); a list of bools, microseconds
        self._train_modes = [m.training for m in self._modules]

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "before_validation" and not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._run(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "epoch_end" and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # not on_fit_end: Lightning calls that after tearing down the strategy (DDP's process group is gone)
        if self.when == "fit_end":
            self._run(trainer, pl_module)

    # ------------------------------------------------------------------ the work

    def _loader(self, trainer: pl.Trainer) -> Iterable | None:
        loader = trainer.train_dataloader
        if loader is None:
            return None
        if isinstance(loader, DataLoader):
            if loader.persistent_workers and loader.num_workers > 0:
                # iter() of a persistent-workers loader RESETS its live iterator: mid-epoch (val_check_interval) that
                # would restart training's epoch under it. A shallow copy without the iterator gets its own workers.
                loader = copy.copy(loader)
                loader._iterator = None
            return loader
        if isinstance(loader, (Mapping, list, tuple)):
            if self.forward_fn is None:
                raise ValueError(
                    "PreciseBN: the trainer has several training dataloaders; pass forward_fn(pl_module, batch) to "
                    "say how to feed their combined batch"
                )
            combined = CombinedLoader(loader, mode="max_size_cycle")
            return (batch for batch, _, _ in combined)
        return loader

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._has_bn:  # warned once, at fit start
            return
        loader = self._loader(trainer)
        if loader is None:
            rank_zero_warn("PreciseBN: the trainer has no training dataloader to recalibrate on; skipped.")
            return
        progress = self.progress if self.progress is not None else trainer.progress_bar_callback is not None
        modules = self._modules or list(pl_module.modules())
        before = [m.training for m in modules]
        if self._train_modes is not None and len(self._train_modes) == len(modules):
            for m, training in zip(modules, self._train_modes, strict=True):
                m.training = training
        else:
            pl_module.train()
        device = pl_module.device
        rng_devices = []
        if device.type == "cuda":
            rng_devices = [device.index if device.index is not None else torch.cuda.current_device()]
        try:
            with torch.random.fork_rng(devices=rng_devices), trainer.precision_plugin.forward_context():
                info = recalibrate_bn(
                    pl_module,
                    loader,
                    self.num_batches,
                    forward_fn=self.forward_fn,
                    device=trainer.strategy.batch_to_device,  # the module's batch-transfer hooks run
                    progress=progress,
                )
        finally:
            for m, training in zip(modules, before, strict=True):
                m.training = training
        self.last_info = info
        if not info:
            return
        self.runs += 1
        self.batches_run += info["num_batches"]
        if trainer.is_global_zero:
            metrics = {
                f"{self.prefix}/precise_bn/seconds": float(info["seconds"]),
                f"{self.prefix}/precise_bn/num_samples": float(info["num_samples"]),
            }
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ checkpoints

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(when=self.when, num_batches=self.num_batches, prefix=self.prefix)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "batches_run": self.batches_run}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.runs = int(state_dict.get("runs", 0))
        self.batches_run = int(state_dict.get("batches_run", 0))
