"""The forward of a BN layer: :func:`batch_norm` and :func:`batch_norm_with_stats`.

Training-mode BN runs through an autograd Function with a hand-written backward (optionally synchronised by a
:class:`~bn_lightning.functional.StatsReducer`, optionally with the Batch Renorm correction; local plain BN of a CPU
input of up to 8K values takes the float64 kernel of :mod:`~bn_lightning.functional.small`); eval mode through
:func:`~bn_lightning.functional.normalize`. Forward-mode AD and ``torch.func`` transforms take the composite path
(:mod:`~bn_lightning.functional.composite`), and so does the backward when a graph of it is asked for
(``create_graph=True``) or when its incoming gradient is batched (``vmap``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bn_lightning.functional.backward import _finish_grad_input, _grad_reductions, _scaled_grad, grad_input
from bn_lightning.functional.channels import _affine, _as_dtype, _channel_view, _scale_shift
from bn_lightning.functional.compiled import _compiled_train, _use_compiled
from bn_lightning.functional.composite import batch_norm_backward_composite, batch_norm_composite, needs_composite
from bn_lightning.functional.running_stats import normalize, update_running_stats
from bn_lightning.functional.small import small_backward, small_eligible, small_forward
from bn_lightning.functional.stats import BatchStats, Count, Renorm, StatsReducer, _add_parts
from bn_lightning.functional.stats_kernels import _centered_stats


class _BatchNormTrainFn(torch.autograd.Function):
    """Batch-statistics BN with a hand-written backward; optional reducer for synchronised statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, reducer, renorm):  # type: ignore[override]
        ctx.eps = eps
        ctx.reducer = reducer
        ctx.in_dtype = x.dtype
        ctx.set_materialize_grads(False)  # mean and var get no gradient: no zero tensors for them in backward
        ctx.small = reducer is None and renorm is None and small_eligible(x)
        if ctx.small:  # few ops in float64 (see bn_lightning.functional.small)
            y, mean, var, centered64, invstd64, scale64 = small_forward(x, weight, bias, eps)
            ctx.save_for_backward(x, weight, centered64, invstd64, scale64)
            ctx.mark_non_differentiable(mean, var)
            return y, mean, var, x.numel() // x.shape[1]
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
        if x.numel() == 0:  # an empty scratch buffer is laid out contiguously: y must keep x's memory format
            scratch = None
        y = _affine(centered, scale, shift, x.dtype, out=scratch)
        # x, not the centred input: the backward recomputes x - center (bit for bit the forward's), and a graph of
        # the backward (create_graph=True) differentiates through x; one activation-sized tensor either way
        ctx.save_for_backward(x, invstd, weight, weight_eff, offset, r, d, center)
        ctx.count = count
        # a SyncBatchNorm's count comes back from its reducer as a tensor: no gradient flows to it either
        ctx.mark_non_differentiable(mean, var, *([count] if isinstance(count, Tensor) else []))
        return y, mean, var, count

    @staticmethod
    def backward(ctx, grad_out, _gm, _gv, _gc):  # type: ignore[override]
        if ctx.small:
            return _small_backward(ctx, grad_out)
        x, invstd, weight, weight_eff, offset, r, d, center = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_out is None:  # not materialised: the output took no part in what was differentiated
            grad_out = torch.zeros_like(x)
        if torch.is_grad_enabled() or needs_composite(grad_out):
            return _composite_backward(ctx, grad_out, x, weight, r, d)
        centered = x if center is None else x - _channel_view(center, x)
        with torch.no_grad():
            return _eager_backward(ctx, grad_out, centered, invstd, weight, weight_eff, offset, r, d)


def _small_backward(ctx: Any, grad_out: Tensor | None) -> tuple[Tensor | None, ...]:
    """The backward of the small-input kernel (:func:`~bn_lightning.functional.small.small_backward`)."""
    x, weight, centered64, invstd64, scale64 = ctx.saved_tensors
    if grad_out is None:  # not materialised: the output took no part in what was differentiated
        grad_out = torch.zeros_like(x)
    if torch.is_grad_enabled() or needs_composite(grad_out):
        return _composite_backward(ctx, grad_out, x, weight, None, None)
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    with torch.no_grad():
        dx, sum_dy, sum_dy_xhat = small_backward(grad_out, centered64, invstd64, scale64, need_x)
    grad_w = sum_dy_xhat.to(weight.dtype) if need_w and weight is not None else None
    grad_b = sum_dy.to(weight.dtype if weight is not None else grad_out.dtype) if need_b else None
    return dx, grad_w, grad_b, None, None, None


