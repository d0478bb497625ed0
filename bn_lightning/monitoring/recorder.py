"""BatchNorm monitoring for any training loop: :class:`BatchNormRecorder`, a plain object (no Trainer).

Provides :class:`BatchNormRecorder` and :class:`Record`. The recorder watches a model's BN layers through forward
hooks shared per model (:mod:`~bn_lightning.monitoring.registry`), and on recording steps turns what the layers
computed anyway into per-layer statistics (:class:`~bn_lightning.monitoring.MonitorStats`,
:class:`~bn_lightning.monitoring.DriftStats`, or any :class:`~bn_lightning.monitoring.Statistics`): one collective
under DDP and one host copy per record, nothing at all on the other steps. The Lightning callbacks
(:mod:`bn_lightning.callbacks`) and the Fabric callbacks (:mod:`bn_lightning.fabric`) drive one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bn_lightning.monitoring import registry
from bn_lightning.monitoring.activations import MonitorStats
from bn_lightning.monitoring.discovery import find_batchnorm_layers
from bn_lightning.monitoring.drift import DriftStats
from bn_lightning.monitoring.hooks import LayerHooks
from bn_lightning.monitoring.reduction import reduce_across_ranks
from bn_lightning.monitoring.statistics import Statistics
from bn_lightning.validation import check_int, check_patterns

__all__ = ["BatchNormRecorder", "Record"]


@dataclass
class Record:
    """The reduced numbers of one recording step, on the host.

    Attributes:
        step: the step they belong to.
        values: per statistic set (in the recorder's order): layer -> stat -> value (NaN values dropped; layers no
            rank ran are absent).
        extras: per statistic set: layer -> its extra columns (e.g. histogram counts), summed across ranks.
        prefix: the metric key prefix.
    """

    step: int
    values: list[dict[str, dict[str, float]]]
    extras: list[dict[str, list[float]]]
    prefix: str = "bn"
    metrics: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = {
            f"{self.prefix}/{layer}/{stat}": v
            for values in self.values
            for layer, stats in values.items()
            for stat, v in stats.items()
        }


class BatchNormRecorder:
    """Record per-layer BatchNorm statistics from any training loop (Fabric, plain PyTorch, Lightning's callbacks).

    Call :meth:`step` after every training step: on recording steps (the first, then every ``every_n_steps``-th) it
    returns the metrics, ``{"bn/<layer>/<stat>": value}`` with the keys of
    :class:`~bn_lightning.callbacks.BatchNormMonitor` (``batch_mean``, ``batch_std``, ...) and
    :class:`~bn_lightning.callbacks.RunningStatDrift` (``drift_kl``, ``rm_velocity``, ..., ``rank_disagreement``
    under DDP); on the other steps ``{}``, having run no tensor op. A record describes the LAST training forward of
    each layer since the previous :meth:`step` (under gradient accumulation, call :meth:`step` once per optimizer
    step); forwards without gradients (``torch.no_grad()``, ``torch.inference_mode()``: an evaluation between two
    steps) are not recorded. Under DDP every rank must call :meth:`step` (one ``all_gather`` per record); the values
    are identical on every rank; the health checks of :class:`~bn_lightning.monitoring.DriftStats` warn on rank zero
    and raise on every rank alike.

    :meth:`close` (or leaving the ``with`` block) removes every hook. :meth:`state_dict` / :meth:`load_state_dict`
    carry the step count and the statistic sets' state (the previous record's running statistics, alert counts).

    Args:
        model: the model whose BN layers (torch's ``_BatchNorm`` subclasses: ours, torch's, SyncBatchNorm; not the
            frozen ones) are watched. Create the recorder after moving the model to its device.
        every_n_steps: record every this many :meth:`step` calls.
        include: ``fnmatch`` patterns of qualified BN layer names to watch (``None``: all).
        exclude: patterns of layer names to skip.
        monitor: the activation statistics: ``True`` (:class:`~bn_lightning.monitoring.MonitorStats` without
            histograms), ``False``, or a configured ``MonitorStats``.
        drift: the drift statistics and health checks: ``True`` (:class:`~bn_lightning.monitoring.DriftStats`),
            ``False``, or a configured ``DriftStats``.
        statistics: explicit statistic sets, used instead of ``monitor`` and ``drift``.
        prefix: metric key prefix.
        group: the process group to reduce over (``None``: the default group).
        arm_in_step: ``True``: :meth:`step` arms the next step (the recorder has hooks of its own). ``False``: the
            training loop's adapter calls :meth:`arm` at every step start and :meth:`record` at its end (as the
            Lightning and Fabric callbacks do); such recorders share one set of hooks per model.

    Raises:
        ValueError: ``every_n_steps`` is not a positive int; no statistic set.
        TypeError: ``include``/``exclude`` are not lists of patterns; ``monitor``/``drift`` of the wrong type.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> from bn_lightning import BatchNormRecorder
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> with BatchNormRecorder(net, every_n_steps=2) as rec:
        ...     logged = []
        ...     for _ in range(3):
        ...         loss = net(torch.randn(16, 4)).square().mean()
        ...         opt.zero_grad(); loss.backward(); opt.step()
        ...         logged.append(rec.step())
        >>> [len(m) > 0 for m in logged]
        [True, False, True]
        >>> sorted(k for k in logged[0] if k.endswith(("batch_mean", "drift_kl")))
        ['bn/1/batch_mean', 'bn/1/drift_kl']
        >>> net[1]._forward_hooks  # closed: no hook left
        OrderedDict()
    """

    def __init__(
        self,
        model: nn.Module,
        every_n_steps: int = 50,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        monitor: bool | MonitorStats = True,
        drift: bool | DriftStats = True,
        statistics: Sequence[Statistics] | None = None,
        prefix: str = "bn",
        group: Any = None,
        arm_in_step: bool = True,
    ) -> None:
        owner = "BatchNormRecorder"
        self.every_n_steps = check_int(owner, "every_n_steps", every_n_steps)
        self.include = check_patterns(owner, "include", include)
        self.exclude = check_patterns(owner, "exclude", exclude)
        if statistics is None:
            statistics = [
                *_chosen(owner, "monitor", monitor, MonitorStats, lambda: MonitorStats(histogram=False)),
                *_chosen(owner, "drift", drift, DriftStats, DriftStats),
            ]
        self.statistics: list[Statistics] = list(statistics)
        if not self.statistics:
            raise ValueError(f"{owner}: nothing to record: monitor and drift are both False and no statistics given")
        for s in self.statistics:
            if not isinstance(s, Statistics):
                raise TypeError(f"{owner}: statistics must be Statistics instances, got {type(s).__name__}")
        self.prefix = prefix
        self.group = group
        self.layers: dict[str, _BatchNorm] = find_batchnorm_layers(model, self.include, self.exclude)
        #: :meth:`step` calls so far
        self.steps = 0
        #: records so far
        self.records = 0
        #: the last record (``None`` before the first)
        self.last: Record | None = None
        self._hooks: LayerHooks | None = None
        self._armed = False
        device = self.device
        for s in self.statistics:
            s.watch(self.layers, device)
        self.arm_in_step = arm_in_step
        if self.layers and arm_in_step:
            # hooks of its own: re-arming at the end of step() must not clear what another recorder has yet to read
            self._hooks = LayerHooks()
            self._hooks.subscribe(self, list(self.layers.values()))
        elif self.layers:
            self._hooks = registry.subscribe(model, self, list(self.layers.values()))
        if arm_in_step:
            self.arm(True, grad_only=True)  # step 0 records

    # ------------------------------------------------------------------ properties

    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the watched BN layers."""
        return list(self.layers)

    @property
    def device(self) -> torch.device:
        """Where the watched layers' tensors live (CPU without layers)."""
        tensors = itertools.chain.from_iterable(
            itertools.chain(m.buffers(), m.parameters()) for m in self.layers.values()
        )
        return next((t.device for t in tensors), torch.device("cpu"))

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` removed the hooks."""
        return self._hooks is None

    # ------------------------------------------------------------------ the plain-loop API

    def step(self, step: int | None = None) -> dict[str, float]:
        """Call after every training step: the metrics on recording steps, ``{}`` otherwise.

        Args:
            step: the step number the record carries (default: the number of :meth:`step` calls, this one included,
                which is the optimizer steps taken).

        Raises:
            BatchNormHealthError: a health check whose action is ``"raise"`` failed (on every rank).
            RuntimeError: the recorder was made with ``arm_in_step=False``.
        """
        if not self.arm_in_step:
            raise RuntimeError("BatchNormRecorder(arm_in_step=False): call arm() and record(), not step()")
        recording = self._armed
        self.steps += 1
        record = self.record(self.steps if step is None else step, seen=self.steps) if recording else None
        self.arm(self.steps % self.every_n_steps == 0, grad_only=True)
        if record is None:
            return {}
        self.observe(record, seen=self.steps)
        return record.metrics

    def close(self) -> None:
        """Remove every hook this recorder added (the hooks of a model are removed with their last reader)."""
        if self._hooks is not None:
            if self.arm_in_step:
                self._hooks.unsubscribe(self)  # its only reader: the hooks are removed
            else:
                registry.unsubscribe(self._hooks, self)
            self._hooks = None
        self._armed = False

    def __enter__(self) -> BatchNormRecorder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ the API of training-loop adapters

    def arm(self, recording: bool, grad_only: bool = False) -> None:
        """Say, at the start of a training step, whether it records (:meth:`step` does it for the next step).

        Args:
            recording: the hooks stash what a record needs during this step's forwards.
            grad_only: ignore forwards run without gradients.
        """
        self._armed = recording and self._hooks is not None
        if self._hooks is not None:
            sample = _merged_samples(self.statistics) if self._armed else None
            self._hooks.begin(self, self._armed, sample, grad_only)

    def record(self, step: int, seen: int) -> Record:
        """The record of the step :meth:`arm` armed: compute, reduce across ranks (ONE collective), one host copy.

        Every rank must call it for the same steps. ``seen`` (the training steps so far) is passed on to
        :meth:`observe`. Without an armed step (or layers): an empty record.
        """
        armed, self._armed = self._armed, False
        sets = self.statistics
        if not armed or self._hooks is None:
            return Record(step, [{} for _ in sets], [{} for _ in sets], self.prefix)
        self._hooks.end(self)
        batch = self._hooks.batch_for(self, self.device)
        # a row for EVERY watched layer (NaN where this rank did not run it): every rank sends the same shape
        locals_, hows, spans = [], [], []
        for s in sets:
            local = s.compute(batch).float()
            extra = s.extra_width()
            locals_.append(local)
            hows += list(s.STATS.values()) + ["sum"] * extra
            spans.append((len(s.STATS), extra))
        local = locals_[0] if len(locals_) == 1 else torch.cat(locals_, dim=1)
        reduced, per_rank = reduce_across_ranks(local, hows, self.group)
        derives = per_rank.shape[0] > 1 and any(s.DERIVED for s in sets)
        parts: list[Tensor] = []
        names: list[list[str]] = []
        at = 0
        for s, (k, extra) in zip(sets, spans, strict=True):
            keys = list(s.STATS)
            if derives:
                stats, rest = reduced[:, at : at + k], reduced[:, at + k : at + k + extra]
                if s.DERIVED:  # statistics of the per-rank values, still on the device
                    stats = torch.cat([stats, s.derive(per_rank[:, :, at : at + k + extra])], dim=1)
                    keys += list(s.DERIVED)
                parts += [stats, rest]
            names.append(keys)
            at += k + extra
        host = (torch.cat(parts, dim=1) if derives else reduced).cpu()  # the ONE host transfer
        rows = host.tolist()
        values: list[dict[str, dict[str, float]]] = []
        extras: list[dict[str, list[float]]] = []
        at = 0
        for keys, (_, extra) in zip(names, spans, strict=True):
            k = len(keys)
            v: dict[str, dict[str, float]] = {}
            e: dict[str, list[float]] = {}
            for name, row in zip(self.layers, rows, strict=True):
                stats = row[at : at + k]
                if all(x != x for x in stats):  # all NaN: no rank ran this layer in this step
                    continue
                v[name] = {key: x for key, x in zip(keys, stats, strict=True) if x == x}
                e[name] = row[at + k : at + k + extra]
            values.append(v)
            extras.append(e)
            at += k + extra
        self.records += 1
        self.last = Record(step, values, extras, self.prefix)
        return self.last

    def observe(self, record: Record, seen: int) -> None:
        """Hand ``record`` to every statistic set (the health checks run here; they may raise)."""
        for s, values, extras in zip(self.statistics, record.values, record.extras, strict=True):
            s.observe(values, extras, record.step, seen)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The step and record counts and every statistic set's state."""
        return {
            "steps": self.steps,
            "records": self.records,
            "statistics": [s.state_dict() for s in self.statistics],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the cadence continues where it stopped."""
        self.steps = int(state_dict.get("steps", 0))
        self.records = int(state_dict.get("records", 0))
        for s, state in zip(self.statistics, state_dict.get("statistics", []), strict=False):
            s.load_state_dict(state)
        if self._hooks is not None and self.arm_in_step:
            self.arm(self.steps % self.every_n_steps == 0, grad_only=True)


def _chosen(owner: str, name: str, value: Any, cls: type, default: Any) -> list[Statistics]:
    if isinstance(value, cls):
        return [value]
    if value is True:
        return [default()]
    if value is False:
        return []
    raise TypeError(f"{owner}: {name} must be a bool or a {cls.__name__}, got {type(value).__name__}")


def _merged_samples(sets: Sequence[Statistics]) -> tuple[int, bool] | None:
    """The samples the hooks keep for ``sets``: one request per set, merged when they ask for the same size."""
    requests = [r for r in (s.sample_request() for s in sets) if r is not None]
    if not requests:
        return None
    if len({k for k, _ in requests}) > 1:
        raise ValueError(f"BatchNormRecorder: statistic sets ask for samples of different sizes: {requests}")
    return requests[0][0], any(w for _, w in requests)
