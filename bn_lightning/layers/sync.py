"""SyncBatchNorm for every device and backend: CPU tensors over gloo, CUDA tensors over nccl.

Provides :class:`SyncBatchNorm` (a drop-in for :class:`torch.nn.SyncBatchNorm`, same constructor and ``state_dict``)
and :class:`ProcessGroupReducer`, the :class:`~bn_lightning.functional.StatsReducer` it plugs into the functional core;
:func:`synchronised_forward`, how a synchronising layer runs inside ``torch.compile`` (eagerly: a graph break).
Per layer and training step there is exactly one collective in forward (an all-gather of every rank's per-channel
mean, variance and count, merged exactly with :func:`~bn_lightning.functional.merge_stats`) and one in backward (an
all-reduce of the two per-channel gradient sums). Ours is deliberately NOT a subclass of ``torch.nn.SyncBatchNorm``:
torch's DDP refuses to wrap a CPU module that holds one.

The collectives go through :mod:`bn_lightning.distributed`; the layer changes nothing outside itself (no thread
scheduling, no environment): on CPU, :class:`~bn_lightning.plugins.SyncBatchNormPlugin` (``idle_gloo_loop=True``) or
:func:`bn_lightning.distributed.set_gloo_event_loop_policy` makes gloo's collectives much cheaper (see there).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from bn_lightning import distributed
from bn_lightning.functional import BatchStats, StatsReducer, merge_finite_stats
from bn_lightning.layers.batchnorm import ScratchBatchNormMixin

__all__ = [
    "NORM_HAS_BIAS_FLAG",
    "ProcessGroupReducer",
    "SyncBatchNorm",
    "compiled_sync",
    "group_reducer",
    "synchronised_forward",
]

# torch >= 2.13 has BatchNorm(..., bias=False): gamma without beta
NORM_HAS_BIAS_FLAG = "bias" in inspect.signature(_NormBase.__init__).parameters


class ProcessGroupReducer:
    """Synchronises BN statistics over a process group: one collective per call.

    Args:
        group: the process group (``None`` = the default group).
        world_size: its size.
        layer_name: used in error messages.
    """

    def __init__(self, group: Any, world_size: int, layer_name: str = "SyncBatchNorm") -> None:
        self.group = group
        self.world_size = world_size
        self.layer_name = layer_name

    def reduce_stats(self, mean: Tensor, var: Tensor, count: int) -> BatchStats:
        """All-gather ``[mean, var, count]`` (float64, one packed tensor) and merge the ranks' statistics exactly.

        A rank with an empty batch sends ``count = 0`` and still joins the collective, so no peer hangs.

        Raises:
            ValueError: the whole group holds a single value per channel (checked on the host only when this
                rank's own count is <= 1, so the common case costs no synchronisation).
        """
        channels = mean.numel()
        packed = torch.cat([mean.double(), var.double(), mean.new_full((1,), float(count), dtype=torch.float64)])
        rows = distributed.all_gather(packed, self.group)
        merged = merge_finite_stats(rows[:, :channels], rows[:, channels : 2 * channels], rows[:, 2 * channels :])
        if count <= 1 and int(merged.count) == 1:
            raise ValueError(
                f"{self.layer_name}: expected more than 1 value per channel when training, but the whole process "
                f"group of {self.world_size} ranks holds 1"
            )
        return BatchStats(merged.mean, merged.var.to(var.dtype), merged.count)

    def reduce_grads(self, sum_dy: Tensor, sum_dy_xhat: Tensor) -> tuple[Tensor, Tensor]:
        """All-reduce (sum) the backward's two per-channel sums, packed into one tensor."""
        return self.start_reduce_grads(sum_dy, sum_dy_xhat)()

    def start_reduce_grads(self, sum_dy: Tensor, sum_dy_xhat: Tensor) -> Callable[[], tuple[Tensor, Tensor]]:
        """Start :meth:`reduce_grads`'s all-reduce asynchronously; the callable returned waits and returns the sums."""
        packed = torch.cat([sum_dy, sum_dy_xhat])
        work = distributed.all_reduce_sum(packed, self.group, async_op=True)

        def finish() -> tuple[Tensor, Tensor]:
            distributed.wait(work, on_cpu=packed.device.type == "cpu")
            return packed[: sum_dy.numel()], packed[sum_dy.numel() :]

        return finish


@torch.compiler.disable(reason="bn_lightning: a synchronising BN layer runs its collectives eagerly")
def synchronised_forward(layer: ScratchBatchNormMixin, input: Tensor) -> Tensor:
    """``layer``'s forward, run eagerly: the graph break a synchronising layer takes inside ``torch.compile``.

    The forward collective, and the backward one its autograd Function runs, go through
    :mod:`bn_lightning.distributed` (``torch.distributed``'s in-place collectives, which Dynamo does not trace), so
    a compiled model runs each synchronising layer's training step outside the graph: one graph break per layer,
    the code before and after it compiled. Outputs, gradients and running statistics are the eager ones.
    """
    return ScratchBatchNormMixin.forward(layer, input)


def compiled_sync(layer: ScratchBatchNormMixin) -> bool:
    """Whether ``torch.compile`` is tracing a training forward of ``layer`` while a process group is initialised.

    Then the layer may synchronise, and takes :func:`synchronised_forward`.
    """
    return torch.compiler.is_compiling() and layer.training and distributed.is_distributed()


def group_reducer(layer: ScratchBatchNormMixin, process_group: Any) -> StatsReducer | None:
    """The reducer that synchronises ``layer``'s training statistics over ``process_group``, or ``None``.

    ``None`` (local BN) in eval mode, without an initialised process group, and in a group of one.
    """
    if not layer.training or not distributed.is_distributed():
        return None
    world_size = distributed.world_size(process_group)
    if world_size == 1:
        return None
    return ProcessGroupReducer(process_group, world_size, f"{layer._get_name()}({layer.num_features})")  # type: ignore[attr-defined]


class SyncBatchNorm(ScratchBatchNormMixin, _BatchNorm):
    r"""Batch normalisation with statistics synchronised over a process group, on any device and backend.

    The same formula as :class:`bn_lightning.BatchNorm2d`, but mean and variance are those of the union of all
    ranks' batches (ranks may hold different batch sizes, even zero), so the outputs, input gradients and running
    statistics equal one process running the concatenated batch. ``weight``/``bias`` gradients are the rank's own
    share; DDP's gradient all-reduce sums them, exactly as with ``torch.nn.SyncBatchNorm``.

    No communication happens in eval mode (running statistics, or the local batch when
    ``track_running_stats=False``), in a group of one, or when no process group is initialised: then the layer is
    plain local BN, so the same model runs unchanged in a single process.

    Under ``torch.compile``, a training forward that synchronises runs eagerly outside the graph (one graph break per
    layer, :func:`synchronised_forward`); eval mode and a model without a process group compile into the graph.

    Cost: each collective waits for the slowest rank, then pays the backend's latency, twice per layer and step
    (``scripts/bench_sync.py``, 2 CPU ranks, ResNet-20 with 21 layers, batch 32: ~14 ms per step over local BN, against
    ~7 ms for the 42 collectives alone). On CPU (gloo):

    - run gloo's TCP event loop at ``SCHED_IDLE`` (:class:`~bn_lightning.plugins.SyncBatchNormPlugin` does it by
      default, or call :func:`bn_lightning.distributed.set_gloo_event_loop_policy` after creating your groups):
      otherwise that loop busy-polls whenever a peer's data arrives first and takes the core from the rank (~45 ms
      per step, pinned or not, instead of ~14 ms pinned and ~25 ms unpinned);
    - give every rank its own cores (``taskset``, ``numactl``, or ``os.sched_setaffinity`` before
      ``init_process_group``, so that gloo's threads inherit it; unpinned: ~25 ms per step), and no more torch
      threads than cores: oversubscribed ranks pay hundreds of ms per step;
    - each rank polls its collective for up to 2 ms before it sleeps, which saves the wake-up; set
      ``BN_LIGHTNING_SYNC_SPIN_US`` (microseconds, ``0`` = block at once) to change that, e.g. when ranks share cores
      with other busy work.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance. Default: 1e-5.
        momentum: running-average factor, or ``None`` for a cumulative average. Default: 0.1.
        affine: learnable ``weight`` and ``bias``. Default: True.
        track_running_stats: keep running estimates. Default: True.
        process_group: synchronise within this group (``None``: the default group, i.e. all ranks).
        device: parameter and buffer device.
        dtype: parameter and buffer dtype.
        bias: learn beta (torch >= 2.13 only allows ``False``: gamma without beta).

    Shape:
        - Input: ``(N, C, *)``
        - Output: same shape as the input

    Example::

        >>> import torch
        >>> from bn_lightning import SyncBatchNorm
        >>> bn = SyncBatchNorm(4)  # no process group initialised here: behaves as local BN
        >>> bn(torch.randn(8, 4, 3, 3)).shape
        torch.Size([8, 4, 3, 3])
        >>> sorted(bn.state_dict()) == sorted(torch.nn.SyncBatchNorm(4).state_dict())
        True
    """

    _input_dims = tuple(range(2, 33))
    _shape_hint = "(N, C, *)"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        kwargs: dict[str, Any] = {"bias": bias} if NORM_HAS_BIAS_FLAG else {}
        if not bias and not NORM_HAS_BIAS_FLAG:
            raise ValueError(f"bias=False needs torch >= 2.13 (installed: {torch.__version__})")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, **kwargs)
        self.process_group = process_group

    def forward(self, input: Tensor) -> Tensor:
        """Normalise with the group's statistics (training) or the running statistics (eval)."""
        if compiled_sync(self):
            return synchronised_forward(self, input)
        return super().forward(input)

    def _stats_reducer(self) -> StatsReducer | None:
        return group_reducer(self, self.process_group)
