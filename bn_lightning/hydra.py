"""Hydra's side of bn_lightning: importing this module registers the structured configs in Hydra's ConfigStore.

Provides :func:`register_configs`, called on import, which stores :class:`~bn_lightning.policy.BatchNormPolicy` as
``bn/base_policy``: the schema every file of the ``conf/bn`` group starts from, so a misspelt key or a wrong type
fails when the config is composed, not when training starts. A ``conf/bn`` file lists only what differs from the
schema's defaults (the dataclass documents every field)::

    defaults:
      - base_policy
      - _self_
    impl: ghost
    options:
      virtual_batch_size: 16

``import bn_lightning`` does not import Hydra; :mod:`bn_lightning.app.train` imports this module.

Example::

    >>> import bn_lightning.hydra
    >>> from hydra.core.config_store import ConfigStore
    >>> "base_policy.yaml" in ConfigStore.instance().list("bn")
    True
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from bn_lightning.policy import BatchNormPolicy

__all__ = ["register_configs"]


def register_configs() -> None:
    """Store :class:`~bn_lightning.policy.BatchNormPolicy` in Hydra's ConfigStore as ``bn/base_policy`` (idempotent)."""
    ConfigStore.instance().store(group="bn", name="base_policy", node=BatchNormPolicy)


register_configs()
