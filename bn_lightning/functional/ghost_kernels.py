"""Ghost BN's grouped kernels: every virtual batch at once, on the ``(G, m, C, L)`` view of an NCHW-contiguous input.

With ``G`` virtual batches of ``m`` samples each, the statistics, the affine transform and the backward of all
virtual batches run as the plain layer's kernels do on one batch (row sums and row norms combined per group, one
``addcmul`` pass with a ``(G, 1, C, 1, k)`` plane), so Ghost BN costs about what one plain BN call on the whole batch
costs instead of ``G`` calls. Per-group statistics are ``(G, C)`` tensors. Private to :mod:`bn_lightning.functional`
(:mod:`~bn_lightning.functional.ghost` calls them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bn_lightning.functional.backward import _input_grad_coefficients
from bn_lightning.functional.channels import _block_size, _plane_row, compute_dtype
from bn_lightning.functional.stats_kernels import _SECOND_PASS_MAX_RATIO, _row_length, _sums_and_sumsq


def grouped_eligible(x: Tensor, sizes: list[int]) -> bool:
    """Whether the grouped kernels serve ``x`` split into virtual batches of ``sizes``.

    CPU, NCHW-contiguous float32/float64 with rows long enough for the statistics' fast path
    (:func:`~bn_lightning.functional.stats_kernels._row_length`), and every virtual batch of one size.

    Example::

        >>> grouped_eligible(torch.randn(8, 3, 8, 8), [4, 4]), grouped_eligible(torch.randn(9, 3, 8, 8), [4, 5])
        (True, False)
    """
    if len(sizes) < 2 or len(set(sizes)) != 1 or x.device.type != "cpu":
        return False
    return x.dtype == compute_dtype(x.dtype) and _row_length(x) > 0


def _view5(t: Tensor, groups: int, k: int) -> Tensor:
    """``t`` (``(N, C, *)``, NCHW-contiguous) as ``(G, m, C, L // k, k)``."""
    n, c = t.shape[0], t.shape[1]
    return t.view(groups, n // groups, c, -1, k)


def _group_blocks(groups: int, *tensors: Tensor) -> zip:
    """Matching blocks of ``(G, m, ...)`` views along ``m``, of about one cache block of samples in all."""
    step = max(1, _block_size(tensors[0].flatten(0, 1)) // groups)
    return zip(*(t.split(step, 1) for t in tensors), strict=True)


def grouped_stats(x: Tensor, groups: int) -> tuple[Tensor, Tensor] | None:
    """Per-virtual-batch ``(mean, var)``, each ``(G, C)`` in the compute dtype, or ``None``.

    The ways of :func:`~bn_lightning.functional.stats_kernels._centered_stats`, decided for all virtual batches at
    once: uncentred when every channel of every virtual batch has ``mean^2 <= var``; else the second pass (the exact
    centred sum of squares from a second blocked read) when every one has ``mean^2 <= 64 var``. ``None`` otherwise:
    a mean that far from zero needs the centred way's offset pass, which the caller runs per virtual batch.

    Example::

        >>> x = torch.randn(8, 3, 8, 8)
        >>> mean, var = grouped_stats(x, 2)
        >>> torch.allclose(mean[1], x[4:].mean((0, 2, 3)), atol=1e-6), mean.shape
        (True, torch.Size([2, 3]))
    """
    count = x.numel() // (x.shape[1] * groups)
    sums, sumsq = _sums_and_sumsq(x, _row_length(x), groups)
    mean64 = sums / count
    mean_sq = mean64 * mean64
    var64 = (sumsq / count).sub_(mean_sq).clamp_(min=0)
    if bool((mean_sq <= var64).all()):
        return mean64.to(x.dtype), var64.to(x.dtype)
    if not bool((mean_sq <= _SECOND_PASS_MAX_RATIO * var64).all()):
        return None
    mean = mean64.to(x.dtype)
    offset64 = mean64 - mean.double()
    var = (_grouped_sumsq_about(x, mean, groups) / count).sub_(offset64.square()).clamp_(min=0)
    return mean, var.to(x.dtype)


def _grouped_sumsq_about(x: Tensor, center: Tensor, groups: int) -> Tensor:
    """Per-group, per-channel ``sum((x - center)^2)`` in float64 (``center`` is ``(G, C)``), block by block.

    As :func:`~bn_lightning.functional.stats_kernels._sumsq_about`: each block minus its centre into a block-sized
    buffer, then row-wise ``vector_norm`` on the cached buffer; nothing activation-sized is written.
    """
    row = _row_length(x)
    c = x.shape[1]
    x5 = _view5(x, groups, row)
    norms = x.new_empty(x5.shape[:-1])
    center5 = center.view(groups, 1, c, 1, 1)
    buf = None
    for block, block_norms in _group_blocks(groups, x5, norms):
        if buf is None or buf.shape != block.shape:
            buf = torch.empty(block.shape, dtype=x.dtype)
        torch.sub(block, center5, out=buf)
        torch.linalg.vector_norm(buf, dim=4, out=block_norms)
    return norms.square_().sum((1, 3), dtype=torch.float64)


def grouped_affine(x: Tensor, scale: Tensor, shift: Tensor | None, groups: int) -> Tensor:
    """``x * scale[g] + shift[g]`` per virtual batch ``g`` and channel, in one pass; ``scale``, ``shift`` ``(G, C)``.

    As :func:`~bn_lightning.functional.channels._affine`: ``torch.addcmul`` with the shift as a cached
    ``(G, 1, C, 1, k)`` plane where the rows can be cut (:func:`~bn_lightning.functional.channels._plane_row`), else
    a multiply then an in-place add per cache block.

    Example::

        >>> x, scale, shift = torch.randn(4, 3, 8, 8), torch.rand(2, 3), torch.randn(2, 3)
        >>> y = grouped_affine(x, scale, shift, 2)
        >>> torch.allclose(y[2:], x[2:] * scale[1].view(3, 1, 1) + shift[1].view(3, 1, 1))
        True
    """
    c = x.shape[1]
    y = torch.empty_like(x)
    scale5 = scale.view(groups, 1, c, 1, 1)
    k = _plane_row(x) if shift is not None else 0
    if k:
        plane = shift.view(groups, 1, c, 1, 1).expand(groups, 1, c, 1, k).contiguous()
        torch.addcmul(plane, _view5(x, groups, k), scale5, out=_view5(y, groups, k))
        return y
    length = x[:1, :1].numel()
    for x_block, y_block in _group_blocks(groups, _view5(x, groups, length), _view5(y, groups, length)):
        torch.mul(x_block, scale5, out=y_block)
        if shift is not None:
            y_block.add_(shift.view(groups, 1, c, 1, 1))
    return y


def grouped_grad_reductions(
    grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, groups: int
) -> tuple[Tensor, Tensor]:
    """Per virtual batch and channel: ``sum(dy)`` and ``sum(dy * x_hat)``, each ``(G, C)`` (``x_hat`` from ``mean``).

    As the plain backward's blocked reductions: per cache block the row sums of ``dy``, ``(x - mean) * dy`` into a
    block-sized buffer and its row sums; row partials are combined per group in float64.
    """
    n, c = x.shape[0], x.shape[1]
    m = n // groups
    rows_dy, rows_x = grad_out.view(groups, m, c, -1), x.view(groups, m, c, -1)
    part_dy, part_dy_xc = x.new_empty(groups, m, c), x.new_empty(groups, m, c)
    mean_v = mean.view(groups, 1, c, 1)
    buf = None
    for block_dy, block_x, out_dy, out_dy_xc in _group_blocks(groups, rows_dy, rows_x, part_dy, part_dy_xc):
        if buf is None or buf.shape != block_x.shape:
            buf = torch.empty(block_x.shape, dtype=x.dtype)
        torch.sum(block_dy, 3, out=out_dy)
        torch.sub(block_x, mean_v, out=buf).mul_(block_dy)
        torch.sum(buf, 3, out=out_dy_xc)
    f64 = torch.float64
    sum_dy = part_dy.sum(1, dtype=f64).to(x.dtype)
    sum_dy_xc = part_dy_xc.sum(1, dtype=f64).to(x.dtype)
    return sum_dy, sum_dy_xc * invstd


def grouped_grad_input(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    groups: int,
) -> Tensor:
    """The input gradient of every virtual batch, ``dx = dy * a + x * b + d`` with ``(G, C)`` coefficients.

    The coefficients are :func:`~bn_lightning.functional.backward.grad_input`'s (with the centre at zero and the
    offset the mean); two ``addcmul`` passes per cache block, ``d`` as a cached plane where the rows can be cut.
    """
    c = x.shape[1]
    count = x.numel() // (c * groups)
    a, b, d = _input_grad_coefficients(invstd, weight, sum_dy, sum_dy_xhat, count, mean)
    a5, b5, d5 = (t.expand(groups, c).reshape(groups, 1, c, 1, 1) for t in (a, b, d))
    dx = torch.empty_like(x)
    k = _plane_row(x)
    views = [_view5(t, groups, k or x[:1, :1].numel()) for t in (grad_out, x, dx)]
    if k:  # d as a cached plane: addcmul's vectorised loop then takes one broadcast operand (see _affine)
        d5 = d5.expand(groups, 1, c, 1, k).contiguous()
        for dy_block, x_block, dx_block in _group_blocks(groups, *views):
            torch.addcmul(d5, x_block, b5, out=dx_block).addcmul_(dy_block, a5)
        return dx
    for dy_block, x_block, dx_block in _group_blocks(groups, *views):
        torch.mul(dy_block, a5, out=dx_block).addcmul_(x_block, b5).add_(d5)
    return dx
