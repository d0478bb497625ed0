"""Which modules of a model the BN callbacks watch: :func:`find_batchnorm_layers`, the core's function.

Defined in :mod:`bn_lightning.monitoring.discovery` (the recorders use it too); here for the callbacks beside it.
"""

from bn_lightning.monitoring import find_batchnorm_layers

__all__ = ["find_batchnorm_layers"]
