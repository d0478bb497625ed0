"""BatchNorm monitoring and repair in a Lightning Fabric loop: Fabric callbacks over the core's plain objects.

Provides :class:`BatchNormRecorderCallback` (drives a :class:`~bn_lightning.monitoring.BatchNormRecorder`, logs with
``fabric.log_dict`` on rank zero) and :class:`SyncRunningStatsCallback` (:func:`~bn_lightning.sync_running_stats`
at the moments the loop names). Fabric calls a callback's method when the loop says ``fabric.call("<hook>",
**kwargs)`` (keyword arguments a method does not take are filtered out), so the loop below is the whole contract::

    import torch
    from lightning.fabric import Fabric

    import bn_lightning
    from bn_lightning.fabric import BatchNormRecorderCallback, SyncRunningStatsCallback

    fabric = Fabric(
        accelerator="cpu", devices=2, strategy="ddp",
        callbacks=[BatchNormRecorderCallback(every_n_steps=50), SyncRunningStatsCallback()],
    )
    fabric.launch()
    model = bn_lightning.convert_sync_batchnorm(make_model())  # the batch statistics of all ranks together
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(make_loader())
    fabric.call("on_train_start", fabric=fabric, model=model)
    for epoch in range(epochs):
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
            fabric.call("on_train_batch_end", fabric=fabric)  # logs bn/<layer>/<stat> every 50 steps
        fabric.call("on_train_epoch_end", fabric=fabric, model=model)  # every rank: the same running statistics
    bn_lightning.recalibrate_bn(model, loader, num_batches=100)  # population statistics, identical on every rank
    fabric.call("on_train_end")

Everything here also works without Fabric: the callbacks are thin; the work is done by
:class:`~bn_lightning.monitoring.BatchNormRecorder`, :func:`~bn_lightning.sync_running_stats` and
:func:`~bn_lightning.recalibrate_bn` (torch only, through :mod:`bn_lightning.distributed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.fabric import Fabric
from lightning.fabric.wrappers import is_wrapped
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bn_lightning.monitoring import BatchNormRecorder, DriftStats, MonitorStats
from bn_lightning.sync_stats import REDUCE, sync_running_stats
from bn_lightning.validation import check_choice, check_int, check_patterns

__all__ = ["BatchNormRecorderCallback", "SyncRunningStatsCallback", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside Fabric's and DDP's wrappers.

    Layer names then read ``features.1``, not ``_forward_module.module.features.1``.

    Example::

        >>> net = nn.Sequential(nn.BatchNorm1d(2))
        >>> unwrap_model(net) is net
        True
    """
    while isinstance(model, DistributedDataParallel) or is_wrapped(model):
        model = model.module
    return model


