"""From-scratch ``BatchNorm1d``/``2d``/``3d``: drop-in replacements for ``torch.nn``'s, built on the functional core.

Provides :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d` and their shared base
:class:`ScratchBatchNormMixin`. Each subclasses the matching ``torch.nn.BatchNormNd`` (and so torch's ``_BatchNorm``)
for its constructor, parameters, buffers, ``state_dict`` format and ``isinstance`` checks, and replaces only
``forward``: no ``F.batch_norm`` inside, the math lives in :mod:`bn_lightning.functional`.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bn_lightning.functional import BatchStats, Renorm, StatsReducer, batch_norm_with_stats, needs_composite

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormXd", "ScratchBatchNormMixin", "has_batch_stats"]


def has_batch_stats(layer: nn.Module) -> bool:
    """Whether ``layer`` keeps the statistics of its last training batch in ``layer.last_batch_stats``.

    The protocol: after a training-mode forward, ``last_batch_stats`` is the detached per-channel
    :class:`~bn_lightning.functional.BatchStats` (mean, biased variance, count) the layer normalised with (for a
    synchronised layer: the statistics of the whole group); after an eval-mode forward, and before any forward, it is
    ``None``. Every trainable bn_lightning BN layer keeps them (they cost nothing: the forward computed them anyway);
    torch's layers do not, and callbacks recover them another way.

    Args:
        layer: any module.

    Example::

        >>> import torch
        >>> from bn_lightning.layers import BatchNorm2d, has_batch_stats
        >>> has_batch_stats(BatchNorm2d(3)), has_batch_stats(torch.nn.BatchNorm2d(3))
        (True, False)
    """
    return isinstance(layer, ScratchBatchNormMixin)


class ScratchBatchNormMixin:
    """The forward shared by every bn_lightning BN layer; mixed in before a ``torch.nn`` BN class.

    After each forward, :attr:`last_batch_stats` holds the detached per-channel :class:`BatchStats` (mean, biased
    variance, count) the layer normalised with in training, or ``None`` after an eval-mode forward. They are the
    tensors the forward computed anyway, so keeping them costs nothing; monitoring callbacks read them.
    """

    _input_dims: tuple[int, ...] = ()
    _shape_hint: str = ""
    last_batch_stats: BatchStats | None = None

    # attributes provided by torch's _BatchNorm
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    training: bool

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._input_dims:
            raise ValueError(
                f"{self._get_name()}({self.num_features}) expects input of shape {self._shape_hint}, got "  # type: ignore[attr-defined]
                f"{input.dim()}D input of shape {tuple(input.shape)}"
            )
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{self._get_name()}({self.num_features}) expects {self.num_features} channels in dim 1 of "  # type: ignore[attr-defined]
                f"{self._shape_hint}, got input of shape {tuple(input.shape)}"
            )

    def _stats_reducer(self) -> StatsReducer | None:
        """The reducer that synchronises statistics; ``None`` means local BN. SyncBatchNorm overrides this."""
        return None

    def _renorm(self) -> Renorm | None:
        """A Batch Renormalization correction for this training step; ``None`` for plain BN. BatchRenorm overrides."""
        return None

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` with batch statistics (training) or running statistics (eval)."""
        self._check_input_dim(input)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)  # type: ignore[attr-defined]
        reducer = self._stats_reducer() if bn_training else None
        if bn_training and reducer is None and input.numel() == input.shape[1]:
            raise ValueError(
                f"{self._get_name()}({self.num_features}): expected more than 1 value per channel when training, "  # type: ignore[attr-defined]
                f"got input of shape {tuple(input.shape)}; use a batch of at least 2, or eval mode"
            )
        track = self.training and self.track_running_stats
        y, stats = batch_norm_with_stats(
            input,
            # buffers are passed only when they are to be used (eval) or updated (training with tracking)
            self.running_mean if not self.training or self.track_running_stats else None,  # type: ignore[attr-defined]
            self.running_var if not self.training or self.track_running_stats else None,  # type: ignore[attr-defined]
            self.weight,  # type: ignore[attr-defined]
            self.bias,  # type: ignore[attr-defined]
            bn_training,
            self.momentum,
            self.eps,
            self.num_batches_tracked if track else None,  # type: ignore[attr-defined]
            reducer,
            self._renorm() if bn_training and self.training else None,
        )
        # statistics computed inside a torch.func transform are wrapped tensors that must not outlive it
        if stats is not None or self.last_batch_stats is not None:  # eval after eval: nothing to reset
            self.last_batch_stats = None if stats is not None and needs_composite(stats.mean) else stats
        return y

    def __prepare_scriptable__(self) -> None:
        """``torch.jit.script`` is not supported: say so, and name ``torch.compile``, the way that is.

        The layer's Python kernels (autograd Functions, float64-combined partial sums) are beyond TorchScript, which
        torch keeps in maintenance mode. ``torch.compile`` and ``torch.jit.trace`` work.

        Raises:
            RuntimeError: always.
        """
        raise RuntimeError(
            f"{self._get_name()} (bn_lightning) cannot be compiled by torch.jit.script: use torch.compile(model) or "  # type: ignore[attr-defined]
            "torch.jit.trace; or swap in torch.nn's BatchNorm where TorchScript is required"
        )


