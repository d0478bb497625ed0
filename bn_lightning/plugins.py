"""The Lightning ``LayerSync`` plugin that synchronises BatchNorm on every device and backend.

Provides :class:`SyncBatchNormPlugin`. ``Trainer(sync_batchnorm=True)`` converts to ``torch.nn.SyncBatchNorm``, which
refuses CPU tensors; this plugin converts to :class:`bn_lightning.SyncBatchNorm`, which runs on CPU (gloo) and CUDA
(nccl), optionally within groups of ``group_size`` consecutive ranks and only for chosen layers, and on CPU runs
gloo's event loop at ``SCHED_IDLE`` while it is applied (``idle_gloo_loop``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
from lightning.pytorch.plugins.layer_sync import LayerSync
from torch.nn import Module
from typing_extensions import override

from bn_lightning.convert import convert_sync_batchnorm, revert_sync_batchnorm
from bn_lightning.distributed import is_distributed, set_gloo_event_loop_policy
from bn_lightning.validation import check_bool, check_int, check_patterns

__all__ = ["SyncBatchNormPlugin"]


class SyncBatchNormPlugin(LayerSync):
    """Convert the model's BN layers to :class:`bn_lightning.SyncBatchNorm` when a DDP-style strategy sets up.

    Lightning calls :meth:`apply` after the process group is initialised (fitting only) and :meth:`revert` at
    teardown, which restores the exact original classes. In a single process the converted layers behave as local BN.
    Combining this plugin with ``Trainer(sync_batchnorm=True)`` is refused by Lightning with a clear error.

    On CPU, every synchronisation point has one rank whose peer's data arrives before it posts the receive, and gloo's
    TCP event loop then busy-polls that socket, taking the core from the rank's own threads. With ``idle_gloo_loop``
    (the default) :meth:`apply` runs the loops of this process's gloo groups at ``SCHED_IDLE`` (see
    :func:`bn_lightning.distributed.set_gloo_event_loop_policy`: about 3x cheaper SyncBatchNorm on a 2-core machine)
    and :meth:`revert` puts them back. Only gloo's own threads of this process change; groups created after
    :meth:`apply` keep gloo's default.

    Args:
        group_size: synchronise within consecutive groups of this many ranks (e.g. 8 of 64 GPUs: one group per
            node); must divide the world size. ``None``: all ranks form one group.
        include: ``fnmatch`` patterns on qualified module names (``"net.features.*"``); only matching BN layers are
            converted. ``None``: all.
        exclude: patterns of BN layers to leave as they are.
        idle_gloo_loop: run gloo's event-loop threads at ``SCHED_IDLE`` from :meth:`apply` to :meth:`revert`
            (Linux; no effect without gloo groups).

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
        idle_gloo_loop: bool = True,
    ) -> None:
        self.group_size = check_int("SyncBatchNormPlugin", "group_size", group_size, optional=True)
        self.include = check_patterns("SyncBatchNormPlugin", "include", include)
        self.exclude = check_patterns("SyncBatchNormPlugin", "exclude", exclude)
        self.idle_gloo_loop = check_bool("SyncBatchNormPlugin", "idle_gloo_loop", idle_gloo_loop)
        self._group: Any = None
        self._idled_loops = False

    def process_group(self) -> Any:
        """The group this rank synchronises in: ``None`` (all ranks) or its subgroup of ``group_size`` ranks.

        Creating subgroups is collective: every rank calls this (through :meth:`apply`) in the same order.

        Raises:
            ValueError: ``group_size`` does not divide the world size.
        """
        if self.group_size is None or not is_distributed():
            return None
        if self._group is None:
            world = dist.get_world_size()
            if world % self.group_size:
                raise ValueError(f"group_size={self.group_size} must divide the world size {world}")
            self._group, _ = dist.new_subgroups(group_size=self.group_size)
        return self._group

    @override
    def apply(self, model: Module) -> Module:
        """Convert the selected BN layers of ``model`` to :class:`bn_lightning.SyncBatchNorm` (and idle gloo's loop)."""
        converted = convert_sync_batchnorm(model, self.process_group(), include=self.include, exclude=self.exclude)
        if self.idle_gloo_loop and is_distributed():
            set_gloo_event_loop_policy("idle")
            self._idled_loops = True
        return converted

    @override
    def revert(self, model: Module) -> Module:
        """Restore the original BN classes (sharing the trained parameters and buffers) and gloo's loop policy."""
        if self._idled_loops:
            set_gloo_event_loop_policy("normal")
            self._idled_loops = False
        return revert_sync_batchnorm(model)
