"""Convert BN layers between implementations, exactly and reversibly; BN-aware parameter groups.

Provides :func:`convert_batchnorm` (every BN layer -> torch, scratch, sync, frozen, ghost or renorm),
:func:`convert_sync_batchnorm` / :func:`revert_sync_batchnorm` (torch has no revert; ours also makes a torch
``SyncBatchNorm`` built elsewhere local: :class:`TorchBatchNormXd`), :func:`swap_batchnorm` (one layer) and
:func:`bn_param_groups`. Converters are plain recursive functions in timm's style: they reuse the very same
``Parameter`` and buffer objects (so optimizers, ``requires_grad``, device and dtype are untouched), keep the training
flag, rebuild the tree with ``add_module``, and remember each layer's original class, constructor options and tensors
so that converting back gives exactly what was there. Frozen layers (:class:`~bn_lightning.layers.frozen.
FrozenBatchNormBase`, which are not torch ``_BatchNorm`` subclasses) are converted to and from like any BN layer, and
left alone by the sync converters.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bn_lightning.layers.batchnorm import BatchNormXd
from bn_lightning.layers.factory import get_batchnorm_class, resolve_impl
from bn_lightning.layers.frozen import FrozenBatchNormBase
from bn_lightning.layers.sync import NORM_HAS_BIAS_FLAG, SyncBatchNorm
from bn_lightning.validation import selected

__all__ = [
    "TorchBatchNormXd",
    "bn_param_groups",
    "convert_batchnorm",
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
    "swap_batchnorm",
]

_ORIGINAL = "_bn_lightning_original"  # (class, constructor kwargs, {name: original tensor object})
_KEEP_ATTRS = ("qconfig",)
_CTOR_ATTRS = ("process_group", "virtual_batch_size", "r_max", "d_max", "warmup_steps", "sync")
# what a layer built frozen (it has neither) becomes when converted to a trainable BN: torch's defaults
_DEFAULT_MOMENTUM = 0.1
_DEFAULT_TRACK_RUNNING_STATS = True

_AnyBatchNorm = _BatchNorm | FrozenBatchNormBase


class TorchBatchNormXd(_BatchNorm):
    """torch's own BN for ``(N, C, *)`` inputs of any dimensionality: a local ``torch.nn.SyncBatchNorm``.

    What :func:`revert_sync_batchnorm` makes of a ``torch.nn.SyncBatchNorm`` that torch's converter (or anyone else)
    built: such a layer does not record whether it replaced a 1d, 2d or 3d layer, so the local layer accepts what it
    accepted (any input of at least 2 dimensions, checked at forward) and computes with the same kernel
    (``F.batch_norm``): its outputs and running-statistics updates are bit-identical to the ``SyncBatchNorm``'s
    without a process group. mmengine's and Lightning's ``_BatchNormXd`` play the same part.

    Example::

        >>> import torch
        >>> bn = TorchBatchNormXd(3)
        >>> bn(torch.randn(4, 3)).shape, bn(torch.randn(4, 3, 2, 2, 2)).shape
        (torch.Size([4, 3]), torch.Size([4, 3, 2, 2, 2]))
        >>> bn(torch.randn(3))
        Traceback (most recent call last):
        ...
        ValueError: TorchBatchNormXd(3) expects input of shape (N, C, *), got 1D input of shape (3,)
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"{self._get_name()}({self.num_features}) expects input of shape (N, C, *), got {input.dim()}D input "
                f"of shape {tuple(input.shape)}"
            )


def _is_batchnorm(module: nn.Module) -> bool:
    """A layer the converters handle: any torch ``_BatchNorm`` (ours included) or a frozen BN layer."""
    return isinstance(module, _BatchNorm | FrozenBatchNormBase)


def _assign(new: nn.Module, name: str, value: Tensor | None) -> None:
    """Put ``value`` into ``new`` as whatever ``name`` is there: a Parameter (trainable layers) or a buffer (frozen)."""
    if name in new._parameters:
        if value is not None and not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=True)
        setattr(new, name, value)
    elif name in new._buffers:
        setattr(new, name, value.detach() if isinstance(value, nn.Parameter) else value)


