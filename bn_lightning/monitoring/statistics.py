"""What a recorder computes on a recording step: :class:`Statistics`, the extension point of every statistic set.

A statistic set says WHAT to compute from a step's packed :class:`~bn_lightning.monitoring.hooks.LayerBatch`
(:meth:`Statistics.compute`, on the device) and how ranks combine each value (:attr:`Statistics.STATS`); the
recorder decides when, reduces every set's columns with ONE collective and copies them to the host once.
:class:`~bn_lightning.monitoring.MonitorStats` and :class:`~bn_lightning.monitoring.DriftStats` are the two sets
the package ships; the Lightning callbacks' base is one too.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from bn_lightning.monitoring.hooks import LayerBatch

__all__ = ["Statistics"]


class Statistics(abc.ABC):
    """A set of per-layer statistics a :class:`~bn_lightning.monitoring.BatchNormRecorder` computes.

    Extension points: :meth:`compute` (abstract) and, when needed, :meth:`sample_request`, :meth:`extra_width`,
    :meth:`derive` (with :attr:`DERIVED`), :meth:`watch`, :meth:`observe`, :meth:`state_dict`.

    Example::

        >>> class BatchMean(Statistics):
        ...     STATS = {"batch_mean": "mean"}
        ...
        ...     def compute(self, batch):
        ...         values = (batch.mean.sum(1) / batch.channels).unsqueeze(1)
        ...         return torch.where(batch.ran.unsqueeze(1), values, float("nan"))
        >>> list(BatchMean().STATS)
        ['batch_mean']
    """

    #: stat name -> cross-rank reduction (one of :data:`~bn_lightning.monitoring.reduction.REDUCTIONS`)
    STATS: ClassVar[dict[str, str]] = {}
    #: stats computed under DDP from every rank's values (see :meth:`derive`)
    DERIVED: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def compute(self, batch: LayerBatch) -> Tensor:
        """The values of :attr:`STATS` (in order) then the extra columns, ``(layers, columns)`` on the device.

        Rows of layers that did not run in the step (``batch.ran`` false) must be NaN.
        """

    def sample_request(self) -> tuple[int, bool] | None:
        """``(k, with_input)``: the hooks keep ``k``-element samples of the output (and input) on recording steps."""
        return None

    def extra_width(self) -> int:
        """Number of extra (unnamed, summed across ranks) columns after :attr:`STATS`, e.g. histogram bins."""
        return 0

    def derive(self, per_rank: Tensor) -> Tensor:
        """Under DDP: the :attr:`DERIVED` statistics ``(layers, len(DERIVED))`` of the per-rank values.

        ``per_rank`` is ``(world, layers, columns)`` (this set's columns only); computed on the device, before the
        host copy. Sets that declare :attr:`DERIVED` must override it.
        """
        raise NotImplementedError(f"{type(self).__name__} declares DERIVED = {self.DERIVED} but no derive()")

    def watch(self, layers: dict[str, _BatchNorm], device: torch.device) -> None:  # noqa: B027
        """Called when the recorder starts watching ``layers`` (qualified name -> layer), before any record."""

    def observe(  # noqa: B027
        self, values: dict[str, dict[str, float]], extras: dict[str, list[float]], step: int, seen: int
    ) -> None:
        """Called on EVERY rank after a record with the reduced host values (e.g. to run checks).

        Args:
            values: layer -> stat -> reduced value (NaN values dropped; layers no rank ran are absent).
            extras: layer -> the extra columns (see :meth:`extra_width`), summed across ranks.
            step: the step of the record.
            seen: training steps (batches) seen so far, this one included.
        """

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs (default: nothing)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: B027
        """Restore :meth:`state_dict`; missing keys keep their defaults."""
