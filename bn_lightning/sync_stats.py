"""Make every rank's BatchNorm running statistics identical: :func:`sync_running_stats` (torch only).

Under DDP each rank updates its BN running statistics from its own batches (unless the layers synchronise their batch
statistics), so the ranks end a step, an epoch or a fit with different buffers, and what evaluation measures or a
checkpoint holds depends on the rank it came from. :func:`sync_running_stats` makes them identical with ONE collective
for all layers (timm's ``distribute_bn`` and mmengine's ``SyncBuffersHook`` pay one per buffer):

- ``reduce="mean"``: the statistics of the mixture of the ranks' distributions, each rank weighted equally:
  ``running_mean = mean_r(mean_r)`` and ``running_var = mean_r(var_r) + mean_r((mean_r - running_mean)^2)`` (the
  variance of the mixture: averaging the variances alone would drop the spread of the ranks' means and under-estimate
  the variance the layer sees in evaluation). Computed in float64 from every rank's buffers (one ``all_gather``).
  ``num_batches_tracked`` becomes the largest over the ranks, so that it never goes back on any rank (Batch
  Renormalization's warm-up and ``momentum=None``'s cumulative average read it).
- ``reduce="broadcast"``: rank zero's buffers, bit for bit (one ``all_reduce`` in which the other ranks add ``-0.0``).

Every torch ``_BatchNorm`` (torch's layers, Lightning's ``_BatchNormXd``, bn_lightning's layers, SyncBatchNorm
included) with running statistics is synchronised, in training or eval mode; layers without running statistics
(``track_running_stats=False``) and frozen layers (fixed statistics, not ``_BatchNorm``) are skipped. Buffers are
written in place (the same tensor objects), in their own dtype and device. Without a process group, or in a group of
one, nothing changes.

Example::

    >>> import torch
    >>> from bn_lightning.sync_stats import sync_running_stats
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4))
    >>> sync_running_stats(net)  # one process: nothing to agree on; the names it would synchronise
    ['1', '2']
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bn_lightning import distributed
from bn_lightning.validation import check_choice

__all__ = ["REDUCE", "running_stat_layers", "sync_running_stats"]

#: how :func:`sync_running_stats` makes the ranks agree
REDUCE = ("mean", "broadcast")
_HEADER = 2  # (number of layers, a checksum of their widths): ranks whose models differ fail with a clear error


def running_stat_layers(module: nn.Module) -> dict[str, _BatchNorm]:
    """The BN layers of ``module`` that hold running statistics, by qualified name (torch ``_BatchNorm`` only).

    Example::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2, track_running_stats=False))
        >>> list(running_stat_layers(net))
        ['0']
    """
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None
    }


def sync_running_stats(module: nn.Module, reduce: str = "mean", group: Any = None) -> list[str]:
    r"""Make the running statistics of every BN layer of ``module`` identical on all ranks of ``group``.

    With ``reduce="mean"``, for each layer and channel, over the ``R`` ranks (``\mu_r``, ``\sigma^2_r``: rank ``r``'s
    ``running_mean`` and ``running_var``):

    .. math::

        \mu = \frac{1}{R} \sum_r \mu_r, \qquad
        \sigma^2 = \frac{1}{R} \sum_r \sigma^2_r + \frac{1}{R} \sum_r (\mu_r - \mu)^2

    and ``num_batches_tracked`` the largest over the ranks. With ``reduce="broadcast"``, rank zero's buffers (of
    ``group``), bit for bit. ONE collective for all layers; every rank of ``group`` must call this together, with the
    same model. Ranks that already agree keep their buffers bit for bit under ``"mean"`` too.

    Args:
        module: the model (or one layer); every torch ``_BatchNorm`` in it with running statistics is synchronised.
        reduce: ``"mean"`` (the mixture of the ranks' statistics) or ``"broadcast"`` (rank zero's).
        group: the process group (``None``: all ranks).

    Returns:
        The qualified names of the layers synchronised (the same list without a process group, where nothing
        changes).

    Raises:
        ValueError: ``reduce`` is not one of :data:`REDUCE`; the ranks' models hold different BN layers (raised on
            every rank, buffers untouched; when even the sizes of the packed statistics differ, the backend's
            collective fails instead, e.g. gloo's "Received data size doesn't match expected size").
        FloatingPointError: a running statistic that would be spread is not finite (raised on every rank, naming
            the layers and ranks, buffers untouched): a NaN would otherwise reach every rank.

    Example::

        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> sync_running_stats(bn, reduce="broadcast")  # the module itself is a BN layer: its name is ''
        ['']
        >>> sync_running_stats(bn, reduce="median")
        Traceback (most recent call last):
        ...
        ValueError: sync_running_stats: reduce must be one of ('mean', 'broadcast'), got 'median'
    """
    check_choice("sync_running_stats", "reduce", reduce, REDUCE)
    layers = running_stat_layers(module)
    names = list(layers)
    if not layers or distributed.world_size(group) == 1:
        return names
    ref = next(iter(layers.values())).running_mean
    dtype = torch.float32 if ref.device.type == "mps" else torch.float64  # MPS has no float64
    widths = [m.running_mean.numel() for m in layers.values()]
    channels = sum(widths)
    header = torch.tensor(
        [float(len(widths)), float(sum((i % 1009 + 1) * w for i, w in enumerate(widths)))], dtype=dtype
    ).to(ref.device)
    pieces = [header]
    pieces += [m.running_mean.detach().reshape(-1).to(ref.device, dtype) for m in layers.values()]
    pieces += [m.running_var.detach().reshape(-1).to(ref.device, dtype) for m in layers.values()]
    pieces += [_counter(m).to(ref.device, dtype) for m in layers.values()]
    packed = torch.cat(pieces)
    if reduce == "mean":
        rows = distributed.all_gather(packed, group)  # (ranks, header + 2 * channels + layers)
        _check_layout(rows[:, :_HEADER], names)
        body = rows[:, _HEADER:]
        means, variances = body[:, :channels], body[:, channels : 2 * channels]
        _check_finite(torch.cat([means, variances], dim=1), widths, names)
        mean = means.mean(0)
        var = variances.mean(0) + (means - mean).square().mean(0)
        counts = body[:, 2 * channels :].amax(0)
    else:
        rank, size = dist.get_rank(group), distributed.world_size(group)
        # every rank's header in its own slot; the body is rank zero's: x + (-0.0) is x, bit for bit, for every x
        headers = torch.zeros(size, _HEADER, dtype=dtype, device=ref.device)
        headers[rank] = header
        body = packed[_HEADER:] if rank == 0 else torch.full_like(packed[_HEADER:], -0.0)
        summed = distributed.all_reduce_sum(torch.cat([headers.reshape(-1), body]), group)
        _check_layout(summed[: size * _HEADER].view(size, _HEADER), names)
        body = summed[size * _HEADER :]
        _check_finite(body[: 2 * channels].unsqueeze(0), widths, names)
        if rank == 0:
            return names  # the source keeps its own tensors untouched
        mean, var, counts = body[:channels], body[channels : 2 * channels], body[2 * channels :]
    offset = 0
    for i, layer in enumerate(layers.values()):
        w = widths[i]
        layer.running_mean.copy_(mean[offset : offset + w].view_as(layer.running_mean))
        layer.running_var.copy_(var[offset : offset + w].view_as(layer.running_var))
        if layer.num_batches_tracked is not None:
            layer.num_batches_tracked.copy_(counts[i].round())
        offset += w
    return names


def _counter(layer: _BatchNorm) -> Tensor:
    counter = getattr(layer, "num_batches_tracked", None)
    return counter.detach().reshape(1) if counter is not None else torch.zeros(1, device=layer.running_mean.device)


def _check_layout(headers: Tensor, names: list[str]) -> None:
    """Every rank sent the same header: the same BN layers with the same widths."""
    if not bool((headers == headers[0]).all()):
        raise ValueError(
            f"sync_running_stats: the ranks' models hold different BN layers (numbers of layers per rank: "
            f"{[int(n) for n in headers[:, 0].tolist()]}; here: {len(names)}); every rank must pass the same model"
        )


def _check_finite(values: Tensor, widths: list[int], names: list[str]) -> None:
    """``values`` is ``(ranks, 2 * channels)``: means then variances; raise naming the layers and ranks not finite."""
    bad = ~torch.isfinite(values)
    if not bool(bad.any()):
        return
    channels = sum(widths)
    per_channel = bad[:, :channels] | bad[:, channels:]  # (ranks, channels)
    found, offset = [], 0
    for name, w in zip(names, widths, strict=True):
        ranks = per_channel[:, offset : offset + w].any(1).nonzero().flatten().tolist()
        if ranks:
            found.append(f"'{name}' (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})")
        offset += w
    raise FloatingPointError(
        "sync_running_stats: non-finite running statistics in layer(s) " + ", ".join(found) + "; nothing was "
        "changed, so that no rank receives them (recalibrate with recalibrate_bn, or guard training with "
        "bn_lightning.callbacks.BatchNormGuard)"
    )
