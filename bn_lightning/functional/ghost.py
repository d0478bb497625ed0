"""Ghost Batch Normalization (Hoffer et al., 2017) in one pass: :func:`ghost_batch_norm_with_stats`.

The batch is split along dim 0 into virtual batches, each normalised with its own statistics, and the running
statistics are updated once per virtual batch, in order. One autograd Function runs the whole ghost forward. Where
the virtual batches are of one size and the input NCHW-contiguous with rows of at least 64 values, the grouped kernels
(:mod:`~bn_lightning.functional.ghost_kernels`) run every virtual batch at once on the ``(G, m, C, L)`` view, at about
the cost of one plain BN call on the whole batch. Elsewhere (a smaller last virtual batch, channels-last, short rows,
a mean beyond 8 standard deviations) the virtual batches are views of the input, each normalised by the eager kernels
straight into its slice of one preallocated output, and the backward writes each virtual batch's input gradient into
its slice of one preallocated gradient. Forward-mode AD, ``torch.func`` transforms, ``torch.compile`` and the compiled
kernel run each virtual batch through :func:`~bn_lightning.functional.batch_norm_with_stats` and concatenate the
outputs; the Function's backward differentiates composite ops per virtual batch when a graph of it is asked for
(``create_graph=True``) or its incoming gradient is batched (``vmap``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bn_lightning.functional.backward import _grad_reductions, grad_input
from bn_lightning.functional.batchnorm import batch_norm_with_stats, check_batch_norm_args
from bn_lightning.functional.channels import _affine, _channel_view, _scale_shift
from bn_lightning.functional.compiled import get_kernel
from bn_lightning.functional.composite import batch_norm_backward_composite, needs_composite
from bn_lightning.functional.ghost_kernels import (
    grouped_affine,
    grouped_eligible,
    grouped_grad_input,
    grouped_grad_reductions,
    grouped_stats,
)
from bn_lightning.functional.running_stats import update_running_stats
from bn_lightning.functional.small import small_backward, small_eligible, small_forward
from bn_lightning.functional.stats import BatchStats, _add_parts, merge_finite_stats, merge_stats
from bn_lightning.functional.stats_kernels import _centered_stats

__all__ = ["ghost_batch_norm_with_stats"]


def _virtual_batch_sizes(x: Tensor, virtual_batch_size: int) -> list[int]:
    """The sizes (along dim 0) of the virtual batches Ghost BN splits ``x`` of shape ``(N, C, *)`` into.

    Virtual batches of ``virtual_batch_size`` samples; a batch that it does not divide ends with a smaller one,
    unless that remainder would hold a single value per channel (one sample without spatial extent, whose variance
    is undefined): then it joins the previous virtual batch.

    Args:
        x: the input, ``(N, C, *)``.
        virtual_batch_size: samples per virtual batch (positive).

    Returns:
        The sizes, summing to ``N`` (``[N]`` when ``virtual_batch_size >= N``).

    Example::

        >>> _virtual_batch_sizes(torch.empty(10, 3, 2), 4), _virtual_batch_sizes(torch.empty(9, 3), 4)
        ([4, 4, 2], [4, 5])
    """
    n = x.shape[0]
    sizes = [virtual_batch_size] * (n // virtual_batch_size)
    if n % virtual_batch_size:
        sizes.append(n % virtual_batch_size)
    if len(sizes) > 1 and sizes[-1] == 1 and x[:1].numel() == x.shape[1]:
        sizes[-2:] = [sizes[-2] + 1]
    return sizes


def ghost_batch_norm_with_stats(
    x: Tensor,
    virtual_batch_size: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
) -> tuple[Tensor, BatchStats]:
    """Training-mode Ghost BN: each virtual batch normalised with its own statistics; returns the output and stats.

    The virtual batches are :func:`_virtual_batch_sizes`; each one gives what
    :func:`~bn_lightning.functional.batch_norm_with_stats` gives it alone (output, gradients, and one update of the
    running buffers, in order: ``num_batches_tracked`` counts virtual batches, and drives ``momentum=None``'s
    cumulative average): bit for bit where the virtual batches run one by one, to float rounding of the per-channel
    coefficients where the grouped kernels run them all at once. ``y`` keeps ``x``'s memory format.

    Args:
        x: ``(N, C, *)`` floating-point input.
        virtual_batch_size: samples per virtual batch (positive).
        running_mean: ``(C,)`` buffer updated in place, or ``None``.
        running_var: ``(C,)`` buffer updated in place, or ``None``.
        weight: gamma ``(C,)`` or ``None``.
        bias: beta ``(C,)`` or ``None``.
        momentum: exponential-average factor per virtual batch, or ``None`` for a cumulative average.
        eps: added to the variance.
        num_batches_tracked: counter buffer, incremented once per virtual batch.

    Returns:
        ``(y, stats)``: ``stats`` the detached :class:`~bn_lightning.functional.BatchStats` of the whole batch (the
        virtual batches' statistics merged; ``count`` a Python int).

    Raises:
        ValueError: ``virtual_batch_size`` is not a positive int; the batch holds a single value per channel;
            ``eps <= 0``.
        TypeError: ``x`` is not floating point.

    Example::

        >>> x = torch.randn(8, 3, 4, 4)
        >>> rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
        >>> y, stats = ghost_batch_norm_with_stats(x, 4, rm, rv, num_batches_tracked=nbt)
        >>> ref = torch.nn.functional.batch_norm(x[4:], None, None, training=True)
        >>> torch.allclose(y[4:], ref, atol=1e-5), int(nbt), stats.count
        (True, 2, 128)
    """
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
        raise ValueError(f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}")
    check_batch_norm_args(x, eps, True)
    sizes = _virtual_batch_sizes(x, virtual_batch_size) if _runs_fused(x, weight, bias) else []
    per_sample = x[:1].numel() // x.shape[1] if sizes else 0  # values per channel in one sample
    if len(sizes) > 1 and min(sizes) * per_sample > 1:  # else one batch, or one that raises (one value per channel)
        y, mean, var = _GhostTrainFn.apply(x, weight, bias, eps, sizes)
        counts = [size * per_sample for size in sizes]
        if running_mean is not None or running_var is not None:
            for m, v, n in zip(mean.unbind(), var.unbind(), counts, strict=True):
                update_running_stats(running_mean, running_var, BatchStats(m, v, n), momentum, num_batches_tracked)
        weights = torch.tensor(counts, device=x.device).to(mean.dtype).unsqueeze(1)
        merged = merge_finite_stats(mean, var, weights)  # every virtual batch holds values: the statistics are finite
        return y, BatchStats(merged.mean, merged.var, sum(counts))
    return _per_virtual_batch(
        x, virtual_batch_size, running_mean, running_var, weight, bias, momentum, eps, num_batches_tracked
    )


def _per_virtual_batch(
    x: Tensor,
    virtual_batch_size: int,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | None,
    eps: float,
    num_batches_tracked: Tensor | None,
) -> tuple[Tensor, BatchStats]:
    """One :func:`~bn_lightning.functional.batch_norm_with_stats` per virtual batch, outputs concatenated.

    The path of transforms, ``torch.compile`` and the compiled kernel. The split is written on tensor shapes, not on
    a list of sizes computed from ``N``, so that ``torch.compile`` keeps the batch size symbolic (one graph for all
    batch sizes with the same number of virtual batches).
    """
    if x.dim() < 2 or x.shape[0] <= virtual_batch_size:
        y, stats = batch_norm_with_stats(
            x, running_mean, running_var, weight, bias, True, momentum, eps, num_batches_tracked
        )
        assert stats is not None  # training mode normalises with batch statistics
        return y, stats
    chunks = list(x.split(virtual_batch_size))
    if chunks[-1].numel() == chunks[-1].shape[1]:  # a single value per channel: merged, as _virtual_batch_sizes says
        chunks[-2:] = [torch.cat(chunks[-2:])]
    outputs, chunk_stats = [], []
    for chunk in chunks:
        y_chunk, stats = batch_norm_with_stats(
            chunk, running_mean, running_var, weight, bias, True, momentum, eps, num_batches_tracked
        )
        assert stats is not None
        outputs.append(y_chunk)
        chunk_stats.append(stats)
    counts = [s.count for s in chunk_stats]
    mean = torch.stack([s.mean for s in chunk_stats])
    var = torch.stack([s.var for s in chunk_stats])
    merged = merge_stats(mean, var, torch.tensor(counts, device=x.device))
    return torch.cat(outputs), BatchStats(merged.mean, merged.var, sum(counts))


def _runs_fused(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether :class:`_GhostTrainFn` serves ``x``: eager kernel, no transform, NCHW or channels-last layout.

    In those layouts the virtual batches of ``x`` and of ``torch.empty_like(x)`` are views with the same strides.
    """
    if torch.compiler.is_compiling() or needs_composite(x, weight, bias) or get_kernel() != "eager":
        return False
    if x.numel() == 0 or x.dim() < 2:
        return False
    if x.is_contiguous():
        return True
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return layout is not None and x.is_contiguous(memory_format=layout)


class _GhostTrainFn(torch.autograd.Function):
    """Ghost BN's forward over all virtual batches, with the hand-written backward of each."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, sizes):  # type: ignore[override]
        ctx.sizes = sizes
        ctx.eps = eps
        ctx.set_materialize_grads(False)
        ctx.grouped = None
        stats = grouped_stats(x, len(sizes)) if grouped_eligible(x, sizes) else None
        if stats is not None:  # every virtual batch at once
            mean, var = stats
            invstd = torch.rsqrt(var + eps)
            scale, shift = _scale_shift(invstd, weight, bias, mean)
            y = grouped_affine(x, scale, shift, len(sizes))
            ctx.save_for_backward(x, weight)
            ctx.grouped = (mean, invstd)
            ctx.mark_non_differentiable(mean, var)
            return y, mean, var
        y = torch.empty_like(x)
        centers, offsets, invstds, means, variances, smalls = [], [], [], [], [], []
        for x_chunk, y_chunk in zip(x.split(sizes), y.split(sizes), strict=True):
            if small_eligible(x_chunk):  # the small-input kernel, as a plain BN call on this virtual batch takes
                out, mean, var, centered64, invstd64, scale64 = small_forward(x_chunk, weight, bias, eps)
                y_chunk.copy_(out)
                centers.append(None)
                offsets.append(None)
                invstds.append(invstd64)
                smalls.append((centered64, scale64))
                means.append(mean)
                variances.append(var)
                continue
            center, offset, var, _, centered, _ = _centered_stats(x_chunk)
            invstd = torch.rsqrt(var + eps)
            scale, shift = _scale_shift(invstd, weight, bias, offset)
            out = _affine(centered, scale, shift, x.dtype, out=y_chunk)
            if out is not y_chunk:  # a compute dtype other than x's: _affine allocated the output
                y_chunk.copy_(out)
            centers.append(center)
            offsets.append(offset)
            invstds.append(invstd)
            smalls.append(None)
            means.append(_add_parts(center, offset))
            variances.append(var)
        mean, var = torch.stack(means), torch.stack(variances)
        # x, not the centred input: the backward recomputes each x - center (bit for bit the forward's)
        ctx.save_for_backward(x, weight)
        ctx.chunk_stats = (centers, offsets, invstds, smalls)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_out, _gm, _gv):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        if grad_out is None:  # not materialised: the output took no part in what was differentiated
            grad_out = torch.zeros_like(x)
        if torch.is_grad_enabled() or needs_composite(grad_out):  # double backward; vmap over the backward
            return _composite_backward(ctx, grad_out, x, weight)
        with torch.no_grad():
            if ctx.grouped is not None:
                mean, invstd = ctx.grouped
                if grad_out.is_contiguous() and grad_out.dtype == x.dtype:
                    return _grouped_backward(ctx, grad_out, x, weight, mean, invstd)
                none = [None] * len(ctx.sizes)
                ctx.chunk_stats = (none, list(mean.unbind()), list(invstd.unbind()), none)
            return _eager_backward(ctx, grad_out, x, weight)


def _sum_in_reverse(parts: list[Tensor]) -> Tensor:
    """``((p[-1] + p[-2]) + ...) + p[0]``: the virtual batches' parameter gradients summed in autograd's order.

    With one BN call per virtual batch, the engine runs the later calls' backward first and adds each gradient as it
    arrives; summing in that order keeps the result bit for bit that of the per-virtual-batch calls.
    """
    total = parts[-1]
    for part in reversed(parts[:-1]):
        total = total + part
    return total


def _eager_backward(ctx: Any, grad_out: Tensor, x: Tensor, weight: Tensor | None) -> tuple[Tensor | None, ...]:
    """Per virtual batch: the two per-channel sums, then its input gradient into its slice of one ``dx``."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    centers, offsets, invstds, smalls = ctx.chunk_stats
    dx = torch.empty_like(x) if need_x else None
    dx_chunks = dx.split(ctx.sizes) if dx is not None else [None] * len(ctx.sizes)
    grad_ws, grad_bs = [], []
    param_dtype = weight.dtype if weight is not None else grad_out.dtype
    per_chunk = (dx_chunks, centers, offsets, invstds, smalls)
    chunks = zip(x.split(ctx.sizes), grad_out.split(ctx.sizes), *per_chunk, strict=True)
    for x_chunk, dy_chunk, dx_chunk, center, offset, invstd, small in chunks:
        if small is not None:
            centered64, scale64 = small
            out, sum_dy, sum_dy_xhat = small_backward(dy_chunk, centered64, invstd, scale64, dx_chunk is not None)
            if dx_chunk is not None and out is not None:
                dx_chunk.copy_(out)
            if need_w and weight is not None:
                grad_ws.append(sum_dy_xhat.to(weight.dtype))
            if need_b:
                grad_bs.append(sum_dy.to(param_dtype))
            continue
        centered = x_chunk if center is None else x_chunk - _channel_view(center, x_chunk)
        sum_dy, sum_dy_xhat, scratch = _grad_reductions(dy_chunk, centered, invstd, offset)
        if need_w and weight is not None:
            grad_ws.append(sum_dy_xhat.to(weight.dtype))
        if need_b:
            grad_bs.append(sum_dy.to(param_dtype))
        if dx_chunk is not None:
            buffer = dx_chunk if dx_chunk.dtype == centered.dtype else scratch
            count = x_chunk.numel() // x_chunk.shape[1]
            out = grad_input(dy_chunk, centered, invstd, weight, sum_dy, sum_dy_xhat, count, offset, x.dtype, buffer)
            if out is not dx_chunk:
                dx_chunk.copy_(out)
    grad_w = _sum_in_reverse(grad_ws) if grad_ws else None
    grad_b = _sum_in_reverse(grad_bs) if grad_bs else None
    return dx, grad_w, grad_b, None, None


def _grouped_backward(
    ctx: Any, grad_out: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor
) -> tuple[Tensor | None, ...]:
    """The backward of every virtual batch at once (:mod:`~bn_lightning.functional.ghost_kernels`)."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    groups = len(ctx.sizes)
    sum_dy, sum_dy_xhat = grouped_grad_reductions(grad_out, x, mean, invstd, groups)
    grad_w = grad_b = dx = None
    if need_w and weight is not None:
        grad_w = _sum_in_reverse([part.to(weight.dtype) for part in sum_dy_xhat.unbind()])
    if need_b:
        param_dtype = weight.dtype if weight is not None else grad_out.dtype
        grad_b = _sum_in_reverse([part.to(param_dtype) for part in sum_dy.unbind()])
    if need_x:
        dx = grouped_grad_input(grad_out, x, mean, invstd, weight, sum_dy, sum_dy_xhat, groups)
    return dx, grad_w, grad_b, None, None


def _composite_backward(ctx: Any, grad_out: Tensor, x: Tensor, weight: Tensor | None) -> tuple[Tensor | None, ...]:
    """The backward as differentiable ops of ``x``, per virtual batch: for double backward and batched gradients."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    parts = [
        batch_norm_backward_composite(dy_chunk, x_chunk, weight, ctx.eps)
        for x_chunk, dy_chunk in zip(x.split(ctx.sizes), grad_out.split(ctx.sizes), strict=True)
    ]
    grad_x = torch.cat([p[0] for p in parts]).to(x.dtype) if need_x else None
    grad_w = _sum_in_reverse([p[1].to(weight.dtype) for p in parts]) if need_w and weight is not None else None
    param_dtype = weight.dtype if weight is not None else grad_out.dtype
    grad_b = _sum_in_reverse([p[2].to(param_dtype) for p in parts]) if need_b else None
    return grad_x, grad_w, grad_b, None, None
