"""SyncBatchNorm for every device and backend: CPU tensors over gloo, CUDA tensors over nccl.

Provides :class:`SyncBatchNorm` (a drop-in for :class:`torch.nn.SyncBatchNorm`, same constructor and ``state_dict``)
and :class:`ProcessGroupReducer`, the :class:`~bn_lightning.functional.StatsReducer` it plugs into the functional core.
Per layer and training step there is exactly one collective in forward (an all-gather of every rank's per-channel
mean, variance and count, merged exactly with :func:`~bn_lightning.functional.merge_stats`) and one in backward (an
all-reduce of the two per-channel gradient sums). Ours is deliberately NOT a subclass of ``torch.nn.SyncBatchNorm``:
torch's DDP refuses to wrap a CPU module that holds one.

On CPU it also provides :func:`set_gloo_event_loop_policy`, which stops gloo's TCP event loop from busy-waiting on the
core its rank computes on (applied automatically the first time a layer synchronises over a group; see there).
"""

from __future__ import annotations

import inspect
import os
import time
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from bn_lightning.functional import BatchStats, StatsReducer, merge_finite_stats
from bn_lightning.layers.batchnorm import ScratchBatchNormMixin

__all__ = ["ProcessGroupReducer", "SyncBatchNorm", "group_reducer", "set_gloo_event_loop_policy"]

# torch >= 2.13 renames all_gather_into_tensor (and deprecates the old name); torch 2.3 only has the old one
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
# torch >= 2.13 has BatchNorm(..., bias=False): gamma without beta
NORM_HAS_BIAS_FLAG = "bias" in inspect.signature(_NormBase.__init__).parameters
_SPIN_ENV = "BN_LIGHTNING_SYNC_SPIN_US"
_SPIN_DEFAULT_US = 2000.0


def _spin_seconds_from_env() -> float:
    """How long a CPU collective is polled before blocking: ``BN_LIGHTNING_SYNC_SPIN_US`` (microseconds; 0: never)."""
    raw = os.environ.get(_SPIN_ENV, "")
    if not raw:
        return _SPIN_DEFAULT_US * 1e-6
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        warnings.warn(
            f"{_SPIN_ENV}={raw!r} is not a number of microseconds >= 0; using {_SPIN_DEFAULT_US:g}",
            RuntimeWarning,
            stacklevel=2,
        )
        return _SPIN_DEFAULT_US * 1e-6
    return value * 1e-6


_spin_seconds = _spin_seconds_from_env()

_IDLE_LOOP_ENV = "BN_LIGHTNING_GLOO_IDLE_LOOP"
_GLOO_LOOP_THREAD = "gloo_tcp_loop"  # the name gloo gives its epoll thread (one per gloo device, i.e. per group)
_LOOP_POLICIES = ("idle", "normal")


def set_gloo_event_loop_policy(policy: str = "idle") -> int:
    """Run this process's gloo TCP event-loop threads at ``SCHED_IDLE`` (``"idle"``) or back at ``SCHED_OTHER``.

    Why: when a peer's data arrives before this rank has posted the matching receive (the peer reached the collective
    first, which at every sync point one of them does), gloo's event loop busy-polls the readable socket until the
    receive is posted. Where a rank has one core (pinned ranks, ``taskset``, small containers), that loop takes the
    core from the very threads that would post the receive: the rank's compute slows down, and a woken thread waits
    for the loop's time slice to end, which is milliseconds (measured on a 2-core VM: a quarter of all small
    all_reduces took 3-4 ms instead of 0.15 ms). At ``SCHED_IDLE`` the loop runs only when nothing else of that core
    wants to, and any woken thread preempts it at once, while a rank that waits in a collective leaves the loop the
    whole core. ``scripts/bench_sync.py`` (2 ranks, ResNet-20): the mean small-collective latency fell from ~1.1 ms
    to ~0.15 ms and SyncBatchNorm's cost per step over local BN from ~45 ms to ~14 ms (A/B in the same runs).

    :class:`SyncBatchNorm` calls this once per process group, after its first CPU collective over that group (gloo
    starts a loop per group); ``BN_LIGHTNING_GLOO_IDLE_LOOP=0`` turns that off. Linux only; elsewhere, and on torch
    builds whose gloo threads carry no name, it changes nothing.

    Args:
        policy: ``"idle"`` (``SCHED_IDLE``) or ``"normal"`` (``SCHED_OTHER``, gloo's default).

    Returns:
        How many event-loop threads were changed (0 when all already ran under ``policy`` or none exist).

    Raises:
        ValueError: ``policy`` is not ``"idle"`` or ``"normal"``.

    Example::

        >>> from bn_lightning import set_gloo_event_loop_policy
        >>> set_gloo_event_loop_policy("idle")  # no gloo group in this process: nothing to change
        0
    """
    if policy not in _LOOP_POLICIES:
        raise ValueError(f"policy must be one of {_LOOP_POLICIES}, got {policy!r}")
    if not hasattr(os, "SCHED_IDLE") or not os.path.isdir("/proc/self/task"):
        return 0
    target = os.SCHED_IDLE if policy == "idle" else os.SCHED_OTHER
    changed = 0
    for tid in _gloo_loop_threads():
        try:
            if os.sched_getscheduler(tid) == target:
                continue
            os.sched_setscheduler(tid, target, os.sched_param(0))
        except ProcessLookupError:  # the thread ended meanwhile
            continue
        except OSError as err:  # e.g. a sandbox that forbids changing policies: keep gloo's default
            warnings.warn(f"could not set gloo's event loop to {policy!r}: {err}", RuntimeWarning, stacklevel=2)
            return changed
        changed += 1
    return changed


