"""Convert BN layers between implementations, exactly and reversibly.

Provides :func:`convert_sync_batchnorm` (every BN layer -> :class:`bn_lightning.SyncBatchNorm`) and
:func:`revert_sync_batchnorm` (back to the EXACT original classes; torch has no revert, and Lightning's leaves a
``_BatchNormXd``). Both are plain recursive functions in timm's style: they reuse the very same ``Parameter`` and
buffer objects (so optimizers, ``requires_grad``, device and dtype are untouched), keep the training flag, and
rebuild the tree with ``add_module``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bn_lightning.layers.batchnorm import BatchNormXd
from bn_lightning.layers.sync import NORM_HAS_BIAS_FLAG, SyncBatchNorm

__all__ = ["convert_sync_batchnorm", "revert_sync_batchnorm", "swap_batchnorm"]

_ORIGINAL = "_bn_lightning_original_class"
_KEEP_ATTRS = ("qconfig",)


def _selected(name: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not (exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude))


def swap_batchnorm(module: _BatchNorm, cls: type[_BatchNorm], **kwargs: Any) -> _BatchNorm:
    """Build a ``cls`` layer that shares ``module``'s parameters and buffers and copies its flags.

    Args:
        module: the BN layer to replace.
        cls: the new class; constructed as ``cls(num_features, eps, momentum, affine, track_running_stats,
            **kwargs)``.
        **kwargs: extra constructor arguments (e.g. ``process_group``).

    Returns:
        The new layer; its ``weight``/``bias`` ARE ``module``'s Parameter objects, its buffers the same tensors.

    Example::

        >>> import torch
        >>> bn = torch.nn.BatchNorm2d(3)
        >>> from bn_lightning import BatchNorm2d
        >>> ours = swap_batchnorm(bn, BatchNorm2d)
        >>> ours.weight is bn.weight, type(ours).__module__
        (True, 'bn_lightning.layers.batchnorm')
    """
    if NORM_HAS_BIAS_FLAG and module.affine:
        kwargs.setdefault("bias", module.bias is not None)
    new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, **kwargs)
    if module.affine:
        new.weight = module.weight
        new.bias = module.bias
    for buf in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, buf, getattr(module, buf))
    new.train(module.training)
    for attr in _KEEP_ATTRS:
        if hasattr(module, attr):
            setattr(new, attr, getattr(module, attr))
    return new


def convert_sync_batchnorm(
    module: nn.Module,
    process_group: Any | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> nn.Module:
    """Replace every BN layer in ``module`` with :class:`bn_lightning.SyncBatchNorm`.

    Converts torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, ours, and any other ``_BatchNorm`` subclass
    (Lightning's ``_BatchNormXd``); layers whose statistics must not be synchronised (frozen BN) opt out with a
    class attribute ``_bn_lightning_no_sync = True``. Remembers each layer's original class
    so :func:`revert_sync_batchnorm` restores it exactly. Layers that are already ours are re-pointed at
    ``process_group``.

    Args:
        module: a model, or a single BN layer (then the converted layer is returned).
        process_group: the group each converted layer synchronises over (``None``: all ranks).
        include: optional ``fnmatch`` patterns on qualified module names (``"features.*"``); only matching BN layers
            are converted.
        exclude: optional patterns of BN layers to leave alone.

    Returns:
        The converted module (the same object unless ``module`` itself was a BN layer).

    Example::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> net = convert_sync_batchnorm(net)
        >>> type(net[1]).__name__, type(revert_sync_batchnorm(net)[1]) is torch.nn.BatchNorm2d
        ('SyncBatchNorm', True)
    """
    return _convert(module, "", process_group, include, exclude)


def _convert(module: nn.Module, name: str, group: Any, include: Any, exclude: Any) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and _selected(name, include, exclude):
        if isinstance(module, SyncBatchNorm):
            module.process_group = group
        elif not getattr(module, "_bn_lightning_no_sync", False):
            out = swap_batchnorm(module, SyncBatchNorm, process_group=group)
            setattr(out, _ORIGINAL, (type(module), getattr(module, "process_group", None)))
    for child_name, child in module.named_children():
        out.add_module(
            child_name, _convert(child, f"{name}.{child_name}" if name else child_name, group, include, exclude)
        )
    return out


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every :class:`bn_lightning.SyncBatchNorm` made by :func:`convert_sync_batchnorm` back into its original.

    The original class (torch's or ours, 1d/2d/3d, or ``torch.nn.SyncBatchNorm`` with its process group) comes back
    sharing the same parameters and buffers. A ``SyncBatchNorm`` that was constructed directly (no original to
    return to) becomes a local :class:`bn_lightning.layers.BatchNormXd`, which accepts any ``(N, C, *)`` input.

    Args:
        module: a model or a single layer.

    Returns:
        The reverted module (the same object unless ``module`` itself was converted).
    """
    out = module
    if isinstance(module, SyncBatchNorm):
        cls, group = getattr(module, _ORIGINAL, (BatchNormXd, None))
        kwargs = {"process_group": group} if issubclass(cls, nn.SyncBatchNorm) else {}
        out = swap_batchnorm(module, cls, **kwargs)
    for child_name, child in module.named_children():
        out.add_module(child_name, revert_sync_batchnorm(child))
    return out
