"""The closed-form backward of batch normalisation with batch statistics.

:func:`grad_reductions` gives the two per-channel sums (which SyncBatchNorm all-reduces) and :func:`grad_input` the
input gradient from them; the private helpers split the input gradient so that its part that needs no batch-wide
sum can run while the all-reduce is in flight.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bn_lightning.functional.channels import (
    _as_dtype,
    _block_size,
    _channel_view,
    _channels_innermost,
    _plane_row,
    _split,
)
from bn_lightning.functional.stats import Count, _host_count
from bn_lightning.functional.stats_kernels import _channel_sum, _channels_last_block_rows


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

    NCHW-contiguous CPU tensors go block by block (:func:`~bn_lightning.functional.channels._block_size`): per block
    the row sums of ``dy``, the product into a block-sized buffer and its row sums, so the product never travels to
    memory and ``dy`` is read once. Channels-last CPU tensors likewise, with column sums
    (:func:`_grad_sums_channels_last`).
    """
    dy = _as_dtype(grad_out, centered.dtype)
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
    elif centered.device.type == "cpu" and dy.stride() == centered.stride() and _channels_last_block_rows(centered):
        step = _channels_last_block_rows(centered)
        sum_dy, sum_dy_xc = _grad_sums_channels_last(dy, centered, offset, step)
    else:
        sum_dy = _channel_sum(dy)
        if offset is None:
            product = dy * centered
        else:
            product = (centered - _channel_view(offset, centered)).mul_(dy)
        sum_dy_xc = _channel_sum(product)
    return sum_dy, sum_dy_xc * invstd, product


def _grad_sums_channels_last(dy: Tensor, centered: Tensor, offset: Tensor | None, step: int) -> tuple[Tensor, Tensor]:
    """``sum(dy)`` and ``sum(dy * (centered - offset))`` per channel of channels-last tensors, block by block.

    Both are column sums of ``(N * prod(*), C)`` row-major matrices; per block of ``step`` rows: the column sums of
    ``dy``, the product into a block-sized buffer (``dy`` and ``centered`` read once, the buffer from cache) and its
    column sums. Block partials are combined in float64 (as in
    :func:`~bn_lightning.functional.stats_kernels._sums_and_sumsq_channels_last`).
    """
    c = centered.shape[1]
    perm = (0, *range(2, centered.dim()), 1)
    mat_dy, mat_x = dy.permute(perm).reshape(-1, c), centered.permute(perm).reshape(-1, c)  # views
    blocks = list(_split(step, mat_dy, mat_x))
    part_dy, part_dy_xc = dy.new_empty(len(blocks), c), dy.new_empty(len(blocks), c)
    buf = torch.empty_like(blocks[0][0])
    for i, (block_dy, block_x) in enumerate(blocks):
        tmp = buf if block_dy.shape[0] == buf.shape[0] else buf[: block_dy.shape[0]]
        torch.sum(block_dy, 0, out=part_dy[i])
        if offset is None:
            torch.mul(block_dy, block_x, out=tmp)
        else:
            torch.sub(block_x, offset, out=tmp).mul_(block_dy)
        torch.sum(tmp, 0, out=part_dy_xc[i])
    f64 = torch.float64
    return part_dy.sum(0, dtype=f64).to(dy.dtype), part_dy_xc.sum(0, dtype=f64).to(dy.dtype)


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
    ``dx = dy * a + (x - c) * b + d`` with per-channel ``a, b, d``, run block by block over the batch on CPU so that
    the second pass finds the block in cache (reads ``dy`` and ``x - c`` once, writes ``dx`` once): on CPU, for
    float inputs of one dtype, ``torch.addcmul(d, x - c, b)`` (``d`` as a cached plane for NCHW inputs, see
    :func:`~bn_lightning.functional.channels._affine`) then ``addcmul_(dy, a)``; elsewhere a multiply, an
    ``addcmul_`` and an add.

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
    step = _block_size(centered)  # all ops on one cached block at a time
    fused = centered.device.type == "cpu" and grad_out.dtype == centered.dtype == a.dtype
    k = _plane_row(centered) if fused and grad_out.is_contiguous() else 0
    if k:  # two passes: (x - c) * b + d with d as a cached plane (see _affine), then += dy * a
        n, c = centered.shape[0], centered.shape[1]
        d_plane = d.view(c, 1).expand(c, k).contiguous().view(1, c, 1, k)
        a4, b4 = a.view(1, c, 1, 1), b.view(1, c, 1, 1)
        rows = centered.numel() // (n * c * k)
        for dy_block, x_block, dx_block in _split(step, grad_out, centered, dx):
            shape = (x_block.shape[0], c, rows, k)
            torch.addcmul(d_plane, x_block.view(shape), b4, out=dx_block.view(shape)).addcmul_(dy_block.view(shape), a4)
    elif fused and grad_out.stride() == centered.stride() and (centered.dim() == 2 or _channels_innermost(centered)):
        for dy_block, x_block, dx_block in _split(step, grad_out, centered, dx):  # channels innermost: no plane
            torch.addcmul(d_v, x_block, b_v, out=dx_block).addcmul_(dy_block, a_v)
    else:
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
    a = invstd if weight is None else invstd * _as_dtype(weight, invstd.dtype)
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
