"""The BatchNorm math, in one place.

Every layer of bn_lightning (plain, sync, ghost, renorm, frozen) calls these functions; nobody re-derives the
formulas. The four classic steps of batch normalisation, for an input ``x`` of shape ``(N, C, *)`` and per-channel
statistics over the ``n = N * prod(*)`` values of each channel:

1. batch statistics: ``mu = sum(x) / n`` and the biased variance ``var = sum((x - mu)^2) / n``;
2. normalise, scale and shift: ``y = (x - mu) / sqrt(var + eps) * gamma + beta``;
3. back-propagate through the normalisation (closed form, see :func:`grad_input`)::

       x_hat = (x - mu) / sqrt(var + eps)
       dbeta = sum(dy)                      dgamma = sum(dy * x_hat)
       dx = gamma / sqrt(var + eps) * (dy - sum(dy) / n - x_hat * sum(dy * x_hat) / n)

4. at inference, normalise with running statistics, which training updates as exponential averages (the
   running variance from the UNBIASED batch variance ``var * n / (n - 1)``), exactly as ``torch.nn`` does.

What this module provides:

- :class:`BatchStats`, :func:`batch_stats`, :func:`merge_stats`: per-channel statistics, and their exact
  combination across chunks or ranks (Chan et al.), numerically stable for large means;
- :func:`normalize`: the inference-time transform with given (running) statistics, one pass;
- :func:`grad_reductions` and :func:`grad_input`: the backward's two per-channel sums and the input gradient, kept
  apart because SyncBatchNorm all-reduces exactly those sums;
- :func:`update_running_stats`: the running-statistics update with torch's semantics (``momentum=None`` is a
  cumulative average; ``num_batches_tracked``);
- :func:`batch_norm` / :func:`batch_norm_with_stats`: the full forward of a BN layer, differentiable through a
  :class:`torch.autograd.Function` with a hand-written backward, with an optional :class:`StatsReducer` that
  synchronises statistics (one collective forward, one backward);
- :func:`set_kernel` / :func:`get_kernel`: run local training-mode BN through the default ``"eager"`` kernel (ATen
  ops) or the opt-in ``"compiled"`` one (the same formulas fused by ``torch.compile``).

Statistics are computed in float32 at least, also for float16/bfloat16 inputs (autocast); outputs keep the input's
dtype, as ``torch.nn.BatchNorm2d`` does.

Example::

    >>> import torch
    >>> from bn_lightning import functional as BF
    >>> x = torch.randn(8, 3, 4, 4)
    >>> rm, rv = torch.zeros(3), torch.ones(3)
    >>> y = BF.batch_norm(x, rm, rv, training=True, momentum=0.1)
    >>> torch.allclose(y, torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3), training=True), atol=1e-5)
    True
    >>> torch.allclose(rm, 0.1 * x.mean((0, 2, 3)))
    True
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "BatchStats",
    "Renorm",
    "StatsReducer",
    "batch_norm",
    "batch_norm_with_stats",
    "batch_stats",
    "compute_dtype",
    "get_kernel",
    "grad_input",
    "grad_reductions",
    "merge_finite_stats",
    "merge_stats",
    "normalize",
    "reduce_dims",
    "set_kernel",
    "update_running_stats",
]

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
    """Batch Renormalization's correction (Ioffe, 2017), applied inside :func:`batch_norm_with_stats`.

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
    """What a synchronising layer plugs into :func:`batch_norm_with_stats`.

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


def reduce_dims(x: Tensor) -> tuple[int, ...]:
    """The dimensions BN reduces over: all but the channel dimension 1.

    Example::

        >>> reduce_dims(torch.empty(2, 3, 4, 5))
        (0, 2, 3)
    """
    return (0, *range(2, x.dim()))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed in: float64 for float64 inputs, float32 for everything else.

    Example::

        >>> compute_dtype(torch.bfloat16)
        torch.float32
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-channel ``(C,)`` tensor so that it broadcasts against ``x`` of shape ``(N, C, *)``."""
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def _channel_sum(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Per-channel sum of ``t`` over all dims but 1, in ``dtype`` (default: ``t``'s).

    For NCHW-contiguous float32/float64 tensors: row sums over each ``(n, c)`` row (ATen's cascade reduction along
    the contiguous dim), then the ``N`` partials combined in float64; channels-last ones: column sums of the
    ``(N * prod(*), C)`` matrix. Other layouts and dtypes use ``Tensor.sum``. (A BLAS gemv with a vector of ones
    was used before: on an AVX-512 EPYC machine MKL's sgemv accumulates naively, 17x the error of ATen's sums, and
    is slower there too.)
    """
    dtype = t.dtype if dtype is None else dtype
    if t.dtype == dtype and dtype in (torch.float32, torch.float64) and t.dim() > 2 and t.numel() > 0:
        n, c = t.shape[0], t.shape[1]
        length = t.numel() // (n * c)
        if t.is_contiguous():  # rows of `length` values: (N*C, L) summed along L, then the N partial sums
            rows = t.view(n * c, length).sum(1).view(n, c)
            return rows.sum(0) if n == 1 else rows.sum(0, dtype=torch.float64).to(dtype)
        rows = t.permute(0, *range(2, t.dim()), 1)
        if rows.is_contiguous():  # channels-last: column sums of (N*L, C)
            return rows.reshape(n * length, c).sum(0)
    return t.sum(reduce_dims(t), dtype=dtype)


_MAX_ROW = 4096  # longest row a float32 vector_norm reduces alone: its error stays ~4e-7 relative
_MIN_ROW = 64  # shorter rows: per-row overhead makes square + sum the faster way
_UNCENTERED_MAX_RATIO = 1.0  # mean^2 / var up to which E[x^2] - mean^2 is accurate enough (see _centered_stats)
_OFFSET_SKIP_RATIO = 16.0  # mean^2 / var below this: the float64-combined mean needs no offset pass


def _is_compiling() -> bool:
    """Whether ``torch.compile`` is tracing this code: then no path may depend on a value read back to the host."""
    check = getattr(torch.compiler, "is_compiling", None)
    return bool(check()) if check is not None else False


def _row_length(t: Tensor) -> int:
    """Length of the rows a contiguous ``(N, C, *)`` tensor splits into within one ``(n, c)`` slice (0: no fast path).

    The per-channel values of an NCHW-contiguous tensor are ``N`` runs of ``L = prod(*)``; those runs are cut into
    rows of at most :data:`_MAX_ROW` values (a divisor of ``L``) for :func:`_channel_sumsq`.
    """
    if t.dim() < 3 or not t.is_contiguous() or t.dtype not in (torch.float32, torch.float64) or t.numel() == 0:
        return 0
    length = t.numel() // (t.shape[0] * t.shape[1])
    if length < _MIN_ROW:
        return 0
    if length <= _MAX_ROW:
        return length
    return next((d for d in range(_MAX_ROW, _MIN_ROW - 1, -1) if length % d == 0), 0)


def _channel_sumsq(t: Tensor) -> tuple[Tensor, Tensor | None]:
    """Per-channel sum of squares of ``t``; also returns the squares' buffer when one had to be written (else None).

    For NCHW-contiguous float tensors a row-wise ``vector_norm`` reads the data once and writes nothing (three times
    less memory traffic than squaring then summing); its float32 accumulation over rows of <= 4096 values keeps the
    relative error near 4e-7, far below what BN's outputs can show. Other layouts square, then sum.
    """
    row = _row_length(t)
    if row:
        n, c = t.shape[0], t.shape[1]
        norms = torch.linalg.vector_norm(t.view(-1, row), dim=1)
        return norms.square_().view(n, c, -1).sum((0, 2)), None
    squares = t * t
    return _channel_sum(squares), squares


_BLOCK_BYTES = 1 << 20  # per operand: the 2-3 operands of a block fit a core's L2 cache (1-2 MB on current x86)


def _block_size(t: Tensor) -> int:
    """Samples per block: batch slices of ``t`` of about :data:`_BLOCK_BYTES` (``t.shape[0]``: no blocking).

    Ops that read the same data one after another (a sum then a sum of squares; a multiply then an add) run block by
    block (``Tensor.split`` along the batch), so the second op finds the block in cache instead of streaming the whole
    activation from memory again. Worth it on CPU for activations well above the cache: measured ~15 % off the
    backward at (64, 64, 32, 32).
    """
    n = t.shape[0]
    per_sample = (t.numel() // n) * t.element_size() if n else 0
    if t.device.type != "cpu" or n <= 1 or per_sample * n <= 2 * _BLOCK_BYTES:
        return max(n, 1)
    return max(1, _BLOCK_BYTES // per_sample)


def _split(step: int, *tensors: Tensor) -> Iterable[tuple[Tensor, ...]]:
    """Matching blocks of ``step`` along dim 0 of each tensor; the tensors themselves when one block covers them."""
    if step >= tensors[0].shape[0]:
        return (tensors,)
    return zip(*(t.split(step) for t in tensors), strict=True)


def _sums_and_sumsq(x: Tensor, row: int) -> tuple[Tensor, Tensor]:
    """Per-channel ``sum(x)`` and ``sum(x^2)``, in float64, of an NCHW-contiguous ``x`` cut into rows of ``row`` values.

    One read of ``x`` from memory: per block, row sums then a row-wise ``vector_norm`` on the cached block for the
    squares. The row partials are combined in float64, so the mean is as exact as its float32 row
    sums allow (their rounding errors average out over rows instead of accumulating in one float32 total).
    """
    n, c = x.shape[0], x.shape[1]
    per_sample = x.numel() // (n * row)  # rows per sample
    rows = x.view(-1, row)
    sums, norms = x.new_empty(rows.shape[0]), x.new_empty(rows.shape[0])
    k = _block_size(x) * per_sample
    for block, block_sums, block_norms in _split(k, rows, sums, norms):
        torch.sum(block, 1, out=block_sums)
        torch.linalg.vector_norm(block, dim=1, out=block_norms)
    f64 = torch.float64
    return sums.view(n, c, -1).sum((0, 2), dtype=f64), norms.square_().view(n, c, -1).sum((0, 2), dtype=f64)


_MIN_CL_CHANNELS = 8  # channels-last inputs with fewer channels take the generic path (sums over very thin rows)


def _channels_last_block_rows(t: Tensor) -> int:
    """Rows per block for :func:`_sums_and_sumsq_channels_last` (0: ``t`` is not a channels-last float tensor).

    A channels-last ``(N, C, *)`` tensor is a row-major ``(N * prod(*), C)`` matrix: one row of ``C`` values per
    position. Blocks hold at most :data:`_MAX_ROW` rows (the float32 per-block column sums then stay within ~6e-7
    relative) and about :data:`_BLOCK_BYTES`, so that squaring a block and summing the squares find it in cache.
    """
    if t.dim() < 3 or t.dtype not in (torch.float32, torch.float64) or t.numel() == 0 or t.is_contiguous():
        return 0
    c = t.shape[1]
    if c < _MIN_CL_CHANNELS or not t.permute(0, *range(2, t.dim()), 1).is_contiguous():
        return 0
    return max(1, min(_MAX_ROW, _BLOCK_BYTES // (c * t.element_size())))


def _sums_and_sumsq_channels_last(x: Tensor, step: int) -> tuple[Tensor, Tensor]:
    """Per-channel ``sum(x)`` and ``sum(x^2)``, in float64, of a channels-last ``x``, in blocks of ``step`` rows.

    Per block: its squares into a block-sized buffer (reading the block into cache), then column sums of the cached
    block and of the squares: ``x`` is read from memory once. Column sums are ATen's cascade reductions (relative
    error ~1.5e-7 over 4096 rows, against ~9e-7 for a BLAS gemv, which made the variance miss 2e-6 relative).
    Block partials are combined in float64.
    """
    c = x.shape[1]
    mat = x.permute(0, *range(2, x.dim()), 1).reshape(-1, c)  # a view: x is channels-last contiguous
    blocks = mat.split(step) if step < mat.shape[0] else (mat,)
    sums, sumsq = x.new_empty(len(blocks), c), x.new_empty(len(blocks), c)
    buf = torch.empty_like(blocks[0])
    for i, block in enumerate(blocks):
        squares = buf if block.shape[0] == buf.shape[0] else buf[: block.shape[0]]
        torch.mul(block, block, out=squares)
        torch.sum(block, 0, out=sums[i])
        torch.sum(squares, 0, out=sumsq[i])
    f64 = torch.float64
    return sums.sum(0, dtype=f64), sumsq.sum(0, dtype=f64)


def _centered_stats(x: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor, int, Tensor, Tensor | None]:
    """Per-channel statistics and a centred input: ``(center, offset, var, count, x - center, scratch)``.

    Everything is in the compute dtype. The mean is ``center + offset`` (``None`` means zero for either; the
    uncentred way returns ``center = None``: the mean is ``offset`` and ``x - center`` is ``x``) and the backward
    works on ``x - center``: :func:`grad_reductions` and :func:`grad_input` take exactly this pair.

    Two ways, chosen per call:

    - **centred (exact for any mean)**: ``center`` is the float32 mean; ``x - center`` is written out and the variance
      computed from it (never as ``E[x^2] - E[x]^2``), which keeps float32 exact for inputs whose mean is large
      relative to their spread. ``offset = mean(x - center)`` is the part of the true mean that float32 cannot hold
      at ``|mean|`` (its spacing is ``|mean| * 6e-8``: 1e-3 at 1e4).
    - **uncentred (CPU, NCHW-contiguous float input, every channel with ``mean^2 <= var``)**: ``center`` is zero,
      ``x - center`` is ``x`` itself (nothing written) and ``var = E[x^2] - mean^2``. With the mean within one
      standard deviation of zero the cancellation at most doubles the ~4e-7 relative error of the float32 sum of
      squares, the float32 mean is within ~1.2e-7 standard deviations of the exact one (outputs within ~1.2e-6 of
      float64 math, torch's own kernel ~4e-7), and the forward reads ``x`` twice and writes only its output: two
      fewer passes and one fewer activation-sized buffer than the centred way. Deciding reads one host
      value, free on CPU; accelerators always take the centred way (no synchronisation).

    ``scratch`` is a dead activation-sized buffer (it held the squares) free for the forward's output, or ``None``.
    On the CPU fast path the mean comes from row sums combined in float64 (:func:`_sums_and_sumsq`); where every
    channel has ``mean^2 < 16 var`` that mean is exact to ~1e-8 standard deviations and gives the offset without
    the offset pass (the float32 sums' rounding grows with ``|mean| / std``, so larger means still take the pass).

    SyncBatchNorm may take either way on each rank: if every rank's channel has ``mean_i^2 <= var_i``, the merged
    statistics satisfy ``mean^2 <= var`` too (``|mean| <= sum w_i |mean_i| <= sum w_i std_i <= std``), so the
    backward's ``sum(dy * x) - mean * sum(dy)`` stays as accurate with the global mean.
    """
    dtype = compute_dtype(x.dtype)
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    denom = max(count, 1)  # an empty batch yields zeros, not NaN; callers skip its running-stat update
    on_cpu = x.device.type == "cpu" and not _is_compiling()  # reading host values would break a torch.compile graph
    row = _row_length(x) if on_cpu and x.dtype == dtype else 0
    cl_step = _channels_last_block_rows(x) if on_cpu and x.dtype == dtype and not row else 0
    mean64: Tensor | None = None
    if row or cl_step:
        sums, sumsq = _sums_and_sumsq(x, row) if row else _sums_and_sumsq_channels_last(x, cl_step)
        mean64 = sums / denom
        mean_sq = mean64 * mean64
        var64 = (sumsq / denom).sub_(mean_sq).clamp_(min=0)
        if bool((mean_sq <= var64).all()):  # _UNCENTERED_MAX_RATIO = 1
            return None, mean64.to(dtype), var64.to(dtype), count, x, None
        center = mean64.to(dtype)
    else:
        center = _channel_sum(x, dtype).div_(denom)
    centered = x - _channel_view(center, x)  # type promotion gives the compute dtype without copying x first
    if cl_step:  # one blocked pass gives the offset and the centred sum of squares, both summed accurately
        sums, sumsq = _sums_and_sumsq_channels_last(centered, cl_step)
        offset64 = sums / denom
        var = (sumsq / denom).sub_(offset64.square()).clamp_(min=0).to(dtype)
        return center, offset64.to(dtype), var, count, centered, None
    sumsq, scratch = _channel_sumsq(centered)
    var = sumsq.div_(denom)
    if mean64 is not None and bool((center.square() < _OFFSET_SKIP_RATIO * var).all()):
        # the float64 mean is exact to ~1e-8 std here: the float32 centre's rounding is the whole offset
        offset = (mean64 - center.double()).to(dtype)
    else:
        offset = _channel_sum(centered).div_(denom)
    var = var.sub_(offset.square()).clamp_(min=0)
    return center, offset, var, count, centered, scratch


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


def _scale_shift(
    invstd: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Fold ``(x - mean) * invstd * weight + bias`` into ``x * scale + shift`` (all per channel)."""
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    shift = None if bias is None else bias.to(invstd.dtype)
    if mean is not None:
        shift = -mean * scale if shift is None else torch.addcmul(shift, mean, scale, value=-1)
    return scale, shift


def _affine(
    x: Tensor, scale: Tensor, shift: Tensor | None, out_dtype: torch.dtype, out: Tensor | None = None
) -> Tensor:
    """``x * scale + shift`` (per channel), returned in ``out_dtype``; written into ``out`` (a free buffer) if given.

    A multiply then an in-place add: ATen's vectorised CPU loop takes at most one broadcast operand, so the ternary
    ``torch.addcmul(shift, x, scale)`` runs scalar code and is slower than both passes together. Reusing a dead
    activation-sized buffer avoids first-touch page faults on a fresh allocation.
    """
    if out is not None and (out.dtype != x.dtype or out.shape != x.shape):
        out = None
    scale_v = _channel_view(scale, x)
    shift_v = None if shift is None else _channel_view(shift, x)
    step = _block_size(x) if x.dtype == scale.dtype and shift_v is not None else x.shape[0]
    if step < x.shape[0]:  # multiply and add block by block: the add finds the block in cache
        y = torch.empty_like(x) if out is None else out
        for x_block, y_block in _split(step, x, y):
            torch.mul(x_block, scale_v, out=y_block).add_(shift_v)
    else:
        y = x * scale_v if out is None else torch.mul(x, scale_v, out=out)
        if shift_v is not None:
            y.add_(shift_v)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def normalize(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    """Normalise ``x`` with GIVEN statistics (inference), scale and shift: one pass over ``x``.

    Differentiable (autograd) in ``x``, ``weight`` and ``bias``; ``mean``/``var`` are treated as constants.

    Args:
        x: ``(N, C, *)``.
        mean: ``(C,)`` e.g. the running mean.
        var: ``(C,)`` e.g. the running variance.
        weight: optional ``(C,)`` gamma.
        bias: optional ``(C,)`` beta.
        eps: added to the variance.

    Returns:
        ``(x - mean) / sqrt(var + eps) * weight + bias`` in the dtype and memory format of ``x``.

    Example::

        >>> x = torch.randn(4, 3)
        >>> torch.allclose(normalize(x, torch.zeros(3), torch.ones(3), eps=0.0), x)
        True
    """
    return _BatchNormEvalFn.apply(x, mean, var, weight, bias, eps)


def grad_reductions(
    grad_out: Tensor, centered: Tensor, invstd: Tensor, offset: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The backward's two per-channel sums: ``sum(dy)`` and ``sum(dy * x_hat)``.

    SyncBatchNorm all-reduces exactly these two before calling :func:`grad_input`.

    Args:
        grad_out: ``dy``, shape ``(N, C, *)``.
        centered: ``x - c`` in the compute dtype, for some per-channel centre ``c``.
        invstd: ``1 / sqrt(var + eps)``, shape ``(C,)``.
        offset: ``mean - c`` when the normalisation mean differs from the centre: the forward centres on the
            float32-rounded local mean and normalises with the exact (for SyncBatchNorm: global) mean. ``None``
            means zero.

    Returns:
        ``(sum_dy, sum_dy_xhat)``, each ``(C,)`` in the compute dtype.
    """
    return _grad_reductions(grad_out, centered, invstd, offset)[:2]


def _grad_reductions(
    grad_out: Tensor, centered: Tensor, invstd: Tensor, offset: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`grad_reductions`, plus the dead ``dy * centered`` buffer (free for the input gradient) or ``None``.

    NCHW-contiguous CPU tensors go block by block (:func:`_block_size`): per block the row sums of ``dy``, the product
    into a block-sized buffer and its row sums, so the product never travels to memory and ``dy`` is read once.
    """
    dy = grad_out.to(centered.dtype)
    dense = dy.is_contiguous() and centered.is_contiguous() and centered.dim() > 2
    step = _block_size(centered) if dense else centered.shape[0]
    product: Tensor | None = None
    # the product is taken against x - mean = centered - offset: with the uncentred forward (centered is x itself)
    # sum(dy * x) - mean * sum(dy) would cancel badly whenever dy has a mean of its own
    if step < centered.shape[0]:
        n, c = centered.shape[0], centered.shape[1]
        rows_dy, rows_x = dy.view(n * c, -1), centered.view(n * c, -1)
        part_dy, part_dy_xc = dy.new_empty(n * c), dy.new_empty(n * c)
        k = step * c
        buf = dy.new_empty(k, rows_dy.shape[1])
        shift = None if offset is None else offset.repeat(step).unsqueeze(1)
        for block_dy, block_x, out_dy, out_dy_xc in _split(k, rows_dy, rows_x, part_dy, part_dy_xc):
            tmp = buf if block_dy.shape[0] == k else buf[: block_dy.shape[0]]
            torch.sum(block_dy, 1, out=out_dy)
            if shift is None:
                torch.mul(block_dy, block_x, out=tmp)
            else:
                torch.sub(block_x, shift if tmp is buf else shift[: tmp.shape[0]], out=tmp).mul_(block_dy)
            torch.sum(tmp, 1, out=out_dy_xc)
        f64 = torch.float64  # row partials combined in float64, as in _channel_sum
        sum_dy = part_dy.view(n, c).sum(0, dtype=f64).to(dy.dtype)
        sum_dy_xc = part_dy_xc.view(n, c).sum(0, dtype=f64).to(dy.dtype)
    else:
        sum_dy = _channel_sum(dy)
        if offset is None:
            product = dy * centered
        else:
            product = (centered - _channel_view(offset, centered)).mul_(dy)
        sum_dy_xc = _channel_sum(product)
    return sum_dy, sum_dy_xc * invstd, product


def grad_input(
    grad_out: Tensor,
    centered: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: Count,
    offset: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Closed-form input gradient of batch normalisation with batch statistics.

    ``dx = gamma * invstd * (dy - sum_dy / n - x_hat * sum_dy_xhat / n)``, evaluated as
    ``dx = dy * a + (x - c) * b + d`` with per-channel ``a, b, d``: a multiply, an ``addcmul_`` and an add, run
    block by block over the batch on CPU so that the last two find the block in cache (reads ``dy`` and ``x - c``
    once, writes ``dx`` once).

    Args:
        grad_out: ``dy``, shape ``(N, C, *)``.
        centered: ``x - c``, as for :func:`grad_reductions`.
        invstd: ``1 / sqrt(var + eps)``, ``(C,)``.
        weight: gamma ``(C,)`` or ``None``.
        sum_dy: ``sum(dy)`` per channel (all-reduced for SyncBatchNorm).
        sum_dy_xhat: ``sum(dy * x_hat)`` per channel (likewise).
        count: values per channel behind the statistics (global for SyncBatchNorm).
        offset: ``mean - c``, as for :func:`grad_reductions`.
        out_dtype: dtype of the result (default: that of ``grad_out``).
        out: an optional free buffer shaped like ``centered`` (compute dtype) to write the result into.

    Returns:
        ``dx`` with the shape and memory format of ``grad_out``.
    """
    dtype = grad_out.dtype if out_dtype is None else out_dtype
    a, b, d = _input_grad_coefficients(invstd, weight, sum_dy, sum_dy_xhat, count, offset)
    dx = _buffer_like(centered, out)
    a_v, b_v, d_v = (_channel_view(t, centered) for t in (a, b, d))
    step = _block_size(centered)  # all three ops on one cached block at a time
    for dy_block, x_block, dx_block in _split(step, grad_out, centered, dx):
        torch.mul(dy_block, a_v, out=dx_block).addcmul_(x_block, b_v).add_(d_v)
    return dx if dx.dtype == dtype else dx.to(dtype)


def _buffer_like(centered: Tensor, out: Tensor | None) -> Tensor:
    """``out`` if it is a free buffer shaped like ``centered`` (same dtype), else a new one with its layout."""
    if out is None or out.dtype != centered.dtype or out.shape != centered.shape:
        return torch.empty_like(centered)
    return out


def _input_grad_coefficients(
    invstd: Tensor, weight: Tensor | None, sum_dy: Tensor, sum_dy_xhat: Tensor, count: Count, offset: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel ``(a, b, d)`` with ``dx = dy * a + (x - c) * b + d`` (see :func:`grad_input`)."""
    count = _host_count(count)
    a = invstd if weight is None else invstd * weight.to(invstd.dtype)
    if isinstance(count, Tensor):
        minus_inv_n: float | Tensor = -count.to(invstd.dtype).clamp(min=1).reciprocal()
    else:
        minus_inv_n = -1.0 / max(count, 1)
    b = (sum_dy_xhat * minus_inv_n).mul_(invstd).mul_(a)
    d = (sum_dy * minus_inv_n).mul_(a)
    if offset is not None:
        d.addcmul_(offset, b, value=-1)
    return a, b, d


def _scaled_grad(
    grad_out: Tensor, centered: Tensor, invstd: Tensor, weight: Tensor | None, out: Tensor | None
) -> Tensor:
    """``dy * gamma * invstd``, the part of ``dx`` that needs no batch-wide sum, in ``centered``'s dtype and layout.

    Written into ``out`` (a dead buffer shaped like ``centered``) when given. SyncBatchNorm computes it while its
    backward all-reduce is in flight, then :func:`_finish_grad_input` adds the rest.
    """
    a = invstd if weight is None else invstd * weight.to(invstd.dtype)
    return torch.mul(grad_out, _channel_view(a, centered), out=_buffer_like(centered, out))


def _finish_grad_input(
    dx: Tensor,
    centered: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: Count,
    offset: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """Add the batch-wide terms to ``dx = dy * a`` in place: ``dx += (x - c) * b + d``, then cast to ``out_dtype``."""
    _, b, d = _input_grad_coefficients(invstd, weight, sum_dy, sum_dy_xhat, count, offset)
    b_v, d_v = _channel_view(b, centered), _channel_view(d, centered)
    step = _block_size(centered)
    for dx_block, x_block in _split(step, dx, centered):
        dx_block.addcmul_(x_block, b_v).add_(d_v)
    return dx if dx.dtype == out_dtype else dx.to(out_dtype)


class _BatchNormTrainFn(torch.autograd.Function):
    """Batch-statistics BN with a hand-written backward; optional reducer for synchronised statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, reducer, renorm):  # type: ignore[override]
        center, offset, var, count, centered, scratch = _centered_stats(x)
        if reducer is None:
            mean = _add_parts(center, offset)
        else:
            # peers exchange float64 means: a float32 mean is quantised at |mean| * 6e-8
            local64 = _add_parts(
                None if center is None else center.double(), None if offset is None else offset.double()
            )
            mean64, var, count = reducer.reduce_stats(local64, var, count)
            mean = mean64.to(var.dtype)
            offset = mean if center is None else (mean64 - center.double()).to(var.dtype)
        invstd = torch.rsqrt(var + eps)
        r = d = None
        weight_eff, bias_eff = weight, bias
        if renorm is not None:
            # Batch Renorm is BN with affine (gamma * r, beta + gamma * d), r and d constants
            sigma_r = torch.sqrt(renorm.running_var.to(var.dtype) + eps)
            r = (invstd.reciprocal() / sigma_r).clamp(1 / renorm.r_max, renorm.r_max)
            d = ((mean - renorm.running_mean.to(mean.dtype)) / sigma_r).clamp(-renorm.d_max, renorm.d_max)
            gamma = torch.ones_like(r) if weight is None else weight.to(r.dtype)
            weight_eff = gamma * r
            bias_eff = gamma * d if bias is None else bias.to(r.dtype) + gamma * d
        scale, shift = _scale_shift(invstd, weight_eff, bias_eff, offset)
        y = _affine(centered, scale, shift, x.dtype, out=scratch)
        ctx.save_for_backward(centered, invstd, weight, weight_eff, offset, r, d)
        ctx.count = count
        ctx.reducer = reducer
        ctx.in_dtype = x.dtype
        ctx.mark_non_differentiable(mean, var)
        ctx.set_materialize_grads(False)  # mean and var get no gradient: no zero tensors for them in backward
        return y, mean, var, count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _gm, _gv, _gc):  # type: ignore[override]
        centered, invstd, weight, weight_eff, offset, r, d = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_out is None:  # not materialised: the output took no part in what was differentiated
            grad_out = torch.zeros_like(centered, dtype=ctx.in_dtype)
        sum_dy, sum_dy_xhat, scratch = _grad_reductions(grad_out, centered, invstd, offset)
        # gamma/beta gradients are LOCAL sums: under DDP the gradient all-reduce adds the ranks' shares.
        grad_w = None
        if need_w and weight is not None:
            grad_w = (sum_dy_xhat if r is None else r * sum_dy_xhat + d * sum_dy).to(weight.dtype)
        grad_b = sum_dy.to(weight.dtype if weight is not None else grad_out.dtype) if need_b else None
        if ctx.reducer is None:
            args = (sum_dy, sum_dy_xhat, ctx.count, offset, ctx.in_dtype, scratch)
            grad_x = grad_input(grad_out, centered, invstd, weight_eff, *args) if need_x else None
            return grad_x, grad_w, grad_b, None, None, None
        # every rank joins the backward collective, also when it needs no input gradient; where the reducer can
        # run it asynchronously, dy * gamma * invstd (which needs no global sum) is computed while it is in flight
        start = getattr(ctx.reducer, "start_reduce_grads", None)
        finish = None
        if start is None:
            sum_dy, sum_dy_xhat = ctx.reducer.reduce_grads(sum_dy, sum_dy_xhat)
        else:
            finish = start(sum_dy, sum_dy_xhat)
        partial = _scaled_grad(grad_out, centered, invstd, weight_eff, scratch) if need_x else None
        if finish is not None:
            sum_dy, sum_dy_xhat = finish()
        grad_x = None
        if partial is not None:
            args = (sum_dy, sum_dy_xhat, ctx.count, offset, ctx.in_dtype)
            grad_x = _finish_grad_input(partial, centered, invstd, weight_eff, *args)
        return grad_x, grad_w, grad_b, None, None, None


class _BatchNormEvalFn(torch.autograd.Function):
    """Running-statistics BN: ``y = x * scale + shift`` in one pass, with a hand-written backward."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps):  # type: ignore[override]
        dtype = compute_dtype(x.dtype)
        invstd = torch.rsqrt(var.to(dtype) + eps)
        scale, shift = _scale_shift(invstd, weight, bias, mean.to(dtype))
        ctx.save_for_backward(x, mean, invstd, weight)
        if _kernel == "compiled" and not _compiled_broken and x.dtype == dtype and shift is not None:
            y = _run_compiled(2, x, scale, shift)  # one fused loop instead of a multiply and an add
            if y is not None:
                return y
        return _affine(x, scale, shift, x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, mean, invstd, weight = ctx.saved_tensors
        need_x, _, _, need_w, need_b = ctx.needs_input_grad[:5]
        dims = reduce_dims(grad_out)
        scale, _ = _scale_shift(invstd, weight, None, None)
        grad_x = _affine(grad_out, scale, None, grad_out.dtype) if need_x else None
        grad_w = grad_b = None
        if need_w:
            centered = x - _channel_view(mean.to(invstd.dtype), x)
            grad_w = ((grad_out * centered).sum(dims) * invstd).to(weight.dtype)
        if need_b:
            grad_b = grad_out.sum(dims, dtype=invstd.dtype).to(weight.dtype if weight is not None else grad_out.dtype)
        return grad_x, None, None, grad_w, grad_b, None


# ------------------------------------------------------------------------------------------- the compiled kernel

KERNELS = ("eager", "compiled")
_kernel = os.environ.get("BN_LIGHTNING_KERNEL", "eager") or "eager"
if _kernel not in KERNELS:
    warnings.warn(
        f"BN_LIGHTNING_KERNEL={_kernel!r} is not one of {KERNELS}; using the eager kernel", RuntimeWarning, stacklevel=1
    )
    _kernel = "eager"
_compiled_pair: tuple[Callable[..., Any], ...] | None = None
_compiled_broken = False


def set_kernel(name: str) -> None:
    """Choose how training-mode local BN runs: ``"eager"`` (default) or ``"compiled"``.

    ``"eager"`` composes ATen ops (this module's functions). ``"compiled"`` runs the SAME formulas — two-pass
    statistics with the exact offset, the closed-form backward — through ``torch.compile``, which fuses each into
    a few loops over the data (on CPU ~0.8-1.0x torch's native BN fwd+bwd at (64, 64, 32, 32), forward alone
    ~0.7x, against ~1.15x eager; ``scripts/bench_layers.py --kernel compiled``). The first call per input shape
    compiles (~15 s on 2 cores; a C++ compiler is needed on CPU); if compiling fails, a warning is given once and the
    eager kernel is used.
    Applies to float32/float64 inputs of plain local BN in training and to the eval-mode transform; SyncBatchNorm's
    and Batch Renorm's training and autocast half-precision inputs always run eager. Also settable with
    ``BN_LIGHTNING_KERNEL=compiled``.

    Args:
        name: ``"eager"`` or ``"compiled"``.

    Raises:
        ValueError: an unknown name.

    Example::

        >>> set_kernel("eager"); get_kernel()
        'eager'
    """
    global _kernel
    if name not in KERNELS:
        raise ValueError(f"unknown BN kernel {name!r}; expected one of {KERNELS}")
    _kernel = name


def get_kernel() -> str:
    """The kernel chosen by :func:`set_kernel` (or ``BN_LIGHTNING_KERNEL``): ``"eager"`` or ``"compiled"``."""
    return _kernel


def _fused_forward(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training-mode BN forward for ``torch.compile``: ``(y, center, offset, var, invstd)``; the eager formulas.

    The mean is ``center + offset`` (float32 cannot hold a large mean exactly: see :func:`_centered_stats`), and
    backward needs both parts.

    Compiled into a reduction for the mean, one for the offset and the centred sum of squares (see
    :func:`_centered_stats`: exact for large means) and one elementwise loop for ``y``: three reads of ``x``, one
    write. Accumulation is float32 (float64 accumulators made the compiled loops 2x slower on CPU).
    """
    dims = reduce_dims(x)
    view = (1, -1) + (1,) * (x.dim() - 2)
    center = x.mean(dims)
    centered = x - center.view(view)
    offset = centered.mean(dims)
    var = ((centered * centered).mean(dims) - offset * offset).clamp(min=0)
    invstd = torch.rsqrt(var + eps)
    scale = invstd * weight
    y = (centered - offset.view(view)) * scale.view(view) + bias.view(view)
    return y, center, offset, var, invstd


def _fused_backward(
    grad_out: Tensor, x: Tensor, center: Tensor, offset: Tensor, invstd: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form BN backward for ``torch.compile``: ``(dx, sum(dy * x_hat), sum(dy))``.

    Compiled into one reduction loop over ``dy`` and ``x`` and one elementwise loop for ``dx``.
    """
    dims = reduce_dims(x)
    view = (1, -1) + (1,) * (x.dim() - 2)
    n = x.numel() // x.shape[1]
    centered = (x - center.view(view)) - offset.view(view)
    sum_dy = grad_out.sum(dims)
    sum_dy_xhat = (grad_out * centered).sum(dims) * invstd
    a = invstd * weight
    b = -a * invstd * (sum_dy_xhat / n)
    d = -a * (sum_dy / n)
    dx = grad_out * a.view(view) + centered * b.view(view) + d.view(view)
    return dx, sum_dy_xhat, sum_dy


def _fused_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """Eval-mode BN for ``torch.compile``: ``x * scale + shift`` per channel, one read and one write."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.view(view) + shift.view(view)


def _compiled_kernels() -> tuple[Callable[..., Any], ...]:
    """The compiled training forward, training backward and eval forward, built on first use."""
    global _compiled_pair
    if _compiled_pair is None:
        _compiled_pair = tuple(torch.compile(fn) for fn in (_fused_forward, _fused_backward, _fused_affine))
    return _compiled_pair


def _use_compiled(x: Tensor, reducer: StatsReducer | None, renorm: Renorm | None) -> bool:
    return (
        _kernel == "compiled"
        and not _compiled_broken
        and reducer is None
        and renorm is None
        and x.dtype in (torch.float32, torch.float64)
        and x.dim() >= 2
        and x.numel() > x.shape[1]  # two or more values per channel (the eager path raises or handles the rest)
    )


def _run_compiled(fn_index: int, *args: object) -> Any:
    """Call a compiled kernel; ``None`` (after one warning, for good) if compiling fails."""
    global _compiled_broken
    try:
        return _compiled_kernels()[fn_index](*args)
    except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the eager kernel
        if fn_index == 1:  # the forward compiled and ran: a failing backward is a real error, not a missing compiler
            raise
        _compiled_broken = True
        warnings.warn(
            f"bn_lightning: the compiled BN kernel is unavailable ({type(err).__name__}: {str(err)[:200]}); "
            "using the eager kernel",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


class _CompileFailedError(Exception):
    """Raised inside :class:`_CompiledTrainFn` when the kernel cannot be compiled: the caller runs eager instead."""


class _CompiledTrainFn(torch.autograd.Function):
    """Local training-mode BN through the compiled kernels; same outputs and statistics as the eager Function."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):  # type: ignore[override]
        w = torch.ones(x.shape[1], dtype=x.dtype, device=x.device) if weight is None else weight.to(x.dtype)
        b = torch.zeros_like(w) if bias is None else bias.to(x.dtype)
        fused = _run_compiled(0, x, w, b, eps)
        if fused is None:
            raise _CompileFailedError
        y, center, offset, var, invstd = fused
        mean = center + offset
        ctx.save_for_backward(x, center, offset, invstd, w)
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _gm, _gv):  # type: ignore[override]
        x, center, offset, invstd, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        # in x's layout: the kernel is compiled for the strides it first saw, an odd gradient would recompile it
        dy = grad_out.to(x.dtype).contiguous(memory_format=_memory_format(x))
        dx, sum_dy_xhat, sum_dy = _run_compiled(1, dy, x, center, offset, invstd, w)  # type: ignore[misc]
        grad_w = sum_dy_xhat.to(ctx.weight_dtype) if need_w and ctx.weight_dtype is not None else None
        grad_b = sum_dy.to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
        return (dx if need_x else None), grad_w, grad_b, None


def _memory_format(x: Tensor) -> torch.memory_format:
    """The memory format ``x`` is dense in (channels-last for 4D/5D tensors stored so, else contiguous)."""
    if not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format


def _compiled_train(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, ...] | None:
    """Training-mode BN through the compiled kernel: ``(y, mean, var)``, or ``None`` if it cannot be compiled."""
    try:
        return _CompiledTrainFn.apply(x, weight, bias, eps)
    except _CompileFailedError:
        return None


def _host_count(count: Count) -> Count:
    """A merged count as a Python number when reading it is free (one CPU value), else the tensor unchanged.

    The arithmetic that follows then runs on scalars instead of a dozen tiny tensor ops; on accelerators the count
    stays on the device, so no synchronisation is added.
    """
    if isinstance(count, Tensor) and count.numel() == 1 and count.device.type == "cpu" and not _is_compiling():
        value = count.item()
        return int(value) if float(value).is_integer() else value
    return count


def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    stats: BatchStats,
    momentum: float | None,
    num_batches_tracked: Tensor | None = None,
) -> None:
    """Update running statistics in place, with ``torch.nn.BatchNorm``'s exact semantics.

    ``running = (1 - f) * running + f * batch`` where ``f = momentum``, or ``f = 1 / num_batches_tracked`` (a
    cumulative average) when ``momentum`` is ``None``. The running variance is updated with the UNBIASED batch
    variance ``var * n / (n - 1)``. ``num_batches_tracked`` is incremented first. An empty batch (``count == 0``)
    only increments the counter, as torch does. No host synchronisation: the factor stays a tensor.

    Args:
        running_mean: ``(C,)`` buffer, updated in place (or ``None``).
        running_var: ``(C,)`` buffer, updated in place (or ``None``).
        stats: the batch's :class:`BatchStats` (biased variance).
        momentum: the exponential-average factor, or ``None`` for a cumulative average.
        num_batches_tracked: the counter buffer, incremented in place (or ``None``).

    Example::

        >>> rm, rv, nbt = torch.zeros(1), torch.ones(1), torch.tensor(0)
        >>> update_running_stats(rm, rv, BatchStats(torch.tensor([2.0]), torch.tensor([1.0]), 2), None, nbt)
        >>> rm, rv, nbt
        (tensor([2.]), tensor([2.]), tensor(1))
    """
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if momentum is None:
            factor: float | Tensor = 0.0 if num_batches_tracked is None else 1.0 / num_batches_tracked.double()
        else:
            factor = momentum
        count = _host_count(stats.count)
        if isinstance(count, Tensor):
            n = count.to(stats.var.dtype)
            unbiased = stats.var * n / (n - 1).clamp(min=1)
            keep = n > 0
        else:
            if count == 0:
                return
            bessel = count / max(count - 1, 1)
            keep = None
            if not isinstance(factor, Tensor):  # the common case: two in-place ops per buffer, no temporaries
                for buf, value, alpha in (
                    (running_mean, stats.mean, factor),
                    (running_var, stats.var, factor * bessel),
                ):
                    if buf is not None:
                        buf.mul_(1 - factor).add_(value.to(buf.dtype), alpha=alpha)
                return
            unbiased = stats.var * bessel
        for buf, value in ((running_mean, stats.mean), (running_var, unbiased)):
            if buf is None:
                continue
            f = factor.to(buf.dtype) if isinstance(factor, Tensor) else factor
            new = buf * (1 - f) + value.to(buf.dtype) * f
            buf.copy_(new if keep is None else torch.where(keep, new, buf))


def batch_norm_with_stats(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
    reducer: StatsReducer | None = None,
    renorm: Renorm | None = None,
) -> tuple[Tensor, BatchStats | None]:
    """The forward of a BN layer; returns the output and the batch statistics it normalised with.

    Semantics follow ``torch.nn.functional.batch_norm``: with ``training=True`` (or no running statistics) the batch
    statistics normalise and, if given, the running buffers are updated (:func:`update_running_stats`); otherwise
    the running statistics normalise (:func:`normalize`).

    Args:
        x: ``(N, C, *)``.
        running_mean: ``(C,)`` buffer or ``None``.
        running_var: ``(C,)`` buffer or ``None``.
        weight: gamma ``(C,)`` or ``None``.
        bias: beta ``(C,)`` or ``None``.
        training: use batch statistics (and update the buffers).
        momentum: exponential-average factor, ``None`` for a cumulative average.
        eps: added to the variance.
        num_batches_tracked: counter buffer, incremented when the running statistics are updated.
        reducer: a :class:`StatsReducer` to synchronise statistics across processes (SyncBatchNorm).
        renorm: a :class:`Renorm` correction (Batch Renormalization) for training mode; composes with ``reducer``.

    Returns:
        ``(y, stats)``: ``stats`` is the detached :class:`BatchStats` used (merged over the reducer's group), or
        ``None`` when the running statistics were used.

    Raises:
        ValueError: training on a batch with a single value per channel (its variance is undefined).
    """
    if not training and running_mean is not None and running_var is not None:
        return normalize(x, running_mean, running_var, weight, bias, eps), None
    if reducer is None and x.dim() >= 2 and x.numel() == x.shape[1] and x.shape[1] > 0:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
    compiled = _compiled_train(x, weight, bias, eps) if _use_compiled(x, reducer, renorm) else None
    if compiled is not None:
        y, mean, var = compiled
        count: Count = x.numel() // x.shape[1]
    else:
        y, mean, var, count = _BatchNormTrainFn.apply(x, weight, bias, eps, reducer, renorm)
    stats = BatchStats(mean, var, count)
    if training and (running_mean is not None or running_var is not None):
        update_running_stats(running_mean, running_var, stats, momentum, num_batches_tracked)
    return y, stats


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
    reducer: StatsReducer | None = None,
    renorm: Renorm | None = None,
) -> Tensor:
    """Batch normalisation, a replacement for ``torch.nn.functional.batch_norm`` built on this module's core.

    Same arguments as :func:`batch_norm_with_stats`; returns only the output.

    Example::

        >>> x = torch.randn(16, 4)
        >>> y = batch_norm(x, None, None, training=True)
        >>> torch.allclose(y.mean(0), torch.zeros(4), atol=1e-6)
        True
    """
    return batch_norm_with_stats(
        x, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked, reducer, renorm
    )[0]
