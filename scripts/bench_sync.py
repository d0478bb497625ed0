"""Benchmark: what synchronising BatchNorm costs in a 2-process gloo DDP training step.

ResNet-20, batch 32 per rank, 32x32 synthetic images, CPU, one thread per process. Three models train in interleaved
rounds (each round runs one step of each, in a varying order, on both ranks in lockstep):

- ``torch``:   torch.nn.BatchNorm2d (native kernels), no synchronisation;
- ``scratch``: bn_lightning.BatchNorm2d, the same math as SyncBatchNorm minus the collectives;
- ``sync``:    bn_lightning.SyncBatchNorm over the 2 ranks.

The extra time of ``sync`` over ``scratch`` is compared with a FLOOR: one collective forward (all_gather) and one
backward (all_reduce) per BN layer is the least any synchronised BN can do, so the floor is what those collectives
cost by themselves. Targets (issue 17): sync step / local-BN step <= 1.15, extra <= 2.0 x floor.

How the floor is measured, and why. In training each collective comes after some compute and the peer may arrive
late; the time a rank waits for a late peer is IMBALANCE (jitter of the compute), not latency. Each round therefore
also runs a LATENCY PROBE, interleaved with the training steps so that it sees the same machine: per BN layer, a
3x3 convolution (about the compute between two BN layers) then an all_gather of a BN-sized packet, and likewise with
an all_reduce. Every call's entry and exit are stamped with ``perf_counter`` (``CLOCK_MONOTONIC``: one clock for all
processes of a Linux machine); afterwards the ranks swap stamps and a call's LATENCY is ``own exit - the last rank's
entry``, its cost once everyone is there. The floor is the median over rounds of the probe's summed latency (the
same statistic as the extra: a median over rounds of per-round totals). It is a sum of 2 x (BN layers) draws, and
the latency has a heavy tail here (a few % of calls take 2-5 ms, even in a bare loop on an idle machine), so the
floor is about 2 x layers x MEAN latency, well above 2 x layers x median latency.

The previous floor, a tight loop of back-to-back all_reduces, is printed for reference only: there each call's exit
skew becomes the next call's arrival skew, so it mixes waiting into "latency", and it misses the tail of calls that
follow compute.

Where the extra goes (``--breakdown``, on by default): after the rounds, more ``sync`` steps run with the reducer's two
methods (``ProcessGroupReducer.reduce_stats``/``start_reduce_grads``: pack, collective, merge; the backward's
all_reduce runs asynchronously while ``dy * gamma / std`` is computed, and counts until its wait returns) stamped the
same way; per step, the time in them splits into WAITING for the peer (last entry - own entry) and LATENCY (own exit
- last entry). The backward's window holds ``dy * gamma / std`` (work local BN does too), so "latency" overstates the
collectives' own and the extra minus the time in them often comes out negative. The sync path's extra small ops
(pack, merge, tensor counts) cost ~2.4 ms per step, measured in one process with the collectives stubbed out.

Polling: on CPU our reducer polls each collective (yielding the core) for up to ``BN_LIGHTNING_SYNC_SPIN_US``
(default 2000) before blocking, which saves a sleeping rank's wake-up; the probe's collectives block, as a plain
``dist.all_reduce`` does. ``BN_LIGHTNING_SYNC_SPIN_US=0 python scripts/bench_sync.py`` shows the difference (here:
in-step latency 24-25 ms vs 27-31 ms per step).

Pinning (``--pin``; the default when the machine has a core per thread): each rank, and every thread it starts, gloo's
included, runs on the rank's own cores. Unpinned, the scheduler places gloo's helper threads on the core where the
other rank computes, which about doubles both the waiting and the latency (measured here: BN collectives 55-60 ms of
each sync step unpinned, 25-30 ms pinned; sync - scratch 65-70 ms vs 28-40 ms). All candidates run under the same
setting; ``--no-pin`` shows the difference. (A separate process group for BN, so that its collectives cannot queue
behind DDP's gradient all_reduce, was measured too and made no difference, pinned or not.)

gloo's event loop (``sync_stock_loop``): gloo's TCP event loop busy-polls a socket whose data arrived before this rank
posted the receive; on a pinned core that loop starves the threads that would post it (a quarter of small
collectives took 3-4 ms here). ``SyncBatchNormPlugin(idle_gloo_loop=True)`` therefore runs the loop at ``SCHED_IDLE``
(:func:`bn_lightning.distributed.set_gloo_event_loop_policy`), and so does this benchmark from the start, for every
candidate and the probe. The extra candidate ``sync_stock_loop`` runs the same sync step with the loop back at gloo's
default policy, in the same rounds, to show what that setting is worth; ``--no-idle-loop`` runs everything at the
default policy.

Allocator (``--malloc``): glibc hands freed activation-sized blocks back to the OS and page-faults them in again
(~1 ms per 4096 faults here), at layers that differ between the ranks, and every sync point waits for the rank that
faulted. ``--malloc keep`` starts the ranks with ``GLIBC_TUNABLES`` that keep freed memory in the process (a fixed
mmap threshold of 1 GiB and no trimming), as jemalloc/tcmalloc setups do; ``default`` leaves glibc as it is. Every
candidate runs under the same setting.

Run: python scripts/bench_sync.py [--rounds 30] [--batch 32] [--no-pin] [--no-breakdown] [--malloc keep]
"""