def swap_batchnorm(module: _AnyBatchNorm, cls: type[_AnyBatchNorm], **kwargs: Any) -> _AnyBatchNorm:
    """Build a ``cls`` layer that shares ``module``'s parameters and buffers and copies its flags.

    Args:
        module: the BN layer to replace (a frozen one has no ``momentum`` nor ``track_running_stats``: torch's
            defaults, 0.1 and ``True``, are used).
        cls: the new class; constructed as ``cls(num_features, eps=, momentum=, affine=, track_running_stats=,
            **kwargs)``.
        **kwargs: extra constructor arguments (e.g. ``process_group``, ``virtual_batch_size``); a ``momentum`` here
            replaces ``module``'s.

    Returns:
        The new layer; its ``weight``/``bias`` ARE ``module``'s Parameter objects (or share their storage as buffers,
        for frozen layers), its running statistics the same tensors.

    Example::

        >>> import torch
        >>> bn = torch.nn.BatchNorm2d(3)
        >>> from bn_lightning import BatchNorm2d
        >>> ours = swap_batchnorm(bn, BatchNorm2d)
        >>> ours.weight is bn.weight, type(ours).__module__
        (True, 'bn_lightning.layers.batchnorm')
    """
    if NORM_HAS_BIAS_FLAG and module.affine:
        kwargs.setdefault("bias", module.bias is not None)
    new = cls(
        module.num_features,
        eps=kwargs.pop("eps", module.eps),
        momentum=kwargs.pop("momentum", getattr(module, "momentum", _DEFAULT_MOMENTUM)),
        affine=module.affine,
        track_running_stats=getattr(module, "track_running_stats", _DEFAULT_TRACK_RUNNING_STATS),
        **kwargs,
    )
    for name in ("weight", "bias"):
        _assign(new, name, getattr(module, name, None))
    for name in ("running_mean", "running_var"):
        setattr(new, name, getattr(module, name))
    counter = getattr(module, "num_batches_tracked", None)
    if counter is not None and new._buffers.get("num_batches_tracked") is not None:
        new.num_batches_tracked = counter
    new.train(module.training)
    for attr in _KEEP_ATTRS:
        if hasattr(module, attr):
            setattr(new, attr, getattr(module, attr))
    return new


def _layer_dim(layer: _AnyBatchNorm) -> int | None:
    """1, 2 or 3 for a BN layer of known dimensionality; ``None`` for dimension-agnostic ones (SyncBatchNorm)."""
    for dim, cls in ((1, nn.BatchNorm1d), (2, nn.BatchNorm2d), (3, nn.BatchNorm3d)):
        if isinstance(layer, cls):
            return dim
    dims = getattr(layer, "_input_dims", None)
    return {(2, 3): 1, (4,): 2, (5,): 3}.get(tuple(dims)) if dims else None


def _remember(layer: _AnyBatchNorm) -> tuple[type, dict[str, Any], dict[str, Any]]:
    """What converting back needs: the class, its constructor options, and the original tensor objects."""
    kwargs = {a: getattr(layer, a) for a in _CTOR_ATTRS if a in _ctor_params(type(layer)) and hasattr(layer, a)}
    if not isinstance(layer, FrozenBatchNormBase):  # a frozen layer has no momentum; layers built from it get it back
        kwargs["momentum"] = layer.momentum
    tensors = {n: getattr(layer, n, None) for n in ("weight", "bias", "num_batches_tracked")}
    return type(layer), kwargs, tensors


def _ctor_params(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters)


def _restore(layer: _AnyBatchNorm) -> _AnyBatchNorm:
    cls, kwargs, tensors = getattr(layer, _ORIGINAL)
    new = swap_batchnorm(layer, cls, **kwargs)
    for name, value in tensors.items():  # the very same Parameter objects (and counter) come back
        if value is not None and (name in new._parameters or new._buffers.get(name) is not None):
            # ... holding the layer's current data, which `.to()`/`.double()` may have replaced since
            current = getattr(layer, name, None)
            if current is None:  # a frozen layer keeps no counter: follow the running statistics' device
                current = value.to(new.running_mean.device) if new.running_mean is not None else value
            if current is not value:
                value.data = current.detach()
            setattr(new, name, value)
    return new


