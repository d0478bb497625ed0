"""BN in plain differentiable ATen ops: the path for higher-order, forward-mode and functorch autograd.

The eager kernels (:mod:`~bn_lightning.functional.batchnorm`) run through autograd Functions with hand-written,
buffer-reusing backwards: fast, but a hand-written backward is opaque to what autograd does beyond one reverse pass.
This module states the SAME formulas (two-pass statistics in the compute dtype, the biased variance to normalise, the
running statistics updated by :func:`~bn_lightning.functional.update_running_stats` with torch's semantics) as a
composition of ordinary differentiable ops, so that autograd derives everything else:

- :func:`batch_norm_composite`: the forward of a BN layer, same signature and result as
  :func:`~bn_lightning.functional.batch_norm_with_stats`; used for forward-mode AD (dual tensors,
  ``torch.func.jvp``), inside ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``, ...) and by ``torch.compile``;
- :func:`batch_norm_backward_composite` / :func:`normalize_backward_composite`: the backward of the training / eval
  transform as differentiable ops of the saved input; the Functions' backwards run them when a graph of the backward
  is asked for (``create_graph=True``: gradient penalties such as WGAN-GP and R1, MAML) or when the incoming gradient
  is batched (``vmap`` over the backward, i.e. batched gradients), so double backward matches torch's;
- :func:`needs_composite`: whether tensors carry a forward-mode tangent or are wrapped by a ``torch.func`` transform.

Synchronised statistics (a :class:`~bn_lightning.functional.StatsReducer`) have no composite form: their gradient
runs a collective inside the hand-written backward.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from bn_lightning.functional.channels import _channel_view, _is_compiling, compute_dtype, reduce_dims
from bn_lightning.functional.stats import BatchStats, Renorm, StatsReducer

__all__ = ["batch_norm_backward_composite", "batch_norm_composite", "needs_composite", "normalize_backward_composite"]


def needs_composite(*tensors: Tensor | None) -> bool:
    """Whether any tensor is a forward-mode dual tensor or is wrapped by a ``torch.func`` transform (or ``vmap``).

    The legacy ``torch._vmap_internals`` batching, which ``torch.autograd.gradcheck(check_batched_grad=True)``
    uses, counts too.

    Such tensors cannot go through the hand-written autograd Functions; :func:`batch_norm_composite` serves them.
    Always ``False`` while ``torch.compile`` traces (the compiled graph takes its path where it dispatches).

    Example::

        >>> import torch.autograd.forward_ad as fwAD
        >>> x = torch.randn(4, 3)
        >>> needs_composite(x)
        False
        >>> with fwAD.dual_level():
        ...     needs_composite(fwAD.make_dual(x, torch.ones_like(x)))
        True
    """
    if _is_compiling():
        return False
    present = [t for t in tensors if t is not None]
    functorch = torch._C._functorch
    if any(functorch.is_functorch_wrapped_tensor(t) or functorch.is_legacy_batchedtensor(t) for t in present):
        return True
    return forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in present)


def _count(x: Tensor) -> int:
    """Values per channel of ``x`` (``N * prod(*)``), 0 for an empty batch."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


