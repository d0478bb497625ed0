"""Ghost Batch Normalization (Hoffer et al., 2017): normalise each virtual batch with its own statistics.

Provides :class:`GhostBatchNorm1d` and :class:`GhostBatchNorm2d`, built on the plain layers' forward (and so on the
functional core): the batch is split along dim 0 into virtual batches of ``virtual_batch_size``, each is normalised
with its own statistics and updates the running statistics once, in order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from bn_lightning.functional import BatchStats, merge_stats
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
        chunks = list(torch.split(input, self.virtual_batch_size))
        if chunks[-1].numel() == chunks[-1].shape[1] and len(chunks) > 1:  # a single value per channel: merge it
            chunks[-2:] = [torch.cat(chunks[-2:])]
        outputs, stats = [], []
        for chunk in chunks:
            outputs.append(super().forward(chunk))
            stats.append(self.last_batch_stats)
        counts = [s.count for s in stats]  # type: ignore[union-attr]
        merged = merge_stats(
            torch.stack([s.mean for s in stats]),  # type: ignore[union-attr]
            torch.stack([s.var for s in stats]),  # type: ignore[union-attr]
            torch.tensor(counts, device=input.device),
        )
        self.last_batch_stats = BatchStats(merged.mean, merged.var, sum(counts))  # a Python int, as for one chunk
        return torch.cat(outputs)


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
