"""One :class:`~bn_lightning.monitoring.hooks.LayerHooks` per model, shared by the recorders watching it.

Provides :func:`subscribe` and :func:`unsubscribe`. Recorders on the same model (e.g. those of BatchNormMonitor and
RunningStatDrift) share one set of hooks: the stashes are copied, sampled and packed once per step whatever the
number of recorders. The registry holds models weakly and forgets a model's hooks when their last reader
unsubscribes.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bn_lightning.monitoring.hooks import LayerHooks

__all__ = ["subscribe", "unsubscribe"]

_HOOKS: weakref.WeakKeyDictionary[nn.Module, LayerHooks] = weakref.WeakKeyDictionary()


def subscribe(model: nn.Module, key: Hashable, layers: list[_BatchNorm]) -> LayerHooks:
    """The hooks of ``model`` (made on first use), now watching ``layers`` for the reader ``key``.

    Example::

        >>> net = nn.Sequential(nn.BatchNorm1d(2))
        >>> a, b = subscribe(net, "a", [net[0]]), subscribe(net, "b", [net[0]])
        >>> a is b, len(net[0]._forward_hooks)
        (True, 1)
        >>> unsubscribe(a, "a"); unsubscribe(a, "b")
        >>> len(net[0]._forward_hooks)
        0
    """
    hooks = _HOOKS.get(model)
    if hooks is None:
        hooks = _HOOKS[model] = LayerHooks()
    hooks.subscribe(key, layers)
    return hooks


def unsubscribe(hooks: LayerHooks, key: Hashable) -> None:
    """Stop ``key`` reading from ``hooks``; the last reader gone, the model's hooks are forgotten."""
    hooks.unsubscribe(key)
    if not hooks.subscribers:
        for model, shared in list(_HOOKS.items()):
            if shared is hooks:
                del _HOOKS[model]
