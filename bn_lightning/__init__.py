"""bn_lightning: the BatchNorm toolkit for PyTorch Lightning.

Flat re-exports of the public API; see the README for a tour.
"""

from bn_lightning import functional
from bn_lightning.layers import BatchNorm1d, BatchNorm2d, BatchNorm3d, get_batchnorm_class

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "__version__",
    "functional",
    "get_batchnorm_class",
]
