"""Timing helpers shared by the ``scripts/bench_*.py`` benchmarks.

A benchmark here compares candidates by INTERLEAVED runs: every round times each candidate once, in an order that
changes from round to round (cycling through every permutation, see :func:`round_orders`), so drifts of the machine
(frequency scaling, a noisy neighbour, the allocator warming up) and the state one candidate leaves behind (caches,
freed memory) hit all candidates alike. Speed is then reported as the MEDIAN OF PER-ROUND RATIOS, which cancels
what the candidates of one round share and ignores the odd outlier round.

What this module provides:

- :func:`interleaved`: warm up, then time the candidates round by round, returning seconds per call for each;
- :func:`round_orders`: the order of each round (every candidate equally often in every position and after every
  other candidate);
- :func:`median`, :func:`median_ratio`, :func:`ratio_quartiles`: the summaries we report;
- :func:`print_table`: a plain aligned text table;
- :func:`cpu_contention`: how much CPU OTHER processes took while timing (Linux), to flag numbers a busy machine
  skewed; ratios do not cancel that out, since a stolen core slows many small multi-threaded kernels more than a few
  big ones;
- :func:`environment_lines`, :func:`load_line` and :func:`reproduce_command`: what every benchmark prints around its
  tables (versions, threads, machine load, the command to rerun it).

Example::

    >>> times = interleaved({"a": lambda: None, "b": lambda: None}, repeats=3, warmup=1)
    >>> sorted(times), len(times["a"])
    (['a', 'b'], 3)
    >>> median_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 2.0])
    2.0
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

__all__ = [
    "add_threads_option",
    "apply_threads_option",
    "cpu_contention",
    "environment_lines",
    "interleaved",
    "load_line",
    "median",
    "median_ratio",
    "print_table",
    "ratio_quartiles",
    "reproduce_command",
    "round_orders",
]

_MAX_PERMUTED = 5  # up to this many candidates, rounds cycle through all k! orders (120 for 5)


def _balanced_cycle(k: int) -> list[tuple[int, ...]]:
    """All permutations of ``range(k)`` (3 <= k <= 5) in a cyclic sequence where, counting the pairs inside rounds
    and across round boundaries alike, every candidate follows every OTHER candidate equally often and never itself.

    Depth-first search over the next round (allowed: a new permutation whose first candidate differs from the last one
    run and whose boundary pair is not yet used its share of times); it finds a cycle at once for k <= 5.
    """
    perms = list(itertools.permutations(range(k)))
    share = len(perms) // (k * (k - 1))  # boundary uses of each ordered pair (a, b), a != b
    order, used, pairs = [perms[0]], {perms[0]}, Counter[tuple[int, int]]()

    def extend() -> bool:
        last = order[-1][-1]
        if len(order) == len(perms):  # close the cycle: the first round follows the last
            return last != order[0][0] and pairs[(last, order[0][0])] < share
        for perm in perms:
            pair = (last, perm[0])
            if perm in used or perm[0] == last or pairs[pair] >= share:
                continue
            used.add(perm)
            order.append(perm)
            pairs[pair] += 1
            if extend():
                return True
            used.discard(perm)
            order.pop()
            pairs[pair] -= 1
        return False

    if not extend():  # pragma: no cover - exists for every k in 3..5 (checked by the tests)
        raise RuntimeError(f"no balanced order of {k} candidates")
    return order


def round_orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """The order in which each of ``rounds`` rounds runs the candidates ``names``.

    For three to five candidates, rounds cycle through ALL ``k!`` permutations, arranged so that over each cycle
    every candidate runs equally often in each position and, counting across round boundaries too, right after each
    other candidate equally often and never right after itself. Two candidates alternate ``ab``, ``ba``; more than
    five get a seeded shuffle per round. A plain rotation (``abc``, ``bca``, ``cab``) would not do: it keeps the
    cyclic neighbours, so one candidate ALWAYS runs right after the same other one. Measured on the layer
    benchmark: ``ours`` always ran after the naive candidate, whose 150 MB of temporaries per call push the input
    out of the cache, and its ratio to native read 1.28-1.45x where balanced orders give 1.17-1.25x.

    Example::

        >>> round_orders(["a", "b"], 3)
        [['a', 'b'], ['b', 'a'], ['a', 'b']]
        >>> len(round_orders(["a", "b", "c"], 6)), sorted(map(tuple, round_orders(["a", "b", "c"], 6)))[0]
        (6, ('a', 'b', 'c'))
    """
    names = list(names)
    k = len(names)
    if k <= 2:
        return [names if r % 2 == 0 else names[::-1] for r in range(rounds)]
    if k <= _MAX_PERMUTED:
        cycle = _balanced_cycle(k)
        return [[names[i] for i in cycle[r % len(cycle)]] for r in range(rounds)]
    rng = random.Random(0)
    return [rng.sample(names, k) for _ in range(rounds)]


def interleaved(
    fns: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int = 3,
    number: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Time candidates in rounds: each of ``repeats`` rounds runs every candidate once, in the orders of
    :func:`round_orders` (warm-up rounds included), so no candidate always runs first (cold caches) or always right
    after the same neighbour. The garbage collector is paused while timing, as :mod:`timeit` does.

    Args:
        fns: candidate name -> a callable doing one unit of work (e.g. one forward+backward).
        repeats: number of timed rounds; the lists returned have this length.
        warmup: untimed rounds first, run the same way (allocator, caches, lazy init, thread pool start-up).
        number: calls per timed sample; the sample is their mean. Raise it for work far below a millisecond.
        sync: called before starting and before stopping each clock, e.g. ``torch.cuda.synchronize`` so that
            asynchronous device work is counted; ``None`` for CPU work.

    Returns:
        name -> ``repeats`` timings in seconds per call; index ``i`` of every list comes from round ``i``, so
        :func:`median_ratio` can pair them.

    Raises:
        ValueError: no candidates, or a non-positive ``repeats``/``number`` or negative ``warmup``.
    """
    if not fns:
        raise ValueError("interleaved needs at least one candidate in `fns`, got none")
    if repeats < 1 or number < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1, number >= 1, warmup >= 0; got {repeats=}, {number=}, {warmup=}")
    names = list(fns)
    orders = round_orders(names, warmup) + round_orders(names, repeats)  # timed rounds start a full cycle
    times: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(warmup + repeats):
            gc.collect()
            gc.disable()
            for name in orders[r]:
                fn = fns[name]
                if sync is not None:
                    sync()
                start = time.perf_counter()
                for _ in range(number):
                    fn()
                if sync is not None:
                    sync()
                elapsed = time.perf_counter() - start
                if r >= warmup:
                    times[name].append(elapsed / number)
            if gc_was_enabled:
                gc.enable()
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def median(xs: Sequence[float]) -> float:
    """The median of ``xs``.

    Example::

        >>> median([3.0, 1.0, 2.0])
        2.0
    """
    return statistics.median(xs)


