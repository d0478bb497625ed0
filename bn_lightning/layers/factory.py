"""Name -> class map for BN layers, so configs can say ``norm: scratch``, ``sync_batchnorm`` or ``FrozenBN``.

Provides :data:`BATCHNORM_IMPLS`, :func:`resolve_impl`, :func:`get_batchnorm_class` and :func:`normalize_name`. Names
are normalised (case, ``-``/``_``/spaces ignored) and aliases map to the canonical implementation names
``torch``, ``scratch``, ``sync``, ``frozen``, ``ghost`` and ``renorm``.
"""

from __future__ import annotations

from torch import nn

from bn_lightning.layers.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bn_lightning.layers.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from bn_lightning.layers.ghost import GhostBatchNorm1d, GhostBatchNorm2d
from bn_lightning.layers.renorm import BatchRenorm1d, BatchRenorm2d
from bn_lightning.layers.sync import SyncBatchNorm

__all__ = ["BATCHNORM_IMPLS", "get_batchnorm_class", "normalize_name", "resolve_impl"]

BATCHNORM_IMPLS: dict[str, dict[int, type[nn.Module]]] = {
    "torch": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
    "scratch": {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d},
    "sync": {1: SyncBatchNorm, 2: SyncBatchNorm, 3: SyncBatchNorm},
    "frozen": {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d},
    "ghost": {1: GhostBatchNorm1d, 2: GhostBatchNorm2d},
    "renorm": {1: BatchRenorm1d, 2: BatchRenorm2d},
}

_ALIASES = {
    "native": "torch",
    "nn": "torch",
    "batchnorm": "torch",
    "fromscratch": "scratch",
    "bnlightning": "scratch",
    "ours": "scratch",
    "syncbn": "sync",
    "syncbatchnorm": "sync",
    "frozenbn": "frozen",
    "frozenbatchnorm": "frozen",
    "ghostbn": "ghost",
    "ghostbatchnorm": "ghost",
    "batchrenorm": "renorm",
    "batchrenormalization": "renorm",
    "brn": "renorm",
}


def normalize_name(name: str) -> str:
    """Lower-case ``name`` and drop ``-``, ``_`` and spaces.

    Example::

        >>> normalize_name("Sync_BatchNorm")
        'syncbatchnorm'
    """
    return "".join(ch for ch in name.lower() if ch not in "-_ ")


def resolve_impl(name: str) -> str:
    """The canonical implementation name for ``name`` (any case, ``-``/``_`` ignored, aliases accepted).

    Raises:
        ValueError: unknown name, listing the accepted ones.

    Example::

        >>> resolve_impl("sync_batchnorm"), resolve_impl("SyncBN"), resolve_impl("FrozenBatchNorm")
        ('sync', 'sync', 'frozen')
    """
    if not isinstance(name, str):
        raise TypeError(f"BatchNorm implementation must be a string, got {type(name).__name__}")
    key = normalize_name(name)
    key = _ALIASES.get(key, key)
    if key not in BATCHNORM_IMPLS:
        raise ValueError(
            f"Unknown BatchNorm implementation {name!r}; expected one of {sorted(BATCHNORM_IMPLS)} "
            f"(aliases: {sorted(_ALIASES)})"
        )
    return key


def get_batchnorm_class(impl: str, dim: int) -> type[nn.Module]:
    """The BN class for implementation ``impl`` and spatial rank ``dim`` (1, 2 or 3).

    Args:
        impl: ``"torch"``, ``"scratch"``, ``"sync"``, ``"frozen"``, ``"ghost"`` or ``"renorm"`` (or an alias).
        dim: 1 for BatchNorm1d, 2 for BatchNorm2d, 3 for BatchNorm3d.

    Raises:
        ValueError: unknown ``impl``, or a ``dim`` the implementation lacks, naming the allowed values.

    Example::

        >>> get_batchnorm_class("scratch", 2).__module__
        'bn_lightning.layers.batchnorm'
        >>> get_batchnorm_class("ghost_bn", 1).__name__
        'GhostBatchNorm1d'
    """
    key = resolve_impl(impl)
    classes = BATCHNORM_IMPLS[key]
    if dim not in classes:
        raise ValueError(f"BatchNorm implementation {key!r} exists for dim in {sorted(classes)}, got {dim!r}")
    return classes[dim]
