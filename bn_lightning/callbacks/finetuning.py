"""BackboneFinetuning whose frozen backbone really keeps its BatchNorm statistics.

Provides :class:`BackboneFinetuning`, a drop-in subclass of Lightning's ``BackboneFinetuning``, and
:func:`is_frozen_batchnorm`, which recognises frozen BN layers of any origin.

Lightning's callback freezes the backbone with ``BaseFinetuning.freeze(backbone)``, whose default ``train_bn=True``
leaves every BN layer trainable before the unfreeze epoch whatever the callback's ``train_bn`` says; and where
Lightning does freeze a BN layer (``freeze_module``) it sets ``track_running_stats=False``, which in training mode
makes the layer normalise with the statistics of each batch (Lightning#15062). Nothing keeps a frozen layer in eval
mode either: whatever puts the model back in training mode (``model.train()`` in a hook, Lightning#21531) undoes it.
Here a frozen BN layer is in eval mode: it normalises with the running statistics it keeps, which stay bit-identical,
in training as in evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BackboneFinetuning as _LightningBackboneFinetuning
from lightning.pytorch.callbacks.finetuning import multiplicative
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.optim.optimizer import Optimizer
from typing_extensions import override

from bn_lightning import distributed
from bn_lightning.layers import FrozenBatchNormBase
from bn_lightning.validation import check_bool, check_int

__all__ = ["BackboneFinetuning", "is_frozen_batchnorm"]


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` is a frozen BN layer, whose statistics never change.

    bn_lightning's :class:`~bn_lightning.layers.FrozenBatchNormBase` subclasses, and any class named
    ``FrozenBatchNorm*`` (torchvision's and detectron2's ``FrozenBatchNorm2d``, timm's ``FrozenBatchNorm2d``),
    recognised by name so that none of those packages is imported.

    Example::

        >>> import bn_lightning as B
        >>> class FrozenBatchNorm2d(nn.Module):  # as torchvision.ops.misc defines it
        ...     pass
        >>> is_frozen_batchnorm(B.FrozenBatchNorm2d(4)), is_frozen_batchnorm(FrozenBatchNorm2d())
        (True, True)
        >>> is_frozen_batchnorm(nn.BatchNorm2d(4))
        False
    """
    if isinstance(module, FrozenBatchNormBase):
        return True
    return any(cls.__name__.startswith("FrozenBatchNorm") for cls in type(module).__mro__)