def _gloo_loop_threads() -> list[int]:
    """Thread ids of this process's gloo event loops (Linux ``/proc``; empty elsewhere)."""
    tids = []
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ():
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == _GLOO_LOOP_THREAD:
                    tids.append(int(tid))
        except OSError:  # the thread ended meanwhile
            continue
    return tids


def _idle_loop_from_env() -> bool:
    """Whether SyncBatchNorm idles gloo's event loops: ``BN_LIGHTNING_GLOO_IDLE_LOOP`` ``1`` (default) or ``0``."""
    raw = os.environ.get(_IDLE_LOOP_ENV, "").strip()
    if raw in ("", "1"):
        return True
    if raw == "0":
        return False
    warnings.warn(f"{_IDLE_LOOP_ENV}={raw!r} is not 0 or 1; using 1", RuntimeWarning, stacklevel=2)
    return True


_idle_loop = _idle_loop_from_env()
_loops_set_for: set[int] = set()  # ids of the process groups whose event loop was already set


def _idle_loops_once(group: Any) -> None:
    """After the first CPU collective over ``group``: idle the event loop(s) gloo started for it, once per group."""
    key = id(dist.group.WORLD if group is None else group)
    if key in _loops_set_for:
        return
    _loops_set_for.add(key)
    if _idle_loop:
        set_gloo_event_loop_policy("idle")


def _wait(work: Any, on_cpu: bool) -> None:
    """Wait for a collective: on CPU, poll (yielding the core) for up to ``_spin_seconds`` before blocking.

    A CPU backend (gloo) runs the collective on a worker thread, and a blocking ``wait`` puts the caller to sleep on
    a condition variable; waking a sleeping rank when the peer's data arrives costs tens to hundreds of
    microseconds (more inside a VM, where an idle core halts). Polling ``is_completed`` while yielding the core to
    the worker threads keeps the rank awake across the typical latency (0.25-0.5 ms on a 2-core VM); a peer later
    than the spin budget (``BN_LIGHTNING_SYNC_SPIN_US``, default 2000; 0 turns polling off) is waited for the
    blocking way, so a slow rank costs its peers at most that much CPU per collective. Accelerator collectives are
    never polled: their ``wait`` only orders streams, and polling would synchronise the host.

    The handle is then kept (the last :data:`_KEPT_WORKS` of them), so that the backend's worker thread never drops
    the last reference to it: destroying a gloo work frees the tensors it holds, which takes the GIL, and a worker
    that does so while the interpreter shuts down aborts the process ("terminate called without an active
    exception"; seen in ~3 % of 2-process Lightning runs that ended right after a collective). Python frees the
    kept handles itself, holding the GIL.
    """
    if on_cpu and _spin_seconds > 0:
        deadline = time.perf_counter() + _spin_seconds
        while not work.is_completed() and time.perf_counter() < deadline:
            os.sched_yield()
    work.wait()
    _kept_works.append(work)


_KEPT_WORKS = 8  # collectives whose handles _wait keeps alive; any later collective outlives the worker's reference
_kept_works: deque[Any] = deque(maxlen=_KEPT_WORKS)


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
        gathered = packed.new_empty(self.world_size * packed.numel())
        on_cpu = packed.device.type == "cpu"
        _wait(_all_gather_single(gathered, packed, group=self.group, async_op=True), on_cpu)
        if on_cpu:
            _idle_loops_once(self.group)
        rows = gathered.view(self.world_size, -1)
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
        work = dist.all_reduce(packed, group=self.group, async_op=True)

        def finish() -> tuple[Tensor, Tensor]:
            _wait(work, packed.device.type == "cpu")
            return packed[: sum_dy.numel()], packed[sum_dy.numel() :]

        return finish


def group_reducer(layer: ScratchBatchNormMixin, process_group: Any) -> StatsReducer | None:
    """The reducer that synchronises ``layer``'s training statistics over ``process_group``, or ``None``.

    ``None`` (local BN) in eval mode, without an initialised process group, and in a group of one.
    """
    if not layer.training or not dist.is_available() or not dist.is_initialized():
        return None
    world_size = dist.get_world_size(process_group)
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

    Cost: each collective waits for the slowest rank, then pays the backend's latency, twice per layer and step
    (``scripts/bench_sync.py``, 2 CPU ranks, ResNet-20 with 21 layers, batch 32: ~14 ms per step over local BN, against
    ~7 ms for the 42 collectives alone). On CPU (gloo):

    - after its first collective over a group, the layer runs gloo's TCP event loop at ``SCHED_IDLE`` (see
      :func:`set_gloo_event_loop_policy`; ``BN_LIGHTNING_GLOO_IDLE_LOOP=0`` keeps gloo's default): otherwise that loop
      busy-polls whenever a peer's data arrives first and takes the core from the rank (~45 ms per step, pinned or
      not, instead of ~14 ms pinned and ~25 ms unpinned);
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

    def _stats_reducer(self) -> StatsReducer | None:
        return group_reducer(self, self.process_group)
