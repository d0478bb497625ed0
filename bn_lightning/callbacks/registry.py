"""One :class:`~bn_lightning.callbacks.recorder.BatchNormRecorder` per model, shared by the callbacks watching it.

Provides :func:`subscribe` and :func:`unsubscribe`. BatchNormMonitor and RunningStatDrift on the same model share
one set of hooks: the stashes are copied, sampled and packed once per step whatever the number of callbacks. The
registry holds models weakly and forgets a recorder when its last reader unsubscribes.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bn_lightning.callbacks.recorder import BatchNormRecorder

__all__ = ["subscribe", "unsubscribe"]

_RECORDERS: weakref.WeakKeyDictionary[nn.Module, BatchNormRecorder] = weakref.WeakKeyDictionary()


def subscribe(model: nn.Module, key: Hashable, layers: list[_BatchNorm]) -> BatchNormRecorder:
    """The recorder of ``model`` (made on first use), now watching ``layers`` for the reader ``key``.

    Example::

        >>> net = nn.Sequential(nn.BatchNorm1d(2))
        >>> a, b = subscribe(net, "a", [net[0]]), subscribe(net, "b", [net[0]])
        >>> a is b, len(net[0]._forward_hooks)
        (True, 1)
        >>> unsubscribe(a, "a"); unsubscribe(a, "b")
        >>> len(net[0]._forward_hooks)
        0
    """
    recorder = _RECORDERS.get(model)
    if recorder is None:
        recorder = _RECORDERS[model] = BatchNormRecorder()
    recorder.subscribe(key, layers)
    return recorder


def unsubscribe(recorder: BatchNormRecorder, key: Hashable) -> None:
    """Stop ``key`` reading from ``recorder``; the last reader gone, the model's recorder is forgotten."""
    recorder.unsubscribe(key)
    if not recorder.subscribers:
        for model, shared in list(_RECORDERS.items()):
            if shared is recorder:
                del _RECORDERS[model]