def convert_batchnorm(
    module: nn.Module,
    to: str = "scratch",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    **options: Any,
) -> nn.Module:
    """Convert every BN layer of ``module`` to another implementation, keeping state and flags.

    Args:
        module: a model, or a single BN layer (then the converted layer is returned).
        to: ``"torch"``, ``"scratch"``, ``"sync"``, ``"frozen"``, ``"ghost"`` or ``"renorm"`` (normalised, with
            aliases such as ``"sync_batchnorm"``, ``"syncbn"``, ``"FrozenBN"``; see
            :func:`bn_lightning.layers.factory.resolve_impl`). ``"torch"`` restores each converted layer's ORIGINAL
            class (torch's or ours) with its original Parameter objects; layers never converted become torch's.
        include: ``fnmatch`` patterns on qualified module names; only matching BN layers are converted.
        exclude: patterns of BN layers to leave alone.
        **options: constructor options of the target, e.g. ``virtual_batch_size=16`` (ghost),
            ``r_max=3, d_max=5, warmup_steps=5000`` (renorm), ``process_group=...`` (sync).

    Returns:
        The converted module (the same object unless ``module`` itself was a BN layer).

    Raises:
        ValueError: unknown ``to``; a layer whose dimensionality the target lacks (e.g. ghost 3d), naming it.

    Example::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> w = net[1].weight
        >>> net = convert_batchnorm(net, "ghost", virtual_batch_size=8)
        >>> type(net[1]).__name__, net[1].weight is w
        ('GhostBatchNorm2d', True)
        >>> net = convert_batchnorm(net, "torch")
        >>> type(net[1]) is torch.nn.BatchNorm2d, net[1].weight is w
        (True, True)
    """
    impl = resolve_impl(to)
    return _convert_tree(module, "", impl, options, include, exclude)


def _convert_tree(module: nn.Module, name: str, impl: str, options: dict, include: Any, exclude: Any) -> nn.Module:
    out = module
    if _is_batchnorm(module) and selected(name, include, exclude):
        out = _convert_one(module, name, impl, options)
    for child_name, child in module.named_children():
        path = f"{name}.{child_name}" if name else child_name
        out.add_module(child_name, _convert_tree(child, path, impl, options, include, exclude))
    return out


def _convert_one(layer: _AnyBatchNorm, name: str, impl: str, options: dict) -> _AnyBatchNorm:
    original = getattr(layer, _ORIGINAL, None)
    if impl == "torch" and original is not None:
        return _restore(layer)
    if impl == "sync":
        if isinstance(layer, SyncBatchNorm):
            if "process_group" in options:
                layer.process_group = options["process_group"]
            return layer
        if isinstance(layer, FrozenBatchNormBase) or getattr(layer, "_bn_lightning_no_sync", False):
            return layer  # frozen / ghost / renorm keep their own semantics
        cls: type[_AnyBatchNorm] = SyncBatchNorm
    else:
        dim = _layer_dim(layer)
        if dim is None and original is not None:
            dim = _layer_dim_of_class(original[0])
        if dim is None:
            raise ValueError(
                f"Cannot convert BN layer '{name or type(layer).__name__}' to {impl!r}: its class "
                f"{type(layer).__name__} does not say whether it is 1d, 2d or 3d"
            )
        try:
            cls = get_batchnorm_class(impl, dim)  # type: ignore[assignment]
        except ValueError as err:
            raise ValueError(f"Cannot convert BN layer '{name or type(layer).__name__}': {err}") from None
    if type(layer) is cls and not options:
        return layer
    if impl in ("frozen", "renorm") and layer.running_mean is None:
        raise ValueError(
            f"Cannot convert BN layer '{name or type(layer).__name__}' to {impl!r}: it has no running statistics "
            "(track_running_stats=False), and this variant is defined by them"
        )
    # momentum and eps are applied by swap_batchnorm for every target, whatever its constructor spells out
    kwargs = {k: v for k, v in options.items() if k in _ctor_params(cls) | {"momentum", "eps"}}
    from_frozen = original is not None and isinstance(layer, FrozenBatchNormBase)
    if from_frozen:  # a frozen layer has no momentum nor counter: the original's come back
        kwargs.setdefault("momentum", original[1].get("momentum", _DEFAULT_MOMENTUM))
    new = swap_batchnorm(layer, cls, **kwargs)
    counter = original[2].get("num_batches_tracked") if from_frozen else None
    if counter is not None and new._buffers.get("num_batches_tracked") is not None:
        new.num_batches_tracked = counter
    setattr(new, _ORIGINAL, original or _remember(layer))
    return new


def _layer_dim_of_class(cls: type) -> int | None:
    for dim, base in ((1, nn.BatchNorm1d), (2, nn.BatchNorm2d), (3, nn.BatchNorm3d)):
        if issubclass(cls, base):
            return dim
    dims = getattr(cls, "_input_dims", None)
    return {(2, 3): 1, (4,): 2, (5,): 3}.get(tuple(dims)) if dims else None


