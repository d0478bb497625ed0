"""Batch Renormalization (Ioffe, 2017) on the functional core, optionally with synchronised statistics.

Provides :class:`BatchRenorm1d` and :class:`BatchRenorm2d`. In training, ``y = (x_hat * r + d) * gamma + beta`` with
``r = clip(sigma_B / sigma_R, 1/r_max, r_max)`` and ``d = clip((mu_B - mu_R) / sigma_R, -d_max, d_max)`` treated as
constants in backward (:class:`bn_lightning.functional.Renorm`). ``r_max`` ramps linearly from 1 and ``d_max`` from 0
over ``warmup_steps`` training steps (counted by ``num_batches_tracked``); eval uses the running statistics. With
``sync=True`` the batch statistics (and so r and d) are synchronised over a process group exactly as in
:class:`bn_lightning.SyncBatchNorm`. Under ``torch.compile`` the layer compiles into the graph (``sync=True`` in a
process group: one graph break, as SyncBatchNorm).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from bn_lightning.functional import Renorm, StatsReducer
from bn_lightning.layers.batchnorm import ScratchBatchNormMixin
from bn_lightning.layers.sync import compiled_sync, group_reducer, synchronised_forward

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenormMixin"]


@torch.library.custom_op("bn_lightning::buffer_snapshot", mutates_args=())
def _snapshot(t: Tensor) -> Tensor:
    """A copy of ``t`` as an opaque op: a compiled graph's backward reads the saved copy, never recomputes it."""
    return t.clone()


@_snapshot.register_fake
def _(t: Tensor) -> Tensor:
    return torch.empty_like(t)


class BatchRenormMixin(ScratchBatchNormMixin):
    """Supplies the :class:`~bn_lightning.functional.Renorm` correction to the shared BN forward."""

    _bn_lightning_no_sync = True  # synchronised through its own `sync` flag, not by conversion
    r_max: float
    d_max: float
    warmup_steps: int
    sync: bool
    process_group: Any

    def __init__(
        self,
        num_features: int,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 0,
        eps: float = 1e-5,
        sync: bool = False,
        process_group: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, eps, **kwargs)  # type: ignore[call-arg]
        if not r_max >= 1:
            raise ValueError(f"r_max must be >= 1, got {r_max!r}")
        if not d_max >= 0:
            raise ValueError(f"d_max must be >= 0, got {d_max!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
        if not self.track_running_stats:
            raise ValueError("Batch Renormalization corrects towards the running statistics: track_running_stats=True")
        self.r_max, self.d_max, self.warmup_steps = float(r_max), float(d_max), warmup_steps
        self.sync, self.process_group = sync, process_group

    def extra_repr(self) -> str:
        """The BN fields plus the renorm bounds."""
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}"  # type: ignore[misc]

    def current_bounds(self) -> tuple[float, float]:
        """``(r_max, d_max)`` for the next training step: linear ramps from (1, 0) over ``warmup_steps``."""
        if self.warmup_steps == 0:
            return self.r_max, self.d_max
        progress = min(int(self.num_batches_tracked) / self.warmup_steps, 1.0)  # type: ignore[attr-defined]
        return 1 + (self.r_max - 1) * progress, self.d_max * progress

    def _renorm(self) -> Renorm | None:
        r_max, d_max = self.current_bounds()
        running_mean, running_var = self.running_mean, self.running_var  # type: ignore[attr-defined]
        if torch.compiler.is_compiling():
            # r and d are functions of the buffers BEFORE this step's update. AOTAutograd's partitioners (torch 2.13)
            # recompute cheap ops in the backward from the graph inputs, i.e. from the buffers the forward has
            # updated in place by then (input gradients off by 4e-2 when the clamps act); an opaque copy is saved
            running_mean, running_var = _snapshot(running_mean), _snapshot(running_var)
        return Renorm(running_mean, running_var, r_max, d_max)

    def forward(self, input: Tensor) -> Tensor:
        """Batch Renorm in training (synchronised if ``sync``), running statistics in eval."""
        if self.sync and compiled_sync(self):
            return synchronised_forward(self, input)
        return super().forward(input)

    def _stats_reducer(self) -> StatsReducer | None:
        return group_reducer(self, self.process_group) if self.sync else None


class BatchRenorm1d(BatchRenormMixin, _BatchNorm):
    r"""Batch Renormalization over ``(N, C)`` or ``(N, C, L)`` inputs.

    Args:
        num_features: channels ``C``.
        r_max: final clip bound of ``r`` (>= 1). Default: 3.
        d_max: final clip bound of ``d`` (>= 0). Default: 5.
        warmup_steps: steps over which the bounds ramp from (1, 0); 0 applies them at once.
        eps: added to the variance.
        momentum: running-average factor (or ``None``).
        affine: learnable gamma/beta.
        sync: synchronise batch statistics over ``process_group`` (CPU/gloo and GPU/nccl).
        process_group: the group for ``sync`` (``None``: all ranks).
        device: parameter/buffer device.
        dtype: parameter/buffer dtype.

    Example::

        >>> import torch
        >>> bn = BatchRenorm1d(3, r_max=1.0, d_max=0.0)  # bounds 1 and 0: plain BN
        >>> x = torch.randn(16, 3)
        >>> torch.allclose(bn(x), torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-5)
        True
    """

    _input_dims = (2, 3)
    _shape_hint = "(N, C) or (N, C, L)"


class BatchRenorm2d(BatchRenormMixin, _BatchNorm):
    r"""Batch Renormalization over ``(N, C, H, W)`` inputs; see :class:`BatchRenorm1d`.

    Example::

        >>> import torch
        >>> BatchRenorm2d(4, warmup_steps=1000)(torch.randn(2, 4, 3, 3)).shape
        torch.Size([2, 4, 3, 3])
    """

    _input_dims = (4,)
    _shape_hint = "(N, C, H, W)"
