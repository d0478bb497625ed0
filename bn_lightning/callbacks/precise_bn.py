"""PreciseBN: the Lightning callback that recalibrates BN population statistics during ``fit``.

Provides :class:`PreciseBN`, :data:`WHEN` (the moments it can run at) and :data:`TARGETS` (the model it recalibrates:
the trained one, or the averaged copy kept by Lightning's ``WeightAveraging``/``EMAWeightAveraging`` or
``StochasticWeightAveraging``). The algorithm is :func:`bn_lightning.precise_bn.recalibrate_bn` (torch only, also
re-exported here); the callback picks the moment, the model, the training dataloader, the modes the model trained in,
the device transfer and the precision context, and logs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import CombinedLoader, move_data_to_device, rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader
from typing_extensions import override

from bn_lightning.precise_bn import recalibrate_bn
from bn_lightning.validation import check_bool, check_callable, check_choice, check_int

__all__ = ["TARGETS", "WHEN", "PreciseBN", "recalibrate_bn"]

#: when :class:`PreciseBN` recalibrates (also the choices of :class:`bn_lightning.policy.PreciseBNPolicy`)
WHEN = ("before_validation", "epoch_end", "fit_end")
#: what :class:`PreciseBN` recalibrates: the LightningModule, or the averaged copy of a weight-averaging callback
TARGETS = ("model", "averaged")


class PreciseBN(Callback):
    """Recompute BN population statistics on training batches during ``fit``: PreciseBN (Wu & Johnson, 2021).

    Calls :func:`recalibrate_bn` with the LightningModule's own ``forward`` on ``num_batches`` batches of
    ``trainer.train_dataloader``, moved to the device by the strategy (the module's batch-transfer hooks run) and
    run in the precision plugin's forward context (autocast for mixed precision). BN layers are recalibrated in the
    modes the last training step used (frozen, eval-mode BN layers stay untouched), even though Lightning has put
    the model in eval mode at validation start; the modes are restored afterwards. The global random state is
    forked, so recalibrating does not change the data order or dropout masks of the training that follows.
    Under DDP every rank recalibrates on its shard and the ranks' statistics are merged (one collective).

    With ``target="averaged"`` it recalibrates the averaged copy kept by the Trainer's weight-averaging callback
    (Lightning's ``WeightAveraging``, ``EMAWeightAveraging`` or ``StochasticWeightAveraging``; exactly one), so that
    the BN statistics used with the averaged weights are the population statistics OF the averaged weights, identical
    on every rank, instead of an average of the training model's statistics (or the initial ones, with
    ``use_buffers=False``). The training model's weights and buffers are left as they are:

    - ``WeightAveraging``/``EMAWeightAveraging`` validate with the averaged weights: with ``when="before_validation"``
      the copy is recalibrated before every validation of ``fit`` (it is swapped in afterwards, so checkpoints saved
      from that validation carry the recalibrated statistics).
    - ``StochasticWeightAveraging`` validates with the training weights until its BN-update epoch (one epoch after
      ``max_epochs``, run with the averaged weights in the LightningModule): before that epoch's validation the copy
      is recalibrated and its statistics written into the LightningModule, in place of SWA's own estimate.
    - At the end of ``fit`` (``when="before_validation"`` or ``"fit_end"``), if the averaging callback puts the
      averaged weights into the LightningModule (it always does, SWA unless stopped early), the copy is recalibrated
      and the LightningModule's ``running_mean``/``running_var`` end equal to it, whichever of the two callbacks comes
      first in the list.

    Logs ``<prefix>/precise_bn/seconds`` and ``<prefix>/precise_bn/num_samples`` (with ``target="averaged"``:
    ``<prefix>/precise_bn/averaged/seconds`` and ``.../num_samples``) to the trainer's loggers on global rank zero.

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
        target: ``"model"``: the LightningModule; ``"averaged"``: the averaged copy of the Trainer's weight-averaging
            callback (see above; ``when`` must be ``"before_validation"`` or ``"fit_end"``).

    Raises:
        ValueError: ``num_batches`` or ``every_n_epochs`` not a positive int, ``when`` not in :data:`WHEN`, ``target``
            not in :data:`TARGETS`, ``target="averaged"`` with ``when="epoch_end"``; at ``fit``, ``target="averaged"``
            and not exactly one weight-averaging callback in the Trainer.
        TypeError: ``forward_fn`` not callable, ``progress`` not a bool or ``None``.

    Example::

        >>> cb = PreciseBN(num_batches=100, when="epoch_end", every_n_epochs=2)
        >>> cb.when, cb.num_batches, cb.runs
        ('epoch_end', 100, 0)
        >>> PreciseBN(when="sometimes")
        Traceback (most recent call last):
            ...
        ValueError: PreciseBN: when must be one of ('before_validation', 'epoch_end', 'fit_end'), got 'sometimes'
        >>> PreciseBN(target="averaged").target  # with an (EMA)WeightAveraging or StochasticWeightAveraging callback
        'averaged'
    """

    def __init__(
        self,
        num_batches: int = 200,
        when: str = "before_validation",
        every_n_epochs: int = 1,
        forward_fn: Callable[[pl.LightningModule, Any], Any] | None = None,
        progress: bool | None = None,
        prefix: str = "bn",
        target: str = "model",
    ) -> None:
        check_int("PreciseBN", "num_batches", num_batches)
        check_choice("PreciseBN", "when", when, WHEN)
        check_choice("PreciseBN", "target", target, TARGETS)
        if target == "averaged" and when == "epoch_end":
            raise ValueError(
                "PreciseBN: target='averaged' recalibrates when the averaged weights are used: when must be "
                "'before_validation' or 'fit_end', got 'epoch_end'"
            )
        check_int("PreciseBN", "every_n_epochs", every_n_epochs)
        check_callable("PreciseBN", "forward_fn", forward_fn, "(pl_module, batch)", optional=True)
        check_bool("PreciseBN", "progress", progress, optional=True)
        self.num_batches = num_batches
        self.when = when
        self.every_n_epochs = every_n_epochs
        self.forward_fn = forward_fn
        self.progress = progress
        self.prefix = prefix
        self.target = target
        self.runs = 0
        self.batches_run = 0
        self.last_info: dict[str, Any] = {}
        self._modules: list[nn.Module] = []
        self._train_modes: list[bool] | None = None
        self._has_bn = True
        self._averager: Callback | None = None

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
        if stage == TrainerFn.FITTING and self.target == "averaged":
            found = [cb for cb in trainer.callbacks if isinstance(cb, (WeightAveraging, StochasticWeightAveraging))]
            if len(found) != 1:
                raise ValueError(
                    "PreciseBN(target='averaged') recalibrates the averaged copy of one weight-averaging callback "
                    "(WeightAveraging, EMAWeightAveraging or StochasticWeightAveraging); the Trainer has "
                    f"{[type(cb).__name__ for cb in found] or 'none'}"
                )
            self._averager = found[0]

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
        # before every on_validation_epoch_start, where WeightAveraging swaps the averaged weights in: order-free
        if self.when == "before_validation" and not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            if self.target == "model":
                self._run(trainer, pl_module)
            else:
                self._run_averaged(trainer, pl_module, end=False)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "epoch_end" and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # not on_fit_end: Lightning calls that after tearing down the strategy (DDP's process group is gone)
        if self.target == "averaged":
            self._run_averaged(trainer, pl_module, end=True)
        elif self.when == "fit_end":
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

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module | None = None) -> bool:
        """Recalibrate ``model`` (default: ``pl_module``) in the training modes; whether it ran."""
        if not self._has_bn:  # warned once, at fit start
            return False
        loader = self._loader(trainer)
        if loader is None:
            rank_zero_warn("PreciseBN: the trainer has no training dataloader to recalibrate on; skipped.")
            return False
        progress = self.progress if self.progress is not None else trainer.progress_bar_callback is not None
        target = pl_module if model is None else model
        modules = (self._modules or list(pl_module.modules())) if model is None else list(model.modules())
        before = [m.training for m in modules]
        if self._train_modes is not None and len(self._train_modes) == len(modules):
            for m, training in zip(modules, self._train_modes, strict=True):  # an averaged copy has the same modules
                m.training = training
        else:
            target.train()
        move: Callable[[Any], Any] = trainer.strategy.batch_to_device  # the module's batch-transfer hooks run
        devices = {pl_module.device}
        held = next(iter(target.parameters()), None)
        if held is not None and held.device != pl_module.device:  # e.g. an averaged copy kept on the CPU
            devices.add(held.device)

            def move(batch: Any, device: torch.device = held.device) -> Any:
                return move_data_to_device(trainer.strategy.batch_to_device(batch), device)

        cuda = [d for d in devices if d.type == "cuda"]
        rng_devices = [d.index if d.index is not None else torch.cuda.current_device() for d in cuda]
        try:
            with torch.random.fork_rng(devices=rng_devices), trainer.precision_plugin.forward_context():
                info = recalibrate_bn(
                    target, loader, self.num_batches, forward_fn=self.forward_fn, device=move, progress=progress
                )
        finally:
            for m, training in zip(modules, before, strict=True):
                m.training = training
        self.last_info = info
        if not info:
            return False
        self.runs += 1
        self.batches_run += info["num_batches"]
        if trainer.is_global_zero:
            key = f"{self.prefix}/precise_bn" + ("" if model is None else "/averaged")
            metrics = {f"{key}/seconds": float(info["seconds"]), f"{key}/num_samples": float(info["num_samples"])}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        return True

    def _run_averaged(self, trainer: pl.Trainer, pl_module: pl.LightningModule, end: bool) -> None:
        """Recalibrate the averaging callback's copy, and the LightningModule's BN buffers if it holds its weights."""
        averager = self._averager
        if isinstance(averager, WeightAveraging):
            averaged = getattr(averager, "_average_model", None)  # a torch AveragedModel, made at setup
            model = None if averaged is None else averaged.module
            into_module = end  # its on_train_end copies the averaged weights AND buffers into the LightningModule
        elif isinstance(averager, StochasticWeightAveraging):
            started = averager.n_averaged is not None and int(averager.n_averaged) > 0
            model = getattr(averager, "_average_model", None) if started else None
            into_module = _swa_ends_averaged(averager, trainer) if end else _swa_bn_epoch(averager, trainer)
            if not into_module:  # validation uses the training weights, or training stopped before SWA's end
                return
        else:  # setup did not run (a hook called by hand)
            return
        if model is None:
            return
        if self._run(trainer, pl_module, model) and into_module:
            _copy_running_stats(model, pl_module, self.last_info["layers"])

    # ------------------------------------------------------------------ checkpoints

    @property
    @override
    def state_key(self) -> str:
        extra = {} if self.target == "model" else {"target": self.target}
        return self._generate_state_key(when=self.when, num_batches=self.num_batches, prefix=self.prefix, **extra)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "batches_run": self.batches_run}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.runs = int(state_dict.get("runs", 0))
        self.batches_run = int(state_dict.get("batches_run", 0))


# ---------------------------------------------------------------------- weight averaging


def _swa_bn_epoch(swa: StochasticWeightAveraging, trainer: pl.Trainer) -> bool:
    """Whether SWA's BN-update epoch runs now: the LightningModule holds the averaged weights (Lightning 2.6's rule)."""
    max_epochs = getattr(swa, "_max_epochs", -1)
    has_bn = bool(getattr(swa, "_model_contains_batch_norm", False))
    return has_bn and max_epochs != -1 and trainer.current_epoch == swa.swa_end + 1


def _swa_ends_averaged(swa: StochasticWeightAveraging, trainer: pl.Trainer) -> bool:
    """Whether SWA's ``on_train_end`` leaves the averaged weights in the LightningModule (Lightning 2.6's rule)."""
    max_epochs = getattr(swa, "_max_epochs", -1)
    has_bn = bool(getattr(swa, "_model_contains_batch_norm", False))
    epoch = trainer.current_epoch - 1  # the trainer has advanced the epoch before on_train_end
    return (has_bn and max_epochs != -1 and epoch == swa.swa_end + 1) or epoch == swa.swa_end or max_epochs == -1


def _copy_running_stats(source: nn.Module, target: nn.Module, names: list[str]) -> None:
    """Copy ``running_mean``/``running_var`` of the layers ``names`` from ``source`` into the same layers of ``target``.

    Only these two: the averaging callbacks copy ``num_batches_tracked`` along with everything (``WeightAveraging``) or
    leave it (SWA) whichever runs first, so the LightningModule ends the same in either callback order.
    """
    sources, targets = dict(source.named_modules()), dict(target.named_modules())
    missing = []
    with torch.no_grad():
        for name in names:
            src, dst = sources[name], targets.get(name)
            if getattr(dst, "running_mean", None) is None or getattr(dst, "running_var", None) is None:
                missing.append(name)
                continue
            dst.running_mean.copy_(src.running_mean)  # type: ignore[union-attr]
            dst.running_var.copy_(src.running_var)  # type: ignore[union-attr]
    if missing:
        rank_zero_warn(f"PreciseBN: layers {missing} of the averaged copy have no running statistics in the model.")
