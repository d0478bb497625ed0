"""Which modules of a model a recorder watches: :func:`find_batchnorm_layers`."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bn_lightning.validation import selected

__all__ = ["find_batchnorm_layers"]


def find_batchnorm_layers(
    module: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> dict[str, _BatchNorm]:
    """Qualified name -> trainable BN layer (torch's, ours, SyncBatchNorm), filtered by ``fnmatch`` patterns.

    A layer is one of torch's ``_BatchNorm`` subclasses; frozen BN layers (plain modules whose statistics never
    change) are not. ``include``/``exclude`` apply to the qualified name as :func:`bn_lightning.validation.selected`
    does.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Sequential(nn.BatchNorm1d(4)))
        >>> list(find_batchnorm_layers(net)), list(find_batchnorm_layers(net, exclude=["2.*"]))
        (['1', '2.0'], ['1'])
    """
    return {
        name: m for name, m in module.named_modules() if isinstance(m, _BatchNorm) and selected(name, include, exclude)
    }
