"""The training kernel for small inputs: few ops, all in float64.

Below :data:`SMALL_VALUES` values (an MLP's ``(64, 128)`` activations, the last stages of small CNNs) the cost of a
BN call is its op count, not its passes over memory: the blocked float32 kernels of
:mod:`~bn_lightning.functional.stats_kernels` and :mod:`~bn_lightning.functional.backward` spend 60-85 ATen calls on
a forward and backward. Here the batch is centred on its float64 mean (``x - mean`` in float64 by type promotion:
exact for float32 input) and the forward and the backward are the textbook formulas on whole tensors, about a dozen
ops each way; results are rounded once, at the end, so they are at least as accurate as the large-input kernels'.
The formulas are written out rather than taken from the core's affine transform and closed-form backward: those
carry the path checks and per-channel coefficient ops this kernel exists to remove (docs/benchmarks.md has the A/B).
Private to :mod:`bn_lightning.functional`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bn_lightning.functional.channels import _channel_view, _is_compiling, compute_dtype, reduce_dims

SMALL_VALUES = 1 << 13  # inputs of up to this many values take this kernel (CPU, float32/float64)


def small_eligible(x: Tensor) -> bool:
    """Whether :func:`small_forward` serves ``x``: a non-empty CPU float32/float64 input of at most 8K values.

    Example::

        >>> small_eligible(torch.randn(64, 128)), small_eligible(torch.randn(64, 64, 8, 8))
        (True, False)
    """
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or _is_compiling():
        return False
    return 0 < x.numel() <= SMALL_VALUES and x.dim() >= 2


def small_forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Training-mode BN of a small ``x``: ``(y, mean, var, centered, invstd, scale)``.

    ``y`` has ``x``'s dtype and memory format; ``mean`` and ``var`` (biased) are ``(C,)`` in the compute dtype;
    ``centered`` (``x - mean``), ``invstd`` and ``scale`` (``invstd * weight``, broadcastable views) are the float64
    tensors :func:`small_backward` takes.

    Example::

        >>> x = torch.randn(16, 3) * 4 + 100
        >>> y, mean, var, *_ = small_forward(x, None, None, 1e-5)
        >>> torch.allclose(y, torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-5)
        True
    """
    f64 = torch.float64
    dims = reduce_dims(x)
    mean = x.mean(dims, keepdim=True, dtype=f64)
    centered = x - mean  # float64 (type promotion): exact for a float32 x
    var = centered.square().mean(dims, keepdim=True)
    invstd = (var + eps).rsqrt_()
    scale = invstd if weight is None else invstd * _channel_view(weight, x)
    y = centered * scale if bias is None else torch.addcmul(_channel_view(bias, x), centered, scale)
    dtype = compute_dtype(x.dtype)
    return y.to(x.dtype), mean.view(-1).to(dtype), var.view(-1).to(dtype), centered, invstd, scale


def small_backward(
    grad_out: Tensor, centered: Tensor, invstd: Tensor, scale: Tensor, need_x: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    """The backward of :func:`small_forward`: ``(dx, sum_dy, sum_dy_xhat)``, the sums ``(C,)`` in float64.

    ``dx = scale * (dy - sum(dy) / n - (x - mean) * invstd^2 * sum(dy * (x - mean)) / n)``, in ``grad_out``'s dtype
    (``None`` unless ``need_x``).

    Example::

        >>> x = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
        >>> dy = torch.randn(16, 3, dtype=torch.float64)
        >>> _, _, _, centered, invstd, scale = small_forward(x.detach(), None, None, 1e-5)
        >>> dx, _, _ = small_backward(dy, centered, invstd, scale, True)
        >>> ref, = torch.autograd.grad(torch.nn.functional.batch_norm(x, None, None, training=True), x, dy)
        >>> torch.allclose(dx, ref)
        True
    """
    dims = reduce_dims(grad_out)
    count = centered.numel() // centered.shape[1]
    sum_dy = grad_out.sum(dims, keepdim=True, dtype=torch.float64)
    sum_dy_xc = (grad_out * centered).sum(dims, keepdim=True)  # float64 by type promotion, as below
    dx = None
    if need_x:
        k = sum_dy_xc * invstd.square().div_(count)
        dx = torch.sub(grad_out, sum_dy, alpha=1.0 / count).addcmul_(centered, k, value=-1).mul_(scale)
        dx = dx.to(grad_out.dtype)
    return dx, sum_dy.view(-1), (sum_dy_xc * invstd).view(-1)
