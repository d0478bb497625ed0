"""Keeping normalisation layers' running statistics out of the way of forward passes that must not change them.

Provides :func:`no_stat_update`, the context manager inside which training-mode forward passes (SAM's second pass,
adversarial examples, a look-ahead) leave every running statistic bit-identical, and the pieces it is built from,
which the guarding callbacks share: :func:`stat_layers` (the layers that keep running statistics),
:class:`StatSnapshot` (a copy of all their state, taken and restored in place) and :func:`is_guarded`.

The guard snapshots and restores; it never switches a layer to eval mode nor changes its ``momentum``. So the
forward inside is exactly the forward outside (batch statistics, SyncBatchNorm's collectives on every rank, Batch
Renormalization's correction), and the state after it is exactly the state before: torch's ``momentum=0`` trick
would still count ``num_batches_tracked`` and could not express ``momentum=None`` (a cumulative average).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parameter import is_lazy

__all__ = ["StatSnapshot", "all_finite", "is_guarded", "no_stat_update", "stat_layers"]

_GUARD_DEPTH: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
_KEPT_ATTRIBUTES = ("last_batch_stats",)  # what bn_lightning's layers keep of their last training batch
_MISSING = object()


def _copy_all(dst: list[Tensor], src: list[Tensor]) -> None:
    foreach = getattr(torch, "_foreach_copy_", None)  # one call for all tensors (torch >= 2.1)
    if foreach is not None:
        foreach(dst, src)
    else:  # pragma: no cover - older torch
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)


def stat_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> every layer of ``module`` that keeps running statistics a training forward updates.

    These are torch's ``_NormBase`` layers (every BatchNorm, torch's and bn_lightning's, SyncBatchNorm, Ghost,
    Renorm; InstanceNorm with ``track_running_stats=True``), ``module`` itself included. Frozen BN layers hold
    statistics that never change and are not listed.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Sequential(nn.BatchNorm1d(4)))
        >>> list(stat_layers(net))
        ['1', '2.0']
    """
    return {name: m for name, m in module.named_modules() if isinstance(m, _NormBase)}


class StatSnapshot:
    """A copy of the running statistics (every buffer) and kept batch statistics of a model's normalisation layers.

    Holds one preallocated tensor per buffer: :meth:`take` copies the live buffers into it and :meth:`restore`
    copies it back, in place and bit for bit (the buffers keep their identity, so optimizers, DDP and
    ``state_dict`` views stay valid). Attributes a layer keeps about its last training batch (bn_lightning's
    ``last_batch_stats``) are saved and put back too. Buffers of lazy modules not yet initialised are left out.

    Args:
        layers: qualified name -> layer, e.g. :func:`stat_layers` of a model.
        take: copy the current values at once (else call :meth:`take` before :meth:`restore`).

    Example::

        >>> bn = nn.BatchNorm1d(3)
        >>> snap = StatSnapshot({"bn": bn})
        >>> _ = bn(torch.randn(8, 3))
        >>> snap.restore()
        >>> bn.running_mean, int(bn.num_batches_tracked)
        (tensor([0., 0., 0.]), 0)
    """

    def __init__(self, layers: Mapping[str, nn.Module], take: bool = True) -> None:
        self.layers = dict(layers)
        self.names: list[str] = []  # the layer each buffer belongs to
        self._owners: list[tuple[nn.Module, str]] = []
        for name, layer in self.layers.items():
            for key, buf in layer.named_buffers(recurse=False):
                if buf is not None and not is_lazy(buf):
                    self.names.append(name)
                    self._owners.append((layer, key))
        self._copies = [torch.empty_like(t) for t in self.live()]
        self._index: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            self._index.setdefault(name, []).append(i)
        self._kept: list[tuple[str, nn.Module, str, Any]] = []
        self._taken = False
        if take:
            self.take()

    def live(self) -> list[Tensor]:
        """The layers' buffers as they are now (the tensors themselves, not copies)."""
        return [getattr(layer, key) for layer, key in self._owners]

    def take(self) -> None:
        """Copy the current state into the snapshot (no allocation: one foreach copy)."""
        with torch.no_grad():
            if self._copies:
                _copy_all(self._copies, self.live())
        self._kept = [
            (name, layer, attr, layer.__dict__.get(attr, _MISSING))
            for name, layer in self.layers.items()
            for attr in _KEPT_ATTRIBUTES
            if hasattr(layer, attr)
        ]
        self._taken = True

    def restore(self, layers: Any = None, kept: bool = True) -> None:
        """Copy the snapshot back into the buffers, in place; ``layers``: only those names (default: all).

        With ``kept=False`` only the buffers are restored, and the kept batch statistics stay those of the last pass.

        The copy goes through ``.data``, so it does not count as an in-place change for autograd: torch's BN saves
        its running buffers for backward (it never reads them there in training), and a restore between a forward
        and its backward must not make that backward fail.

        Raises:
            RuntimeError: if nothing was taken yet.
        """
        if not self._taken:
            raise RuntimeError("StatSnapshot.restore: take() the snapshot first")
        with torch.no_grad():
            if layers is None:
                _copy_all([t.data for t in self.live()], self._copies)
            else:
                for name in layers:
                    for i in self._index.get(name, ()):
                        layer, key = self._owners[i]
                        getattr(layer, key).data.copy_(self._copies[i])
        pick = None if layers is None else set(layers)
        for name, layer, attr, value in self._kept if kept else ():
            if pick is None or name in pick:
                if value is _MISSING:
                    layer.__dict__.pop(attr, None)  # back to the class default
                else:
                    layer.__dict__[attr] = value

    def floating(self, ignore: Any = ()) -> list[Tensor]:
        """The live floating-point buffers (running mean and variance), except those of the layers in ``ignore``."""
        skip = set(ignore)
        pairs = zip(self.names, self.live(), strict=True)
        return [t for name, t in pairs if t.is_floating_point() and name not in skip]

    def nonfinite_layers(self) -> list[str]:
        """Names of the layers whose live floating buffers hold a NaN or an infinity (one host read per layer)."""
        bad = []
        for name in self.layers:
            tensors = [t for n, t in zip(self.names, self.live(), strict=True) if n == name and t.is_floating_point()]
            if tensors and not bool(all_finite(tensors)):
                bad.append(name)
        return bad