class BatchNormRecorderCallback:
    """A Fabric callback that records BN statistics with a :class:`~bn_lightning.monitoring.BatchNormRecorder`.

    Hooks (call them through ``fabric.call``, every rank alike):

    - ``on_train_start(fabric, model)``: watch ``model``'s BN layers (Fabric's wrappers are looked through);
    - ``on_train_batch_end(fabric, step=None)``: after every optimizer step; on recording steps, the metrics
      (``bn/<layer>/<stat>``, the keys of the Lightning callbacks ``BatchNormMonitor`` and ``RunningStatDrift``)
      go to ``fabric.log_dict`` on rank zero, at ``step`` (default: the number of steps so far). Under DDP the
      values are reduced across ranks first (one collective per record), so the logged numbers cover all ranks;
    - ``on_train_end()``: remove the hooks.

    :attr:`last_metrics` holds the latest record's metrics on every rank. :meth:`state_dict` and
    :meth:`load_state_dict` carry the recorder's state (put them in what ``fabric.save`` stores).

    Args:
        every_n_steps: record every this many steps (the first step records).
        include: ``fnmatch`` patterns of BN layer names to watch.
        exclude: patterns of BN layer names to skip.
        monitor: the activation statistics (``True``, ``False`` or a :class:`~bn_lightning.monitoring.MonitorStats`).
        drift: the drift statistics and health checks (``True``, ``False`` or a
            :class:`~bn_lightning.monitoring.DriftStats`).
        prefix: metric key prefix.

    Raises:
        ValueError: ``every_n_steps`` is not a positive int.
        TypeError: ``include``/``exclude`` are not lists of patterns.
        RuntimeError: ``on_train_batch_end`` before ``on_train_start``.

    Example::

        >>> import torch
        >>> from lightning.fabric import Fabric
        >>> cb = BatchNormRecorderCallback(every_n_steps=2)
        >>> fabric = Fabric(accelerator="cpu", devices=1, callbacks=[cb])
        >>> model = fabric.setup(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
        >>> fabric.call("on_train_start", fabric=fabric, model=model)
        >>> _ = model(torch.randn(8, 3))
        >>> fabric.call("on_train_batch_end", fabric=fabric)
        >>> sorted(cb.last_metrics)[:2]
        ['bn/1/batch_mean', 'bn/1/batch_size']
        >>> fabric.call("on_train_end")
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        monitor: bool | MonitorStats = True,
        drift: bool | DriftStats = True,
        prefix: str = "bn",
    ) -> None:
        owner = type(self).__name__
        self.every_n_steps = check_int(owner, "every_n_steps", every_n_steps)
        self.include = check_patterns(owner, "include", include)
        self.exclude = check_patterns(owner, "exclude", exclude)
        self.monitor = monitor
        self.drift = drift
        self.prefix = prefix
        self.recorder: BatchNormRecorder | None = None
        #: the latest record's metrics (every rank)
        self.last_metrics: dict[str, float] = {}
        self._state: dict[str, Any] | None = None

    def on_train_start(self, fabric: Fabric, model: nn.Module) -> None:
        """Watch ``model``'s BN layers (replacing a previous model's)."""
        self.on_train_end()
        self.recorder = BatchNormRecorder(
            unwrap_model(model),
            every_n_steps=self.every_n_steps,
            include=self.include,
            exclude=self.exclude,
            monitor=self.monitor,
            drift=self.drift,
            prefix=self.prefix,
        )
        if self._state is not None:
            self.recorder.load_state_dict(self._state)
            self._state = None

    def on_train_batch_end(self, fabric: Fabric, step: int | None = None) -> None:
        """After an optimizer step: record (every rank) and log on rank zero when it is a recording step."""
        if self.recorder is None:
            raise RuntimeError(f"{type(self).__name__}: call on_train_start(fabric, model) before on_train_batch_end")
        metrics = self.recorder.step(step)
        if not metrics:
            return
        self.last_metrics = metrics
        if fabric.is_global_zero:
            record = self.recorder.last
            fabric.log_dict(metrics, step=record.step if record is not None else step)

    def on_train_end(self) -> None:
        """Remove the hooks."""
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None

    def state_dict(self) -> dict[str, Any]:
        """The recorder's state (steps, records, the previous running statistics, alert counts)."""
        if self.recorder is not None:
            return self.recorder.state_dict()
        return dict(self._state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (applied at ``on_train_start`` when called before it)."""
        if self.recorder is not None:
            self.recorder.load_state_dict(state_dict)
        else:
            self._state = dict(state_dict)


class SyncRunningStatsCallback:
    """A Fabric callback that makes every rank's BN running statistics identical.

    The Fabric counterpart of :class:`~bn_lightning.callbacks.SyncBatchNormBuffers`; the work is
    :func:`~bn_lightning.sync_running_stats`: ONE collective for all layers, layers without running statistics and
    frozen layers skipped, nothing to do without a process group. It runs when the loop calls the hooks named in
    ``when``, every rank alike, each with ``model=...``.

    Args:
        reduce: ``"mean"`` (the mixture of the ranks' statistics) or ``"broadcast"`` (rank zero's, bit for bit).
        when: the hook names that synchronise (default: ``on_train_epoch_end`` and ``on_validation_start``).

    Raises:
        ValueError: ``reduce`` is not one of :data:`bn_lightning.sync_stats.REDUCE`; ``when`` names an unknown hook.

    Example::

        >>> cb = SyncRunningStatsCallback(reduce="broadcast", when=("on_train_epoch_end",))
        >>> net = nn.Sequential(nn.BatchNorm1d(2))
        >>> cb.on_train_epoch_end(model=net), cb.on_validation_start(model=net)  # no process group: nothing moves
        (['0'], None)
    """

    HOOKS = ("on_train_epoch_end", "on_validation_start", "on_train_end")

    def __init__(self, reduce: str = "mean", when: Sequence[str] = ("on_train_epoch_end", "on_validation_start")):
        owner = type(self).__name__
        self.reduce = check_choice(owner, "reduce", reduce, REDUCE)
        self.when = tuple(check_choice(owner, "when", hook, self.HOOKS) for hook in when)
        #: synchronisations done
        self.syncs = 0

    def _sync(self, hook: str, model: nn.Module) -> list[str] | None:
        if hook not in self.when:
            return None
        self.syncs += 1
        return sync_running_stats(unwrap_model(model), reduce=self.reduce)

    def on_train_epoch_end(self, model: nn.Module) -> list[str] | None:
        """Synchronise (with ``"on_train_epoch_end"`` in ``when``); the names of the layers synchronised."""
        return self._sync("on_train_epoch_end", model)

    def on_validation_start(self, model: nn.Module) -> list[str] | None:
        """Synchronise (with ``"on_validation_start"`` in ``when``); the names of the layers synchronised."""
        return self._sync("on_validation_start", model)

    def on_train_end(self, model: nn.Module | None = None) -> list[str] | None:
        """Synchronise (with ``"on_train_end"`` in ``when`` and a ``model``); the names of the layers synchronised."""
        return None if model is None else self._sync("on_train_end", model)
