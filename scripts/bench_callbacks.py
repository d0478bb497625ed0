"""Benchmark: what BatchNormMonitor + RunningStatDrift add to a Lightning training step, next to wandb.watch, on CPU.

ResNet-20 (torch BN, 21 BN layers), batch 64, 32x32 synthetic images, SGD, one Lightning ``Trainer.fit`` per
candidate on CPU with torch's default thread count. Four candidates, each with its own model (same initial weights),
optimizer, data loader (same batches) and logger:

- ``baseline``:       no callbacks; a CSVLogger;
- ``callbacks@50``:   ``BatchNormMonitor()`` + ``RunningStatDrift()``, recording every 50 steps (the Trainer's
                      ``log_every_n_steps=50``, which the callbacks follow by default); a CSVLogger;
- ``callbacks@1``:    the same two callbacks with ``log_every_n_steps=1``: they record on every step; a CSVLogger;
- ``wandb.watch@50``: ``wandb.watch(model, log="all", log_freq=50)`` on an offline ``WandbLogger``, which replaces
                      the CSVLogger: its ratio is "switch to W&B and watch the model" against the baseline.

Every Trainer has ``log_every_n_steps=50``, so the Trainer's own logging (``train/loss``) is the same in all four and
the ratios isolate what the callbacks (or wandb) add, their own ``logger.log_metrics`` calls included. Targets (from
the issue): ``callbacks@50 / baseline <= 1.02`` and ``callbacks@1 / baseline <= 1.10``; wandb has no target.

How the runs are interleaved: by fits. After an untimed warm-up fit of every candidate, each of ``--rounds`` rounds
runs one ``fit`` per candidate, in an order that varies from round to round (``_bench.round_orders``: each
candidate equally often in every position and right after every other candidate). Every fit uses a FRESH Trainer
(fresh loops and optimizer state) but the candidate's SAME model, loader, logger and callback
objects, so the callbacks' counter ``batches_seen`` and wandb's hook counters run on across fits as in one long run.
A fit runs ``--discard + --steps + 1`` steps. A timing callback, first in every Trainer, stamps ``perf_counter`` at
every ``on_train_batch_start``; a step's time is the gap to the next stamp: data fetch, forward, forward hooks,
backward, optimizer, every callback hook and the Trainer's logging, all of the loop's work for that batch. The first
``--discard`` steps of a fit are dropped (a fresh Trainer's first step is slower); the last stamp only closes the
window. The window is ``--steps`` consecutive steps, a multiple of 50, so it holds recording steps in exactly the right
proportion whatever the phase: one callback record (and one wandb log, one Trainer log, one CSV flush) per 50 steps
for the @50 candidates, a record on every step for ``callbacks@1``; the script checks those counts. A round's sample
is the MEAN step time over its window (a median would hide the one recording step in 50); the reported ratio is the
MEDIAN OVER ROUNDS of the per-round ratios candidate / baseline, with their quartiles. The garbage collector runs
between fits.

Noise: back-to-back fits of one candidate agree within ~1-2%, but the step time of the process drifts by up to ~10%
over tens of seconds (idle machine), so per-round ratios of the @50 candidates scatter by a few percent and the
default 6 rounds place the median within about +-2%: use ``--rounds 20`` (about 10 minutes) to settle a 2% target.
The summary also prints what one record costs within the same fits, ``(recording - plain step) / 50``, a steadier
estimate of the @50 overhead from records (it leaves out the cost of the idle hooks on other steps). Interleaving
step by step instead (each fit in its own thread, one step at a time) was tried and rejected: every thread gets its
own OpenMP pool, and steps ran ~30% slower than in a plain fit (151 vs 116 ms, idle machine), a different workload.

Others' CPU is the share of the machine that processes other than this one and its children (the wandb service)
took during each round (``_bench.cpu_contention``): above ~5%, numbers are skewed, since on 2 cores one stolen core
makes a step several times slower, and slows the many small ops of the callbacks' hooks more than the big
convolutions; re-run when the machine is idle.

    python scripts/bench_callbacks.py                        # defaults: 6 rounds x 50 steps, ~3 minutes on 2 cores
    python scripts/bench_callbacks.py --rounds 12 --steps 100
    python scripts/bench_callbacks.py --profile              # also profile callbacks@1 (a record on every step)
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import io
import logging
import os
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from _bench import (
    add_threads_option,
    apply_threads_option,
    cpu_contention,
    environment_lines,
    load_line,
    median,
    median_ratio,
    print_table,
    ratio_quartiles,
    reproduce_command,
    round_orders,
)
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from typing_extensions import override

from bn_lightning.app.data import SyntheticImageDataModule
from bn_lightning.app.models import ResNet20
from bn_lightning.callbacks import BatchNormMonitor, RunningStatDrift
from bn_lightning.module import BatchNormModule

PERIOD = 50  # the Trainer's log_every_n_steps, the callbacks' default record period and wandb's log_freq
BATCH = 64
POOL = 16 * BATCH  # distinct synthetic images; batches are drawn from them with replacement
BASELINE = "baseline"
DESCRIPTIONS = {
    "baseline": "no callbacks, CSVLogger",
    "callbacks@50": "BatchNormMonitor() + RunningStatDrift(), every 50 steps, CSVLogger",
    "callbacks@1": "BatchNormMonitor + RunningStatDrift with log_every_n_steps=1, CSVLogger",
    "wandb.watch@50": 'offline WandbLogger + wandb.watch(model, log="all", log_freq=50)',
}
TARGETS = {"callbacks@50": 1.02, "callbacks@1": 1.10}  # candidate / baseline, from the issue
CONTENTION_WARN = 0.05  # others' share of the CPU above which a round is flagged


class StepTimer(Callback):
    """Times every training step of a fit: the gap between consecutive ``on_train_batch_start`` calls.

    Also notes, per step, whether the candidate recorded during it. Must be the first callback, so that the
    others' batch-start hooks fall inside the step they belong to.

    Args:
        records: how many records (callback records, wandb logs) the candidate has done so far.
    """

    def __init__(self, records: Callable[[], int]) -> None:
        self.records = records
        self.batches = 0  # batch starts seen over all fits
        self.times: list[float] = []  # seconds per step, steps of the current fit in order
        self.recorded: list[bool] = []
        self._start: float | None = None
        self._records = 0

    def reset(self) -> None:
        """Forget the steps of a previous fit."""
        self.times, self.recorded, self._start = [], [], None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        now = time.perf_counter()
        records = self.records()
        if self._start is not None:
            self.times.append(now - self._start)
            self.recorded.append(records > self._records)
        self._records = records
        self.batches += 1
        self._start = now

    def window(self, discard: int, steps: int) -> tuple[list[float], list[bool]]:
        """Step times (s) of steps ``discard .. discard + steps - 1`` of the last fit, and which ones recorded."""
        if len(self.times) < discard + steps:
            raise RuntimeError(f"the fit timed {len(self.times)} steps, expected at least {discard + steps}")
        return self.times[discard : discard + steps], self.recorded[discard : discard + steps]


@dataclass
class Candidate:
    """One benchmarked configuration: its model, loader, logger and callbacks, and its results."""

    name: str
    module: BatchNormModule
    loader: DataLoader
    logger: Logger
    callbacks: list[Callback]
    timer: StepTimer
    means: list[float] = field(default_factory=list)  # per round: mean step time (s) over the window
    plain: list[float] = field(default_factory=list)  # every timed step without a record (s)
    recording: list[float] = field(default_factory=list)  # every timed step with a record (s)
    records_per_round: set[int] = field(default_factory=set)
    service_cpu: float = 0.0  # CPU seconds of this process's children (the wandb service) during its timed fits


def descendant_cpu_seconds() -> float:
    """CPU seconds used so far by the live descendants of this process (the wandb service), from ``/proc``.

    ``_bench.cpu_contention`` counts them as other processes; they are this benchmark's own work.
    """
    parent: dict[int, int] = {}
    busy: dict[int, int] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return 0.0
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid ... utime stime
        except (OSError, IndexError):
            continue
        parent[int(entry)] = int(fields[1])
        busy[int(entry)] = int(fields[11]) + int(fields[12])
    me, total = os.getpid(), 0
    for pid, ticks in busy.items():
        p = parent.get(pid)
        while p not in (None, 0, 1, me):
            p = parent.get(p)
        if p == me and pid != me:
            total += ticks
    return total / os.sysconf("SC_CLK_TCK")


def make_trainer(steps: int, candidate: Candidate) -> pl.Trainer:
    """A Trainer that runs ``steps`` training batches with ``candidate``'s callbacks (timer first) and logger."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        log_every_n_steps=PERIOD,
        logger=candidate.logger,
        callbacks=[candidate.timer, *candidate.callbacks],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def _counter(callback: Any) -> Callable[[], int]:
    return lambda: callback.records


