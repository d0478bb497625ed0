"""Ghost Batch Normalization (Hoffer et al., 2017): normalise each virtual batch with its own statistics.

Provides :class:`GhostBatchNorm1d` and :class:`GhostBatchNorm2d`, built on the functional core
(:func:`~bn_lightning.functional.ghost_batch_norm_with_stats`): the batch is split along dim 0 into virtual batches of
``virtual_batch_size``, each is normalised with its own statistics and updates the running statistics once, in
order; eval mode is the plain layers' forward.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from bn_lightning.functional import ghost_batch_norm_with_stats, needs_composite
from bn_lightning.layers.batchnorm import ScratchBatchNormMixin
from bn_lightning.validation import check_int

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNormMixin"]


class GhostBatchNormMixin(ScratchBatchNormMixin):
    """Splits the training batch into virtual batches; eval mode is plain BN with the running statistics.

    A batch that ``virtual_batch_size`` does not divide ends with a smaller virtual batch, normalised with its own
    statistics; if that remainder would hold a single value per channel (a batch of one sample without spatial
    extent), it joins the previous virtual batch instead. With ``virtual_batch_size >= N`` the layer is plain BN.
    ``num_batches_tracked`` counts virtual batches (it drives ``momentum=None``'s cumulative average).
    :attr:`last_batch_stats` holds the statistics of the whole batch (the virtual batches' statistics merged).
    Ghost BN is local by design: it opts out of SyncBatchNorm conversion.
    """

    _bn_lightning_no_sync = True
    virtual_batch_size: int

    def __init__(self, num_features: int, virtual_batch_size: int = 32, eps: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(num_features, eps, **kwargs)  # type: ignore[call-arg]
        self.virtual_batch_size = check_int(type(self).__name__, "virtual_batch_size", virtual_batch_size)

    def extra_repr(self) -> str:
        """The BN fields plus ``virtual_batch_size``."""
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"  # type: ignore[misc]

    def forward(self, input: Tensor) -> Tensor:
        """Normalise each virtual batch with its own statistics (training) or with running statistics (eval)."""
        # virtual batches are a training-time regulariser: eval (even without running statistics) sees the whole batch
        if not self.training or input.dim() < 2 or input.shape[0] <= self.virtual_batch_size:
            return super().forward(input)
        self._check_input_dim(input)
        track = self.track_running_stats
        y, stats = ghost_batch_norm_with_stats(
            input,
            self.virtual_batch_size,
            self.running_mean if track else None,  # type: ignore[attr-defined]
            self.running_var if track else None,  # type: ignore[attr-defined]
            self.weight,  # type: ignore[attr-defined]
            self.bias,  # type: ignore[attr-defined]
            self.momentum,
            self.eps,
            self.num_batches_tracked if track else None,  # type: ignore[attr-defined]
        )
        # statistics computed inside a torch.func transform are wrapped tensors that must not outlive it
        self.last_batch_stats = None if needs_composite(stats.mean) else stats
        return y


class GhostBatchNorm1d(GhostBatchNormMixin, _BatchNorm):
    r"""Ghost BN over ``(N, C)`` or ``(N, C, L)`` inputs.

    Each virtual batch of ``virtual_batch_size`` samples is normalised with its own mean and variance.

    Args:
        num_features: channels ``C``.
        virtual_batch_size: samples per virtual batch.
        eps: added to the variance.
        momentum: running-average factor per virtual batch, or ``None``.
        affine: learnable gamma/beta.
        track_running_stats: keep running estimates.
        device: parameter/buffer device.
        dtype: parameter/buffer dtype.

    Example::

        >>> import torch
        >>> bn = GhostBatchNorm1d(3, virtual_batch_size=4)
        >>> y = bn(torch.randn(8, 3))
        >>> torch.allclose(y[:4].mean(0), torch.zeros(3), atol=1e-6), int(bn.num_batches_tracked)
        (True, 2)
    """

    _input_dims = (2, 3)
    _shape_hint = "(N, C) or (N, C, L)"


class GhostBatchNorm2d(GhostBatchNormMixin, _BatchNorm):
    r"""Ghost BN over ``(N, C, H, W)`` inputs; see :class:`GhostBatchNorm1d`.

    Example::

        >>> import torch
        >>> bn = GhostBatchNorm2d(3, virtual_batch_size=2)
        >>> bn(torch.randn(6, 3, 4, 4)).shape, int(bn.num_batches_tracked)
        (torch.Size([6, 3, 4, 4]), 3)
    """

    _input_dims = (4,)
    _shape_hint = "(N, C, H, W)"
