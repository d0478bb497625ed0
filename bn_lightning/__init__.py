"""bn_lightning: the BatchNorm toolkit for PyTorch Lightning.

Flat re-exports of the public API; see the README for a tour and docs/architecture.md for the floors. The torch-only
core (layers, functional, conversion, PreciseBN's algorithm, distributed helpers) is imported with the package; the
Lightning names (:class:`BatchNormModule` and the policies) load on first use, so ``import bn_lightning`` costs no
Lightning import. Callbacks live in :mod:`bn_lightning.callbacks`, the LayerSync plugin in
:mod:`bn_lightning.plugins`, the Hydra app in :mod:`bn_lightning.hydra` and :mod:`bn_lightning.app`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bn_lightning import distributed, functional
from bn_lightning.convert import bn_param_groups, convert_batchnorm, convert_sync_batchnorm, revert_sync_batchnorm
from bn_lightning.distributed import set_gloo_event_loop_policy
from bn_lightning.guards import no_stat_update
from bn_lightning.layers import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm1d,
    BatchRenorm2d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    SyncBatchNorm,
    get_batchnorm_class,
)
from bn_lightning.monitoring import BatchNormRecorder
from bn_lightning.precise_bn import recalibrate_bn
from bn_lightning.sync_stats import sync_running_stats

if TYPE_CHECKING:
    from bn_lightning.module import BatchNormModule
    from bn_lightning.policy import BatchNormPolicy, FreezePolicy, PreciseBNPolicy

# Lightning-floor names, imported on first access (PEP 562)
_LAZY = {
    "BatchNormModule": "bn_lightning.module",
    "BatchNormPolicy": "bn_lightning.policy",
    "FreezePolicy": "bn_lightning.policy",
    "PreciseBNPolicy": "bn_lightning.policy",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bn_lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormModule",
    "BatchNormPolicy",
    "BatchNormRecorder",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "FreezePolicy",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "PreciseBNPolicy",
    "SyncBatchNorm",
    "__version__",
    "bn_param_groups",
    "convert_batchnorm",
    "convert_sync_batchnorm",
    "distributed",
    "functional",
    "get_batchnorm_class",
    "no_stat_update",
    "recalibrate_bn",
    "revert_sync_batchnorm",
    "set_gloo_event_loop_policy",
    "sync_running_stats",
]