def make_candidates(names: list[str], tmp: str, batches: int, seed: int) -> dict[str, Candidate]:
    """The candidates, every model a copy of one seeded ResNet-20; the wandb run is started here, untimed.

    Each gets its own loader of ``batches`` batches (the longest fit) drawn with replacement from the same seeded
    pool of images, in the same order.
    """
    torch.manual_seed(seed)
    net = ResNet20(num_classes=10, in_channels=3, norm="torch")
    dm = SyntheticImageDataModule(shape=(3, 32, 32), num_samples=POOL, val_samples=BATCH, batch_size=BATCH, seed=seed)
    dm.setup()
    data: TensorDataset = dm.train_set  # type: ignore[assignment]
    candidates = {}
    for name in names:
        module = BatchNormModule(copy.deepcopy(net), num_classes=10)
        sampler = RandomSampler(data, True, BATCH * batches, generator=torch.Generator().manual_seed(seed))
        loader = DataLoader(data, batch_size=BATCH, sampler=sampler, drop_last=True)
        callbacks: list[Callback] = []
        if name == "callbacks@50":  # log_every_n_steps=None: the Trainer's, PERIOD
            callbacks = [BatchNormMonitor(), RunningStatDrift()]
        elif name == "callbacks@1":
            callbacks = [BatchNormMonitor(log_every_n_steps=1), RunningStatDrift(log_every_n_steps=1)]
        timer = StepTimer(_counter(callbacks[0]) if callbacks else lambda: 0)
        if name.startswith("wandb"):
            from lightning.pytorch.loggers import WandbLogger

            logger: Logger = WandbLogger(save_dir=tmp, offline=True, project="bench_callbacks", name=name)
            logger.experiment.watch(module, log="all", log_freq=PERIOD)  # wandb.watch on the logger's run
            # its hooks log on every PERIOD-th forward (and backward) from now on: in the step before batch start
            # number PERIOD, 2 * PERIOD, ...
            timer.records = lambda timer=timer: timer.batches // PERIOD
        else:
            # the Trainer saves (flushes) its loggers whenever it logs: once per window, with every row logged since
            logger = CSVLogger(tmp, name=name)
        candidates[name] = Candidate(name, module, loader, logger, callbacks, timer)
    return candidates


