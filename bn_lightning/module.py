"""The LightningModule that trains any backbone under a BatchNorm policy.

Provides :class:`BatchNormModule` (a backbone, a loss, optimizer and scheduler factories in Hydra's ``_partial_``
style, and a :class:`~bn_lightning.policy.BatchNormPolicy` it applies) and :func:`default_optimizer` (the SGD it
falls back to).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn import Parameter
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from bn_lightning.callbacks import BatchNormFreeze, PreciseBN
from bn_lightning.convert import bn_param_groups, convert_batchnorm
from bn_lightning.layers.frozen import FrozenBatchNormBase
from bn_lightning.policy import BatchNormPolicy
from bn_lightning.validation import selected

__all__ = [
    "DEFAULT_OPTIMIZER_KWARGS",
    "BatchNormModule",
    "LossFunction",
    "OptimizerFactory",
    "SchedulerFactory",
    "default_optimizer",
]

#: Builds the optimizer from the parameters (or parameter groups), e.g. ``functools.partial(torch.optim.SGD, lr=0.1)``.
OptimizerFactory = Callable[[Iterable[Parameter] | Iterable[dict[str, Any]]], Optimizer]
#: Builds the learning-rate scheduler from the optimizer, e.g. ``functools.partial(CosineAnnealingLR, T_max=10)``.
SchedulerFactory = Callable[[Optimizer], LRScheduler]
#: ``loss(outputs, targets) -> scalar``: a function or an ``nn.Module`` such as ``nn.CrossEntropyLoss()``.
LossFunction = Callable[[Tensor, Tensor], Tensor]

#: The keyword arguments of :func:`default_optimizer`'s ``torch.optim.SGD``.
DEFAULT_OPTIMIZER_KWARGS: dict[str, float] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}


def default_optimizer(params: Iterable[Parameter] | Iterable[dict[str, Any]]) -> Optimizer:
    """SGD with ``lr=0.1``, momentum 0.9 and weight decay ``5e-4``: the usual recipe for BN networks.

    Example::

        >>> from torch import nn
        >>> opt = default_optimizer(nn.Linear(2, 2).parameters())
        >>> type(opt).__name__, opt.defaults["lr"], opt.defaults["momentum"], opt.defaults["weight_decay"]
        ('SGD', 0.1, 0.9, 0.0005)
    """
    return torch.optim.SGD(params, **DEFAULT_OPTIMIZER_KWARGS)


def _factory_weight_decay(factory: Callable[..., Any]) -> float | None:
    """The ``weight_decay`` a factory passes to its optimizer, if it says (a ``functools.partial``, as Hydra builds)."""
    if factory is default_optimizer:
        return DEFAULT_OPTIMIZER_KWARGS["weight_decay"]
    if isinstance(factory, functools.partial) and factory.keywords.get("weight_decay") is not None:
        return float(factory.keywords["weight_decay"])
    return None


class BatchNormModule(pl.LightningModule):
    """Trains any backbone with a loss, and applies a :class:`~bn_lightning.policy.BatchNormPolicy` to its BN layers.

    The policy (a dataclass, a ``dict`` or Hydra's ``cfg.bn``) is applied in three places:

    - at construction: the BN layers it selects (``include``/``exclude``, on names in this module such as
      ``"net.features.1"``) are converted to ``impl`` with ``options`` (:func:`~bn_lightning.convert_batchnorm`,
      which keeps parameters and statistics) and get the policy's ``momentum`` and ``eps``;
    - in :meth:`configure_optimizers`: with ``no_weight_decay``, BN weights and biases form a parameter group with
      ``weight_decay=0`` (:func:`~bn_lightning.bn_param_groups`), the rest a group with the optimizer factory's
      ``weight_decay`` (read from the ``functools.partial`` that Hydra's ``_partial_: true`` builds; left to the
      optimizer's default when the factory does not say);
    - in :meth:`configure_callbacks`: a :class:`~bn_lightning.callbacks.freeze.BatchNormFreeze` for ``freeze`` and a
      :class:`~bn_lightning.callbacks.precise_bn.PreciseBN` for ``precise_bn``, which Lightning adds to the Trainer's
      callbacks (replacing any of the same type).

    The policy is stored as plain data in ``self.hparams.bn_policy`` (``dataclasses.asdict``), so loggers record it
    and checkpoints rebuild the same module: ``BatchNormModule.load_from_checkpoint(path, net=fresh_backbone)``.

    Logs ``train/loss_step`` (every logged step: this rank's loss, no collective), ``train/loss_epoch``, ``val/loss``
    and ``test/loss`` (per epoch, averaged over every rank's batches with ``sync_dist=True``), and, when
    ``num_classes`` is given, the micro-averaged top-1 accuracy ``train/acc``, ``val/acc`` and ``test/acc`` (per
    epoch), accumulated by separate :class:`~torchmetrics.classification.MulticlassAccuracy` objects that Lightning
    computes, syncs across processes and resets each epoch.

    Args:
        net: the backbone; maps a batch of inputs to the outputs the loss takes (``(N, num_classes)`` logits for
            classification). Converted in place (the same object, with new BN children).
        bn_policy: a :class:`~bn_lightning.policy.BatchNormPolicy`, a mapping of its fields (Hydra's ``cfg.bn``), or
            ``None`` for the default policy (keep the layers, exempt BN parameters from weight decay).
        loss: ``loss(outputs, targets)``, a function or an ``nn.Module`` (e.g. one Hydra instantiated from
            ``{_target_: torch.nn.CrossEntropyLoss, label_smoothing: 0.1}``); ``None``: cross-entropy.
        num_classes: number of classes for the accuracy metrics; ``None``: no accuracy (a non-classification task).
        optimizer: called with the parameters (or the parameter groups) to build the optimizer, e.g. a Hydra
            ``_partial_: true`` config of ``torch.optim.SGD``; ``None`` uses :func:`default_optimizer`.
        scheduler: called with the optimizer to build a learning-rate scheduler, stepped once per epoch; ``None``
            keeps the learning rate constant.

    Raises:
        TypeError: ``net`` is not an ``nn.Module``; ``loss``, ``optimizer`` or ``scheduler`` is neither callable nor
            ``None``; a policy field of the wrong type.
        ValueError: ``num_classes`` is not ``None`` or an int ``>= 2``; an invalid policy (an unknown ``impl`` names
            the allowed ones); a layer the policy's ``impl`` cannot convert (e.g. ghost BN for a 3d layer).

    The loss, optimizer and scheduler are not stored in :attr:`hparams` (nor in checkpoints): they are code, not data,
    and would stop checkpoints from loading with ``torch.load(weights_only=True)``. The training script logs the whole
    config instead.

    Example::

        >>> import functools, torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))
        >>> policy = {"impl": "ghost", "options": {"virtual_batch_size": 8}, "momentum": 0.05}
        >>> module = BatchNormModule(net, bn_policy=policy, num_classes=10,
        ...                          optimizer=functools.partial(torch.optim.SGD, lr=0.1, weight_decay=1e-4))
        >>> type(module.net[2]).__name__, module.net[2].momentum
        ('GhostBatchNorm1d', 0.05)
        >>> module(torch.randn(16, 1, 8, 8)).shape
        torch.Size([16, 10])
        >>> [(len(g["params"]), g["weight_decay"]) for g in module.configure_optimizers().param_groups]
        [(4, 0.0001), (2, 0.0)]
        >>> module.hparams.bn_policy["impl"], module.hparams.bn_policy["options"]
        ('ghost', {'virtual_batch_size': 8})
    """

    def __init__(
        self,
        net: nn.Module,
        bn_policy: BatchNormPolicy | Mapping[str, Any] | None = None,
        loss: LossFunction | None = None,
        num_classes: int | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"`net` must be an nn.Module, got {type(net).__name__}")
        bad_classes = isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        if num_classes is not None and bad_classes:
            raise ValueError(f"`num_classes` must be None or an integer >= 2, got {num_classes!r}")
        for name, factory in (("loss", loss), ("optimizer", optimizer), ("scheduler", scheduler)):
            if factory is not None and not callable(factory):
                raise TypeError(f"`{name}` must be callable or None, got {type(factory).__name__}")
        policy = BatchNormPolicy.from_config(bn_policy)
        # plain data only (an explicit dict: the policy as given may be a dataclass or any mapping, e.g. a DictConfig)
        self.save_hyperparameters({"num_classes": num_classes, "bn_policy": policy.to_dict()})
        self.bn_policy = policy
        self.net = net
        self.criterion: LossFunction = loss if loss is not None else nn.CrossEntropyLoss()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.train_acc = self.val_acc = self.test_acc = None
        if num_classes is not None:
            self.train_acc = MulticlassAccuracy(num_classes, average="micro")
            self.val_acc = MulticlassAccuracy(num_classes, average="micro")
            self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self._apply_bn_policy()
        self._build_bn_callbacks()  # fail now, not when fitting starts, if the callbacks refuse the policy

    # ------------------------------------------------------------------ the BN policy

    def bn_layers(self) -> dict[str, _BatchNorm | FrozenBatchNormBase]:
        """The BN layers the policy applies to (``include``/``exclude``), by qualified name in this module.

        Frozen layers (:class:`~bn_lightning.layers.frozen.FrozenBatchNormBase`, not torch ``_BatchNorm`` subclasses)
        are BN layers too: the policy converts them and sets their ``eps``; they have no ``momentum``.
        """
        policy = self.bn_policy
        return {
            name: layer
            for name, layer in self.named_modules()
            if isinstance(layer, _BatchNorm | FrozenBatchNormBase) and selected(name, policy.include, policy.exclude)
        }

    def _apply_bn_policy(self) -> None:
        policy = self.bn_policy
        if policy.impl is not None:
            # converting this module (not `net`) so patterns name layers as the plugin and callbacks do: "net.*"
            convert_batchnorm(self, policy.impl, include=policy.include, exclude=policy.exclude, **policy.options)
        for layer in self.bn_layers().values():
            if policy.momentum is not None and not isinstance(layer, FrozenBatchNormBase):
                layer.momentum = policy.layer_momentum  # None for "cumulative": torch's cumulative average
            if policy.eps is not None:
                layer.eps = policy.eps

    def _build_bn_callbacks(self) -> list[Callback]:
        policy = self.bn_policy
        callbacks: list[Callback] = []
        # the nested policies' fields are the callbacks' arguments
        if policy.freeze is not None:
            callbacks.append(BatchNormFreeze(**asdict(policy.freeze)))
        if policy.precise_bn is not None:
            callbacks.append(PreciseBN(**asdict(policy.precise_bn)))
        return callbacks

    @override
    def configure_callbacks(self) -> list[Callback]:
        """Fresh callbacks for the policy: ``BatchNormFreeze`` for ``freeze``, ``PreciseBN`` for ``precise_bn``.

        Lightning calls this when fitting starts and adds them to the Trainer's callbacks; an empty list when the
        policy has neither.
        """
        return self._build_bn_callbacks()

    # ------------------------------------------------------------------ steps

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Outputs of ``net`` for ``x``."""
        return self.net(x)

    def _shared_step(self, batch: tuple[Tensor, Tensor], metric: MulticlassAccuracy | None) -> Tensor:
        x, y = batch
        outputs = self(x)
        loss = self.criterion(outputs, y)
        if metric is not None:
            # update() only: the accuracy is computed once per epoch, not on every step
            metric.update(outputs.detach(), y)
        return loss

    def _log_step(self, stage: str, loss: Tensor, metric: MulticlassAccuracy | None, batch_size: int) -> None:
        training = stage == "train"
        if training:
            # per step: this rank's loss, no collective on every step; per epoch: the mean over every rank's batches
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=batch_size)
            self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch_size)
        else:
            self.log(
                f"{stage}/loss",
                loss,
                on_step=False,
                on_epoch=True,
                prog_bar=True,
                sync_dist=True,
                batch_size=batch_size,
            )
        if metric is not None:  # a torchmetrics Metric reduces over the ranks itself
            self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=not training, batch_size=batch_size)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Loss of one training batch; logs ``train/loss_step``, ``train/loss_epoch`` (and ``train/acc``)."""
        loss = self._shared_step(batch, self.train_acc)
        self._log_step("train", loss, self.train_acc, batch[1].shape[0])
        return loss

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Loss of one validation batch; logs ``val/loss`` (and ``val/acc``) per epoch."""
        loss = self._shared_step(batch, self.val_acc)
        self._log_step("val", loss, self.val_acc, batch[1].shape[0])
        return loss

    @override
    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Loss of one test batch; logs ``test/loss`` (and ``test/acc``) per epoch."""
        loss = self._shared_step(batch, self.test_acc)
        self._log_step("test", loss, self.test_acc, batch[1].shape[0])
        return loss

    # ------------------------------------------------------------------ optimization

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups under the policy: ``[decayed, BN (weight_decay 0)]``, empty ones dropped.

        The first group carries the optimizer factory's ``weight_decay`` when the factory says what it is (a
        ``functools.partial`` with that keyword, or :func:`default_optimizer`); otherwise it has no ``weight_decay``
        key and the optimizer's own default applies to it.
        """
        factory = self.optimizer_factory if self.optimizer_factory is not None else default_optimizer
        weight_decay = _factory_weight_decay(factory)
        groups = bn_param_groups(self, weight_decay=weight_decay or 0.0, no_decay_bn=True)
        if weight_decay is None:
            del groups[0]["weight_decay"]
        return [group for group in groups if group["params"]]

    @override
    def configure_optimizers(self) -> Any:
        """The optimizer (over :meth:`parameter_groups` with ``no_weight_decay``), plus the per-epoch scheduler."""
        factory = self.optimizer_factory if self.optimizer_factory is not None else default_optimizer
        optimizer = factory(self.parameter_groups() if self.bn_policy.no_weight_decay else self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
