"""The Lightning ``LayerSync`` plugin that synchronises BatchNorm on every device and backend.

Provides :class:`SyncBatchNormPlugin`. ``Trainer(sync_batchnorm=True)`` converts to ``torch.nn.SyncBatchNorm``, which
refuses CPU tensors; this plugin converts to :class:`bn_lightning.SyncBatchNorm`, which runs on CPU (gloo) and CUDA
(nccl), optionally within groups of ``group_size`` consecutive ranks and only for chosen layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
from lightning.pytorch.plugins.layer_sync import LayerSync
from torch.nn import Module
from typing_extensions import override

from bn_lightning.convert import convert_sync_batchnorm, revert_sync_batchnorm

__all__ = ["SyncBatchNormPlugin"]


class SyncBatchNormPlugin(LayerSync):
    """Convert the model's BN layers to :class:`bn_lightning.SyncBatchNorm` when a DDP-style strategy sets up.

    Lightning calls :meth:`apply` after the process group is initialised (fitting only) and :meth:`revert` at
    teardown, which restores the exact original classes. In a single process the converted layers behave as local BN.
    Combining this plugin with ``Trainer(sync_batchnorm=True)`` is refused by Lightning with a clear error.

    Args:
        group_size: synchronise within consecutive groups of this many ranks (e.g. 8 of 64 GPUs: one group per
            node); must divide the world size. ``None``: all ranks form one group.
        include: ``fnmatch`` patterns on qualified module names (``"net.features.*"``); only matching BN layers are
            converted. ``None``: all.
        exclude: patterns of BN layers to leave as they are.

    Example::

        >>> import lightning.pytorch as pl
        >>> from bn_lightning.plugins import SyncBatchNormPlugin
        >>> trainer = pl.Trainer(accelerator="cpu", devices=1, plugins=[SyncBatchNormPlugin()], logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> # multi-process: pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", plugins=[SyncBatchNormPlugin()])
    """

    def __init__(
        self,
        group_size: int | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
    ) -> None:
        if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
        for arg, value in (("include", include), ("exclude", exclude)):
            if isinstance(value, str):
                raise TypeError(f"{arg} must be a sequence of patterns, got the string {value!r}; wrap it in a list")
        self.group_size = group_size
        self.include = None if include is None else list(include)
        self.exclude = None if exclude is None else list(exclude)
        self._group: Any = None

    def process_group(self) -> Any:
        """The group this rank synchronises in: ``None`` (all ranks) or its subgroup of ``group_size`` ranks.

        Creating subgroups is collective: every rank calls this (through :meth:`apply`) in the same order.

        Raises:
            ValueError: ``group_size`` does not divide the world size.
        """
        if self.group_size is None or not (dist.is_available() and dist.is_initialized()):
            return None
        if self._group is None:
            world = dist.get_world_size()
            if world % self.group_size:
                raise ValueError(f"group_size={self.group_size} must divide the world size {world}")
            self._group, _ = dist.new_subgroups(group_size=self.group_size)
        return self._group

    @override
    def apply(self, model: Module) -> Module:
        """Convert the selected BN layers of ``model`` to :class:`bn_lightning.SyncBatchNorm`."""
        return convert_sync_batchnorm(model, self.process_group(), include=self.include, exclude=self.exclude)

    @override
    def revert(self, model: Module) -> Module:
        """Restore the original BN classes (sharing the trained parameters and buffers)."""
        return revert_sync_batchnorm(model)