def run_fit(candidate: Candidate, steps: int) -> list[float]:
    """One fit of ``steps`` batches with a fresh Trainer, after collecting garbage; returns its step times (s)."""
    candidate.timer.reset()
    gc.collect()
    make_trainer(steps, candidate).fit(candidate.module, train_dataloaders=candidate.loader)
    return candidate.timer.times


def run_rounds(candidates: dict[str, Candidate], args: argparse.Namespace) -> list[float]:
    """The timed rounds (see the module docstring); fills the candidates' results, returns others' CPU per round."""
    orders = round_orders(list(candidates), args.rounds)
    fit_steps = args.discard + args.steps + 1
    others_per_round = []
    for r in range(args.rounds):
        child0, wall0 = descendant_cpu_seconds(), time.perf_counter()
        with cpu_contention() as load:
            for name in orders[r]:
                cand = candidates[name]
                before = descendant_cpu_seconds()
                run_fit(cand, fit_steps)
                cand.service_cpu += descendant_cpu_seconds() - before
                times, recorded = cand.timer.window(args.discard, args.steps)
                cand.means.append(statistics.fmean(times))
                cand.plain += [t for t, rec in zip(times, recorded, strict=True) if not rec]
                cand.recording += [t for t, rec in zip(times, recorded, strict=True) if rec]
                cand.records_per_round.add(sum(recorded))
        children = (descendant_cpu_seconds() - child0) / ((time.perf_counter() - wall0) * (os.cpu_count() or 1))
        others = max(0.0, load["others"] - children) if "others" in load else float("nan")
        others_per_round.append(others)
        base = candidates[BASELINE].means[-1]
        ratios = ", ".join(f"{n} {c.means[-1] / base:.3f}" for n, c in candidates.items() if n != BASELINE)
        print(
            f"  round {r + 1}/{args.rounds}: baseline {1e3 * base:.1f} ms/step; {ratios}; "
            f"others' CPU {100 * others:.0f}%",
            flush=True,
        )
    return others_per_round


