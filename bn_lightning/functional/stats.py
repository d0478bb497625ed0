"""Per-channel batch statistics: their types, computing them, and merging them exactly across chunks or ranks."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from bn_lightning.functional.channels import _is_compiling
from bn_lightning.functional.stats_kernels import _centered_stats

Count = int | Tensor  # a Python int for one process, a tensor once merged across ranks


class BatchStats(NamedTuple):
    """Per-channel statistics of one batch.

    Attributes:
        mean: per-channel mean, shape ``(C,)``, float32 or float64, detached.
        var: per-channel BIASED variance (divided by ``count``), shape ``(C,)``.
        count: number of values per channel, ``N * prod(spatial)``: a Python int for one process, a tensor when the
            statistics were merged across ranks.
    """

    mean: Tensor
    var: Tensor
    count: Count


class Renorm(NamedTuple):
    """Batch Renormalization's correction (Ioffe, 2017), applied inside the BN forward.

    Passed as ``renorm`` to :func:`~bn_lightning.functional.batch_norm_with_stats`.

    With ``sigma = sqrt(var + eps)``: ``r = clip(sigma_B / sigma_R, 1 / r_max, r_max)`` and
    ``d = clip((mu_B - mu_R) / sigma_R, -d_max, d_max)``, both treated as constants in backward, and
    ``y = (x_hat * r + d) * gamma + beta``. With ``r_max = 1, d_max = 0`` this is plain BN.

    Attributes:
        running_mean: ``mu_R``, the running mean BEFORE this batch's update.
        running_var: ``var_R``, likewise.
        r_max: clip bound of ``r`` (>= 1).
        d_max: clip bound of ``d`` (>= 0).
    """

    running_mean: Tensor
    running_var: Tensor
    r_max: float
    d_max: float


class StatsReducer(Protocol):
    """What a synchronising layer plugs into :func:`~bn_lightning.functional.batch_norm_with_stats`.

    Local BN uses no reducer. SyncBatchNorm gives one whose two methods each run one collective.
    """

    def reduce_stats(self, mean: Tensor, var: Tensor, count: int) -> BatchStats:
        """Combine this rank's statistics with its peers' (forward collective).

        ``mean`` arrives, and must be returned, in float64; ``var`` is in the compute dtype.
        """
        ...

    def reduce_grads(self, sum_dy: Tensor, sum_dy_xhat: Tensor) -> tuple[Tensor, Tensor]:
        """Sum the backward's per-channel reductions over the peers (backward collective).

        A reducer may also offer ``start_reduce_grads(sum_dy, sum_dy_xhat)``, which starts the same collective
        asynchronously and returns a callable that waits for it and returns the sums; the backward then computes
        the part of the input gradient that needs no global sum while the collective is in flight.
        """
        ...


def _host_count(count: Count) -> Count:
    """A merged count as a Python number when reading it is free (one CPU value), else the tensor unchanged.

    The arithmetic that follows then runs on scalars instead of a dozen tiny tensor ops; on accelerators the count
    stays on the device, so no synchronisation is added.
    """
    if isinstance(count, Tensor) and count.numel() == 1 and count.device.type == "cpu" and not _is_compiling():
        value = count.item()
        return int(value) if float(value).is_integer() else value
    return count


def _add_parts(center: Tensor | None, offset: Tensor | None) -> Tensor:
    """``center + offset`` where ``None`` is zero (at least one is given)."""
    if center is None or offset is None:
        out = offset if center is None else center
        assert out is not None
        return out
    return center + offset


def batch_stats(x: Tensor) -> BatchStats:
    """Per-channel mean, biased variance and count of ``x`` of shape ``(N, C, *)``.

    Args:
        x: input of shape ``(N, C, *)``, any floating dtype; statistics are returned in float32 (float64 for a
            float64 input).

    Returns:
        :class:`BatchStats` with ``mean`` and ``var`` of shape ``(C,)`` and the Python int ``count``.

    Example::

        >>> x = torch.tensor([[1.0, 10.0], [3.0, 10.0]])
        >>> batch_stats(x)
        BatchStats(mean=tensor([ 2., 10.]), var=tensor([1., 0.]), count=2)
    """
    with torch.no_grad():
        center, offset, var, count, _, _ = _centered_stats(x)
    return BatchStats(_add_parts(center, offset), var, count)


def merge_stats(mean: Tensor, var: Tensor, count: Tensor) -> BatchStats:
    """Combine the statistics of ``k`` disjoint chunks into those of their union, exactly.

    Uses the pairwise-stable form ``var = sum(n_i * (var_i + (mean_i - mean)^2)) / n``; chunks with ``n_i = 0``
    (an empty batch on some rank) contribute nothing, whatever their mean and variance hold.

    Args:
        mean: ``(k, C)`` per-chunk means.
        var: ``(k, C)`` per-chunk biased variances.
        count: ``(k,)`` or ``(k, C)`` per-chunk counts.

    Returns:
        :class:`BatchStats` of the union, ``count`` a 0-d tensor (or ``(C,)`` for per-channel counts).

    Example::

        >>> a, b = torch.randn(5, 2), torch.randn(3, 2)
        >>> s = merge_stats(torch.stack([a.mean(0), b.mean(0)]), torch.stack([a.var(0, correction=0),
        ...                 b.var(0, correction=0)]), torch.tensor([5, 3]))
        >>> torch.allclose(s.var, torch.cat([a, b]).var(0, correction=0))
        True
    """
    if mean.shape != var.shape or mean.dim() != 2:
        raise ValueError(
            f"merge_stats expects mean and var of shape (k, C), got {tuple(mean.shape)} and {tuple(var.shape)}"
        )
    counts = count.to(mean.dtype)
    if counts.dim() == 1:
        counts = counts.unsqueeze(1)
    present = counts > 0
    return merge_finite_stats(torch.where(present, mean, 0), torch.where(present, var, 0), counts)


def merge_finite_stats(mean: Tensor, var: Tensor, counts: Tensor) -> BatchStats:
    """:func:`merge_stats` for chunks whose statistics are all finite (an empty chunk may hold zeros, not NaN).

    About half the ops of :func:`merge_stats`, for callers that run it on every step (SyncBatchNorm's reducer: its
    packets come from :func:`batch_stats`' kernels, which give an empty batch zero statistics).

    Args:
        mean: ``(k, C)`` per-chunk means, finite (zero for an empty chunk).
        var: ``(k, C)`` per-chunk biased variances, finite (zero for an empty chunk).
        counts: ``(k, 1)`` or ``(k, C)`` per-chunk counts, in ``mean``'s dtype.

    Returns:
        :class:`BatchStats` of the union.

    Example::

        >>> ones = torch.ones(2, 1)
        >>> s = merge_finite_stats(torch.tensor([[0.0], [2.0]]), ones, ones)
        >>> s.mean, s.var
        (tensor([1.]), tensor([2.]))
    """
    total = counts.sum(0)
    weights = counts / total.clamp(min=1)
    mean_all = (mean * weights).sum(0)
    var_all = ((mean - mean_all).square_().add_(var) * weights).sum(0)
    return BatchStats(mean_all, var_all, total.squeeze(0) if total.numel() == 1 else total)