class BackboneFinetuning(_LightningBackboneFinetuning):
    """Lightning's ``BackboneFinetuning`` (same arguments, same learning rates) with the backbone's BN layers right.

    Until epoch ``unfreeze_backbone_at_epoch`` the LightningModule's ``backbone`` is frozen, and its BN layers:

    - ``train_bn=False``: are frozen too: eval mode (they normalise with their running statistics, which stay
      bit-identical), ``weight``/``bias`` with ``requires_grad=False``, ``track_running_stats`` left as it is. The eval
      mode is re-applied at the start of training, of every epoch and of every batch, so whatever switched the model
      back to training mode in between (a hook calling ``train()``, Lightning#21531) does not reach a forward pass.
    - ``train_bn=True``: train: training mode (their statistics update), ``weight``/``bias`` trainable.

    At ``unfreeze_backbone_at_epoch`` Lightning's unfreezing runs as usual (a new param group for the backbone, the
    BN layers' ``weight``/``bias`` left out of it with ``train_bn=False``) and the BN layers follow the model's mode
    again. Frozen BN layers (:func:`is_frozen_batchnorm`: bn_lightning's ``FrozenBatchNorm*``, torchvision's
    ``FrozenBatchNorm2d``, ...) are recognised as frozen already: never switched, any parameters they have stay
    frozen after unfreezing too. Composes with :class:`~bn_lightning.callbacks.BatchNormFreeze`, in either order: a
    layer either callback holds is in eval mode at every training batch.

    Under DDP the backbone's parameters were frozen when the model was wrapped, so DDP does not reduce their gradients
    after unfreezing (with or without ``find_unused_parameters``), and each rank would train its own backbone: this
    callback averages those gradients over the ranks before every optimizer step (one ``all_reduce`` of a packed
    tensor), as DDP does for the others.

    Args:
        unfreeze_backbone_at_epoch: epoch (0-based) at which the backbone is unfrozen.
        lambda_func: multiplies the backbone's learning rate every epoch after unfreezing.
        backbone_initial_ratio_lr: the backbone's initial learning rate as a ratio of the head's.
        backbone_initial_lr: the backbone's initial learning rate (wins over the ratio).
        should_align: align the backbone's learning rate with the head's once it catches up.
        initial_denom_lr: divides the head's learning rate for the backbone when no ``lr`` is given.
        train_bn: train the backbone's BN layers while it is frozen (see above).
        verbose: log the learning rates.
        rounding: digits of the logged learning rates.

    Raises:
        ValueError: ``unfreeze_backbone_at_epoch`` not an int >= 0.
        TypeError: ``train_bn`` not a bool.
        MisconfigurationException: (at setup) the LightningModule has no ``nn.Module`` attribute ``backbone``.

    Example::

        >>> cb = BackboneFinetuning(unfreeze_backbone_at_epoch=2, train_bn=False)
        >>> class Net(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        ...         self.head = nn.Linear(8, 2)
        >>> net = Net()
        >>> cb.freeze_before_training(net)
        >>> cb.bn_layers, net.backbone[1].weight.requires_grad, net.backbone[1].track_running_stats
        (['backbone.1'], False, True)
    """

    def __init__(
        self,
        unfreeze_backbone_at_epoch: int = 10,
        lambda_func: Callable = multiplicative,
        backbone_initial_ratio_lr: float = 10e-2,
        backbone_initial_lr: float | None = None,
        should_align: bool = True,
        initial_denom_lr: float = 10.0,
        train_bn: bool = True,
        verbose: bool = False,
        rounding: int = 12,
    ) -> None:
        check_int("BackboneFinetuning", "unfreeze_backbone_at_epoch", unfreeze_backbone_at_epoch, minimum=0)
        check_bool("BackboneFinetuning", "train_bn", train_bn)
        super().__init__(
            unfreeze_backbone_at_epoch=unfreeze_backbone_at_epoch,
            lambda_func=lambda_func,
            backbone_initial_ratio_lr=backbone_initial_ratio_lr,
            backbone_initial_lr=backbone_initial_lr,
            should_align=should_align,
            initial_denom_lr=initial_denom_lr,
            train_bn=train_bn,
            verbose=verbose,
            rounding=rounding,
        )
        #: qualified names of the backbone's BN layers held in eval mode until unfreezing (``train_bn=False``)
        self.bn_layers: list[str] = []
        #: qualified names of the backbone's frozen BN layers (:func:`is_frozen_batchnorm`), left as they are
        self.frozen_bn_layers: list[str] = []
        self._held: list[_BatchNorm] = []
        self._frozen: list[nn.Module] = []
        self._released = False
        self._reduced_by_ddp: set[int] | None = None  # ids of the parameters DDP reduces; None: not under DDP
        self._unreduced: list[nn.Parameter] = []

    # ------------------------------------------------------------------ freezing

    @override
    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        backbone = getattr(pl_module, "backbone", None)
        if not isinstance(backbone, nn.Module):
            raise MisconfigurationException("The LightningModule should have a nn.Module `backbone` attribute")
        held, frozen = {}, {}
        for name, module in backbone.named_modules():
            if isinstance(module, _BatchNorm):
                held[f"backbone.{name}"] = module
            elif is_frozen_batchnorm(module):
                frozen[f"backbone.{name}"] = module
        for module in self.flatten_modules(backbone):
            if isinstance(module, _BatchNorm) and self.train_bn:
                self.make_trainable(module)
            else:  # not freeze_module: it turns track_running_stats off (batch statistics in training mode)
                for param in module.parameters(recurse=False):
                    param.requires_grad = False
        self._held = [] if self.train_bn else list(held.values())
        self.bn_layers = [] if self.train_bn else list(held)
        self._frozen, self.frozen_bn_layers = list(frozen.values()), list(frozen)
        self._released = False

    @override
    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        super().finetune_function(pl_module, epoch, optimizer)
        if epoch == self.unfreeze_backbone_at_epoch:
            for module in self._frozen:  # Lightning made every parameter of the backbone trainable
                for param in module.parameters():
                    param.requires_grad = False
                    param.grad = None

    def _hold(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch < self.unfreeze_backbone_at_epoch:
            for layer in self._held:  # cheap: anything may have called model.train() since
                layer.training = False
        elif not self._released:
            self._released = True
            for layer in self._held:
                layer.train(pl_module.training)

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wrapped = isinstance(trainer.model, DistributedDataParallel) and distributed.world_size() > 1
        # DDP's reducer holds the parameters that required gradients when it wrapped the model: these, still
        self._reduced_by_ddp = {id(p) for p in pl_module.parameters() if p.requires_grad} if wrapped else None
        # not at setup: Lightning warns about modules in eval mode when training starts
        self._hold(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._hold(trainer, pl_module)
        if self._reduced_by_ddp is not None:
            reduced = self._reduced_by_ddp
            self._unreduced = [p for p in pl_module.parameters() if p.requires_grad and id(p) not in reduced]

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if not self._unreduced:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._unreduced]
        packed = torch.cat([g.reshape(-1) for g in grads])
        distributed.all_reduce_sum(packed)
        packed /= distributed.world_size()
        offset = 0
        for p in self._unreduced:
            n = p.numel()
            if p.grad is not None:  # a parameter outside the graph keeps no gradient (weight decay skips it)
                p.grad.copy_(packed[offset : offset + n].view_as(p))
            offset += n

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._hold(trainer, pl_module)
