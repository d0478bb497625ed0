"""Frozen BatchNorm: fixed statistics and affine, for fine-tuning and detection backbones.

Provides :class:`FrozenBatchNorm1d`, :class:`FrozenBatchNorm2d`, :class:`FrozenBatchNorm3d`. ``weight``, ``bias``,
``running_mean`` and ``running_var`` are all BUFFERS (nothing to train, nothing updated), the output always equals
eval-mode BN (:func:`bn_lightning.functional.normalize`) whatever the training flag, and a torch BN ``state_dict``
loads directly (``num_batches_tracked`` is ignored). Unlike ``track_running_stats=False`` (which makes BN normalise with
BATCH statistics), freezing keeps the learned running statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from bn_lightning.functional import normalize
from bn_lightning.layers.batchnorm import ScratchBatchNormMixin

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "FrozenBatchNormMixin"]


class FrozenBatchNormMixin(ScratchBatchNormMixin):
    """Eval-mode BN with every tensor a buffer; shared by the 1d/2d/3d classes."""

    _bn_lightning_no_sync = True  # fixed statistics: nothing to synchronise

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        **kwargs: Any,
    ) -> None:
        # momentum and tracking do not apply; converters pass them, so they are accepted and ignored
        _BatchNorm.__init__(self, num_features, eps, 0.0, False, True, device=device, dtype=dtype)  # type: ignore[arg-type]
        kw = {"device": device, "dtype": dtype}
        for name, fill in (("weight", 1.0), ("bias", 0.0)):
            self._parameters.pop(name, None)  # registered as None by _NormBase(affine=False)
            self.register_buffer(name, torch.full((num_features,), fill, **kw) if affine else None)  # type: ignore[attr-defined]
        self.affine = affine
        self.register_buffer("num_batches_tracked", None)  # type: ignore[attr-defined]

    def extra_repr(self) -> str:
        """Channels, eps and whether there is an affine transform (momentum and tracking do not apply)."""
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"  # type: ignore[attr-defined]

    def reset_running_stats(self) -> None:
        """Running mean 0 and variance 1 (there is no counter)."""
        if getattr(self, "running_mean", None) is not None:
            self.running_mean.zero_()  # type: ignore[attr-defined]
            self.running_var.fill_(1)  # type: ignore[attr-defined]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        state_dict.pop(prefix + "num_batches_tracked", None)  # a torch BN state_dict loads as is
        # skip _NormBase's hook: for a state_dict without version metadata it puts num_batches_tracked back
        super(_NormBase, self)._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, input: Tensor) -> Tensor:
        """Normalise with the frozen statistics, in training and eval alike."""
        self._check_input_dim(input)
        self.last_batch_stats = None
        return normalize(input, self.running_mean, self.running_var, self.weight, self.bias, self.eps)  # type: ignore[attr-defined]


class FrozenBatchNorm1d(FrozenBatchNormMixin, _BatchNorm):
    """Frozen BN over ``(N, C)`` or ``(N, C, L)`` inputs.

    Always ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``, with all four tensors buffers.

    Args:
        num_features: channels ``C``.
        eps: added to the variance.
        affine: keep ``weight``/``bias`` buffers (``False``: no affine).
        device: buffer device.
        dtype: buffer dtype.
        **kwargs: ``momentum``/``track_running_stats`` are accepted and ignored (converters pass them).

    Example::

        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(3).eval()
        >>> frozen = FrozenBatchNorm1d(3)
        >>> _ = frozen.load_state_dict(bn.state_dict())
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(frozen.train()(x), bn(x))
        True
    """

    _input_dims = (2, 3)
    _shape_hint = "(N, C) or (N, C, L)"


class FrozenBatchNorm2d(FrozenBatchNormMixin, _BatchNorm):
    """Frozen BN over ``(N, C, H, W)`` inputs; see :class:`FrozenBatchNorm1d`.

    Example::

        >>> import torch
        >>> FrozenBatchNorm2d(3)(torch.randn(2, 3, 4, 4)).shape
        torch.Size([2, 3, 4, 4])
    """

    _input_dims = (4,)
    _shape_hint = "(N, C, H, W)"


class FrozenBatchNorm3d(FrozenBatchNormMixin, _BatchNorm):
    """Frozen BN over ``(N, C, D, H, W)`` inputs; see :class:`FrozenBatchNorm1d`.

    Example::

        >>> import torch
        >>> FrozenBatchNorm3d(2)(torch.randn(1, 2, 2, 2, 2)).shape
        torch.Size([1, 2, 2, 2, 2])
    """

    _input_dims = (5,)
    _shape_hint = "(N, C, D, H, W)"
