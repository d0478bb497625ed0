"""Bounded samples of activations: where to read ``k`` elements of a tensor without copying it.

Provides :func:`sample_plan`. The positions are drawn once per size, layout and device and cached, so successive
records look at the same positions and a record costs O(k) whatever the activation size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["MAX_CACHED", "sample_plan"]

#: entries of a module-wide cache before it is cleared (activation shapes and layouts rarely vary)
MAX_CACHED = 256
_PLANS: dict[Any, tuple[Tensor, Tensor]] = {}  # (size, layout, device, k) -> (positions, their channels)


def sample_plan(t: Tensor, k: int, cache: dict[Any, Any] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Where to sample ``t`` ``(N, C, *)``: ``(source, idx, channels)``; ``torch.take(source, idx)`` is the sample.

    Dense tensors (contiguous, channels-last) are read in memory order, others in logical order, neither copied.
    The indices (at most ``k``, drawn once per size, layout and device, seeded by the size) and their channels are
    cached (in ``cache``, by default a module-wide one), so successive records look at the same positions.

    Example::

        >>> t = torch.arange(24.0).view(2, 3, 4)
        >>> source, idx, channels = sample_plan(t, k=5)
        >>> len(idx), bool(((torch.take(source, idx) // 4) % 3 == channels).all())
        (5, True)
    """
    cache = _PLANS if cache is None else cache
    dense_cl = not t.is_contiguous() and (
        (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))
    )
    if t.dim() >= 2 and (dense_cl or t.is_contiguous()):
        source = t.as_strided((t.numel(),), (1,), t.storage_offset()) if dense_cl else t  # memory order
        channel_stride = t.stride(1)
    else:
        source = t  # take() reads in logical order, without a copy
        channel_stride = t[0, 0].numel() if t.dim() >= 2 and t.shape[0] else 1
    channels_dim = t.shape[1] if t.dim() >= 2 else 1
    key = (t.numel(), channel_stride, channels_dim, t.device, k)
    plan = cache.get(key)
    if plan is None:
        n = t.numel()
        if n <= k:
            idx = torch.arange(n, device=t.device)
        else:
            g = torch.Generator(device="cpu").manual_seed(n)
            # sorted: the same positions, read in memory order (a random gather from a large tensor misses the cache)
            idx = torch.randperm(n, generator=g)[:k].sort().values.to(t.device)
        plan = (idx, torch.div(idx, channel_stride, rounding_mode="floor") % max(channels_dim, 1))
        if len(cache) >= MAX_CACHED:
            cache.clear()
        cache[key] = plan
    return source, plan[0], plan[1]
