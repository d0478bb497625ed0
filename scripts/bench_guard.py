"""Benchmark: what BatchNormGuard adds to a Lightning training step on CPU (target from the issue: <= 1.02x).

ResNet-20 (torch BN, 21 BN layers), batch 64, 3x32x32 synthetic images, SGD, one Lightning ``Trainer.fit`` per
candidate and round, on CPU with torch's default thread count. Two candidates, each with its own copy of one seeded
model, its own optimizer and its own loader (the same batches):

- ``baseline``: no callbacks;
- ``guard``:    ``BatchNormGuard()`` (a copy of every BN buffer before each batch, one packed finite check and one
  host read after it).

Rounds interleave the candidates (``_bench.round_orders``: ``ab``, ``ba``, ...). A timing callback, first in every
Trainer, stamps ``perf_counter`` at every ``on_train_batch_start``; a step's time is the gap to the next stamp (data,
forward, backward, optimizer, every hook). The first ``--discard`` steps of a fit are dropped; a round's sample is the
mean step time of its window, the reported ratio the MEDIAN OVER ROUNDS of guard / baseline, with quartiles. The
guard's own hooks are also timed directly (microseconds per step), a steadier figure than a ratio near 1.

    python scripts/bench_guard.py                  # defaults: 8 rounds x 30 steps, ~2 minutes on 2 cores
    python scripts/bench_guard.py --rounds 20 --steps 50
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from _bench import (
    add_threads_option,
    apply_threads_option,
    environment_lines,
    median,
    median_ratio,
    print_table,
    ratio_quartiles,
    reproduce_command,
    round_orders,
)
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from typing_extensions import override

from bn_lightning.app.models import ResNet20
from bn_lightning.callbacks import BatchNormGuard
from bn_lightning.module import BatchNormModule

BATCH = 64
TARGET = 1.02
NAMES = ("baseline", "guard")


class StepTimer(Callback):
    """Seconds per training step: the gap between consecutive ``on_train_batch_start`` calls (first callback)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start: float | None = None

    def reset(self) -> None:
        self.times, self._start = [], None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        now = time.perf_counter()
        if self._start is not None:
            self.times.append(now - self._start)
        self._start = now


class TimedGuard(BatchNormGuard):
    """BatchNormGuard whose two per-batch hooks add their own run time to :attr:`hook_seconds`."""

    hook_seconds: float = 0.0
    hook_batches: int = 0

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        t = time.perf_counter()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.hook_seconds += time.perf_counter() - t

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        t = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.hook_seconds += time.perf_counter() - t
        self.hook_batches += 1


def make_candidates(batches: int, seed: int) -> dict[str, dict[str, Any]]:
    torch.manual_seed(seed)
    net = ResNet20(num_classes=10, in_channels=3, norm="torch")
    g = torch.Generator().manual_seed(seed)
    pool = 16 * BATCH  # distinct synthetic images; batches are drawn from them with replacement
    data = TensorDataset(torch.randn(pool, 3, 32, 32, generator=g), torch.randint(0, 10, (pool,), generator=g))
    out = {}
    for name in NAMES:
        sampler = RandomSampler(data, True, BATCH * batches, generator=torch.Generator().manual_seed(seed))
        out[name] = {
            "module": BatchNormModule(copy.deepcopy(net), num_classes=10),
            "loader": DataLoader(data, batch_size=BATCH, sampler=sampler, drop_last=True),
            "timer": StepTimer(),
            "callbacks": [TimedGuard()] if name == "guard" else [],
            "means": [],
        }
    return out


def run_fit(cand: dict[str, Any], steps: int) -> list[float]:
    cand["timer"].reset()
    gc.collect()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        callbacks=[cand["timer"], *cand["callbacks"]],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(cand["module"], train_dataloaders=cand["loader"])
    return cand["timer"].times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per candidate per round")
    parser.add_argument("--discard", type=int, default=2, help="untimed steps at the start of every fit")
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps of the untimed warm-up fit per candidate")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_option(parser)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.discard < 0 or args.warmup_steps < 0:
        parser.error("need --rounds >= 1, --steps >= 1, --discard >= 0 and --warmup-steps >= 0")
    apply_threads_option(parser, args)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec")
    warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no `val_dataloader`")
    fit_steps = args.discard + args.steps + 1
    print("bench_guard: Lightning training step with and without BatchNormGuard (CPU)")
    print("\n".join(environment_lines()))
    print(
        f"ResNet-20 (torch BN), batch {BATCH}, 3x32x32 synthetic images, SGD; {args.rounds} rounds x 2 candidates x "
        f"1 fit of {fit_steps} steps ({args.discard} discarded, {args.steps} timed)"
    )
    candidates = make_candidates(max(fit_steps, args.warmup_steps), args.seed)
    for cand in candidates.values():
        if args.warmup_steps:
            run_fit(cand, args.warmup_steps)
    guard = candidates["guard"]["callbacks"][0]
    guard.hook_seconds, guard.hook_batches = 0.0, 0
    for r, order in enumerate(round_orders(list(NAMES), args.rounds)):
        for name in order:
            times = run_fit(candidates[name], fit_steps)[args.discard :]
            candidates[name]["means"].append(statistics.fmean(times))
        base, g = candidates["baseline"]["means"][-1], candidates["guard"]["means"][-1]
        print(f"  round {r + 1}/{args.rounds}: baseline {1e3 * base:.1f} ms/step, guard {g / base:.3f}x", flush=True)
    base_means, guard_means = candidates["baseline"]["means"], candidates["guard"]["means"]
    ratio = median_ratio(guard_means, base_means)
    q1, q3 = ratio_quartiles(guard_means, base_means) if args.rounds > 1 else (ratio, ratio)
    hook_us = 1e6 * guard.hook_seconds / max(guard.hook_batches, 1)
    print()
    print_table(
        ["candidate", "step ms", "ratio", "q1", "q3"],
        [
            ["baseline", 1e3 * median(base_means), 1.0, 1.0, 1.0],
            ["guard", 1e3 * median(guard_means), ratio, q1, q3],
        ],
    )
    share = 100 * hook_us * 1e-6 / median(base_means)
    print(f"\nBatchNormGuard hooks: {hook_us:.0f} us per step ({share:.2f}% of a baseline step)")
    print(f"verdict: guard / baseline = {ratio:.3f} (target <= {TARGET}): {'PASS' if ratio <= TARGET else 'MISS'}")
    resolved = ["--rounds", str(args.rounds), "--steps", str(args.steps), "--discard", str(args.discard)]
    resolved += ["--warmup-steps", str(args.warmup_steps), "--seed", str(args.seed)]
    if args.threads is not None:
        resolved += ["--threads", str(args.threads)]
    print(f"reproduce: {reproduce_command(resolved)}")


if __name__ == "__main__":
    main()