def _composite_backward(
    ctx: Any, grad_out: Tensor, x: Tensor, weight: Tensor | None, r: Tensor | None, d: Tensor | None
) -> tuple[Tensor | None, ...]:
    """The backward as differentiable ops of ``x``: for double backward and for batched (``vmap``) gradients."""
    if ctx.reducer is not None:
        raise NotImplementedError(
            "SyncBatchNorm: double backward (create_graph=True) and vmap over the backward are not supported while "
            "statistics are synchronised across processes; they work for local BN (also a SyncBatchNorm without a "
            "process group)"
        )
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, grad_w, grad_b = batch_norm_backward_composite(grad_out, x, weight, ctx.eps, r, d)
    grad_x = dx.to(ctx.in_dtype) if need_x else None
    grad_w = grad_w.to(weight.dtype) if need_w and weight is not None else None
    grad_b = grad_b.to(weight.dtype if weight is not None else grad_out.dtype) if need_b else None
    return grad_x, grad_w, grad_b, None, None, None


def _eager_backward(
    ctx: Any,
    grad_out: Tensor,
    centered: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    weight_eff: Tensor | None,
    offset: Tensor | None,
    r: Tensor | None,
    d: Tensor | None,
) -> tuple[Tensor | None, ...]:
    """The hand-written backward: the closed form on the saved centred input, buffers reused (one reverse pass)."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    sum_dy, sum_dy_xhat, scratch = _grad_reductions(grad_out, centered, invstd, offset)
    # gamma/beta gradients are LOCAL sums: under DDP the gradient all-reduce adds the ranks' shares.
    grad_w = None
    if need_w and weight is not None:
        grad_w = _as_dtype(sum_dy_xhat if r is None else r * sum_dy_xhat + d * sum_dy, weight.dtype)
    grad_b = _as_dtype(sum_dy, weight.dtype if weight is not None else grad_out.dtype) if need_b else None
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


def check_batch_norm_args(x: Tensor, eps: float, batch_stats: bool) -> None:
    """Reject what ``torch.nn.functional.batch_norm`` rejects, before any buffer is touched.

    Args:
        x: the input; must be floating point.
        eps: must be positive when normalising with batch statistics, non-negative otherwise.
        batch_stats: whether batch statistics normalise (training, or no running statistics).

    Raises:
        TypeError: ``x`` is not floating point.
        ValueError: ``eps`` out of range.

    Example::

        >>> check_batch_norm_args(torch.randn(2, 3), 0.0, batch_stats=False)
        >>> check_batch_norm_args(torch.randn(2, 3), 0.0, batch_stats=True)
        Traceback (most recent call last):
        ...
        ValueError: batch_norm eps must be positive during training, but got 0.0
    """
    if not x.is_floating_point():
        raise TypeError(
            f"batch_norm expects a floating-point input (float16, bfloat16, float32, float64), got {x.dtype}"
        )
    if batch_stats and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


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
    statistics normalise and, if given, the running buffers are updated
    (:func:`~bn_lightning.functional.update_running_stats`); otherwise the running statistics normalise
    (:func:`~bn_lightning.functional.normalize`).

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
        reducer: a :class:`~bn_lightning.functional.StatsReducer` to synchronise statistics across processes
            (SyncBatchNorm).
        renorm: a :class:`~bn_lightning.functional.Renorm` correction (Batch Renormalization) for training mode;
            composes with ``reducer``.

    Returns:
        ``(y, stats)``: ``stats`` is the detached :class:`~bn_lightning.functional.BatchStats` used (merged over
        the reducer's group), or ``None`` when the running statistics were used.

    Raises:
        TypeError: ``x`` is not a floating-point tensor (checked before any buffer is touched).
        ValueError: training on a batch with a single value per channel (its variance is undefined); ``eps <= 0``
            with batch statistics or ``eps < 0`` with running statistics (the messages of
            ``torch.nn.functional.batch_norm``).
    """
    use_running = not training and running_mean is not None and running_var is not None
    check_batch_norm_args(x, eps, not use_running)
    if use_running:
        return normalize(x, running_mean, running_var, weight, bias, eps), None  # type: ignore[arg-type]
    if reducer is None and x.dim() >= 2 and x.numel() == x.shape[1] and x.shape[1] > 0:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
    if torch.compiler.is_compiling() or needs_composite(x, weight, bias):  # torch.compile, forward AD, torch.func
        return batch_norm_composite(
            x, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked, reducer, renorm
        )
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
