"""The kernel choice (:func:`set_kernel` / :func:`get_kernel`) and the opt-in compiled kernel.

The compiled kernel runs the BN math (batch statistics from one read of the input, exact for large means; the
closed-form backward; the eval transform) through ``torch.compile``, which fuses each into one or two loops over the
data. It is built on first use, with symbolic sizes (one graph for every batch size and shape of two or more in each
dimension); if compiling fails, a warning is given once and the eager kernel runs from then on. Inside a model that
``torch.compile`` traces, neither kernel runs: the layers take the composite path
(:mod:`~bn_lightning.functional.composite`), which the model's own graph compiles and fuses.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from bn_lightning.functional.channels import _is_compiling
from bn_lightning.functional.stats import Renorm, StatsReducer

KERNELS = ("eager", "compiled")
_ENV_VAR = "BN_LIGHTNING_KERNEL"
_chosen: str | None = None  # set_kernel's choice; None: the environment variable decides, read on each use
_warned_env_values: set[str] = set()  # invalid values of the environment variable already warned about
_compiled_pair: tuple[Callable[..., Any], ...] | None = None
_compiled_broken = False


def set_kernel(name: str) -> None:
    """Choose how training-mode local BN runs: ``"eager"`` (default) or ``"compiled"``.

    ``"eager"`` composes ATen ops (the functions of :mod:`bn_lightning.functional`). ``"compiled"`` runs the same
    math — batch statistics exact for large means, the closed-form backward — through ``torch.compile``, which fuses
    each into one or two loops over the data (``scripts/bench_layers.py --kernel compiled``; figures in
    ``docs/benchmarks.md``). The first call compiles (tens of seconds on 2 cores with an empty Inductor cache, a few
    with a warm one: ``docs/compile.md``; a C++ compiler is needed on CPU); its graphs have symbolic sizes, so
    every batch size and layer shape reuses them. A size of 1 (batch size 1, a 1x1 feature map), another memory
    format or another number of dimensions compiles once more. If compiling fails, a warning is given once and the
    eager kernel is used.
    Applies to float32/float64 inputs of plain local BN in training and to the eval-mode transform; SyncBatchNorm's
    and Batch Renorm's training and autocast half-precision inputs always run eager. Without a call, the
    environment variable ``BN_LIGHTNING_KERNEL`` decides (see :func:`get_kernel`).

    Args:
        name: ``"eager"`` or ``"compiled"``.

    Raises:
        ValueError: an unknown name.

    Example::

        >>> set_kernel("eager"); get_kernel()
        'eager'
    """
    global _chosen
    if name not in KERNELS:
        raise ValueError(f"unknown BN kernel {name!r}; expected one of {KERNELS}")
    _chosen = name


def get_kernel() -> str:
    """The kernel local training-mode BN runs: ``"eager"`` or ``"compiled"``.

    The choice of :func:`set_kernel` if one was made; else the environment variable ``BN_LIGHTNING_KERNEL``, read on
    each call (unset or empty: ``"eager"``; any other value than the two names warns once and means ``"eager"``).
    Code traced by ``torch.compile`` keeps the kernel it was traced with.

    Example::

        >>> get_kernel() in KERNELS
        True
    """
    if _chosen is not None:
        return _chosen
    name = os.environ.get(_ENV_VAR, "eager") or "eager"
    if name in KERNELS:
        return name
    if name not in _warned_env_values:
        _warned_env_values.add(name)
        warnings.warn(
            f"{_ENV_VAR}={name!r} is not one of {KERNELS}; using the eager kernel", RuntimeWarning, stacklevel=2
        )
    return "eager"


def _channel_sums(t: Tensor, per_sample: bool = True) -> Tensor:
    """Per-channel sums of ``t`` (``N, C, *``), in two levels (``per_sample``) or in one reduction.

    Two levels, first over each sample's positions and then over the samples, give Inductor (CPU) one loop nest that
    reads ``t`` once with short float32 partial sums, in NCHW and channels_last alike; the one reduction is faster
    for a backward in NCHW (measured with ``scripts/bench_layers.py --kernel compiled``).
    """
    if not per_sample or t.dim() == 2:
        return t.sum((0, *range(2, t.dim())))
    return t.sum(tuple(range(2, t.dim()))).sum(0)


def _fused_forward(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training-mode BN forward for ``torch.compile``: ``(y, center, offset, var, invstd)``.

    The mean is ``center + offset`` (backward needs both parts): ``center`` is the first sample's per-channel mean,
    ``offset`` the mean of ``x - center`` over the batch, and the variance the mean of ``(x - center)^2`` less
    ``offset^2`` (the shifted-data formula). Both sums come from one read of ``x``; a second computes ``y``.

    Accuracy: ``center`` is exact in float32 however large the mean is (no ``E[x^2] - E[x]^2`` cancellation of a
    large mean), and ``offset`` is small: the batch variance holds the spread of the sample means, so
    ``offset^2 <= N * var``, and the subtraction loses at most ``log10(N + 1)`` digits, only when all of the
    variance is the first sample's distance from the others (for independent values ``offset^2 ~ var / (H * W)``).
    Accumulation is float32 (float64 accumulators made the compiled loops 2x slower on CPU).
    """
    view = (1, -1) + (1,) * (x.dim() - 2)
    n = x.numel() // x.shape[1]
    center = x[0].reshape(x.shape[1], -1).mean(1)
    centered = x - center.view(view)
    offset = _channel_sums(centered) / n
    var = (_channel_sums(centered * centered) / n - offset * offset).clamp(min=0)
    invstd = torch.rsqrt(var + eps)
    scale = invstd * weight
    y = (centered - offset.view(view)) * scale.view(view) + bias.view(view)
    return y, center, offset, var, invstd


