"""Frozen BatchNorm: fixed statistics and affine, for fine-tuning and detection backbones.

Provides :class:`FrozenBatchNorm1d`, :class:`FrozenBatchNorm2d`, :class:`FrozenBatchNorm3d` and their shared base
:class:`FrozenBatchNormBase`. ``weight``, ``bias``, ``running_mean`` and ``running_var`` are all BUFFERS (nothing to
train, nothing updated), the output always equals eval-mode BN (:func:`bn_lightning.functional.normalize`) whatever the
training flag, and a torch BN ``state_dict`` loads directly (``num_batches_tracked`` is ignored). Unlike
``track_running_stats=False`` (which makes BN normalise with BATCH statistics), freezing keeps the learned running
statistics.

The layers are plain ``nn.Module`` subclasses, not torch ``_BatchNorm`` ones, as torchvision's and detectron2's
``FrozenBatchNorm2d`` are: every tool that finds BN layers with ``isinstance(m, _BatchNorm)`` to reset, recalibrate,
average or synchronise their statistics (``torch.optim.swa_utils.update_bn``, ``torch.nn.SyncBatchNorm
.convert_sync_batchnorm``, Lightning's ``StochasticWeightAveraging`` and ``sync_batchnorm=True``,
:func:`bn_lightning.recalibrate_bn`) passes them by, so their statistics stay exactly what they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bn_lightning.functional import normalize
from bn_lightning.layers.batchnorm import ScratchBatchNormMixin

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "FrozenBatchNormBase"]


class FrozenBatchNormBase(nn.Module):
    """Eval-mode BN with every tensor a buffer; the 1d/2d/3d classes only set the input shapes they accept.

    ``isinstance(layer, FrozenBatchNormBase)`` answers "is this a frozen BN layer?"; such a layer is never a torch
    ``_BatchNorm``. Its output and buffers do not depend on :meth:`train`/:meth:`eval`.

    Args:
        num_features: channels ``C``.
        eps: added to the variance.
        affine: keep ``weight``/``bias`` buffers (``False``: no affine).
        device: buffer device.
        dtype: buffer dtype.
        **kwargs: ``momentum``, ``track_running_stats``, ``bias`` (what converters pass to every BN class) are
            accepted and ignored.
    """

    _input_dims: tuple[int, ...] = ()
    _shape_hint: str = ""
    #: always ``None``: a frozen layer never normalises with batch statistics
    last_batch_stats: None = None
    _check_input_dim = ScratchBatchNormMixin._check_input_dim  # same checks and messages as the trainable layers

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **kw) if affine else None)
        self.register_buffer("bias", torch.zeros(num_features, **kw) if affine else None)
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer("num_batches_tracked", None)  # the name code written for torch BN reads; no counter

    def extra_repr(self) -> str:
        """Channels, eps and whether there is an affine transform."""
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"

    def reset_running_stats(self) -> None:
        """Running mean 0 and variance 1 (there is no counter)."""
        self.running_mean.zero_()
        self.running_var.fill_(1)

    def reset_parameters(self) -> None:
        """Running statistics reset, ``weight`` 1 and ``bias`` 0."""
        self.reset_running_stats()
        if self.weight is not None:
            self.weight.fill_(1)
        if self.bias is not None:
            self.bias.zero_()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        state_dict.pop(prefix + "num_batches_tracked", None)  # a torch BN state_dict loads as is
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, input: Tensor) -> Tensor:
        """Normalise with the frozen statistics, in training and eval alike."""
        self._check_input_dim(input)
        return normalize(input, self.running_mean, self.running_var, self.weight, self.bias, self.eps)


class FrozenBatchNorm1d(FrozenBatchNormBase):
    r"""Frozen BN over ``(N, C)`` or ``(N, C, L)`` inputs.

    .. math:: y = \frac{x - \text{running\_mean}}{\sqrt{\text{running\_var} + \epsilon}} \cdot \text{weight}
        + \text{bias}

    in training and eval mode alike, with all four tensors buffers (see :class:`FrozenBatchNormBase` for the
    arguments).

    Shape:
        - Input: ``(N, C)`` or ``(N, C, L)``
        - Output: same shape as the input

    Example::

        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(3).eval()
        >>> frozen = FrozenBatchNorm1d(3)
        >>> _ = frozen.load_state_dict(bn.state_dict())
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(frozen.train()(x), bn(x))
        True
        >>> frozen, list(frozen.parameters())
        (FrozenBatchNorm1d(3, eps=1e-05, affine=True), [])
    """

    _input_dims = (2, 3)
    _shape_hint = "(N, C) or (N, C, L)"


class FrozenBatchNorm2d(FrozenBatchNormBase):
    """Frozen BN over ``(N, C, H, W)`` inputs; see :class:`FrozenBatchNorm1d`.

    Example::

        >>> import torch
        >>> FrozenBatchNorm2d(3)(torch.randn(2, 3, 4, 4)).shape
        torch.Size([2, 3, 4, 4])
    """

    _input_dims = (4,)
    _shape_hint = "(N, C, H, W)"


class FrozenBatchNorm3d(FrozenBatchNormBase):
    """Frozen BN over ``(N, C, D, H, W)`` inputs; see :class:`FrozenBatchNorm1d`.

    Example::

        >>> import torch
        >>> FrozenBatchNorm3d(2)(torch.randn(1, 2, 2, 2, 2)).shape
        torch.Size([1, 2, 2, 2, 2])
    """

    _input_dims = (5,)
    _shape_hint = "(N, C, D, H, W)"