def check_record_counts(candidates: dict[str, Candidate], steps: int) -> None:
    """Exit if a round did not hold the records it should: the measurement would not be what it claims."""
    bad = []
    for name, cand in candidates.items():
        expected = 0 if name == BASELINE else steps if name == "callbacks@1" else steps // PERIOD
        if cand.records_per_round != {expected}:
            bad.append(f"{name}: records per round {sorted(cand.records_per_round)}, expected {expected}")
        counts = {cb.records for cb in cand.callbacks}  # type: ignore[attr-defined]
        if len(counts) > 1:
            bad.append(f"{name}: the two callbacks recorded {sorted(counts)} times")
    if bad:
        sys.exit("the timed rounds do not hold the expected records: " + "; ".join(bad))


def profile_callbacks(candidates: dict[str, Candidate], steps: int, top: int) -> None:
    """Where the callbacks' time goes on recording steps.

    First cProfile of a ``callbacks@1`` fit (every step records), then the ops that a ``callbacks@1`` fit runs beyond
    a baseline fit of the same length (torch.profiler). Both profilers add a cost per call, so code made of many small
    calls looks bigger than it is: read shares, not totals.
    """
    cand, base = candidates["callbacks@1"], candidates[BASELINE]
    run_fit(cand, 3)  # settle
    profiler = cProfile.Profile()
    cand.timer.reset()
    gc.collect()
    trainer = make_trainer(steps, cand)
    profiler.enable()
    trainer.fit(cand.module, train_dataloaders=cand.loader)
    profiler.disable()
    times = cand.timer.times
    stats = pstats.Stats(profiler, stream=io.StringIO())
    per_step = 1e3 / steps

    def cumulative(file_part: str, func: str, line: int | None = None) -> tuple[float, int]:
        """Cumulative seconds and calls of the matching function; of the outermost one where they nest (save)."""
        found = [
            (cum, ncalls)
            for (file, lineno, fn), (_, ncalls, _, cum, _) in stats.stats.items()  # type: ignore[attr-defined]
            if file_part in file.replace(os.sep, "/") and fn == func and line in (None, lineno)
        ]
        return max(found, default=(0.0, 0))

    cb, rec, mon, drift, mon_stats, drift_stats = (
        "bn_lightning/callbacks/base.py",
        "bn_lightning/monitoring/hooks.py",
        "bn_lightning/callbacks/monitor.py",
        "bn_lightning/callbacks/drift.py",
        "bn_lightning/monitoring/activations.py",
        "bn_lightning/monitoring/drift.py",
    )
    rows = []
    for label, file_part, func, line in [
        ("optimizer step closure (fwd + bwd + SGD)", "lightning/pytorch/loops/optimization/automatic.py", "run", None),
        ("  BN pre-forward hooks (stash, shared)", rec, "_pre", None),
        ("  BN forward hooks (stash, samples, shared)", rec, "_post", None),
        ("callbacks' on_train_batch_start", cb, "on_train_batch_start", None),
        ("callbacks' on_train_batch_end (both)", cb, "on_train_batch_end", None),
        ("  LayerHooks.batch (pack all layers, shared)", rec, "batch", None),
        ("  MonitorStats.compute (all layers)", mon_stats, "compute", None),
        ("  DriftStats.compute (all layers)", drift_stats, "compute", None),
        ("  _log -> CSVLogger.log_metrics", cb, "_log", None),
        ("  BatchNormMonitor.on_record", mon, "on_record", None),
        ("  RunningStatDrift.on_record (checks)", drift, "on_record", None),
        ("CSVLogger.save (flush)", "lightning/fabric/loggers/csv_logs.py", "save", None),  # nested: outer
    ]:
        total, calls = cumulative(file_part, func, line)
        rows.append([label, per_step * total, calls / steps])
    print(
        f"\nprofile 1: cProfile of one callbacks@1 fit of {steps} steps (a record on every step); median step under "
        f"cProfile {1e3 * median(times):.1f} ms"
    )
    print_table(["where (cumulative time, inclusive)", "ms per step", "calls per step"], rows, floatfmt=".2f")
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(r"bn_lightning/callbacks", top)
    print(f"\ntop {top} functions of bn_lightning/callbacks by own time (tottime, s over the {steps} steps):")
    body = out.getvalue().splitlines()
    first = next((i for i, line in enumerate(body) if line.lstrip().startswith("ncalls")), 0)
    print("\n".join(line for line in body[first:] if line.strip()))

    from torch.profiler import ProfilerActivity, profile

    ops = {}
    for c in (base, cand):
        run_fit(c, 3)
        c.timer.reset()
        gc.collect()
        trainer = make_trainer(steps, c)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.fit(c.module, train_dataloaders=c.loader)
        ops[c.name] = {e.key: (e.count, e.self_cpu_time_total) for e in prof.key_averages()}
    extra = []
    for key, (count, self_us) in ops[cand.name].items():
        count0, self_us0 = ops[base.name].get(key, (0, 0.0))
        if count > count0:  # ops the callbacks ran; the time of the others only differs by noise
            calls = (count - count0) / steps
            ms = (self_us - self_us0) / 1e3 / steps
            extra.append([key, calls, ms, 1e3 * ms / calls])
    extra.sort(key=lambda row: -row[2])
    total = sum(row[2] for row in extra)
    calls = sum(row[1] for row in extra)
    print(
        f"\nprofile 2: torch.profiler, ops a callbacks@1 fit runs more often than a baseline fit ({steps} steps "
        f"each): {calls:.0f} extra op calls and {total:.1f} ms of extra self CPU time in ops per step; top {top}:"
    )
    headers = ["op", "extra calls per step", "extra self ms per step", "us per extra call"]
    print_table(headers, extra[:top], floatfmt=".2f")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds")
    parser.add_argument(
        "--steps", type=int, default=PERIOD, help=f"steps per candidate per round; a multiple of {PERIOD}"
    )
    parser.add_argument("--discard", type=int, default=2, help="untimed steps at the start of every fit")
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps of the untimed warm-up fit per candidate")
    add_threads_option(parser)
    parser.add_argument("--no-wandb", action="store_true", help="leave out the wandb.watch candidate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="also profile callbacks@1 (cProfile, torch.profiler)")
    parser.add_argument("--profile-steps", type=int, default=10, help="steps of each profiled fit")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.steps < PERIOD or args.steps % PERIOD:
        parser.error(
            f"--steps must be a positive multiple of {PERIOD} (one record in {PERIOD} steps), got {args.steps}"
        )
    if args.discard < 0 or args.warmup_steps < 0 or args.profile_steps < 2:
        parser.error("need --discard >= 0, --warmup-steps >= 0 and --profile-steps >= 2")
    apply_threads_option(parser, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message="BatchNorm health check")  # the drift check on a young model
    warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no `val_dataloader`")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec")

    names = [BASELINE, "callbacks@50", "callbacks@1"] + ([] if args.no_wandb else ["wandb.watch@50"])
    fit_steps = args.discard + args.steps + 1
    print("bench_callbacks: Lightning training step with BatchNormMonitor + RunningStatDrift, and wandb.watch (CPU)")
    print("\n".join(environment_lines()))
    print(
        f"ResNet-20 (torch BN), batch {BATCH}, 3x32x32 synthetic images, SGD; Trainer log_every_n_steps={PERIOD}; "
        f"{args.rounds} rounds x {len(names)} candidates x 1 fit of {fit_steps} steps ({args.discard} discarded, "
        f"{args.steps} timed); untimed warm-up fit of {args.warmup_steps} steps each"
    )
    for name in names:
        print(f"  {name}: {DESCRIPTIONS[name]}")

    with tempfile.TemporaryDirectory(prefix="bench_callbacks_") as tmp:
        os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=tmp, WANDB_CONSOLE="off")
        candidates = make_candidates(names, tmp, max(fit_steps, args.warmup_steps, args.profile_steps + 3), args.seed)
        if args.warmup_steps:
            for cand in candidates.values():
                run_fit(cand, args.warmup_steps)
        print("\nrounds (mean step time over the window; ratio to the baseline of the same round):")
        others = run_rounds(candidates, args)
        check_record_counts(candidates, args.steps)

        base = candidates[BASELINE]
        print(
            "\nstep ms: mean over a round, median over rounds; plain/recording ms: median over the steps without/with "
            "a record;\nratio: median over rounds of candidate/baseline, [q1, q3] of those ratios"
        )
        rows, verdicts = [], []
        for name, cand in candidates.items():
            ratio = median_ratio(cand.means, base.means)
            q1, q3 = ratio_quartiles(cand.means, base.means) if len(cand.means) > 1 else (ratio, ratio)
            target = TARGETS.get(name)
            verdict = "-" if target is None else "PASS" if ratio <= target else "MISS"
            if target is not None:
                verdicts.append((name, ratio, target, verdict, q3))
            rows.append(
                [
                    name,
                    1e3 * median(cand.means),
                    1e3 * median(cand.plain) if cand.plain else "-",
                    1e3 * median(cand.recording) if cand.recording else "-",
                    f"{ratio:.3f}x",
                    f"[{q1:.3f}, {q3:.3f}]",
                    "-" if target is None else f"<= {target:.2f}",
                    verdict,
                ]
            )
        headers = ["candidate", "step ms", "plain ms", "recording ms", "ratio", "[q1, q3]", "target", "verdict"]
        print_table(headers, rows, floatfmt=".1f")
        records = ", ".join(f"{n} {sorted(c.records_per_round)[0]}" for n, c in candidates.items() if n != BASELINE)
        print(f"records in every round (checked): {records}; wandb's are inferred from its log_freq")
        base_step = median(base.means)
        for name, cand in candidates.items():
            if name.endswith("@50") and cand.plain and cand.recording:
                extra = median(cand.recording) - median(cand.plain)
                print(
                    f"{name}: one record costs {1e3 * extra:.1f} ms (recording - plain step), i.e. "
                    f"{100 * extra / PERIOD / base_step:+.2f}% of a baseline step when spread over {PERIOD} steps"
                )
        if "wandb.watch@50" in candidates:
            cand = candidates["wandb.watch@50"]
            service_ms = 1e3 * cand.service_cpu / (args.rounds * fit_steps)
            print(
                f"wandb's service process used {service_ms:.1f} ms of CPU per wandb step, outside the step times "
                "(and outside others' CPU)"
            )

        flagged = [i + 1 for i, o in enumerate(others) if o > CONTENTION_WARN]
        print(
            f"\nothers' CPU per round: {' '.join(f'{100 * o:.0f}%' for o in others)} "
            f"(median {100 * median(others):.0f}%, max {100 * max(others):.0f}%)"
        )
        if flagged:
            print(
                f"WARNING: other processes took more than {100 * CONTENTION_WARN:.0f}% of the CPU in round(s) "
                f"{', '.join(map(str, flagged))}: a stolen core slows a step several-fold, the callbacks' many small "
                "ops more than the convolutions; these numbers are skewed, re-run when the machine is idle."
            )

        print("\nsummary:")
        for name, ratio, target, verdict, q3 in verdicts:
            note = f" (q3 {q3:.3f} above the target)" if verdict == "PASS" and q3 > target else ""
            print(f"  {name}/baseline = {ratio:.3f}x, target <= {target:.2f}x: {verdict}{note}")

        if args.profile:
            profile_callbacks(candidates, args.profile_steps, top=20)

        if "wandb.watch@50" in candidates:
            import wandb

            wandb.finish()

    print(f"\nafter the run: {load_line()}")
    repro = ["--rounds", str(args.rounds), "--steps", str(args.steps), "--discard", str(args.discard)]
    repro += ["--warmup-steps", str(args.warmup_steps), "--threads", str(torch.get_num_threads())]
    repro += ["--seed", str(args.seed)]
    repro += ["--no-wandb"] if args.no_wandb else []
    repro += ["--profile", "--profile-steps", str(args.profile_steps)] if args.profile else []
    print(f"\nreproduce: {reproduce_command(repro)}")


if __name__ == "__main__":
    main()