from __future__ import annotations

import argparse
import copy
import os
import queue as queue_module
import socket
import sys
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench import (  # noqa: E402
    cpu_contention,
    environment_lines,
    interleaved,
    load_line,
    median,
    median_ratio,
    print_table,
    ratio_quartiles,
    reproduce_command,
)

import bn_lightning as bnl  # noqa: E402
from bn_lightning.app.models import ResNet20  # noqa: E402
from bn_lightning.distributed import gloo_event_loop_threads, set_gloo_event_loop_policy  # noqa: E402
from bn_lightning.layers.sync import ProcessGroupReducer  # noqa: E402

WORLD = 2
WIDEST = 64  # channels of ResNet-20's widest BN layer: the probe's packets are that layer's
OPS = ("all_gather", "all_reduce")  # the forward and the backward collective
CONTENTION_WARN = 0.05  # others' share of the CPU above which the numbers get a warning
# glibc tunables for --malloc keep: no mmap below 1 GiB, never trim the heap (freed memory stays mapped)
KEEP_MALLOC = "glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=17179869184"


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _cpus(rank: int, threads: int) -> set[int]:
    """The cores rank ``rank`` is pinned to."""
    return set(range(rank * threads, (rank + 1) * threads))


def _pin(rank: int, threads: int) -> None:
    """Bind this process, and every thread it has or will start, to its own ``threads`` cores."""
    for tid in os.listdir("/proc/self/task"):  # threads started so far; later ones inherit the main thread's mask
        os.sched_setaffinity(int(tid), _cpus(rank, threads))


def _with_loop_policy(step: Callable[[], None], tids: list[int], inside: int, outside: int) -> Callable[[], None]:
    """``step`` run with the event loops at scheduling policy ``inside``, restored to ``outside`` after it."""

    def run() -> None:
        for tid in tids:
            os.sched_setscheduler(tid, inside, os.sched_param(0))
        try:
            step()
        finally:
            for tid in tids:
                os.sched_setscheduler(tid, outside, os.sched_param(0))

    return run


def _gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Stack every rank's ``t`` (same shape on all ranks): ``(world, *t.shape)``."""
    out = t.new_empty((WORLD, *t.shape))
    dist.all_gather_into_tensor(out.view(-1), t.contiguous().view(-1))
    return out


def _latency(enter_exit: torch.Tensor) -> torch.Tensor:
    """``(world, ..., 2)`` perf_counter stamps (entry, exit) -> ``own exit - last rank's entry``, ``(world, ...)``."""
    return enter_exit[..., 1] - enter_exit[..., 0].amax(0, keepdim=True)