def all_finite(tensors: list[Tensor]) -> Tensor:
    """A 0-d bool tensor: whether every value of ``tensors`` is finite (one packed check, no host read).

    Example::

        >>> all_finite([torch.ones(2), torch.tensor([1.0, float("nan")])])
        tensor(False)
    """
    if not tensors:
        return torch.tensor(True)
    return torch.cat([t.reshape(-1) for t in tensors]).isfinite().all()


def is_guarded(layer: nn.Module) -> bool:
    """Whether ``layer`` is inside a :func:`no_stat_update` block: its forward passes will leave no trace.

    Callbacks that collect statistics from forward hooks skip such passes.

    Example::

        >>> bn = nn.BatchNorm1d(2)
        >>> with no_stat_update(bn):
        ...     is_guarded(bn)
        True
        >>> is_guarded(bn)
        False
    """
    return _GUARD_DEPTH.get(layer, 0) > 0


class no_stat_update:  # noqa: N801 - used as a function: ``with no_stat_update(model):``
    """Context manager: forward passes inside leave every running statistic of ``module`` bit-identical.

    On entry, every buffer of every layer in :func:`stat_layers` (``running_mean``, ``running_var``,
    ``num_batches_tracked``, and any other buffer a variant keeps) and the batch statistics bn_lightning's layers keep
    (``last_batch_stats``) are copied; on exit, also through an exception, they are copied back in place. Nothing
    else changes: layers stay in training mode, so the forward normalises with batch statistics and gives exactly
    what it gives outside; SyncBatchNorm still runs its collectives on every rank (a rank that skipped them would
    hang its peers); ``momentum=None`` and ``num_batches_tracked`` come back as they were. Gradients flow as usual.

    Re-entrant: blocks nest, and one object may be entered again while it is active. Callbacks that collect
    statistics in forward hooks ask :func:`is_guarded` and skip guarded passes.

    Args:
        module: the model (or a single layer).

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        >>> before = net[1].running_mean.clone()
        >>> x = torch.randn(8, 4)
        >>> with no_stat_update(net):
        ...     y = net(x)  # e.g. SAM's second forward
        >>> torch.equal(net[1].running_mean, before), net.training
        (True, True)
    """

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"no_stat_update: module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self._stack: list[StatSnapshot] = []

    def __enter__(self) -> nn.Module:
        snapshot = StatSnapshot(stat_layers(self.module))
        self._stack.append(snapshot)
        for layer in snapshot.layers.values():
            _GUARD_DEPTH[layer] = _GUARD_DEPTH.get(layer, 0) + 1
        return self.module

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        snapshot = self._stack.pop()
        try:
            snapshot.restore()
        finally:
            for layer in snapshot.layers.values():
                depth = _GUARD_DEPTH.get(layer, 0) - 1
                if depth > 0:
                    _GUARD_DEPTH[layer] = depth
                else:
                    _GUARD_DEPTH.pop(layer, None)
