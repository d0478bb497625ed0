"""Reducing the recorders' ``(layers, columns)`` values across ranks: one ``all_gather``, NaN entries ignored.

Provides :func:`reduce_across_ranks` and :data:`REDUCTIONS`. A rank that did not run a layer in a step sends NaN in
its row; every rank sends the same shape, so the collective never mismatches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from bn_lightning import distributed

__all__ = ["REDUCTIONS", "reduce_across_ranks"]

_REDUCE = {
    "mean": lambda t: t.nanmean(0),
    "sum": lambda t: t.nansum(0),
    "max": lambda t: torch.where(t.isnan(), -torch.inf, t).amax(0),
    "min": lambda t: torch.where(t.isnan(), torch.inf, t).amin(0),
}
#: the per-column reductions :func:`reduce_across_ranks` knows
REDUCTIONS = tuple(_REDUCE)


def reduce_across_ranks(local: Tensor, hows: Sequence[str], group: Any = None) -> tuple[Tensor, Tensor]:
    """Reduce ``local`` ``(layers, columns)`` over the ranks, column ``j`` with ``hows[j]``, NaN entries ignored.

    Args:
        local: this rank's values.
        hows: one of :data:`REDUCTIONS` per column.
        group: the process group (``None``: the default group).

    Returns:
        ``(reduced, per_rank)``: the reduced ``(layers, columns)`` tensor and every rank's ``(world, layers,
        columns)``; without a process group, ``local`` itself and ``local.unsqueeze(0)``.

    Example::

        >>> values = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
        >>> reduced, per_rank = reduce_across_ranks(values, ["mean", "max"])
        >>> reduced is values, tuple(per_rank.shape)
        (True, (1, 2, 2))
    """
    if distributed.world_size(group) == 1:
        return local, local.unsqueeze(0)
    per_rank = distributed.all_gather(local, group)
    columns = [_REDUCE[how](per_rank[:, :, j]) for j, how in enumerate(hows)]
    return (torch.stack(columns, dim=1) if columns else local), per_rank