class LatencyProbe:
    """The collectives of one sync step without the BN around them: per layer, compute then a stamped collective.

    Args:
        n_bn: BN layers; each call runs ``n_bn`` (convolution, all_gather) then ``n_bn`` (convolution, all_reduce).
    """

    def __init__(self, n_bn: int) -> None:
        self.n_bn = n_bn
        stats = torch.zeros(2 * WIDEST + 1, dtype=torch.float64)  # forward packet: [mean, var, count]
        gathered = stats.new_empty(WORLD * stats.numel())
        grads = torch.zeros(2 * WIDEST)  # backward packet: [sum_dy, sum_dy_xhat]
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self.ops: dict[str, Callable[[], object]] = {
            "all_gather": lambda: gather(gathered, stats),
            "all_reduce": lambda: dist.all_reduce(grads),
        }
        # the compute between two BN layers of ResNet-20 (1-7 ms): a 3x3 convolution of the middle stage, ~1.5 ms
        self.act, self.weight = torch.randn(32, 32, 16, 16), torch.randn(32, 32, 3, 3)
        self.calls: list[torch.Tensor] = []  # per call: (ops, n_bn, 2) stamps

    def __call__(self) -> None:
        stamps = torch.empty(len(self.ops), self.n_bn, 2, dtype=torch.float64)
        for i, op in enumerate(self.ops.values()):
            for j in range(self.n_bn):
                nn.functional.conv2d(self.act, self.weight, padding=1)
                t0 = time.perf_counter()
                op()
                stamps[i, j, 0], stamps[i, j, 1] = t0, time.perf_counter()
        self.calls.append(stamps)

    def summary(self, last: int) -> dict[str, float]:
        """From the ``last`` calls: median over calls of the summed latency (rank mean), and per-op statistics."""
        latency = _latency(_gather_rows(torch.stack(self.calls[-last:])))  # (world, calls, ops, n_bn)
        out = {"total": latency.sum((2, 3)).mean(0).median().item()}
        for i, name in enumerate(self.ops):
            samples = latency[:, :, i].flatten()
            out[f"{name} mean"] = samples.mean().item()
            out[f"{name} median"] = samples.median().item()
            out[f"{name} p90"] = samples.quantile(0.9).item()
        return out


