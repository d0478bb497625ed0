"""BatchNormFreeze: freeze BatchNorm layers the right way, from an epoch, a step, or for chosen layers only.

Provides :class:`BatchNormFreeze`. A frozen BN layer normalises with its running statistics AND keeps them unchanged:
it is put in eval mode (``layer.eval()``) while the rest of the model trains, and put back in eval mode whenever
Lightning switches the model to training mode. Optionally its affine parameters (gamma, beta) are frozen too.

Why not ``track_running_stats = False`` (what Lightning's ``BaseFinetuning.freeze(train_bn=False)`` did, see
Lightning issue #15062)? Flipping that flag on a layer in training mode does stop the buffer updates, but it ALSO
makes the layer normalise with the statistics of the current batch (torch only reads the running buffers in training
mode when ``track_running_stats`` is true). The frozen network then trains on batch-statistic normalisation and is
evaluated with running statistics that no longer match the weights: the train/eval mismatch that freezing was meant
to avoid, and one that gets worse the smaller the batches. In eval mode the layer uses the running statistics it
keeps, in training and in evaluation alike: training and evaluation see the same function.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from bn_lightning.callbacks.discovery import find_batchnorm_layers
from bn_lightning.validation import check_bool, check_int, check_patterns

__all__ = ["BatchNormFreeze"]


class BatchNormFreeze(Callback):
    """Freeze BN layers during training: they use and keep their running statistics (eval-mode BN).

    From epoch ``freeze_at_epoch`` or global step ``freeze_at_step`` (both ``None``: from the start of training), the
    BN layers whose qualified names match ``include`` and not ``exclude`` (``fnmatch`` patterns, e.g.
    ``"backbone.*"`` to fine-tune a head on a frozen backbone) are put in eval mode: they normalise with their running
    statistics, which stay bit-identical, and gradients still flow through them. The eval mode is re-applied at the
    start of every training epoch and batch, since Lightning (and user hooks) switch the whole model back to training
    mode, e.g. after validation. With ``freeze_affine`` the layers' ``weight``/``bias`` (gamma/beta) get
    ``requires_grad=False`` too (and their ``.grad`` is cleared, so optimisers skip them); :meth:`unfreeze` restores
    the previous ``requires_grad`` flags.

    The layers are NEVER frozen with ``track_running_stats=False``: on a layer in training mode that makes BN
    normalise with batch statistics (Lightning issue #15062; see the module docstring).

    :meth:`unfreeze` (or ``unfreeze_at_epoch``) puts the layers back in the model's mode. Under a Trainer, each
    freeze and unfreeze logs ``bn/freeze/frozen_layers`` (the number of frozen layers; 0 at an unfreeze) on rank zero,
    which ``bn-report`` marks on its curves. The state (whether frozen,
    which layers, the epoch and step it happened, the saved ``requires_grad`` flags) is saved in checkpoints, so a run
    resumed with ``ckpt_path`` re-applies the freeze at the start of training, whatever the schedule says.

    Calls by hand win over the schedule: it freezes only if the layers were never frozen nor unfrozen before, and
    unfreezes only if they were never unfrozen before (:attr:`freezes` and :attr:`unfreezes` count both kinds).

    Under DDP, changing ``requires_grad`` after the model is wrapped (``freeze_affine``) needs
    ``strategy="ddp_find_unused_parameters_true"``: DDP otherwise waits for gradients that never come. The running
    statistics need nothing: every rank freezes the same layers at the same step.

    Args:
        freeze_at_epoch: freeze at the start of this epoch (0-based).
        freeze_at_step: freeze before the training batch at which ``trainer.global_step`` reaches this value.
        include: ``fnmatch`` patterns of BN layer names to freeze; ``None``: all.
        exclude: patterns of BN layer names to leave alone.
        freeze_affine: also freeze gamma and beta (``requires_grad=False``).
        unfreeze_at_epoch: unfreeze at the start of this epoch; must come after the freeze epoch.

    Raises:
        ValueError: for an epoch or step that is not a non-negative int, for both ``freeze_at_epoch`` and
            ``freeze_at_step``, or for an ``unfreeze_at_epoch`` not after the freeze epoch.
        TypeError: if ``include`` or ``exclude`` is a string instead of a sequence of patterns, or
            ``freeze_affine`` is not a bool.

    Example::

        >>> from bn_lightning.callbacks.freeze import BatchNormFreeze
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8))
        >>> cb = BatchNormFreeze(include=["1"], freeze_affine=True)
        >>> cb.freeze(net)
        ['1']
        >>> net.training, net[1].training, net[1].weight.requires_grad, net[4].training
        (True, False, False, True)
        >>> net[1].track_running_stats  # never flipped
        True
        >>> cb.unfreeze()
        >>> net[1].training, net[1].weight.requires_grad, cb.frozen
        (True, True, False)
    """

    def __init__(
        self,
        freeze_at_epoch: int | None = None,
        freeze_at_step: int | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        freeze_affine: bool = False,
        unfreeze_at_epoch: int | None = None,
    ) -> None:
        for arg, value in (
            ("freeze_at_epoch", freeze_at_epoch),
            ("freeze_at_step", freeze_at_step),
            ("unfreeze_at_epoch", unfreeze_at_epoch),
        ):
            check_int("BatchNormFreeze", arg, value, minimum=0, optional=True)
        if freeze_at_epoch is not None and freeze_at_step is not None:
            raise ValueError(
                f"BatchNormFreeze: give at most one of freeze_at_epoch ({freeze_at_epoch!r}) and freeze_at_step "
                f"({freeze_at_step!r})"
            )
        if unfreeze_at_epoch is not None and unfreeze_at_epoch <= (freeze_at_epoch or 0):
            raise ValueError(
                f"BatchNormFreeze: unfreeze_at_epoch must be greater than the freeze epoch ({freeze_at_epoch or 0}), "
                f"got {unfreeze_at_epoch!r}"
            )
        self.freeze_at_epoch = freeze_at_epoch
        self.freeze_at_step = freeze_at_step
        self.include = check_patterns("BatchNormFreeze", "include", include)
        self.exclude = check_patterns("BatchNormFreeze", "exclude", exclude)
        self.freeze_affine = check_bool("BatchNormFreeze", "freeze_affine", freeze_affine)
        self.unfreeze_at_epoch = unfreeze_at_epoch
        #: whether the layers are frozen now
        self.frozen = False
        #: qualified names of the frozen layers (of the latest freeze)
        self.layer_names: list[str] = []
        #: epoch and global step of the latest freeze / unfreeze (``None``: never; no Trainer: ``None`` too)
        self.frozen_epoch: int | None = None
        self.frozen_step: int | None = None
        self.unfrozen_epoch: int | None = None
        self.unfrozen_step: int | None = None
        #: how many times the layers were frozen / unfrozen (by the schedule or by hand)
        self.freezes = 0
        self.unfreezes = 0
        # qualified parameter name -> requires_grad before the freeze (only with freeze_affine)
        self._requires_grad: dict[str, bool] = {}
        self._module: nn.Module | None = None
        self._layers: dict[str, _BatchNorm] = {}

    # ------------------------------------------------------------------ public API

    def freeze(self, pl_module: nn.Module) -> list[str]:
        """Freeze the matching BN layers of ``pl_module`` now; returns their names.

        Works on any ``nn.Module``. If already frozen, re-applies the freeze to the same layers.
        """
        if self.frozen and self._module is pl_module:
            self._apply()
            return list(self._layers)
        self._module = pl_module
        self._layers = find_batchnorm_layers(pl_module, self.include, self.exclude)
        if not self._layers:
            rank_zero_warn("BatchNormFreeze: no BatchNorm layer matches include/exclude; nothing is frozen.")
        untracked = [n for n, m in self._layers.items() if m.running_mean is None or m.running_var is None]
        if untracked:
            rank_zero_warn(
                f"BatchNormFreeze: layers {untracked} have no running statistics (track_running_stats=False): they "
                "keep normalising with batch statistics; only freeze_affine has an effect on them."
            )
        self.layer_names = list(self._layers)
        self._requires_grad = {}
        if self.freeze_affine:
            for name, layer in self._layers.items():
                for pname, p in layer.named_parameters(recurse=False):
                    self._requires_grad[f"{name}.{pname}"] = p.requires_grad
        self.frozen = True
        self.freezes += 1
        self.frozen_epoch, self.frozen_step = self._when(pl_module)
        self._apply(check_ddp=True)
        self._log_event(pl_module, len(self._layers))
        return list(self.layer_names)

    def unfreeze(self, pl_module: nn.Module | None = None) -> None:
        """Unfreeze: the layers follow the model's mode again; restore the affine ``requires_grad`` flags.

        Args:
            pl_module: the model the layers were frozen in; ``None``: the one :meth:`freeze` was given.
        """
        module = pl_module if pl_module is not None else self._module
        if not self.frozen:
            return
        if module is None:
            raise ValueError("unfreeze() needs the module: the layers were frozen from a checkpoint; pass pl_module")
        if module is not self._module:
            self._resolve(module)
        for layer in self._layers.values():
            layer.train(module.training)
        params = dict(module.named_parameters())
        for pname, flag in self._requires_grad.items():
            if pname in params:
                params[pname].requires_grad_(flag)
        self.frozen = False
        self.unfreezes += 1
        self._requires_grad = {}
        self.unfrozen_epoch, self.unfrozen_step = self._when(module)
        self._log_event(module, 0)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _trainer(module: nn.Module | None) -> pl.Trainer | None:
        if not isinstance(module, pl.LightningModule):
            return None
        try:
            return module.trainer
        except RuntimeError:  # not attached to a Trainer
            return None

    def _when(self, module: nn.Module) -> tuple[int | None, int | None]:
        trainer = self._trainer(module)
        if trainer is None:
            return None, None
        return int(trainer.current_epoch), int(trainer.global_step)

    def _log_event(self, module: nn.Module, frozen_layers: int) -> None:
        """Log ``bn/freeze/frozen_layers`` (0 at an unfreeze) at this step, for plots that mark the event."""
        trainer = self._trainer(module)
        if trainer is None or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics({"bn/freeze/frozen_layers": float(frozen_layers)}, step=int(trainer.global_step))

    def _resolve(self, module: nn.Module) -> None:
        """Find the frozen layers by name (after a checkpoint was loaded, or for another module object)."""
        modules = dict(module.named_modules())
        missing = [n for n in self.layer_names if not isinstance(modules.get(n), _BatchNorm)]
        if missing:
            rank_zero_warn(f"BatchNormFreeze: frozen layers {missing} are not BatchNorm layers of the model; skipped.")
        self._module = module
        self._layers = {n: modules[n] for n in self.layer_names if n not in missing}  # type: ignore[misc]

    def _apply(self, check_ddp: bool = False) -> None:
        for layer in self._layers.values():
            layer.eval()
        if not self._requires_grad or self._module is None:
            return
        params = dict(self._module.named_parameters())
        flipped = [params[p] for p in self._requires_grad if p in params and params[p].requires_grad]
        if flipped and check_ddp:
            self._check_ddp()
        for p in flipped:
            p.requires_grad_(False)
            p.grad = None

    def _check_ddp(self) -> None:
        trainer = self._trainer(self._module)
        if trainer is None:
            return
        model = trainer.model
        if isinstance(model, DistributedDataParallel) and not model.find_unused_parameters:
            raise RuntimeError(
                "BatchNormFreeze(freeze_affine=True) stops the gradients of BN weights after DDP wrapped the model: "
                'use strategy="ddp_find_unused_parameters_true" (or DDPStrategy(find_unused_parameters=True)).'
            )

    def _schedule(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch, step = trainer.current_epoch, trainer.global_step
        if self.frozen and self._module is not pl_module:  # resumed from a checkpoint (or another model)
            self._resolve(pl_module)
            self._apply(check_ddp=True)
        past_unfreeze = self.unfreeze_at_epoch is not None and epoch >= self.unfreeze_at_epoch
        if self.frozen and past_unfreeze and self.unfreezes == 0:
            self.unfreeze(pl_module)
        elif not self.frozen and self.freezes == 0 and self.unfreezes == 0 and not past_unfreeze:
            if self.freeze_at_epoch is not None:
                due = epoch >= self.freeze_at_epoch
            elif self.freeze_at_step is not None:
                due = step >= self.freeze_at_step
            else:
                due = True
            if due:
                self.freeze(pl_module)
        if self.frozen:
            for layer in self._layers.values():  # cheap: Lightning may have called model.train() since
                layer.training = False

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._schedule(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._schedule(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._schedule(trainer, pl_module)

    # ------------------------------------------------------------------ checkpoints

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "frozen": self.frozen,
            "layer_names": list(self.layer_names),
            "frozen_epoch": self.frozen_epoch,
            "frozen_step": self.frozen_step,
            "unfrozen_epoch": self.unfrozen_epoch,
            "unfrozen_step": self.unfrozen_step,
            "freezes": self.freezes,
            "unfreezes": self.unfreezes,
            "requires_grad": dict(self._requires_grad),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.frozen = bool(state_dict.get("frozen", False))
        self.layer_names = list(state_dict.get("layer_names", []))
        self.frozen_epoch = state_dict.get("frozen_epoch")
        self.frozen_step = state_dict.get("frozen_step")
        self.unfrozen_epoch = state_dict.get("unfrozen_epoch")
        self.unfrozen_step = state_dict.get("unfrozen_step")
        self.freezes = int(state_dict.get("freezes", int(self.frozen or self.frozen_epoch is not None)))
        self.unfreezes = int(state_dict.get("unfreezes", int(self.unfrozen_epoch is not None)))
        self._requires_grad = dict(state_dict.get("requires_grad", {}))
        self._module, self._layers = None, {}  # re-resolved by name at the start of training
