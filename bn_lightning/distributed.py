"""The few collectives bn_lightning needs, for layers, callbacks and plain loops alike (torch only).

- :func:`is_distributed`, :func:`world_size`: whether there is anyone to talk to;
- :func:`all_gather` (one packed tensor from every rank) and :func:`all_reduce_sum`, each one collective;
- :func:`wait`: wait for an asynchronous collective; on CPU it polls briefly before it blocks and keeps the handle
  alive past the backend's worker thread (see there);
- :func:`set_gloo_event_loop_policy`: stop gloo's TCP event loop from busy-waiting on the core its rank computes on.
  Nothing here calls it by itself: :class:`bn_lightning.plugins.SyncBatchNormPlugin` does (``idle_gloo_loop=True``),
  or you do.

Without an initialised process group every function is the one-process identity, so code that calls them runs
unchanged in a single process.

Environment (read on every call, so it can be changed at run time): ``BN_LIGHTNING_SYNC_SPIN_US``, the microseconds
:func:`wait` polls a CPU collective before blocking (default 2000; ``0``: block at once).

Example::

    >>> import torch
    >>> from bn_lightning import distributed
    >>> distributed.is_distributed(), distributed.world_size()
    (False, 1)
    >>> distributed.all_gather(torch.tensor([1.0, 2.0]))  # one process: a batch of one
    tensor([[1., 2.]])
"""

from __future__ import annotations

import os
import time
import warnings
from collections import deque
from typing import Any

import torch.distributed as dist
from torch import Tensor

__all__ = [
    "SPIN_ENV",
    "all_gather",
    "all_reduce_sum",
    "gloo_event_loop_threads",
    "is_distributed",
    "set_gloo_event_loop_policy",
    "wait",
    "world_size",
]

#: the environment variable that sets :func:`wait`'s polling budget, in microseconds
SPIN_ENV = "BN_LIGHTNING_SYNC_SPIN_US"
_SPIN_DEFAULT_US = 2000.0
_GLOO_LOOP_THREAD = "gloo_tcp_loop"  # the name gloo gives its epoll thread (one per gloo device, i.e. per group)
_LOOP_POLICIES = ("idle", "normal")
# torch >= 2.13 renames all_gather_into_tensor (and deprecates the old name); torch 2.3 only has the old one
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_KEPT_WORKS = 8  # collectives whose handles wait() keeps alive; any later collective outlives the worker's reference
_kept_works: deque[Any] = deque(maxlen=_KEPT_WORKS)
_warned_spin_values: set[str] = set()


