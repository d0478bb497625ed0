"""The batch statistics a BN layer normalised with, recovered from what the layer already holds.

Provides :func:`update_factor`, :func:`layer_batch_stats` and :data:`MIN_FACTOR`. A torch BN layer in training mode
updates its running statistics as ``running = (1 - f) * before + f * batch`` (unbiased batch variance), so the batch
statistics follow from the running statistics before and after the forward in O(channels), with no pass over the
activation. The recorder does the same for all its layers at once.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from bn_lightning.functional import BatchStats, batch_stats
from bn_lightning.layers import has_batch_stats

__all__ = ["MIN_FACTOR", "layer_batch_stats", "update_factor"]

#: below this update factor the batch statistics are computed from the input instead of recovered: inverting the
#: update divides float32 rounding by the factor (below 1e-2, as with ``momentum=None`` after 100 batches, that is
#: more than 1e-5 relative error)
MIN_FACTOR = 1e-2


def update_factor(layer: _BatchNorm) -> float:
    """The weight ``f`` of the batch in the running-stat update ``layer`` is about to do (0 when it cannot be known).

    Example::

        >>> from torch import nn
        >>> update_factor(nn.BatchNorm1d(3)), update_factor(nn.BatchNorm1d(3, momentum=None))
        (0.1, 1.0)
    """
    if layer.momentum is not None:
        return float(layer.momentum)
    nbt = layer.num_batches_tracked
    return 1.0 / float(nbt + 1) if nbt is not None else 0.0


def layer_batch_stats(layer: _BatchNorm, x: Tensor, before: tuple[Tensor, Tensor, Tensor | None] | None) -> BatchStats:
    """The per-channel batch statistics ``layer`` just normalised ``x`` with, as cheaply as possible.

    - layers that keep them (:func:`bn_lightning.layers.has_batch_stats`, ``last_batch_stats``): free;
    - torch layers that updated their running statistics with a factor ``f >= MIN_FACTOR``: recovered from the
      update in O(channels) (``before`` = the running mean, variance and ``num_batches_tracked`` before the forward;
      relative error ~1e-7 / f);
    - otherwise (no tracking, tiny or zero momentum, ``momentum=None`` after 100 batches, eval-mode layer): computed
      from ``x``, one pass over the activation.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> bn, x = nn.BatchNorm1d(2), torch.randn(8, 2)
        >>> before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
        >>> _ = bn(x)
        >>> torch.allclose(layer_batch_stats(bn, x, before).mean, x.mean(0), atol=1e-5)
        True
    """
    kept = layer.last_batch_stats if has_batch_stats(layer) else None
    if kept is not None:
        return kept
    count = x.numel() // max(x.shape[1], 1)
    if before is not None and layer.training and layer.track_running_stats and count > 1:
        rm0, rv0, nbt0 = before
        if layer.momentum is None:
            factor = 1.0 / float(nbt0 + 1) if nbt0 is not None else 0.0
        else:
            factor = float(layer.momentum)
        if factor >= MIN_FACTOR:
            mean = (layer.running_mean.float() - (1 - factor) * rm0) / factor
            unbiased = (layer.running_var.float() - (1 - factor) * rv0) / factor
            return BatchStats(mean, (unbiased * ((count - 1) / count)).clamp_(min=0), count)
    return batch_stats(x.detach())
