"""The LightningModule that trains a classifier network.

Provides :class:`ClassificationModule` (cross-entropy, top-1 accuracy, optimizer and scheduler given as factories in
Hydra's ``_partial_`` style) and :func:`default_optimizer` (the SGD it falls back to).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import Parameter
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

__all__ = ["ClassificationModule", "OptimizerFactory", "SchedulerFactory", "default_optimizer"]

#: Builds the optimizer from the parameters, e.g. ``functools.partial(torch.optim.SGD, lr=0.1)``.
OptimizerFactory = Callable[[Iterable[Parameter]], Optimizer]
#: Builds the learning-rate scheduler from the optimizer, e.g. ``functools.partial(CosineAnnealingLR, T_max=10)``.
SchedulerFactory = Callable[[Optimizer], LRScheduler]


def default_optimizer(params: Iterable[Parameter]) -> Optimizer:
    """SGD with ``lr=0.1``, momentum 0.9 and weight decay ``5e-4``: the usual recipe for BN networks.

    Example::

        >>> from torch import nn
        >>> opt = default_optimizer(nn.Linear(2, 2).parameters())
        >>> type(opt).__name__, opt.defaults["lr"], opt.defaults["momentum"], opt.defaults["weight_decay"]
        ('SGD', 0.1, 0.9, 0.0005)
    """
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)


class ClassificationModule(pl.LightningModule):
    """Trains ``net`` with cross-entropy and reports top-1 accuracy.

    Logs ``train/loss`` (every logged step and per epoch), ``train/acc`` (per epoch), ``val/loss`` and ``val/acc``
    (per epoch, on the progress bar). Accuracy is micro-averaged (the fraction of correct samples) and accumulated by
    separate :class:`~torchmetrics.classification.MulticlassAccuracy` objects for training and validation, which
    Lightning computes, syncs across processes and resets at the end of each epoch.

    Args:
        net: the network; maps a batch of inputs to ``(N, num_classes)`` logits.
        num_classes: number of classes, for the accuracy metrics.
        optimizer: called with the parameters to build the optimizer, e.g. a Hydra ``_partial_: true`` config of
            ``torch.optim.SGD``; ``None`` uses :func:`default_optimizer`.
        scheduler: called with the optimizer to build a learning-rate scheduler, stepped once per epoch; ``None``
            keeps the learning rate constant.

    Raises:
        TypeError: ``net`` is not an ``nn.Module``, or ``optimizer``/``scheduler`` is neither callable nor ``None``.
        ValueError: ``num_classes < 2``.

    The optimizer and scheduler factories are not stored in :attr:`hparams` (nor in checkpoints): they are code, not
    data, and would stop checkpoints from loading with ``torch.load(weights_only=True)``. The training script logs the
    whole config instead.

    Example::

        >>> import functools, torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> module = ClassificationModule(net, optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
        >>> module(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
        >>> type(module.configure_optimizers()).__name__
        'Adam'
        >>> dict(module.hparams)
        {'num_classes': 10}
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 10,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"`net` must be an nn.Module, got {type(net).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"`num_classes` must be an integer >= 2, got {num_classes!r}")
        for name, factory in (("optimizer", optimizer), ("scheduler", scheduler)):
            if factory is not None and not callable(factory):
                raise TypeError(f"`{name}` must be callable or None, got {type(factory).__name__}")
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.criterion = nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Logits of ``net`` for ``x``."""
        return self.net(x)

    def _shared_step(self, batch: tuple[Tensor, Tensor], metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        # update() only: the accuracy is computed once per epoch, not on every step
        metric.update(logits.detach(), y)
        return loss

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy of one training batch; logs ``train/loss`` and ``train/acc``."""
        loss = self._shared_step(batch, self.train_acc)
        batch_size = batch[1].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy of one validation batch; logs ``val/loss`` and ``val/acc`` per epoch."""
        loss = self._shared_step(batch, self.val_acc)
        batch_size = batch[1].shape[0]
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch_size)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch_size)
        return loss

    @override
    def configure_optimizers(self) -> Any:
        """The optimizer over all parameters, plus the per-epoch scheduler if one was given."""
        factory = self.optimizer_factory if self.optimizer_factory is not None else default_optimizer
        optimizer = factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
