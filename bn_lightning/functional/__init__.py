"""The BatchNorm math, in one place.

Every layer of bn_lightning (plain, sync, ghost, renorm, frozen) calls these functions; nobody re-derives the
formulas. The four classic steps of batch normalisation, for an input ``x`` of shape ``(N, C, *)`` and per-channel
statistics over the ``n = N * prod(*)`` values of each channel:

1. batch statistics: ``mu = sum(x) / n`` and the biased variance ``var = sum((x - mu)^2) / n``;
2. normalise, scale and shift: ``y = (x - mu) / sqrt(var + eps) * gamma + beta``;
3. back-propagate through the normalisation (closed form, see :func:`grad_input`)::

       x_hat = (x - mu) / sqrt(var + eps)
       dbeta = sum(dy)                      dgamma = sum(dy * x_hat)
       dx = gamma / sqrt(var + eps) * (dy - sum(dy) / n - x_hat * sum(dy * x_hat) / n)

4. at inference, normalise with running statistics, which training updates as exponential averages (the
   running variance from the UNBIASED batch variance ``var * n / (n - 1)``), exactly as ``torch.nn`` does.

What this package provides:

- :class:`BatchStats`, :func:`batch_stats`, :func:`merge_stats`: per-channel statistics, and their exact
  combination across chunks or ranks (Chan et al.), numerically stable for large means;
- :func:`normalize`: the inference-time transform with given (running) statistics, one pass;
- :func:`grad_reductions` and :func:`grad_input`: the backward's two per-channel sums and the input gradient, kept
  apart because SyncBatchNorm all-reduces exactly those sums;
- :func:`update_running_stats`: the running-statistics update with torch's semantics (``momentum=None`` is a
  cumulative average; ``num_batches_tracked``);
- :func:`batch_norm` / :func:`batch_norm_with_stats`: the full forward of a BN layer, differentiable through a
  :class:`torch.autograd.Function` with a hand-written backward, with an optional :class:`StatsReducer` that
  synchronises statistics (one collective forward, one backward);
- :func:`batch_norm_composite` (and the backward's :func:`batch_norm_backward_composite`,
  :func:`normalize_backward_composite`): the same formulas in plain differentiable ops, which double backward
  (``create_graph=True``), forward-mode AD and ``torch.func`` transforms (``vmap``, ``jvp``, ``grad``) run through;
  :func:`needs_composite` tells when; :func:`check_batch_norm_args` rejects what ``torch.nn.functional.batch_norm``
  rejects (non-floating inputs, ``eps <= 0`` in training);
- :func:`ghost_batch_norm_with_stats`: Ghost BN's training forward (each virtual batch normalised with its own
  statistics, the running statistics updated once per virtual batch) in one autograd Function;
- :func:`set_kernel` / :func:`get_kernel`: run local training-mode BN through the default ``"eager"`` kernel (ATen
  ops) or the opt-in ``"compiled"`` one (the same formulas fused by ``torch.compile``).

Where it lives: :mod:`~bn_lightning.functional.stats` (the types, computing and merging statistics; its eager
kernels in :mod:`~bn_lightning.functional.stats_kernels`), :mod:`~bn_lightning.functional.backward` (the
closed-form backward), :mod:`~bn_lightning.functional.small` (the training kernel for inputs of up to 8K values:
few ops, in float64), :mod:`~bn_lightning.functional.running_stats` (the running update and the eval transform),
:mod:`~bn_lightning.functional.batchnorm` (the forward of a layer and its autograd Function),
:mod:`~bn_lightning.functional.ghost` (virtual batches; its grouped kernels in
:mod:`~bn_lightning.functional.ghost_kernels`), :mod:`~bn_lightning.functional.compiled` (the kernel
choice and the ``torch.compile`` kernel) and
:mod:`~bn_lightning.functional.channels` (per-channel plumbing they share).

Statistics are computed in float32 at least, also for float16/bfloat16 inputs (autocast); outputs keep the input's
dtype, as ``torch.nn.BatchNorm2d`` does.

Example::

    >>> import torch
    >>> from bn_lightning import functional as BF
    >>> x = torch.randn(8, 3, 4, 4)
    >>> rm, rv = torch.zeros(3), torch.ones(3)
    >>> y = BF.batch_norm(x, rm, rv, training=True, momentum=0.1)
    >>> torch.allclose(y, torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3), training=True), atol=1e-5)
    True
    >>> torch.allclose(rm, 0.1 * x.mean((0, 2, 3)))
    True
"""

from bn_lightning.functional.backward import grad_input, grad_reductions
from bn_lightning.functional.batchnorm import batch_norm, batch_norm_with_stats, check_batch_norm_args
from bn_lightning.functional.channels import compute_dtype, reduce_dims
from bn_lightning.functional.compiled import get_kernel, set_kernel
from bn_lightning.functional.composite import (
    batch_norm_backward_composite,
    batch_norm_composite,
    needs_composite,
    normalize_backward_composite,
)
from bn_lightning.functional.ghost import ghost_batch_norm_with_stats
from bn_lightning.functional.running_stats import normalize, update_running_stats
from bn_lightning.functional.stats import (
    BatchStats,
    Renorm,
    StatsReducer,
    batch_stats,
    merge_finite_stats,
    merge_stats,
)

__all__ = [
    "BatchStats",
    "Renorm",
    "StatsReducer",
    "batch_norm",
    "batch_norm_backward_composite",
    "batch_norm_composite",
    "batch_norm_with_stats",
    "batch_stats",
    "check_batch_norm_args",
    "compute_dtype",
    "get_kernel",
    "ghost_batch_norm_with_stats",
    "grad_input",
    "grad_reductions",
    "merge_finite_stats",
    "merge_stats",
    "needs_composite",
    "normalize",
    "normalize_backward_composite",
    "reduce_dims",
    "set_kernel",
    "update_running_stats",
]
