"""Packing many small per-layer tensors into one padded ``(rows, slots, width)`` tensor: one ``cat``, one gather.

Provides :class:`Packer` (the packing, with a cache of what depends only on the layout) and :func:`pack_index`.
The number of tensor ops of a record does not grow with the number of layers: every layer's pieces go through one
``torch.cat`` and one ``index_select`` whose index is built once per layout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bn_lightning.monitoring.sampling import MAX_CACHED

__all__ = ["Packer", "pack_index"]

_INDEXES: dict[Any, Tensor] = {}  # module-wide: a fresh recorder (every fit) finds the layouts of the previous one


def pack_index(lengths: tuple[int, ...], at: list[tuple[int, int, int]], shape: tuple[int, int, int]) -> Tensor:
    """The gather index that places pieces of ``lengths`` (concatenated, then one fill value) into ``shape``.

    ``at[i] = (row, slot, span)``: piece ``i`` fills ``span`` consecutive slots of ``row`` from ``slot``, each with
    ``lengths[i] / span`` values; every other position reads the fill value (index ``sum(lengths)``).

    Example::

        >>> pack_index((2, 1), [(0, 0, 1), (1, 0, 1)], (2, 1, 2)).tolist()
        [0, 1, 2, 3]
    """
    rows, slots, width = shape
    total = sum(lengths)
    idx = [total] * (rows * slots * width)
    offset = 0
    for length, (row, slot, span) in zip(lengths, at, strict=True):
        c = length // span
        for j in range(span):
            start = ((row * slots) + slot + j) * width
            idx[start : start + c] = range(offset + j * c, offset + (j + 1) * c)
        offset += length
    return torch.tensor(idx, dtype=torch.long)


class Packer:
    """Packs 1-d pieces into zero-padded tensors and caches what depends only on the layout (masks, indices).

    Example::

        >>> packer = Packer()
        >>> packer.pack([torch.ones(2), torch.ones(3)], [(0, 0, 1), (1, 0, 1)], (2, 1, 3), "cpu").view(2, 3)
        tensor([[1., 1., 0.],
                [1., 1., 1.]])
    """

    def __init__(self) -> None:
        self._cache: dict[Any, Any] = {}

    def clear(self) -> None:
        """Forget the cached layouts (the layers changed)."""
        self._cache = {}

    def cached(self, key: Any, make: Callable[[], Any]) -> Any:
        """The value cached under ``key``, made with ``make()`` the first time."""
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = make()
        return value

    def put(self, key: Any, value: Any) -> Any:
        """Cache ``value`` under ``key`` (replacing what was there); returns it."""
        self._cache[key] = value
        return value

    def pack(
        self, pieces: list[Tensor], at: list[tuple[int, int, int]], shape: tuple[int, int, int], device: Any
    ) -> Tensor:
        """Place 1-d ``pieces`` into a zero-padded ``shape = (rows, slots, width)`` tensor: one cat, one gather.

        ``at[i] = (row, slot, span)``: piece ``i`` fills ``span`` consecutive slots of ``row`` from ``slot``, each
        with ``len(piece) / span`` values. Without pieces: zeros on ``device``.
        """
        if not pieces:
            return torch.zeros(shape, device=device)
        lengths = tuple(p.numel() for p in pieces)
        ref = pieces[0]
        key = (shape, lengths, tuple(at), ref.device)
        idx = _INDEXES.get(key)
        if idx is None:
            if len(_INDEXES) >= MAX_CACHED:
                _INDEXES.clear()
            idx = _INDEXES[key] = pack_index(lengths, at, shape).to(ref.device)
        fill = self.cached(("fill", ref.dtype, ref.device), lambda: torch.zeros(1, dtype=ref.dtype, device=ref.device))
        return torch.cat([*pieces, fill]).index_select(0, idx).view(shape)

    def length_mask(self, lengths: tuple[int, ...], width: int, device: Any) -> tuple[Tensor, Tensor]:
        """``(rows, width)`` mask of the first ``lengths[row]`` entries, and ``lengths`` as a float tensor."""

        def make() -> tuple[Tensor, Tensor]:
            n = torch.tensor(lengths, device=device)
            return torch.arange(width, device=device) < n.unsqueeze(1), n.float()

        return self.cached(("mask", lengths, width, device), make)
