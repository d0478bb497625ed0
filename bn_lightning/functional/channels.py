"""Per-channel plumbing shared by the kernels.

The reduced dims, the compute dtype, broadcasting views, cache blocking along the batch, and the per-channel affine
transform ``x * scale + shift`` that both the training and the eval forward end with.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


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


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, skipping the call when ``t`` already has that dtype (its fixed cost adds up on small inputs)."""
    return t if t.dtype == dtype else t.to(dtype)


def _channel_view(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-channel ``(C,)`` tensor so that it broadcasts against ``x`` of shape ``(N, C, *)``."""
    return t.view((1, -1) + (1,) * (x.dim() - 2))


def _is_compiling() -> bool:
    """Whether ``torch.compile`` is tracing this code: then no path may depend on a value read back to the host."""
    check = getattr(torch.compiler, "is_compiling", None)
    return bool(check()) if check is not None else False


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


def _scale_shift(
    invstd: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Fold ``(x - mean) * invstd * weight + bias`` into ``x * scale + shift`` (all per channel)."""
    scale = invstd if weight is None else invstd * _as_dtype(weight, invstd.dtype)
    shift = None if bias is None else _as_dtype(bias, invstd.dtype)
    if mean is not None:
        shift = -mean * scale if shift is None else torch.addcmul(shift, mean, scale, value=-1)
    return scale, shift


_SMALL_AFFINE = 1 << 14  # inputs of up to this many values: one addcmul whatever the layout (no plane to build)
_PLANE_VALUES = 1 << 16  # values in the shift plane of :func:`_affine`: 256 KB in float32, resident in L2
_MIN_PLANE_ROW = 16  # shortest rows the plane may cut a channel's values into (shorter: vector loops too short)


def _plane_row(x: Tensor) -> int:
    """Length ``k`` of the rows :func:`_affine` cuts each ``(n, c)`` slice of an NCHW-contiguous ``x`` into (0: none).

    ``k`` divides the slice length ``L = prod(*)``, keeps the ``(C, k)`` shift plane within :data:`_PLANE_VALUES`
    (or ``L`` itself when that is short) and leaves the plane read at least four times per call.
    """
    n, c = x.shape[0], x.shape[1]
    length = x.numel() // (n * c) if n * c else 0
    if x.dim() < 3 or length == 0 or not x.is_contiguous():
        return 0
    cap = max(_MIN_PLANE_ROW, _PLANE_VALUES // c)
    k = length if length <= cap else next((d for d in range(cap, _MIN_PLANE_ROW - 1, -1) if length % d == 0), 0)
    return k if k and x.numel() >= 4 * c * k else 0


def _affine(
    x: Tensor, scale: Tensor, shift: Tensor | None, out_dtype: torch.dtype, out: Tensor | None = None
) -> Tensor:
    """``x * scale + shift`` (per channel), returned in ``out_dtype``; written into ``out`` (a free buffer) if given.

    One pass over ``x`` (``torch.addcmul``) wherever ATen's vectorised CPU loop can run it. That loop takes at most
    one operand that is constant along the innermost dimension: in a channels-last (or ``(N, C)``) input the
    channels are innermost and the per-channel vectors are ordinary operands; in an NCHW-contiguous one both would
    be constant along the rows, so the shift becomes a small ``(C, k)`` plane (each channel's value repeated ``k``
    times, :func:`_plane_row`) that every ``k``-long row of ``x`` reads from cache. Inputs of at most
    :data:`_SMALL_AFFINE` values take one ``addcmul`` whatever their layout. Elsewhere (a mixed dtype, a
    slice too short or too long to cut) a multiply then an in-place add, block by block along the batch so that the
    add finds each block in cache. Reusing a dead activation-sized buffer avoids first-touch page faults on a fresh
    allocation.
    """
    if out is not None and (out.dtype != x.dtype or out.shape != x.shape):
        out = None
    scale_v = _channel_view(scale, x)
    if shift is None:
        y = x * scale_v if out is None else torch.mul(x, scale_v, out=out)
        return y if y.dtype == out_dtype else y.to(out_dtype)
    shift_v = _channel_view(shift, x)
    if x.dtype == scale.dtype == shift.dtype:
        small = x.numel() <= _SMALL_AFFINE  # the plane costs more than the scalar loop saves
        if small or x.device.type != "cpu" or x.dim() == 2 or _channels_innermost(x):
            y = torch.addcmul(shift_v, x, scale_v) if out is None else torch.addcmul(shift_v, x, scale_v, out=out)
            return y if y.dtype == out_dtype else y.to(out_dtype)
        k = _plane_row(x)
        if k:
            n, c = x.shape[0], x.shape[1]
            rows = (n, c, x.numel() // (n * c * k), k)
            plane = shift.view(c, 1).expand(c, k).contiguous().view(1, c, 1, k)
            y = torch.empty_like(x) if out is None else out
            torch.addcmul(plane, x.view(rows), scale.view(1, c, 1, 1), out=y.view(rows))
            return y if y.dtype == out_dtype else y.to(out_dtype)
    step = _block_size(x) if x.dtype == scale.dtype else x.shape[0]
    if step < x.shape[0]:  # multiply and add block by block: the add finds the block in cache
        y = torch.empty_like(x) if out is None else out
        for x_block, y_block in _split(step, x, y):
            torch.mul(x_block, scale_v, out=y_block).add_(shift_v)
    else:
        y = x * scale_v if out is None else torch.mul(x, scale_v, out=out)
        y.add_(shift_v)
    return y if y.dtype == out_dtype else y.to(out_dtype)


def _channels_innermost(x: Tensor) -> bool:
    """Whether ``x`` (``(N, C, *)``) is laid out channels-last: its ``(N * prod(*), C)`` matrix is row-major."""
    return x.dim() > 2 and x.stride(1) == 1 and x.permute(0, *range(2, x.dim()), 1).is_contiguous()