def is_distributed() -> bool:
    """Whether a default process group is initialised (``torch.distributed`` available and set up).

    Example::

        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized()


def world_size(group: Any = None) -> int:
    """The number of ranks in ``group`` (``None``: the default group); 1 when not distributed.

    Example::

        >>> world_size()
        1
    """
    return dist.get_world_size(group) if is_distributed() else 1


def all_gather(tensor: Tensor, group: Any = None) -> Tensor:
    """Every rank's ``tensor`` (same shape and dtype on every rank), stacked: ``(world_size, *tensor.shape)``.

    One collective (an all-gather into a single output tensor), waited for with :func:`wait`. Without a process
    group, ``tensor.unsqueeze(0)``.

    Args:
        tensor: this rank's contribution; pack several values into one tensor to pay one collective.
        group: the process group (``None``: the default group).

    Returns:
        A new tensor whose row ``r`` is rank ``r``'s ``tensor``.

    Example::

        >>> import torch
        >>> all_gather(torch.zeros(2, 3)).shape
        torch.Size([1, 2, 3])
    """
    size = world_size(group)
    if size == 1:
        return tensor.unsqueeze(0).clone()
    flat = tensor.reshape(-1).contiguous()  # gathered 1-D: every backend takes the concatenation of 1-D tensors
    gathered = flat.new_empty(size * flat.numel())
    wait(_all_gather_single(gathered, flat, group=group, async_op=True), on_cpu=flat.device.type == "cpu")
    return gathered.view(size, *tensor.shape)


def all_reduce_sum(tensor: Tensor, group: Any = None, async_op: bool = False) -> Any:
    """Sum ``tensor`` over the ranks of ``group``, in place.

    Args:
        tensor: summed in place (contiguous).
        group: the process group (``None``: the default group).
        async_op: return the collective's handle at once (finish it with :func:`wait`) instead of waiting.

    Returns:
        ``tensor`` (summed), or with ``async_op`` the handle (``None`` without a process group: nothing to wait for).

    Example::

        >>> import torch
        >>> all_reduce_sum(torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
    """
    if world_size(group) == 1:
        return None if async_op else tensor
    work = dist.all_reduce(tensor, group=group, async_op=True)
    if async_op:
        return work
    wait(work, on_cpu=tensor.device.type == "cpu")
    return tensor


def _spin_seconds() -> float:
    """:func:`wait`'s polling budget from ``BN_LIGHTNING_SYNC_SPIN_US``; an invalid value warns once and means 2000."""
    raw = os.environ.get(SPIN_ENV, "")
    if not raw:
        return _SPIN_DEFAULT_US * 1e-6
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        if raw not in _warned_spin_values:
            _warned_spin_values.add(raw)
            warnings.warn(
                f"{SPIN_ENV}={raw!r} is not a number of microseconds >= 0; using {_SPIN_DEFAULT_US:g}",
                RuntimeWarning,
                stacklevel=3,
            )
        return _SPIN_DEFAULT_US * 1e-6
    return value * 1e-6


def wait(work: Any, on_cpu: bool = False) -> None:
    """Wait for an asynchronous collective; with ``on_cpu``, poll (yielding the core) for a while before blocking.

    A CPU backend (gloo) runs the collective on a worker thread, and a blocking ``wait`` puts the caller to sleep on
    a condition variable; waking a sleeping rank when the peer's data arrives costs tens to hundreds of microseconds
    (more inside a VM, where an idle core halts). Polling ``is_completed`` while yielding the core to the worker
    threads keeps the rank awake across the typical latency (0.25-0.5 ms on a 2-core VM); a peer later than the
    budget (``BN_LIGHTNING_SYNC_SPIN_US``, default 2000 microseconds; ``0`` turns polling off) is waited for the
    blocking way, so a slow rank costs its peers at most that much CPU per collective. Accelerator collectives
    (``on_cpu=False``) are never polled: their ``wait`` only orders streams, and polling would synchronise the host.

    The handle is then kept (the last eight of them), so that the backend's worker thread never drops the last
    reference to it: destroying a gloo work frees the tensors it holds, which takes the GIL, and a worker that does
    so while the interpreter shuts down aborts the process ("terminate called without an active exception"). Python
    frees the kept handles itself, holding the GIL.

    Args:
        work: the handle an ``async_op=True`` collective returned (``None``: nothing to wait for).
        on_cpu: the collective's tensors live on the CPU.

    Example::

        >>> wait(None)  # all_reduce_sum(..., async_op=True) without a process group returns None
    """
    if work is None:
        return
    spin = _spin_seconds() if on_cpu else 0.0
    if spin > 0:
        deadline = time.perf_counter() + spin
        while not work.is_completed() and time.perf_counter() < deadline:
            os.sched_yield()
    work.wait()
    _kept_works.append(work)


def set_gloo_event_loop_policy(policy: str = "idle") -> int:
    """Run this process's gloo TCP event-loop threads at ``SCHED_IDLE`` (``"idle"``) or back at ``SCHED_OTHER``.

    Why: when a peer's data arrives before this rank has posted the matching receive (the peer reached the collective
    first, which at every sync point one of them does), gloo's event loop busy-polls the readable socket until the
    receive is posted. Where a rank has one core (pinned ranks, ``taskset``, small containers), that loop takes the
    core from the very threads that would post the receive: the rank's compute slows down, and a woken thread waits
    for the loop's time slice to end, which is milliseconds (measured on a 2-core VM: a quarter of all small
    all_reduces took 3-4 ms instead of 0.15 ms). At ``SCHED_IDLE`` the loop runs only when nothing else of that core
    wants to, and any woken thread preempts it at once, while a rank that waits in a collective leaves the loop the
    whole core (``scripts/bench_sync.py``: SyncBatchNorm's cost per step over local BN fell about 3x; figures in
    ``docs/benchmarks.md``).

    gloo starts one loop per process group when the group is created: call this after creating the groups you use
    (:class:`~bn_lightning.plugins.SyncBatchNormPlugin` does so when ``idle_gloo_loop=True``). It changes the OS
    scheduling of threads of this process only, and only of gloo's loops. Linux only; elsewhere, and on torch builds
    whose gloo threads carry no name, it changes nothing.

    Args:
        policy: ``"idle"`` (``SCHED_IDLE``) or ``"normal"`` (``SCHED_OTHER``, gloo's default).

    Returns:
        How many event-loop threads were changed (0 when all already ran under ``policy`` or none exist).

    Raises:
        ValueError: ``policy`` is not ``"idle"`` or ``"normal"``.

    Example::

        >>> set_gloo_event_loop_policy("idle")  # no gloo group in this process: nothing to change
        0
    """
    if policy not in _LOOP_POLICIES:
        raise ValueError(f"set_gloo_event_loop_policy: policy must be one of {_LOOP_POLICIES}, got {policy!r}")
    if not hasattr(os, "SCHED_IDLE"):
        return 0
    target = os.SCHED_IDLE if policy == "idle" else os.SCHED_OTHER
    changed = 0
    for tid in gloo_event_loop_threads():
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


def gloo_event_loop_threads() -> list[int]:
    """Thread ids of this process's gloo event loops (from Linux ``/proc``; empty elsewhere).

    Example::

        >>> gloo_event_loop_threads()  # no gloo group in this process
        []
    """
    tids = []
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ():
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == _GLOO_LOOP_THREAD:
                    tids.append(int(tid))
        except OSError:  # the thread ended meanwhile
            continue
    return tids