def _train_stats(xc: Tensor, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable per-channel ``(mean, biased var, x - mean)`` of ``xc`` (compute dtype); zeros when empty."""
    dims = reduce_dims(xc)
    denom = max(count, 1)
    mean = xc.sum(dims) / denom
    centered = xc - _channel_view(mean, xc)
    var = centered.square().sum(dims) / denom
    return mean, var, centered


def _renorm_affine(
    mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, renorm: Renorm | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The effective affine ``(gamma * r, beta + gamma * d)`` and the constants ``(r, d)`` (``None`` without renorm)."""
    dtype = mean.dtype
    w = None if weight is None else weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    if renorm is None:
        return w, b, None, None
    with torch.no_grad():  # r and d are constants of the step (Ioffe, 2017)
        sigma_r = torch.sqrt(renorm.running_var.to(dtype) + eps)
        r = (torch.sqrt(var.detach() + eps) / sigma_r).clamp(1 / renorm.r_max, renorm.r_max)
        d = ((mean.detach() - renorm.running_mean.to(dtype)) / sigma_r).clamp(-renorm.d_max, renorm.d_max)
    gamma = torch.ones_like(r) if w is None else w
    return gamma * r, (gamma * d if b is None else b + gamma * d), r, d


def _affine_composite(t: Tensor, scale: Tensor | None, shift: Tensor | None) -> Tensor:
    """``t * scale + shift`` per channel, ``None`` meaning 1 and 0."""
    if scale is not None:
        t = t * _channel_view(scale, t)
    if shift is not None:
        t = t + _channel_view(shift, t)
    return t


def batch_norm_composite(
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
    """:func:`~bn_lightning.functional.batch_norm_with_stats` in plain differentiable ops.

    Same arguments and result: ``(y, stats)`` with ``stats`` the detached batch statistics (``None`` when the running
    statistics normalised), the running buffers updated in place exactly as torch does. Statistics are computed in
    float32 (float64 for float64 inputs) and ``y`` keeps ``x``'s dtype and memory format. Autograd differentiates it
    to any order, in reverse and forward mode, and ``torch.func`` transforms it like any composite op.

    Running statistics cannot be updated from inside ``torch.func.vmap`` or ``torch.func.jvp``/``grad`` over a
    captured module (the buffers are not batched / not inputs), as with ``torch.nn``'s BN: use eval mode,
    ``track_running_stats=False`` or ``torch.func.functional_call``/``replace_all_batch_norm_modules_``.

    Args:
        x: ``(N, C, *)`` floating-point input.
        running_mean: ``(C,)`` buffer or ``None``.
        running_var: ``(C,)`` buffer or ``None``.
        weight: gamma ``(C,)`` or ``None``.
        bias: beta ``(C,)`` or ``None``.
        training: normalise with batch statistics and update the buffers.
        momentum: exponential-average factor, ``None`` for a cumulative average.
        eps: added to the variance.
        num_batches_tracked: counter buffer, incremented with each update.
        reducer: must be ``None``: synchronised statistics have no composite form.
        renorm: a :class:`~bn_lightning.functional.Renorm` correction (``r`` and ``d`` constants, as in eager).

    Returns:
        ``(y, stats)``.

    Raises:
        NotImplementedError: a ``reducer`` was given.
        RuntimeError: the running statistics cannot be updated under the active ``torch.func`` transform.

    Example::

        >>> x = torch.randn(8, 3, 4, 4, dtype=torch.float64, requires_grad=True)
        >>> y, stats = batch_norm_composite(x, None, None, training=True)
        >>> ref = torch.nn.functional.batch_norm(x, None, None, training=True)
        >>> torch.allclose(y, ref)
        True
        >>> g, = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)  # a graph of the gradient
        >>> g.requires_grad
        True
    """
    if reducer is not None:
        raise NotImplementedError(
            "batch_norm_composite: synchronised statistics (a StatsReducer, e.g. a distributed SyncBatchNorm) have "
            "no composite form; run them through batch_norm_with_stats"
        )
    dtype = compute_dtype(x.dtype)
    if not training and running_mean is not None and running_var is not None:
        invstd = torch.rsqrt(running_var.to(dtype) + eps)
        scale = invstd if weight is None else invstd * weight.to(dtype)
        shift = None if bias is None else bias.to(dtype)
        y = _affine_composite(x.to(dtype) - _channel_view(running_mean.to(dtype), x), scale, shift)
        return y.to(x.dtype), None
    count = _count(x)
    mean, var, centered = _train_stats(x.to(dtype), count)
    w_eff, b_eff, _, _ = _renorm_affine(mean, var, weight, bias, eps, renorm)
    y = _affine_composite(centered * _channel_view(torch.rsqrt(var + eps), centered), w_eff, b_eff).to(x.dtype)
    stats = BatchStats(mean.detach(), var.detach(), count)
    if training and (running_mean is not None or running_var is not None):
        from bn_lightning.functional.running_stats import update_running_stats  # it imports this module

        try:
            update_running_stats(running_mean, running_var, stats, momentum, num_batches_tracked)
        except RuntimeError as err:
            raise RuntimeError(
                "BatchNorm: the running statistics cannot be updated in place under this torch.func transform (nor "
                "can torch.nn's BatchNorm's): use eval mode, track_running_stats=False, or pass the buffers as "
                "inputs (torch.func.functional_call, torch.func.replace_all_batch_norm_modules_)"
            ) from err
    return y, stats


def batch_norm_backward_composite(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor | None,
    eps: float,
    r: Tensor | None = None,
    d: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The training-mode BN backward as differentiable ops of ``x``: ``(dx, dgamma, dbeta)``.

    ``x_hat = (x - mean) * invstd`` with ``mean`` and ``invstd`` recomputed from ``x``, then
    ``dx = gamma_eff * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))``, ``dgamma = sum(dy * x_hat)`` (Batch
    Renorm: ``r * sum(dy * x_hat) + d * sum(dy)`` with ``gamma_eff = gamma * r``) and ``dbeta = sum(dy)``. Autograd
    differentiates the result again (double backward) and ``torch.func.vmap`` batches it over ``grad_out``.

    Args:
        grad_out: ``dy``, shaped like ``x``.
        x: the forward's input.
        weight: gamma or ``None``.
        eps: the forward's ``eps``.
        r: Batch Renorm's ``r`` (a constant), or ``None``.
        d: Batch Renorm's ``d`` (a constant), or ``None``.

    Returns:
        ``(dx, dgamma, dbeta)`` in the compute dtype (``dx`` in ``x``'s layout).

    Example::

        >>> x = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
        >>> dy = torch.randn(6, 2, dtype=torch.float64)
        >>> y = torch.nn.functional.batch_norm(x, None, None, training=True)
        >>> dx, _, _ = batch_norm_backward_composite(dy, x, None, 1e-5)
        >>> torch.allclose(dx, torch.autograd.grad(y, x, dy)[0])
        True
    """
    dtype = compute_dtype(x.dtype)
    count = _count(x)
    _, var, centered = _train_stats(x.to(dtype), count)
    invstd = torch.rsqrt(var + eps)
    x_hat = centered * _channel_view(invstd, centered)
    dy = grad_out.to(dtype)
    dims = reduce_dims(x)
    sum_dy = dy.sum(dims)
    sum_dy_xhat = (dy * x_hat).sum(dims)
    gamma = invstd if weight is None else invstd * weight.to(dtype)
    if r is not None:
        gamma = gamma * r
    denom = max(count, 1)
    inner = dy - _channel_view(sum_dy / denom, dy) - x_hat * _channel_view(sum_dy_xhat / denom, dy)
    dx = inner * _channel_view(gamma, inner)
    grad_w = sum_dy_xhat if r is None or d is None else r * sum_dy_xhat + d * sum_dy
    return dx, grad_w, sum_dy


def normalize_backward_composite(
    grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The eval-mode (given statistics) BN backward as differentiable ops: ``(dx, dgamma, dbeta)``.

    ``dx = dy * gamma * invstd``, ``dgamma = sum(dy * (x - mean)) * invstd``, ``dbeta = sum(dy)``; ``mean`` and
    ``invstd`` are constants.

    Args:
        grad_out: ``dy``, shaped like ``x``.
        x: the forward's input.
        mean: ``(C,)`` statistics the forward normalised with.
        invstd: ``(C,)`` ``1 / sqrt(var + eps)`` in the compute dtype.
        weight: gamma or ``None``.

    Returns:
        ``(dx, dgamma, dbeta)`` in the compute dtype.

    Example::

        >>> x, dy = torch.randn(4, 3), torch.randn(4, 3)
        >>> dx, dw, db = normalize_backward_composite(dy, x, torch.zeros(3), torch.ones(3), None)
        >>> torch.equal(dx, dy), torch.allclose(db, dy.sum(0))
        (True, True)
    """
    dtype = invstd.dtype
    dims = reduce_dims(x)
    dy = grad_out.to(dtype)
    scale = invstd if weight is None else invstd * weight.to(dtype)
    dx = dy * _channel_view(scale, dy)
    centered = x.to(dtype) - _channel_view(mean.to(dtype), x)
    grad_w = (dy * centered).sum(dims) * invstd
    return dx, grad_w, dy.sum(dims)