class BatchNorm1d(ScratchBatchNormMixin, nn.BatchNorm1d):
    r"""Batch normalisation over a 2D or 3D input, from scratch; a drop-in for :class:`torch.nn.BatchNorm1d`.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    Mean and biased variance are per channel over the batch (and length); at eval the running estimates are used.
    The running variance is updated with the unbiased batch variance. ``momentum`` is the weight of the NEW value
    (``running = (1 - momentum) * running + momentum * batch``), ``None`` for a cumulative average.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance for numerical stability. Default: 1e-5.
        momentum: running-average factor, or ``None``. Default: 0.1.
        affine: learnable ``weight`` (gamma) and ``bias`` (beta). Default: True.
        track_running_stats: keep running estimates; if False, batch statistics are used in eval too.
        device: parameter and buffer device.
        dtype: parameter and buffer dtype.

    Shape:
        - Input: ``(N, C)`` or ``(N, C, L)``
        - Output: same shape as the input

    Example::

        >>> import torch
        >>> from bn_lightning import BatchNorm1d
        >>> bn = BatchNorm1d(4)
        >>> bn(torch.randn(8, 4)).shape
        torch.Size([8, 4])
        >>> sorted(bn.state_dict()) == sorted(torch.nn.BatchNorm1d(4).state_dict())
        True
    """

    _input_dims = (2, 3)
    _shape_hint = "(N, C) or (N, C, L)"


class BatchNorm2d(ScratchBatchNormMixin, nn.BatchNorm2d):
    r"""Batch normalisation over a 4D input, from scratch; a drop-in for :class:`torch.nn.BatchNorm2d`.

    Same formula, arguments and ``state_dict`` as :class:`BatchNorm1d` / ``torch.nn.BatchNorm2d``; statistics are
    per channel over ``(N, H, W)``. Works on NCHW and channels_last inputs (the output keeps the memory format).

    Shape:
        - Input: ``(N, C, H, W)``
        - Output: same shape as the input

    Example::

        >>> import torch
        >>> from bn_lightning import BatchNorm2d
        >>> bn = BatchNorm2d(3)
        >>> _ = bn.load_state_dict(torch.nn.BatchNorm2d(3).state_dict())
        >>> y = bn(torch.randn(4, 3, 8, 8))
        >>> bn.last_batch_stats.mean.shape
        torch.Size([3])
    """

    _input_dims = (4,)
    _shape_hint = "(N, C, H, W)"


class BatchNorm3d(ScratchBatchNormMixin, nn.BatchNorm3d):
    r"""Batch normalisation over a 5D input, from scratch; a drop-in for :class:`torch.nn.BatchNorm3d`.

    Same formula, arguments and ``state_dict`` as :class:`BatchNorm1d`; statistics are per channel over
    ``(N, D, H, W)``.

    Shape:
        - Input: ``(N, C, D, H, W)``
        - Output: same shape as the input

    Example::

        >>> import torch
        >>> from bn_lightning import BatchNorm3d
        >>> BatchNorm3d(2)(torch.randn(2, 2, 3, 4, 4)).shape
        torch.Size([2, 2, 3, 4, 4])
    """

    _input_dims = (5,)
    _shape_hint = "(N, C, D, H, W)"


class BatchNormXd(ScratchBatchNormMixin, _BatchNorm):
    """Local from-scratch BN for any ``(N, C, *)`` input (torch's ``_BatchNormXd`` counterpart).

    What :func:`bn_lightning.revert_sync_batchnorm` returns for a SyncBatchNorm that was constructed directly, whose
    original dimensionality is unknown. Same constructor and ``state_dict`` as the other BN layers.

    Example::

        >>> import torch
        >>> BatchNormXd(3)(torch.randn(4, 3, 2, 2, 2, 2)).shape
        torch.Size([4, 3, 2, 2, 2, 2])
    """

    _input_dims = tuple(range(2, 33))
    _shape_hint = "(N, C, *)"
