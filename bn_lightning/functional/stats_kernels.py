"""The eager kernels behind the per-channel statistics.

Per-channel sums with float64-combined partials, blocked sums and sums of squares (rows of NCHW tensors, columns of
channels-last ones), and :func:`_centered_stats`, which picks the centred or the uncentred way per call. Private to
:mod:`bn_lightning.functional`; :func:`~bn_lightning.functional.batch_stats` is the public entry point.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bn_lightning.functional.channels import (
    _BLOCK_BYTES,
    _block_size,
    _channel_view,
    _is_compiling,
    _split,
    compute_dtype,
    reduce_dims,
)


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
_SECOND_PASS_MAX_RATIO = 64.0  # mean^2 / var up to which x itself (not x - mean) feeds the output and the backward


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


def _sums_and_sumsq(x: Tensor, row: int, groups: int = 1) -> tuple[Tensor, Tensor]:
    """Per-channel ``sum(x)`` and ``sum(x^2)``, in float64, of an NCHW-contiguous ``x`` cut into rows of ``row`` values.

    ``(C,)`` each; with ``groups > 1``, ``(groups, C)``: the sums of each of ``groups`` equal slices of the batch.

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
    if groups > 1:
        shape = (groups, n // groups, c, -1)
        return sums.view(shape).sum((1, 3), dtype=f64), norms.square_().view(shape).sum((1, 3), dtype=f64)
    return sums.view(n, c, -1).sum((0, 2), dtype=f64), norms.square_().view(n, c, -1).sum((0, 2), dtype=f64)


_MIN_CL_CHANNELS = 8  # channels-last inputs with fewer channels take the generic path (sums over very thin rows)


def _channels_last_block_rows(t: Tensor) -> int:
    """Rows per block for :func:`_sums_and_sumsq_channels_last` (0: ``t`` is not a channels-last float tensor).

    A channels-last ``(N, C, *)`` tensor is a row-major ``(N * prod(*), C)`` matrix: one row of ``C`` values per
    position. Blocks hold at most :data:`_MAX_ROW` rows (the float32 per-block column sums then stay within ~6e-7
    relative) and about :data:`~bn_lightning.functional.channels._BLOCK_BYTES`, so that squaring a block and summing
    the squares find it in cache.
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


def _sumsq_about(x: Tensor, center: Tensor, row: int, cl_step: int) -> Tensor:
    """Per-channel ``sum((x - center)^2)`` in float64, block by block: no activation-sized buffer is written.

    Per block of the batch (NCHW rows of ``row`` values, :func:`_sums_and_sumsq`) or of ``cl_step`` rows of the
    channels-last ``(N * prod(*), C)`` matrix (:func:`_sums_and_sumsq_channels_last`): the block minus ``center``
    into a block-sized buffer, then its row-wise ``vector_norm`` (NCHW) or squares and column sums (channels-last),
    reading the buffer from cache. The exact centred sum of squares, as the centred way computes it, at the cost of
    one more read of ``x`` instead of a written and re-read ``x - center``.
    """
    n, c = x.shape[0], x.shape[1]
    f64 = torch.float64
    if row:
        length = x.numel() // (n * c)
        step = _block_size(x)
        norms = x.new_empty(n * c * (length // row))
        buf = x.new_empty(min(step, n), c, length)
        center_v = center.view(1, c, 1)
        for block, block_norms in _split(step, x.view(n, c, length), norms.view(n, -1)):
            tmp = buf if block.shape[0] == buf.shape[0] else buf[: block.shape[0]]
            torch.sub(block, center_v, out=tmp)
            torch.linalg.vector_norm(tmp.view(-1, row), dim=1, out=block_norms.view(-1))
        return norms.square_().view(n, c, -1).sum((0, 2), dtype=f64)
    mat = x.permute(0, *range(2, x.dim()), 1).reshape(-1, c)
    blocks = mat.split(cl_step) if cl_step < mat.shape[0] else (mat,)
    sumsq = x.new_empty(len(blocks), c)
    buf = torch.empty_like(blocks[0])
    for i, block in enumerate(blocks):
        tmp = buf if block.shape[0] == buf.shape[0] else buf[: block.shape[0]]
        torch.sub(block, center, out=tmp).square_()
        torch.sum(tmp, 0, out=sumsq[i])
    return sumsq.sum(0, dtype=f64)


def _centered_stats(x: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor, int, Tensor, Tensor | None]:
    """Per-channel statistics and a centred input: ``(center, offset, var, count, x - center, scratch)``.

    Everything is in the compute dtype. The mean is ``center + offset`` (``None`` means zero for either; the
    uncentred way returns ``center = None``: the mean is ``offset`` and ``x - center`` is ``x``) and the backward
    works on ``x - center``: :func:`~bn_lightning.functional.grad_reductions` and
    :func:`~bn_lightning.functional.grad_input` take exactly this pair.

    Three ways, chosen per call:

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
    - **second pass (same CPU inputs, every channel with mean^2 <= 64 var)**: as uncentred, except that the variance
      is the centred sum of squares from a second blocked read of ``x`` (:func:`_sumsq_about`), exact for any mean;
      ``x - center`` is never written. The output ``x * scale + shift`` and the backward's ``x - mean`` then lose at
      most ``|mean| / std * 6e-8 <= 5e-7`` standard deviations to rounding, as the centred way does.

    ``scratch`` is a dead activation-sized buffer (it held the squares) free for the forward's output, or ``None``.
    On the CPU fast path the mean comes from row sums combined in float64 (:func:`_sums_and_sumsq`); up to
    ``mean^2 <= 64 var`` that mean is exact to a few 1e-8 standard deviations (the float32 sums' rounding grows with
    ``|mean| / std``, so larger means take the centred way and its offset pass).

    SyncBatchNorm may take a different way on each rank: if every rank's channel has ``mean_i^2 <= r var_i``, the
    merged statistics satisfy ``mean^2 <= r var`` too (``|mean| <= sum w_i |mean_i| <= sqrt(r) sum w_i std_i <=
    sqrt(r) std``), so the output and the backward's ``x - mean`` stay as accurate with the global mean.
    """
    dtype = compute_dtype(x.dtype)
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    denom = max(count, 1)  # an empty batch yields zeros, not NaN; callers skip its running-stat update
    on_cpu = x.device.type == "cpu" and not _is_compiling()  # reading host values would break a torch.compile graph
    row = _row_length(x) if on_cpu and x.dtype == dtype else 0
    cl_step = _channels_last_block_rows(x) if on_cpu and x.dtype == dtype and not row else 0
    if row or cl_step:
        sums, sumsq = _sums_and_sumsq(x, row) if row else _sums_and_sumsq_channels_last(x, cl_step)
        mean64 = sums / denom
        mean_sq = mean64 * mean64
        var64 = (sumsq / denom).sub_(mean_sq).clamp_(min=0)
        if bool((mean_sq <= var64).all()):  # _UNCENTERED_MAX_RATIO = 1
            return None, mean64.to(dtype), var64.to(dtype), count, x, None
        center = mean64.to(dtype)
        if bool((mean_sq <= _SECOND_PASS_MAX_RATIO * var64).all()):
            # exact variance from a second blocked pass; x - center is never written, backward keeps x itself
            offset64 = mean64 - center.double()
            sumsq64 = _sumsq_about(x, center, row, cl_step)
            var = (sumsq64 / denom).sub_(offset64.square()).clamp_(min=0).to(dtype)
            return None, center, var, count, x, None
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
    offset = _channel_sum(centered).div_(denom)
    var = var.sub_(offset.square()).clamp_(min=0)
    return center, offset, var, count, centered, scratch
