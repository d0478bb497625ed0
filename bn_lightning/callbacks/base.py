"""The base of the callbacks that watch BN layers during training: :class:`BatchNormCallbackBase`.

A subclass is a :class:`~bn_lightning.monitoring.Statistics`: it says WHAT to compute from a step's packed
statistics (:meth:`~BatchNormCallbackBase.compute`) and what to do with the numbers
(:meth:`~BatchNormCallbackBase.on_record`). The base is the Lightning adapter of a
:class:`~bn_lightning.monitoring.BatchNormRecorder` (which shares one set of hooks per model with the other BN
callbacks, reduces the ``(layers, values)`` tensor with ONE collective under DDP and copies it to the host ONCE): it
decides WHEN (every ``log_every_n_steps`` optimizer steps, on the micro-batch that ends the step under gradient
accumulation), hands plain floats to ``on_record`` on every rank (so decisions that raise are taken identically
everywhere) and logs them on rank zero only.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from bn_lightning.monitoring import BatchNormRecorder, LayerBatch, Statistics
from bn_lightning.validation import check_int, check_patterns

__all__ = ["BatchNormCallbackBase", "delegated"]


def delegated(name: str) -> Any:
    """A property reading and writing ``self.stats.<name>``: a callback's settings live in its statistic set."""

    def get(self: Any) -> Any:
        return getattr(self.stats, name)

    def set_(self: Any, value: Any) -> None:
        setattr(self.stats, name, value)

    return property(get, set_, doc=f"``stats.{name}``.")


class BatchNormCallbackBase(Callback, Statistics):
    """Base of :class:`~bn_lightning.callbacks.BatchNormMonitor` and :class:`~bn_lightning.callbacks.RunningStatDrift`.

    Extension points: :meth:`compute` and :meth:`on_record` (abstract), and, when needed, those of
    :class:`~bn_lightning.monitoring.Statistics` (:meth:`sample_request`, :meth:`extra_width`, :meth:`derive` with
    :attr:`DERIVED`, :meth:`watch`). Metric keys are ``<prefix>/<layer>/<stat>``.

    Args:
        log_every_n_steps: record every this many optimizer steps; ``None`` uses the Trainer's
            ``log_every_n_steps``. Under gradient accumulation (``Trainer(accumulate_grad_batches=k)``) a step is
            ``k`` micro-batches and the record is of the last of them, the one after which the optimizer steps (as
            Lightning logs ``self.log`` values), so every record has its own ``global_step``.
        include: ``fnmatch`` patterns of BN layer names (qualified, e.g. ``"net.features.*"``) to watch.
        exclude: patterns of BN layer names to skip.
        prefix: metric key prefix.

    Raises:
        ValueError: ``log_every_n_steps`` is neither ``None`` nor a positive int.
        TypeError: ``include`` or ``exclude`` is not a list of patterns.

    Example::

        >>> import torch
        >>> class BatchMean(BatchNormCallbackBase):
        ...     STATS = {"batch_mean": "mean"}
        ...
        ...     def compute(self, batch):
        ...         values = (batch.mean.sum(1) / batch.channels).unsqueeze(1)
        ...         return torch.where(batch.ran.unsqueeze(1), values, float("nan"))
        ...
        ...     def on_record(self, trainer, values, extras, step):
        ...         pass
        >>> BatchMean(log_every_n_steps=10).log_every_n_steps
        10
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        prefix: str = "bn",
    ) -> None:
        owner = type(self).__name__
        self.log_every_n_steps = check_int(owner, "log_every_n_steps", log_every_n_steps, optional=True)
        self.include = check_patterns(owner, "include", include)
        self.exclude = check_patterns(owner, "exclude", exclude)
        self.prefix = prefix
        self._layers: dict[str, _BatchNorm] = {}
        self._recorder: BatchNormRecorder | None = None
        self._armed = False
        self._ends = True  # whether the current training batch ends an optimizer step
        self.batches_seen = 0
        #: training batches seen that ended an optimizer step (all of them without gradient accumulation)
        self.steps_seen = 0
        self.records = 0

    # ------------------------------------------------------------------ extension points

    @abc.abstractmethod
    def compute(self, batch: LayerBatch) -> Tensor:
        """The values of :attr:`STATS` (in order) then the extra columns, ``(layers, columns)`` on the device.

        Rows of layers that did not run in the step (``batch.ran`` false) must be NaN.
        """

    @abc.abstractmethod
    def on_record(
        self, trainer: pl.Trainer, values: dict[str, dict[str, float]], extras: dict[str, list[float]], step: int
    ) -> None:
        """Called on EVERY rank after a record (after the base logged ``values`` on rank zero).

        Args:
            trainer: the Trainer.
            values: layer -> stat -> reduced value (NaN values dropped; layers no rank ran are absent).
            extras: layer -> the extra columns (see :meth:`extra_width`), summed across ranks.
            step: ``trainer.global_step``.
        """

    # ------------------------------------------------------------------ hooks

    def _install(self, pl_module: pl.LightningModule) -> None:
        self._remove()
        self._recorder = BatchNormRecorder(
            pl_module,
            include=self.include,
            exclude=self.exclude,
            statistics=[self],
            prefix=self.prefix,
            arm_in_step=False,  # on_train_batch_start arms; the callbacks on one model share the hooks
        )
        self._layers = self._recorder.layers

    def _remove(self) -> None:
        if self._recorder is not None:
            self._recorder.close()
            self._recorder = None
        self._armed = False

    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the BN layers being watched (after the fit started)."""
        return list(self._layers)

    def _every(self, trainer: pl.Trainer) -> int:
        return self.log_every_n_steps or max(int(trainer.log_every_n_steps), 1)

    @staticmethod
    def _ends_step(trainer: pl.Trainer, batch_idx: int) -> bool:
        """Whether the optimizer steps after this training batch.

        Lightning's own rule under automatic optimisation: every ``accumulate_grad_batches``-th batch of the epoch,
        and its last batch (manual optimisation allows no accumulation: every batch).
        """
        k = int(trainer.accumulate_grad_batches)
        if k <= 1 or trainer.strategy.handles_gradient_accumulation or (batch_idx + 1) % k == 0:
            return True
        if batch_idx + 1 == trainer.num_training_batches:
            return True
        return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)  # set before on_train_batch_start

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the strategy set up the model: a LayerSync plugin has already converted the layers
        self._install(pl_module)
        if not self._layers:
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
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._ends = self._ends_step(trainer, batch_idx)
        self._armed = bool(self._layers) and self._ends and self.steps_seen % self._every(trainer) == 0
        if self._recorder is not None:
            self._recorder.arm(self._armed)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        armed, self._armed = self._armed, False
        self.batches_seen += 1
        if self._ends:
            self.steps_seen += 1
        if not armed or self._recorder is None:
            return
        step = trainer.global_step
        record = self._recorder.record(step, seen=self.batches_seen)
        self.records += 1
        self._log(trainer, record.metrics, step)
        self.on_record(trainer, record.values[0], record.extras[0], step)

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
        if not trainer.is_global_zero or not trainer.loggers or not metrics:
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
        return {"batches_seen": self.batches_seen, "steps_seen": self.steps_seen, "records": self.records}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_seen = int(state_dict.get("batches_seen", 0))
        # a checkpoint from before steps were counted: it recorded every batch, i.e. a step per batch
        self.steps_seen = int(state_dict.get("steps_seen", self.batches_seen))
        self.records = int(state_dict.get("records", 0))
