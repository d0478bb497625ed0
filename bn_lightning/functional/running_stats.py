"""Running statistics: their update in training (torch's semantics) and the inference-time transform that uses them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bn_lightning.functional.channels import _affine, _as_dtype, _channel_view, _scale_shift, compute_dtype, reduce_dims
from bn_lightning.functional.compiled import _compiled_affine
from bn_lightning.functional.composite import batch_norm_composite, needs_composite, normalize_backward_composite
from bn_lightning.functional.stats import BatchStats, _host_count


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
        stats: the batch's :class:`~bn_lightning.functional.BatchStats` (biased variance).
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
                        buf.mul_(1 - factor).add_(_as_dtype(value, buf.dtype), alpha=alpha)
                return
            unbiased = stats.var * bessel
        for buf, value in ((running_mean, stats.mean), (running_var, unbiased)):
            if buf is None:
                continue
            f = factor.to(buf.dtype) if isinstance(factor, Tensor) else factor
            new = buf * (1 - f) + value.to(buf.dtype) * f
            buf.copy_(new if keep is None else torch.where(keep, new, buf))


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
    if needs_composite(x, weight, bias):  # forward-mode AD, torch.func transforms
        return batch_norm_composite(x, mean, var, weight, bias, False, None, eps)[0]
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _eval_forward(x, mean, var, weight, bias, eps)[0]  # inference: no graph, nothing saved
    return _BatchNormEvalFn.apply(x, mean, var, weight, bias, eps)


def _eval_forward(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor]:
    """``(y, invstd)``: the inference transform ``x * scale + shift``, ``scale`` and ``shift`` folded per channel."""
    dtype = compute_dtype(x.dtype)
    invstd = torch.rsqrt(_as_dtype(var, dtype) + eps)
    scale, shift = _scale_shift(invstd, weight, bias, _as_dtype(mean, dtype))
    if x.dtype == dtype and shift is not None:
        y = _compiled_affine(x, scale, shift)  # None unless the compiled kernel is chosen and available
        if y is not None:
            return y, invstd
    return _affine(x, scale, shift, x.dtype), invstd


class _BatchNormEvalFn(torch.autograd.Function):
    """Running-statistics BN: ``y = x * scale + shift`` in one pass, with a hand-written backward."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, eps):  # type: ignore[override]
        y, invstd = _eval_forward(x, mean, var, weight, bias, eps)
        ctx.save_for_backward(x, mean, invstd, weight)
        return y

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, mean, invstd, weight = ctx.saved_tensors
        need_x, _, _, need_w, need_b = ctx.needs_input_grad[:5]
        if torch.is_grad_enabled() or needs_composite(grad_out):  # double backward; vmap over the backward
            dx, dw, db = normalize_backward_composite(grad_out, x, mean, invstd, weight)
            return (
                dx.to(grad_out.dtype) if need_x else None,
                None,
                None,
                dw.to(weight.dtype) if need_w else None,
                db.to(weight.dtype if weight is not None else grad_out.dtype) if need_b else None,
                None,
            )
        with torch.no_grad():
            return _eval_backward(ctx, grad_out, x, mean, invstd, weight)


def _eval_backward(
    ctx: Any, grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None
) -> tuple[Tensor | None, ...]:
    """The hand-written eval backward: ``dx = dy * scale``, the two per-channel sums for gamma and beta."""
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