def _breakdown(step: Callable[[], None], steps: int) -> dict[str, float]:
    """Run ``steps`` training steps with the reducer's methods stamped: per-step seconds, rank mean, mean of steps."""
    calls: list[tuple[float, float]] = []
    # the backward starts its all_reduce asynchronously and waits later: a call lasts from start to the end of the wait
    originals = {name: getattr(ProcessGroupReducer, name) for name in ("reduce_stats", "start_reduce_grads")}

    def stamped(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if not callable(out):
                calls.append((t0, time.perf_counter()))
                return out

            def finish():
                result = out()
                calls.append((t0, time.perf_counter()))
                return result

            return finish

        return wrapper

    per_step = []
    try:
        for name, fn in originals.items():
            setattr(ProcessGroupReducer, name, stamped(fn))
        for _ in range(steps):
            calls.clear()
            t0 = time.perf_counter()
            step()
            per_step.append((time.perf_counter() - t0, torch.tensor(calls, dtype=torch.float64)))
    finally:
        for name, fn in originals.items():
            setattr(ProcessGroupReducer, name, fn)
    stamps = _gather_rows(torch.stack([s for _, s in per_step]))  # (world, steps, calls, 2)
    inside = (stamps[..., 1] - stamps[..., 0]).sum(-1)  # (world, steps)
    latency = _latency(stamps).sum(-1)
    rank_mean = {"inside": inside.mean(0), "latency": latency.mean(0), "waiting": (inside - latency).mean(0)}
    out = {k: v.mean().item() for k, v in rank_mean.items()}  # means over steps: the parts add up
    out["step"] = median([t for t, _ in per_step])
    out["calls"] = stamps.shape[2]
    return out


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    if args.pin:
        _pin(rank, args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    torch.manual_seed(0)
    base = ResNet20(num_classes=10, in_channels=3, norm="torch")
    nets = {
        "torch": base,
        "scratch": _local(bnl.convert_sync_batchnorm(copy.deepcopy(base))),
        "sync": bnl.convert_sync_batchnorm(copy.deepcopy(base)),
    }
    n_bn = sum(isinstance(m, bnl.SyncBatchNorm) for m in nets["sync"].modules())
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    fns: dict[str, Callable[[], None]] = {}
    for name, net in nets.items():
        model = DistributedDataParallel(net)
        fns[name] = _train_step(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), x, y)
    # every candidate and the probe run with the event loops as SyncBatchNormPlugin leaves them (idle while applied),
    # set up front so that the first probes and warm-up rounds see the same setting
    loop_default = os.sched_getscheduler(0)
    loop_policy = os.SCHED_IDLE if args.idle_loop else loop_default
    if args.idle_loop:
        set_gloo_event_loop_policy("idle")
    if args.stock_loop and loop_policy != loop_default:
        fns["sync_stock_loop"] = _with_loop_policy(fns["sync"], gloo_event_loop_threads(), loop_default, loop_policy)
    probe = LatencyProbe(n_bn)
    back_to_back = interleaved(probe.ops, repeats=5, warmup=1, number=100)
    times = interleaved({**fns, "probe": probe}, repeats=args.rounds, warmup=args.warmup)
    lat = probe.summary(args.rounds)
    lat.update({f"{k} back-to-back": median(v) for k, v in back_to_back.items()})
    parts = _breakdown(fns["sync"], args.rounds) if args.breakdown else None
    if rank == 0:
        del times["probe"]
        queue.put({"times": times, "lat": lat, "n_bn": n_bn, "parts": parts})
        queue.close()
        queue.join_thread()  # the results are in the pipe before any teardown
    dist.barrier()
    dist.destroy_process_group()


def _local(net: nn.Module) -> nn.Module:
    """Our BN without synchronisation: revert the converted SyncBatchNorm layers to bn_lightning.BatchNorm2d."""
    for name, child in net.named_children():
        if isinstance(child, bnl.SyncBatchNorm):
            setattr(net, name, bnl.convert.swap_batchnorm(child, bnl.BatchNorm2d))
        else:
            _local(child)
    return net


def _run(args: argparse.Namespace) -> tuple[dict, float]:
    """Start the ranks; return rank 0's results and the share of the CPU that OTHER processes used meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, WORLD, port, args, queue)) for r in range(WORLD)]
    before, wall0 = os.times(), time.perf_counter()
    with cpu_contention() as load:
        for p in procs:
            p.start()
        while True:
            try:
                result = queue.get(timeout=5)
                break
            except queue_module.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    for p in procs:
                        p.terminate()
                    raise SystemExit("a rank failed, see its traceback above") from None
        for p in procs:
            p.join(timeout=20)
            if p.exitcode is None:  # seen with torch 2.13: a gloo worker thread needs the GIL that teardown holds
                print(f"note: {p.name} hung in destroy_process_group after reporting; terminated", file=sys.stderr)
                p.terminate()
                p.join()
    after, wall1 = os.times(), time.perf_counter()
    # cpu_contention counts our own (joined) worker processes as "others": take their CPU time back out
    ours = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    others = load.get("others", float("nan")) - ours / ((wall1 - wall0) * (os.cpu_count() or 1))
    return result, max(others, 0.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30, help="timed interleaved rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--batch", type=int, default=32, help="batch size per rank")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bind each rank (and gloo's threads) to its own cores; default: on when there is a core per thread",
    )
    parser.add_argument(
        "--idle-loop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run gloo's event loops at SCHED_IDLE, as SyncBatchNormPlugin(idle_gloo_loop=True) does",
    )
    parser.add_argument(
        "--stock-loop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time sync with gloo's event loop at its default scheduling policy (candidate sync_stock_loop)",
    )
    parser.add_argument(
        "--malloc",
        choices=("default", "keep"),
        default="default",
        help="the ranks' glibc allocator: as it is, or keeping freed memory mapped (GLIBC_TUNABLES, see above)",
    )
    parser.add_argument(
        "--breakdown",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="split sync's time in the collectives into waiting for the peer and latency (extra untimed steps)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.warmup < 0 or args.batch < 1 or args.threads < 1:
        parser.error("need --rounds >= 2, --warmup >= 0, --batch >= 1, --threads >= 1")
    can_pin = hasattr(os, "sched_setaffinity") and WORLD * args.threads <= (os.cpu_count() or 1)
    if args.pin and not can_pin:
        parser.error(f"--pin needs Linux and {WORLD * args.threads} cores; this machine has {os.cpu_count()}")
    args.pin = can_pin if args.pin is None else args.pin

    torch.set_num_threads(args.threads)  # this process only reports; environment_lines then shows the ranks' count
    if args.malloc == "keep":  # read by glibc when a rank's process starts (spawn), so set before starting them
        os.environ["GLIBC_TUNABLES"] = KEEP_MALLOC
    result, others = _run(args)
    times, lat, n_bn, parts = result["times"], result["lat"], result["n_bn"], result["parts"]
    ms = {k: [t * 1e3 for t in v] for k, v in times.items()}
    us = {k: v * 1e6 for k, v in lat.items()}
    extra = median([s - p for s, p in zip(ms["sync"], ms["scratch"], strict=True)])
    floor = lat["total"] * 1e3
    print("\n".join(environment_lines()))
    pins = "; ".join(f"rank {r} -> cpus {sorted(_cpus(r, args.threads))}" for r in range(WORLD))
    pinning = f"pinned: {pins}" if args.pin else "not pinned"
    loop = "SCHED_IDLE" if args.idle_loop else "default policy"
    print(
        f"{WORLD} gloo processes x {args.threads} thread(s), ResNet-20 ({n_bn} BN layers), batch {args.batch}/rank, "
        f"32x32, {args.rounds} interleaved rounds, {pinning}, gloo event loop {loop}, malloc {args.malloc}"
    )
    print_table(
        ["candidate", "median step ms", "ratio vs scratch (median, q1-q3)"],
        [
            [
                k,
                median(v),
                "{:.3f} ({:.3f}-{:.3f})".format(median_ratio(v, ms["scratch"]), *ratio_quartiles(v, ms["scratch"])),
            ]
            for k, v in ms.items()
        ],
    )
    print(
        f"collective latency after compute, own exit - last rank's entry ({WIDEST}-channel packets; mean / median / "
        "p90): "
        + "; ".join(f"{op} {us[op + ' mean']:.1f} / {us[op + ' median']:.1f} / {us[op + ' p90']:.1f} us" for op in OPS)
    )
    print(
        "back-to-back loop (the old floor's measure; mixes in waiting, reference only): "
        + ", ".join(f"{op} {us[op + ' back-to-back']:.1f} us" for op in OPS)
    )
    print(f"sync - scratch (median of per-round differences): {extra:.2f} ms")
    if "sync_stock_loop" in ms:
        stock = median([s - p for s, p in zip(ms["sync_stock_loop"], ms["scratch"], strict=True)])
        print(f"sync_stock_loop - scratch (gloo's event loop at its default policy): {stock:.2f} ms")
    if parts is not None:
        print(
            f"where it goes (sync step {parts['step'] * 1e3:.1f} ms, {parts['calls']} reducer calls; rank mean, mean "
            f"over steps): in BN collectives {parts['inside'] * 1e3:.2f} ms = waiting for the peer "
            f"{parts['waiting'] * 1e3:.2f} ms + latency {parts['latency'] * 1e3:.2f} ms (incl. the backward's "
            f"dy*gamma/std, computed while its all_reduce is in flight); extra - that = "
            f"{extra - parts['inside'] * 1e3:.2f} ms"
        )
    by_median = n_bn * (us["all_gather median"] + us["all_reduce median"]) / 1e3
    print(
        f"floor {n_bn} x (all_gather + all_reduce), summed probe latency (median over rounds): {floor:.2f} ms "
        f"({n_bn} x the median latencies would say {by_median:.2f} ms) -> extra / floor = {extra / floor:.2f} "
        "(target <= 2.0)"
    )
    print(f"sync / local-BN (scratch) step time: {median_ratio(ms['sync'], ms['scratch']):.3f} (target <= 1.15)")
    print(f"sync / torch step time: {median_ratio(ms['sync'], ms['torch']):.3f}")
    print(f"other processes' share of the CPU during the run: {100 * others:.0f}%; after the run: {load_line()}")
    if others > CONTENTION_WARN:
        print("WARNING: the machine was busy while timing; rerun on an idle machine before trusting the numbers.")
    resolved = ["--rounds", str(args.rounds), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    resolved += ["--threads", str(args.threads), "--pin" if args.pin else "--no-pin", "--malloc", args.malloc]
    resolved += [] if args.stock_loop else ["--no-stock-loop"]
    resolved += [] if args.idle_loop else ["--no-idle-loop"]
    resolved += [] if args.breakdown else ["--no-breakdown"]
    print("reproduce:", reproduce_command(resolved))


if __name__ == "__main__":
    main()
