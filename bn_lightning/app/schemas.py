"""Structured-config schemas (dataclasses) of the BN policy, the BN callbacks and the plugin, for Hydra.

Provides :class:`BatchNormPolicyConfig` (with its nested :class:`FreezePolicyConfig` and
:class:`PreciseBNPolicyConfig`), one schema per callback (:class:`BatchNormMonitorConfig`,
:class:`RunningStatDriftConfig`, :class:`PreciseBNConfig`, :class:`BatchNormGapConfig`,
:class:`BatchNormFreezeConfig`), :class:`SyncBatchNormPluginConfig`, and :data:`TARGETS` (schema -> the class it
describes). Each schema has a ``_target_`` and one field per constructor argument, with the constructor's default
(a test compares them with the signatures), so ``hydra.utils.instantiate`` builds the object and OmegaConf refuses a
misspelt key or a wrong type when the config is composed. Values a type cannot judge (a ``momentum`` outside
``[0, 1]`` or a word other than ``cumulative``, an unknown ``impl``) are checked by the class itself when it is
built, naming the argument.

:mod:`bn_lightning.hydra` registers these schemas in Hydra's ConfigStore.

**Nested policies.** ``freeze`` and ``precise_bn`` of :class:`BatchNormPolicyConfig` are nodes, not ``null``, so a
command line can set one of their fields (OmegaConf cannot set a key inside a ``null`` node). Their ``enabled``
field decides whether the policy uses them: ``null`` (the default) means "on as soon as any other field differs
from its default", so ``bn.precise_bn.num_batches=50`` turns PreciseBN on and the untouched node is off;
``true``/``false`` force it (``bn.freeze.enabled=true`` freezes from the start with all defaults). ``bn.freeze=null``
is off too. :meth:`bn_lightning.policy.BatchNormPolicy.from_config` reads ``enabled``.

Example::

    >>> from omegaconf import OmegaConf
    >>> import hydra.utils
    >>> cfg = OmegaConf.structured(BatchNormMonitorConfig(bins=32))
    >>> monitor = hydra.utils.instantiate(cfg)
    >>> type(monitor).__name__, monitor.bins
    ('BatchNormMonitor', 32)
    >>> policy = hydra.utils.instantiate(OmegaConf.structured(BatchNormPolicyConfig(impl="ghost")))
    >>> policy.impl, policy.freeze, policy.precise_bn
    ('ghost', None, None)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union  # noqa: UP035  (OmegaConf reads these annotations at runtime)

__all__ = [
    "TARGETS",
    "AccumulateBatchNormStatsConfig",
    "BatchNormFreezeConfig",
    "BatchNormGapConfig",
    "BatchNormGuardConfig",
    "BatchNormMonitorConfig",
    "BatchNormPolicyConfig",
    "FreezePolicyConfig",
    "PreciseBNConfig",
    "PreciseBNPolicyConfig",
    "RunningStatDriftConfig",
    "SyncBatchNormBuffersConfig",
    "SyncBatchNormPluginConfig",
]


@dataclass
class _FreezeFields:
    """:class:`~bn_lightning.callbacks.freeze.BatchNormFreeze`'s arguments: the callback's schema and ``bn.freeze``."""

    freeze_at_epoch: Optional[int] = None  # noqa: UP045
    freeze_at_step: Optional[int] = None  # noqa: UP045
    include: Optional[List[str]] = None  # noqa: UP006, UP045
    exclude: Optional[List[str]] = None  # noqa: UP006, UP045
    freeze_affine: bool = False
    unfreeze_at_epoch: Optional[int] = None  # noqa: UP045


@dataclass
class _PreciseBNFields:
    """The :class:`~bn_lightning.callbacks.precise_bn.PreciseBN` arguments that ``bn.precise_bn`` also holds."""

    num_batches: int = 200
    when: str = "before_validation"
    every_n_epochs: int = 1


@dataclass
class FreezePolicyConfig(_FreezeFields):
    """``bn.freeze``: :class:`~bn_lightning.policy.FreezePolicy`'s fields plus ``enabled`` (see the module docstring).

    Args: see :class:`~bn_lightning.callbacks.freeze.BatchNormFreeze`; ``enabled``: ``null`` on when any other
    field is set, ``true``/``false`` force it.
    """

    enabled: Optional[bool] = None  # noqa: UP045


@dataclass
class PreciseBNPolicyConfig(_PreciseBNFields):
    """``bn.precise_bn``: :class:`~bn_lightning.policy.PreciseBNPolicy`'s fields plus ``enabled`` (see above).

    Args: see :class:`~bn_lightning.callbacks.precise_bn.PreciseBN`; ``enabled``: ``null`` on when any other
    field is set, ``true``/``false`` force it.
    """

    enabled: Optional[bool] = None  # noqa: UP045


@dataclass
class BatchNormPolicyConfig:
    """The ``bn`` node: a :class:`~bn_lightning.policy.BatchNormPolicy` (see it for what every field means).

    ``instantiate`` builds the policy; :class:`~bn_lightning.module.BatchNormModule` also accepts the node itself.
    """

    _target_: str = "bn_lightning.policy.BatchNormPolicy"
    impl: Optional[str] = None  # noqa: UP045
    options: Dict[str, Any] = field(default_factory=dict)  # noqa: UP006
    include: Optional[List[str]] = None  # noqa: UP006, UP045
    exclude: Optional[List[str]] = None  # noqa: UP006, UP045
    # a number in [0, 1], "cumulative" (torch's momentum=None) or null (keep); int: `bn.momentum=1` parses as one
    momentum: Optional[Union[float, int, str]] = None  # noqa: UP007, UP045
    eps: Optional[float] = None  # noqa: UP045
    no_weight_decay: bool = True
    freeze: Optional[FreezePolicyConfig] = field(default_factory=FreezePolicyConfig)  # noqa: UP045
    precise_bn: Optional[PreciseBNPolicyConfig] = field(default_factory=PreciseBNPolicyConfig)  # noqa: UP045


@dataclass
class BatchNormMonitorConfig:
    """:class:`~bn_lightning.callbacks.monitor.BatchNormMonitor` (see it for what every field means)."""

    _target_: str = "bn_lightning.callbacks.BatchNormMonitor"
    log_every_n_steps: Optional[int] = None  # noqa: UP045
    include: Optional[List[str]] = None  # noqa: UP006, UP045
    exclude: Optional[List[str]] = None  # noqa: UP006, UP045
    histogram: bool = True
    bins: int = 64
    hist_range: float = 6.0
    sample_size: int = 4096
    collapse_var: float = 1e-6
    near_zero_gamma: float = 1e-3
    prefix: str = "bn"


@dataclass
class RunningStatDriftConfig:
    """:class:`~bn_lightning.callbacks.drift.RunningStatDrift` (see it for what every field means)."""

    _target_: str = "bn_lightning.callbacks.RunningStatDrift"
    log_every_n_steps: Optional[int] = None  # noqa: UP045
    include: Optional[List[str]] = None  # noqa: UP006, UP045
    exclude: Optional[List[str]] = None  # noqa: UP006, UP045
    actions: Optional[Dict[str, str]] = None  # noqa: UP006, UP045
    min_batch_size: int = 8
    max_drift_kl: float = 0.5
    collapse_var: float = 1e-6
    max_collapsed_frac: float = 0.5
    drift_warmup_steps: int = 100
    prefix: str = "bn"


@dataclass
class PreciseBNConfig(_PreciseBNFields):
    """:class:`~bn_lightning.callbacks.precise_bn.PreciseBN` (see it for what every field means)."""

    _target_: str = "bn_lightning.callbacks.PreciseBN"
    forward_fn: Any = None  # a callable: set it with a `_target_`/`_partial_` node
    progress: Optional[bool] = None  # noqa: UP045
    prefix: str = "bn"
    target: str = "model"  # "model", or "averaged": the copy of a weight-averaging callback (EMA, SWA)


@dataclass
class BatchNormGapConfig:
    """:class:`~bn_lightning.callbacks.gap.BatchNormGap` (see it for what every field means)."""

    _target_: str = "bn_lightning.callbacks.BatchNormGap"
    num_batches: int = 4
    loss_fn: Any = None  # a callable: set it with a `_target_`/`_partial_` node
    metric_fn: Any = None  # likewise
    prefix: str = "bn"


@dataclass
class BatchNormFreezeConfig(_FreezeFields):
    """:class:`~bn_lightning.callbacks.freeze.BatchNormFreeze` (see it for what every field means)."""

    _target_: str = "bn_lightning.callbacks.BatchNormFreeze"


@dataclass
class BatchNormGuardConfig:
    """:class:`~bn_lightning.callbacks.guard.BatchNormGuard` (see it for what every field means)."""

    _target_: str = "bn_lightning.callbacks.BatchNormGuard"
    nonfinite: str = "skip"  # "skip" | "raise"
    rollback_skipped_steps: bool = True


@dataclass
class AccumulateBatchNormStatsConfig:
    """:class:`~bn_lightning.callbacks.accumulate.AccumulateBatchNormStats` (no arguments)."""

    _target_: str = "bn_lightning.callbacks.AccumulateBatchNormStats"


@dataclass
class SyncBatchNormBuffersConfig:
    """:class:`~bn_lightning.callbacks.sync_buffers.SyncBatchNormBuffers` (see it for what every field means)."""

    _target_: str = "bn_lightning.callbacks.SyncBatchNormBuffers"
    reduce: str = "mean"  # "mean" | "broadcast"
    when: str = "before_validation"  # "before_validation" | "epoch_end" | "before_save"


@dataclass
class SyncBatchNormPluginConfig:
    """:class:`~bn_lightning.plugins.SyncBatchNormPlugin` (see it for what every field means)."""

    _target_: str = "bn_lightning.plugins.SyncBatchNormPlugin"
    group_size: Optional[int] = None  # noqa: UP045
    include: Optional[List[str]] = None  # noqa: UP006, UP045
    exclude: Optional[List[str]] = None  # noqa: UP006, UP045
    idle_gloo_loop: bool = True


#: Each schema and the dotted path of the class it describes (its ``_target_``).
TARGETS: dict[type, str] = {
    cls: cls._target_
    for cls in (
        BatchNormPolicyConfig,
        BatchNormMonitorConfig,
        RunningStatDriftConfig,
        PreciseBNConfig,
        BatchNormGapConfig,
        BatchNormFreezeConfig,
        BatchNormGuardConfig,
        AccumulateBatchNormStatsConfig,
        SyncBatchNormBuffersConfig,
        SyncBatchNormPluginConfig,
    )
}