def _fused_backward(
    grad_out: Tensor, x: Tensor, center: Tensor, offset: Tensor, invstd: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form BN backward for ``torch.compile``: ``(dx, sum(dy * x_hat), sum(dy))``.

    Compiled into one reduction loop over ``dy`` and ``x`` and one elementwise loop for ``dx``. ``grad_out`` is in
    ``x``'s layout (its caller makes it so).
    """
    view = (1, -1) + (1,) * (x.dim() - 2)
    n = x.numel() // x.shape[1]
    per_sample = not x.is_contiguous()  # channels_last: see _channel_sums
    centered = (x - center.view(view)) - offset.view(view)
    sum_dy = _channel_sums(grad_out, per_sample)
    sum_dy_xhat = _channel_sums(grad_out * centered, per_sample) * invstd
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
        get_kernel() == "compiled"
        and not _compiled_broken
        and not _is_compiling()  # inside a compiled model the whole graph is compiled: no kernel of its own
        and reducer is None
        and renorm is None
        and x.dtype in (torch.float32, torch.float64)
        and x.dim() >= 2
        and x.numel() > x.shape[1]  # two or more values per channel (the eager path raises or handles the rest)
    )


def _dynamic_sizes(t: Tensor) -> Tensor:
    """An alias of ``t`` whose sizes ``torch.compile`` traces as symbolic: one graph for every batch size and shape.

    Symbolic from the first call: no second compile when the batch size first changes (Dynamo's automatic dynamic
    shapes), and none per channel count, of which a network can have more than Dynamo compiles per function
    (``torch._dynamo.config.recompile_limit``, 8; beyond it the function runs uncompiled). The mark is an attribute
    of the tensor object, so it goes on a fresh alias, never on the caller's tensor (which the caller may pass to a
    ``torch.compile`` of its own). A size of 0 or 1 still gets a graph of its own (Dynamo specialises them), and so
    does each memory format (strides are part of a graph).
    """
    alias = t.detach()
    torch._dynamo.maybe_mark_dynamic(alias, list(range(t.dim())))
    return alias


def _run_compiled(fn_index: int, *args: object) -> Any:
    """Call a compiled kernel; ``None`` (after one warning, for good) if compiling fails.

    Every tensor argument is passed with symbolic sizes (the per-channel ones too: their size is the channel count).
    """
    global _compiled_broken
    args = tuple(_dynamic_sizes(a) if isinstance(a, Tensor) else a for a in args)
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


def _compiled_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor | None:
    """Eval-mode BN through the compiled kernel: one fused loop instead of a multiply and an add.

    ``None`` when the eager kernel runs instead (not chosen, or compiling failed).
    """
    if get_kernel() != "compiled" or _compiled_broken or _is_compiling():
        return None
    return _run_compiled(2, x, scale, shift)


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
