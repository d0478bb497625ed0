"""Name -> class map for BN layers, so configs can say ``norm: scratch`` (or ``torch``).

Provides :func:`get_batchnorm_class` and :data:`BATCHNORM_IMPLS`. Names are normalised (case, ``-``/``_``
ignored) so ``"Scratch"``, ``"scratch"`` and ``"from_scratch"`` are accepted alike.
"""

from __future__ import annotations

from torch import nn

from bn_lightning.layers.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BATCHNORM_IMPLS", "get_batchnorm_class", "normalize_name"]

BATCHNORM_IMPLS: dict[str, dict[int, type[nn.Module]]] = {
    "torch": {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d},
    "scratch": {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d},
}

_ALIASES = {"native": "torch", "nn": "torch", "fromscratch": "scratch", "bnlightning": "scratch", "ours": "scratch"}


def normalize_name(name: str) -> str:
    """Lower-case ``name`` and drop ``-``, ``_`` and spaces.

    Example::

        >>> normalize_name("Sync_BatchNorm")
        'syncbatchnorm'
    """
    return "".join(ch for ch in name.lower() if ch not in "-_ ")


def get_batchnorm_class(impl: str, dim: int) -> type[nn.Module]:
    """The BN class for implementation ``impl`` and spatial rank ``dim`` (1, 2 or 3).

    Args:
        impl: ``"torch"`` or ``"scratch"`` (aliases: ``native``, ``nn``; ``from_scratch``, ``ours``).
        dim: 1 for BatchNorm1d, 2 for BatchNorm2d, 3 for BatchNorm3d.

    Raises:
        ValueError: unknown ``impl`` or ``dim``, naming the allowed values.

    Example::

        >>> get_batchnorm_class("scratch", 2).__module__
        'bn_lightning.layers.batchnorm'
    """
    key = normalize_name(impl)
    key = _ALIASES.get(key, key)
    if key not in BATCHNORM_IMPLS:
        raise ValueError(f"Unknown BatchNorm implementation {impl!r}; expected one of {sorted(BATCHNORM_IMPLS)}")
    classes = BATCHNORM_IMPLS[key]
    if dim not in classes:
        raise ValueError(f"BatchNorm dim must be one of {sorted(classes)}, got {dim!r}")
    return classes[dim]
