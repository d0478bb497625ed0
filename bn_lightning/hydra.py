"""Hydra's side of bn_lightning: importing this module registers the structured configs in Hydra's ConfigStore.

Provides :func:`register_configs`, called on import, which stores the schemas of :mod:`bn_lightning.app.schemas`:

- group ``bn_lightning/bn``: the BN policy, one option per implementation (``torch``, ``scratch``, ``sync``,
  ``ghost``, ``renorm``, ``frozen``), each a :class:`~bn_lightning.app.schemas.BatchNormPolicyConfig` with that
  ``impl``;
- group ``bn_lightning/callbacks``: ``monitor``, ``drift``, ``precise_bn``, ``gap``, ``freeze``, ``guard``,
  ``accumulate``, ``sync_buffers``, the callbacks with all their defaults;
- group ``bn_lightning/plugins``: ``sync``, the :class:`~bn_lightning.plugins.SyncBatchNormPlugin`.

Any Hydra application places them with a defaults entry, e.g. in its primary config::

    defaults:
      - _self_
      - bn_lightning/callbacks@callbacks.bn_monitor: monitor
      - bn_lightning/bn@bn: ghost

and ``hydra.utils.instantiate(cfg.callbacks.bn_monitor)`` builds a ``BatchNormMonitor``. A misspelt key or a wrong
type fails when the config is composed, naming the key. ``import bn_lightning`` does not import Hydra.

Example::

    >>> import bn_lightning.hydra
    >>> from hydra.core.config_store import ConfigStore
    >>> sorted(ConfigStore.instance().list("bn_lightning/callbacks"))[:5]
    ['accumulate.yaml', 'drift.yaml', 'freeze.yaml', 'gap.yaml', 'guard.yaml']
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from bn_lightning.app.schemas import (
    AccumulateBatchNormStatsConfig,
    BatchNormFreezeConfig,
    BatchNormGapConfig,
    BatchNormGuardConfig,
    BatchNormMonitorConfig,
    BatchNormPolicyConfig,
    PreciseBNConfig,
    RunningStatDriftConfig,
    SyncBatchNormBuffersConfig,
    SyncBatchNormPluginConfig,
)

__all__ = ["BN_OPTIONS", "CALLBACK_OPTIONS", "register_configs"]

#: The options of the ``bn_lightning/bn`` group: the BN implementations.
BN_OPTIONS = ("torch", "scratch", "sync", "ghost", "renorm", "frozen")

#: The options of the ``bn_lightning/callbacks`` group and the schema each one stores.
CALLBACK_OPTIONS: dict[str, type] = {
    "monitor": BatchNormMonitorConfig,
    "drift": RunningStatDriftConfig,
    "precise_bn": PreciseBNConfig,
    "gap": BatchNormGapConfig,
    "freeze": BatchNormFreezeConfig,
    "guard": BatchNormGuardConfig,
    "accumulate": AccumulateBatchNormStatsConfig,
    "sync_buffers": SyncBatchNormBuffersConfig,
}


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore under ``bn_lightning/{bn,callbacks,plugins}`` (idempotent)."""
    store = ConfigStore.instance()
    for impl in BN_OPTIONS:
        store.store(group="bn_lightning/bn", name=impl, node=BatchNormPolicyConfig(impl=impl))
    for name, schema in CALLBACK_OPTIONS.items():
        store.store(group="bn_lightning/callbacks", name=name, node=schema)
    store.store(group="bn_lightning/plugins", name="sync", node=SyncBatchNormPluginConfig)


register_configs()