def _ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    if len(a) != len(b) or not a:
        raise ValueError(f"per-round ratios need two non-empty lists of equal length, got {len(a)} and {len(b)}")
    return [x / y for x, y in zip(a, b, strict=True)]


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of ``a[i] / b[i]``: how many times slower ``a`` is than ``b`` (< 1: faster).

    Pairing by round cancels what both candidates of a round shared (a slow moment of the machine); the median
    ignores outlier rounds. Not the same as ``median(a) / median(b)``.

    Example::

        >>> median_ratio([1.0, 10.0, 3.0], [1.0, 2.0, 2.0])
        1.5
    """
    return statistics.median(_ratios(a, b))


def ratio_quartiles(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """First and third quartiles of the per-round ratios ``a[i] / b[i]``: the spread behind :func:`median_ratio`.

    Example::

        >>> ratio_quartiles([1.0, 2.0, 3.0, 4.0, 5.0], [1.0] * 5)
        (2.0, 4.0)
        >>> ratio_quartiles([3.0], [2.0])  # a single round: no spread to show
        (1.5, 1.5)
    """
    ratios = _ratios(a, b)
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q3


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], floatfmt: str = ".3f") -> None:
    """Print an aligned text table; floats are formatted with ``floatfmt``, numbers right-aligned.

    Example::

        >>> print_table(["name", "ms"], [["a", 1.5], ["bb", 12.25]], floatfmt=".2f")
        name     ms
        ----  -----
        a      1.50
        bb    12.25
    """
    cells = [[format(c, floatfmt) if isinstance(c, float) else str(c) for c in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(headers))]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    print(line(list(headers)))
    print(line(["-" * w for w in widths]))
    for row in cells:
        print(line(row))


def _busy_cpu_seconds() -> float | None:
    """CPU-seconds all processes have spent busy since boot, from ``/proc/stat``; ``None`` where it is missing."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal: all but idle and iowait is busy; steal (other VMs) too
    ticks = [int(v) for v in fields[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


@contextmanager
def cpu_contention() -> Iterator[dict[str, float]]:
    """Measure the share of the machine's CPU that OTHER processes used while the block ran.

    Yields a dict that is filled on exit: ``others`` is their busy CPU time over ``wall time * cpu count`` (0: the
    machine was ours; 0.5 on 2 cores: one core was taken). Stays empty where ``/proc/stat`` is unavailable.

    Example::

        >>> with cpu_contention() as load:
        ...     _ = sum(range(1000))
        >>> set(load) <= {"others"}
        True
    """
    result: dict[str, float] = {}
    busy0, own0, wall0 = _busy_cpu_seconds(), os.times(), time.perf_counter()
    try:
        yield result
    finally:
        busy1, own1, wall1 = _busy_cpu_seconds(), os.times(), time.perf_counter()
        if busy0 is not None and busy1 is not None and wall1 > wall0:
            own = (own1.user - own0.user) + (own1.system - own0.system)
            capacity = (wall1 - wall0) * (os.cpu_count() or 1)
            result["others"] = max(0.0, (busy1 - busy0) - own) / capacity


_TIMING_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LD_PRELOAD", "ATEN_CPU_CAPABILITY", "KMP_AFFINITY")


def environment_lines() -> list[str]:
    """What a reader needs to compare numbers across machines: versions, threads, timing-relevant env, load, device."""
    lines = [
        f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()} {platform.system()}",
        f"torch threads: {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
        f"cpu count: {os.cpu_count()}",
    ]
    # set, these change CPU timings: thread pools, and the allocator (fresh pages for big temporaries are costly)
    env = {k: v for k, v in os.environ.items() if k in _TIMING_ENV or k.startswith("MALLOC_")}
    if env:
        lines.append("env: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())))
    if hasattr(os, "getloadavg"):
        lines.append(load_line())
    if torch.cuda.is_available():
        lines.append(f"cuda device: {torch.cuda.get_device_name()}")
    return lines


def load_line() -> str:
    """The 1/5/15-minute load averages: a load above the thread count means others competed for the CPU."""
    one, five, fifteen = os.getloadavg()
    return f"load average (1/5/15 min): {one:.2f} {five:.2f} {fifteen:.2f}"


def reproduce_command(args: Sequence[str]) -> str:
    """The shell command that reruns this benchmark: this interpreter, this script, then ``args``.

    The interpreter is given relative to the working directory when it lives below it (``.venv/bin/python``).

    Args:
        args: the command-line arguments, fully resolved (so the defaults of the day are pinned).
    """
    exe = sys.executable
    rel = os.path.relpath(exe)
    exe = rel if not rel.startswith("..") else exe
    script = os.path.relpath(sys.argv[0])
    return shlex.join([exe, script, *args])


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--threads`` (``torch.set_num_threads``; default: torch's own) to a benchmark's parser."""
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's own")


def apply_threads_option(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validate ``--threads`` (exits through ``parser.error``) and apply it with ``torch.set_num_threads``."""
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
