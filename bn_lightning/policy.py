"""The BatchNorm policy of a training run, as plain dataclasses.

Provides :class:`BatchNormPolicy` (which BN implementation, its options, momentum, eps, weight decay, and the
optional :class:`FreezePolicy` and :class:`PreciseBNPolicy`) and :func:`impl_options`. A policy is data:
:class:`bn_lightning.module.BatchNormModule` applies it to a network and builds the callbacks it asks for. The nested
policies' fields are the arguments of the callbacks they describe, so ``BatchNormFreeze(**asdict(policy.freeze))``
and ``PreciseBN(**asdict(policy.precise_bn))`` build them.

Every policy is validated on construction (``ValueError``/``TypeError`` naming the field and the allowed values), and
:meth:`BatchNormPolicy.from_config` accepts a policy, any mapping (a ``dict``, or Hydra's ``cfg.bn``) or ``None``.
The Hydra schema built on these classes is registered by :mod:`bn_lightning.hydra`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from bn_lightning.callbacks.precise_bn import WHEN
from bn_lightning.layers.factory import BATCHNORM_IMPLS, resolve_impl
from bn_lightning.validation import check_bool, check_choice, check_int, check_number, check_patterns

__all__ = ["CUMULATIVE", "BatchNormPolicy", "FreezePolicy", "PreciseBNPolicy", "impl_options"]

P = TypeVar("P")

#: the ``BatchNormPolicy.momentum`` that asks for torch's ``momentum=None``: a cumulative average, every batch
#: weighted equally (``None`` itself means "keep each layer's momentum", as for the other fields)
CUMULATIVE = "cumulative"

# constructor arguments every BN class has: the policy sets them through its own fields, not `options`
_COMMON_ARGS = {"self", "num_features", "eps", "momentum", "affine", "bias", "track_running_stats", "device", "dtype"}
# objects, not data: they cannot live in a config (SyncBatchNormPlugin's `group_size` picks the group instead)
_OBJECT_ARGS = {"process_group"}


def impl_options(impl: str) -> list[str]:
    """The ``options`` an implementation accepts: its constructor arguments beyond the ones all BN layers share.

    Args:
        impl: an implementation name or alias (see :func:`bn_lightning.layers.factory.resolve_impl`).

    Returns:
        The sorted option names; empty for ``torch``, ``scratch``, ``sync`` and ``frozen``.

    Example::

        >>> impl_options("ghost"), impl_options("BatchRenorm"), impl_options("torch")
        (['virtual_batch_size'], ['d_max', 'r_max', 'sync', 'warmup_steps'], [])
    """
    names: set[str] = set()
    for cls in set(BATCHNORM_IMPLS[resolve_impl(impl)].values()):
        for param in inspect.signature(cls.__init__).parameters.values():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                names.add(param.name)
    return sorted(names - _COMMON_ARGS - _OBJECT_ARGS)


def _from_mapping(cls: type[P], data: Any, owner: str) -> P:
    """Build dataclass ``cls`` from ``data`` (an instance or a mapping, e.g. a ``DictConfig``), refusing unknown keys.

    Nested mappings and sequences are left as they are: each field's check turns them into plain data.
    """
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise TypeError(f"{owner} must be a {cls.__name__}, a mapping or None, got {type(data).__name__}")
    data = dict(data)
    target = f"{cls.__module__}.{cls.__qualname__}"
    if data.get("_target_", target) != target:
        raise ValueError(f"{owner}._target_ must be {target!r} or absent, got {data['_target_']!r}")
    data.pop("_target_", None)  # a Hydra node that `instantiate` would build into this class
    allowed = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(allowed), key=str)
    if unknown:
        raise ValueError(f"{owner} has unknown keys {unknown}; allowed keys are {allowed}")
    return cls(**data)


def _nested(cls: type[P], data: Any, owner: str) -> P | None:
    """Build nested policy ``cls`` from ``data``; a mapping's ``enabled`` key says whether it is on at all.

    ``enabled`` absent or ``True``: on. ``False``: off (``None``). ``None``: on when any other key differs from the
    field's default (how a config schema keeps the node settable from the command line yet off when untouched).
    """
    if not isinstance(data, Mapping):
        return _from_mapping(cls, data, owner)
    data = dict(data)
    enabled = check_bool(owner, "enabled", data.pop("enabled", True), optional=True)
    if enabled is None:
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        enabled = any(key not in defaults or value != defaults[key] for key, value in data.items())
    return _from_mapping(cls, data, owner) if enabled else None


@dataclass
class FreezePolicy:
    """When and which BN layers :class:`~bn_lightning.callbacks.freeze.BatchNormFreeze` freezes during training.

    A frozen layer is in eval mode: it normalises with its running statistics and keeps them unchanged. The fields
    are ``BatchNormFreeze``'s arguments: ``BatchNormFreeze(**asdict(policy))`` builds the callback.

    Args:
        freeze_at_epoch: freeze at the start of this epoch (0-based); with ``freeze_at_step`` also ``None``: from the
            start.
        freeze_at_step: freeze when ``trainer.global_step`` reaches this value (instead of ``freeze_at_epoch``).
        include: ``fnmatch`` patterns of BN layer names in the LightningModule (``"net.features.*"``); ``None``: all.
        exclude: patterns of BN layers to leave alone.
        freeze_affine: also stop training gamma and beta.
        unfreeze_at_epoch: unfreeze at the start of this epoch (after the freeze epoch); ``None``: never.

    Raises:
        ValueError: a negative or non-int epoch or step, both ``freeze_at_epoch`` and ``freeze_at_step``, or an
            ``unfreeze_at_epoch`` not after the freeze epoch.
        TypeError: ``include``/``exclude`` not a list of strings, ``freeze_affine`` not a bool.

    Example::

        >>> policy = FreezePolicy(freeze_at_epoch=5, include=("net.features.*",))
        >>> policy.freeze_at_epoch, policy.include, policy.freeze_affine
        (5, ['net.features.*'], False)
        >>> FreezePolicy(freeze_at_epoch=2, freeze_at_step=100)
        Traceback (most recent call last):
            ...
        ValueError: FreezePolicy: give at most one of freeze_at_epoch (2) and freeze_at_step (100)
    """

    freeze_at_epoch: int | None = None
    freeze_at_step: int | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    freeze_affine: bool = False
    unfreeze_at_epoch: int | None = None

    def __post_init__(self) -> None:
        for name in ("freeze_at_epoch", "freeze_at_step", "unfreeze_at_epoch"):
            check_int("FreezePolicy", name, getattr(self, name), minimum=0, optional=True)
        if self.freeze_at_epoch is not None and self.freeze_at_step is not None:
            raise ValueError(
                f"FreezePolicy: give at most one of freeze_at_epoch ({self.freeze_at_epoch}) and freeze_at_step "
                f"({self.freeze_at_step})"
            )
        if self.unfreeze_at_epoch is not None and self.unfreeze_at_epoch <= (self.freeze_at_epoch or 0):
            raise ValueError(
                f"FreezePolicy: unfreeze_at_epoch must be greater than the freeze epoch ({self.freeze_at_epoch or 0}), "
                f"got {self.unfreeze_at_epoch!r}"
            )
        self.include = check_patterns("FreezePolicy", "include", self.include)
        self.exclude = check_patterns("FreezePolicy", "exclude", self.exclude)
        check_bool("FreezePolicy", "freeze_affine", self.freeze_affine)


@dataclass
class PreciseBNPolicy:
    """How :class:`~bn_lightning.callbacks.precise_bn.PreciseBN` recomputes the BN population statistics.

    The fields are ``PreciseBN``'s arguments: ``PreciseBN(**asdict(policy))`` builds the callback.

    Args:
        num_batches: training batches per recalibration (200 in Wu & Johnson, 2021).
        when: ``"before_validation"`` (every validation of ``fit`` sees precise statistics), ``"epoch_end"`` (after
            every ``every_n_epochs``-th epoch) or ``"fit_end"`` (once, when training ends).
        every_n_epochs: for ``when="epoch_end"``: recalibrate after every this many epochs.

    Raises:
        ValueError: ``num_batches`` or ``every_n_epochs`` not a positive int, or an unknown ``when``.

    Example::

        >>> PreciseBNPolicy(num_batches=50)
        PreciseBNPolicy(num_batches=50, when='before_validation', every_n_epochs=1)
        >>> PreciseBNPolicy(when="sometimes")
        Traceback (most recent call last):
            ...
        ValueError: PreciseBNPolicy: when must be one of ('before_validation', 'epoch_end', 'fit_end'), got 'sometimes'
    """

    num_batches: int = 200
    when: str = "before_validation"
    every_n_epochs: int = 1

    def __post_init__(self) -> None:
        check_int("PreciseBNPolicy", "num_batches", self.num_batches)
        check_choice("PreciseBNPolicy", "when", self.when, WHEN)
        check_int("PreciseBNPolicy", "every_n_epochs", self.every_n_epochs)


@dataclass
class BatchNormPolicy:
    """What a training run does with BatchNorm: the implementation, its settings, weight decay, freezing, PreciseBN.

    :class:`bn_lightning.module.BatchNormModule` applies it: it converts the selected BN layers of the network to
    ``impl`` (with ``options``) and sets their ``momentum``/``eps`` when it is built, exempts BN parameters from weight
    decay in ``configure_optimizers``, and returns the freeze and PreciseBN callbacks from ``configure_callbacks``.
    A field left at ``None`` changes nothing: the default policy keeps the network's layers as they are and only
    exempts gamma and beta from weight decay.

    Args:
        impl: ``"torch"``, ``"scratch"``, ``"sync"``, ``"ghost"``, ``"renorm"`` or ``"frozen"`` (aliases such as
            ``"SyncBN"`` are accepted and stored under the canonical name); ``None``: keep each layer's class.
        options: constructor options of ``impl``: ``virtual_batch_size`` (ghost); ``r_max``, ``d_max``,
            ``warmup_steps``, ``sync`` (renorm). See :func:`impl_options`.
        include: ``fnmatch`` patterns of BN layer names in the LightningModule (``"net.features.*"``) that the policy
            converts and whose momentum/eps it sets; ``None``: all.
        exclude: patterns of BN layers the policy leaves alone.
        momentum: running-average factor set on every selected layer, in ``[0, 1]``; ``"cumulative"``
            (:data:`CUMULATIVE`): torch's ``momentum=None``, a cumulative average of all batches, each weighted
            equally (``1 / num_batches_tracked``); ``None``: keep each layer's. :attr:`layer_momentum` is the value
            the layers get.
        eps: added to the variance, ``> 0``; ``None``: keep each layer's.
        no_weight_decay: put BN weights and biases in a parameter group with ``weight_decay=0`` (decaying them only
            shrinks the normalised output's scale); ``False``: one group, decayed like everything else.
        freeze: freeze BN layers during training (:class:`FreezePolicy`, or a mapping of its fields); ``None``:
            never. A mapping may also hold ``enabled``: ``False`` means ``None``; ``None`` means on only if another
            key differs from its default (the Hydra schema's untouched node is off, see
            :mod:`bn_lightning.app.schemas`).
        precise_bn: recompute the population statistics (:class:`PreciseBNPolicy`, or a mapping as for ``freeze``);
            ``None``: never.

    Raises:
        ValueError: an unknown ``impl`` or option (naming the allowed ones), a ``momentum`` neither in ``[0, 1]``
            nor ``"cumulative"``,
            an ``eps <= 0``, or an invalid nested policy.
        TypeError: a field of the wrong type (``include`` given as a string, ``options`` not a mapping, ...).

    Example::

        >>> policy = BatchNormPolicy(impl="GhostBN", options={"virtual_batch_size": 16}, freeze={"freeze_at_epoch": 5})
        >>> policy.impl, policy.freeze.freeze_at_epoch
        ('ghost', 5)
        >>> policy.to_dict()["options"]
        {'virtual_batch_size': 16}
        >>> BatchNormPolicy(precise_bn={"enabled": None, "num_batches": 200}).precise_bn is None  # all defaults: off
        True
        >>> BatchNormPolicy(momentum="cumulative").layer_momentum is None  # torch's momentum=None
        True
        >>> BatchNormPolicy(impl="layernorm")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
            ...
        ValueError: BatchNormPolicy.impl: Unknown BatchNorm implementation 'layernorm'; expected one of ['frozen', ...
    """

    impl: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    include: list[str] | None = None
    exclude: list[str] | None = None
    momentum: float | str | None = None
    eps: float | None = None
    no_weight_decay: bool = True
    freeze: FreezePolicy | None = None
    precise_bn: PreciseBNPolicy | None = None

    def __post_init__(self) -> None:
        if self.impl is not None:
            try:
                self.impl = resolve_impl(self.impl)
            except (TypeError, ValueError) as err:
                raise type(err)(f"BatchNormPolicy.impl: {err}") from None
        self._check_options()
        self.include = check_patterns("BatchNormPolicy", "include", self.include)
        self.exclude = check_patterns("BatchNormPolicy", "exclude", self.exclude)
        if isinstance(self.momentum, str):
            if self.momentum != CUMULATIVE:
                raise ValueError(
                    f"BatchNormPolicy: momentum must be a number >= 0 and <= 1, {CUMULATIVE!r} (torch's "
                    f"momentum=None, a cumulative average) or None (keep each layer's), got {self.momentum!r}"
                )
        elif self.momentum is not None:
            self.momentum = float(check_number("BatchNormPolicy", "momentum", self.momentum, low=0.0, high=1.0))
        if self.eps is not None:
            self.eps = float(check_number("BatchNormPolicy", "eps", self.eps, low=0.0, low_open=True))
        check_bool("BatchNormPolicy", "no_weight_decay", self.no_weight_decay)
        if self.freeze is not None:
            self.freeze = _nested(FreezePolicy, self.freeze, "BatchNormPolicy.freeze")
        if self.precise_bn is not None:
            self.precise_bn = _nested(PreciseBNPolicy, self.precise_bn, "BatchNormPolicy.precise_bn")

    @property
    def layer_momentum(self) -> float | None:
        """The ``momentum`` the selected layers get when :attr:`momentum` is not ``None``: ``None`` for cumulative.

        Example::

            >>> BatchNormPolicy(momentum=0.01).layer_momentum, BatchNormPolicy(momentum="cumulative").layer_momentum
            (0.01, None)
        """
        return None if self.momentum == CUMULATIVE else self.momentum  # type: ignore[return-value]

    def _check_options(self) -> None:
        if self.options is None:
            self.options = {}
        if not isinstance(self.options, Mapping):
            raise TypeError(f"BatchNormPolicy.options must be a mapping, got {type(self.options).__name__}")
        self.options = dict(self.options)
        if not self.options:
            return
        if self.impl is None:
            raise ValueError(f"BatchNormPolicy.options {sorted(self.options)} need an impl; impl is None")
        allowed = impl_options(self.impl)
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise ValueError(
                f"BatchNormPolicy.options {unknown} are not options of impl {self.impl!r}; allowed: {allowed or 'none'}"
            )
        # the values are the layer's to judge: a one-channel layer checks them now, before any network is built
        layer_cls = next(iter(BATCHNORM_IMPLS[self.impl].values()))
        try:
            layer_cls(1, **self.options)
        except (TypeError, ValueError) as err:
            raise type(err)(f"BatchNormPolicy.options: {err}") from None

    @classmethod
    def from_config(cls, config: BatchNormPolicy | Mapping[str, Any] | None) -> BatchNormPolicy:
        """The policy ``config`` describes: a policy (returned as is), a mapping, or ``None``.

        Args:
            config: e.g. ``{"impl": "ghost", "options": {"virtual_batch_size": 16}}``, or Hydra's ``cfg.bn`` (an
                OmegaConf ``DictConfig`` is a mapping; its ``_target_``, if any, must name this class).

        Returns:
            The validated policy; ``None`` gives the default ``BatchNormPolicy()``.

        Raises:
            ValueError: unknown keys (naming the allowed ones) or invalid values.
            TypeError: ``config`` is none of the above.

        Example::

            >>> BatchNormPolicy.from_config({"impl": "sync_batchnorm", "momentum": 0.01}).impl
            'sync'
            >>> BatchNormPolicy.from_config({"impl": "torch", "momentun": 0.1})  # doctest: +ELLIPSIS
            Traceback (most recent call last):
                ...
            ValueError: BatchNormPolicy has unknown keys ['momentun']; allowed keys are ['impl', 'options', ...
        """
        if config is None:
            return cls()
        return _from_mapping(cls, config, cls.__name__)

    def to_dict(self) -> dict[str, Any]:
        """The policy as plain data (``dataclasses.asdict``): what the module stores in ``hparams["bn_policy"]``."""
        return asdict(self)