def convert_sync_batchnorm(
    module: nn.Module,
    process_group: Any | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> nn.Module:
    """Replace every BN layer in ``module`` with :class:`bn_lightning.SyncBatchNorm`.

    Converts torch's ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm``, ours, and any other ``_BatchNorm`` subclass
    (Lightning's ``_BatchNormXd``). Frozen layers (fixed statistics: nothing to synchronise) are left alone, as
    torch's converter does; ghost layers and renorm (which syncs through its own ``sync`` flag) opt out with a class
    attribute ``_bn_lightning_no_sync = True``. Remembers each
    layer's original class so :func:`revert_sync_batchnorm` restores it exactly. Layers that are already ours are
    re-pointed at ``process_group``.

    Args:
        module: a model, or a single BN layer (then the converted layer is returned).
        process_group: the group each converted layer synchronises over (``None``: all ranks).
        include: optional ``fnmatch`` patterns on qualified module names (``"features.*"``); only matching BN layers
            are converted.
        exclude: optional patterns of BN layers to leave alone.

    Returns:
        The converted module (the same object unless ``module`` itself was a BN layer).

    Example::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        >>> net = convert_sync_batchnorm(net)
        >>> type(net[1]).__name__, type(revert_sync_batchnorm(net)[1]) is torch.nn.BatchNorm2d
        ('SyncBatchNorm', True)
    """
    return _convert_tree(module, "", "sync", {"process_group": process_group}, include, exclude)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every synchronised BN layer into a local one: ours back into what it was converted from, torch's local.

    - A :class:`bn_lightning.SyncBatchNorm` made by :func:`convert_sync_batchnorm` gets its original class back
      (torch's or ours, 1d/2d/3d, or ``torch.nn.SyncBatchNorm`` with its process group); one constructed directly
      (no original to return to) becomes a local :class:`bn_lightning.layers.BatchNormXd`, which accepts any
      ``(N, C, *)`` input.
    - A ``torch.nn.SyncBatchNorm`` made elsewhere (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, or built
      directly) becomes a :class:`TorchBatchNormXd`: torch's kernel, any input of at least 2 dimensions, as the
      ``SyncBatchNorm`` accepted (it does not record the dimensionality of the layer it replaced).

    The parameters and buffers are the very same tensor objects, the training flag is kept.

    Args:
        module: a model or a single layer.

    Returns:
        The reverted module (the same object unless ``module`` itself was converted).

    Example::

        >>> import torch
        >>> net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(4)))
        >>> w = net[0].weight
        >>> net = revert_sync_batchnorm(net)
        >>> type(net[0]).__name__, net[0].weight is w
        ('TorchBatchNormXd', True)
    """
    out = module
    if isinstance(module, SyncBatchNorm):
        if getattr(module, _ORIGINAL, None) is not None:
            out = _restore(module)
        else:
            out = swap_batchnorm(module, BatchNormXd)
    elif isinstance(module, nn.SyncBatchNorm):
        out = swap_batchnorm(module, TorchBatchNormXd)
    for child_name, child in module.named_children():
        out.add_module(child_name, revert_sync_batchnorm(child))
    return out


def bn_param_groups(
    model: nn.Module, weight_decay: float, no_decay_bias: bool = False, no_decay_bn: bool = True
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with BN weights and biases (and optionally all biases) excluded from weight decay.

    Decaying gamma and beta fights the normalisation (it shrinks the layer's output scale for no benefit); common
    recipes exempt them. Parameters that do not require grad are left out. Each parameter appears exactly once.
    Frozen BN layers hold buffers only, so nothing of theirs is in either group.

    Args:
        model: the model.
        weight_decay: decay of the first group.
        no_decay_bias: also exempt every other parameter named ``*bias``.
        no_decay_bn: exempt BN affine parameters (the point of this function; ``False`` gives one group).

    Returns:
        ``[{"params": [...], "weight_decay": weight_decay}, {"params": [...], "weight_decay": 0.0}]``.

    Example::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        >>> [len(g["params"]) for g in bn_param_groups(net, 1e-4)]
        [2, 2]
        >>> opt = torch.optim.SGD(bn_param_groups(net, 1e-4), lr=0.1)
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    exempt: set[int] = set()
    for module in model.modules():
        if no_decay_bn and isinstance(module, _BatchNorm):
            exempt.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in exempt or (no_decay_bias and name.endswith("bias")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
