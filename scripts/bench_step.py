"""Benchmark: a whole ResNet-20 training step with bn_lightning's BatchNorm2d against the same net with torch's.

Two copies of ResNet-20 (21 BN layers, the app's model) with the same weights: ``norm="scratch"``
(bn_lightning.BatchNorm2d) and ``norm="torch"`` (torch.nn.BatchNorm2d). One step is forward, cross-entropy,
backward and an SGD update on a fixed batch of 32x32 images. Each round times ``--steps`` steps of every candidate
in rotating orders (scripts/_bench.py); the ratio is the median over rounds of scratch / torch. Each thread count
given runs as its own table, in the same process.

Run: python scripts/bench_step.py [--batch 64] [--rounds 12] [--steps 10] [--thread-counts 1 2] [--channels-last]
     [--kernel compiled]
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable

import torch
from _bench import (
    environment_lines,
    interleaved,
    load_line,
    median,
    median_ratio,
    print_table,
    ratio_quartiles,
    reproduce_command,
)
from torch import nn

from bn_lightning.app.models import ResNet20
from bn_lightning.functional import set_kernel

TARGET = 1.02  # scratch / torch step time, from issue 17


def make_models(seed: int) -> dict[str, nn.Module]:
    """ResNet-20 with torch's BN and the same net with bn_lightning's, identical weights and buffers."""
    torch.manual_seed(seed)
    base = ResNet20(num_classes=10, in_channels=3, norm="torch")
    ours = ResNet20(num_classes=10, in_channels=3, norm="scratch")
    ours.load_state_dict(base.state_dict())
    return {"scratch": ours, "torch": copy.deepcopy(base)}


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> Callable[[], None]:
    """``steps`` SGD steps of ``model`` on the batch ``(x, y)``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def run() -> None:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

    return run


def check_agreement(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor) -> float:
    """Max abs difference of the two models' losses and first-layer gradients on one step (before timing)."""
    grads = {}
    for name, model in models.items():
        m = copy.deepcopy(model)
        loss = nn.functional.cross_entropy(m(x), y)
        loss.backward()
        grads[name] = (loss.detach(), m.conv1.weight.grad)  # type: ignore[union-attr]
    diff = max((grads["scratch"][i] - grads["torch"][i]).abs().max().item() for i in range(2))
    scale = max(1.0, grads["torch"][1].abs().max().item())
    if not diff <= 1e-3 * scale:
        sys.exit(f"scratch and torch ResNet-20 disagree on one step (max abs diff {diff:.3e}); not timing")
    return diff


def print_profile(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, steps: int, top: int) -> None:
    """Each model's ``top`` ATen ops and autograd Functions by self CPU time per step (torch profiler)."""
    from torch.profiler import profile

    for name, model in models.items():
        run = make_step(copy.deepcopy(model), x, y, steps)
        run()
        with profile() as prof:
            run()
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
        print(f"\nprofile, {name}: {total:.1f} ms self CPU per step; top {top} (ms per step, calls per step)")
        rows = [[e.key[:48], e.self_cpu_time_total / steps / 1e3, e.count // steps] for e in events[:top]]
        print_table(["op", "ms", "calls"], rows, floatfmt=".2f")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=12, help="timed interleaved rounds per thread count")
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed sample")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--thread-counts", type=int, nargs="+", default=[1, 2], help="torch.set_num_threads values")
    parser.add_argument("--channels-last", action="store_true", help="models and input in channels_last")
    parser.add_argument(
        "--kernel", choices=["eager", "compiled"], default="eager", help="bn_lightning.functional.set_kernel for ours"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=int, default=0, metavar="TOP", help="also print each model's TOP ops")
    args = parser.parse_args(argv)
    if args.batch < 2 or args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("need --batch >= 2, --rounds >= 1, --steps >= 1, --warmup >= 0")
    if any(t < 1 for t in args.thread_counts):
        parser.error(f"--thread-counts must be >= 1, got {args.thread_counts}")
    set_kernel(args.kernel)
    models = make_models(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
        for m in models.values():
            m.to(memory_format=torch.channels_last)
    print("bench_step: ResNet-20 train step (fwd, loss, bwd, SGD), bn_lightning BN (scratch) vs torch BN")
    for line in environment_lines():
        print(line)
    layout = "channels_last" if args.channels_last else "NCHW"
    print(f"batch {args.batch} x 3 x 32 x 32, {layout}, {args.kernel} kernel")
    print(f"one-step agreement (loss, conv1 grad): max abs diff {check_agreement(models, x, y):.2e}")
    summary = []
    for threads in args.thread_counts:
        torch.set_num_threads(threads)
        fns = {name: make_step(m, x, y, args.steps) for name, m in models.items()}
        times = interleaved(fns, args.rounds, warmup=args.warmup)
        ratio = median_ratio(times["scratch"], times["torch"])
        q1, q3 = ratio_quartiles(times["scratch"], times["torch"])
        print(f"\nthreads {threads}:")
        print_table(
            ["candidate", "ms per step", "ratio", "[q1, q3]"],
            [
                [name, median(t) * 1e3 / args.steps, median_ratio(t, times["torch"]), f"[{q1:.3f}, {q3:.3f}]"]
                if name == "scratch"
                else [name, median(t) * 1e3 / args.steps, 1.0, ""]
                for name, t in times.items()
            ],
        )
        summary.append([threads, ratio, f"[{q1:.3f}, {q3:.3f}]", "met" if ratio <= TARGET else "missed"])
        if args.profile > 0:
            print_profile(models, x, y, args.steps, args.profile)
    print(f"\nsummary: scratch / torch step time (target <= {TARGET}x)")
    print_table(["threads", "ratio", "[q1, q3]", "target"], summary)
    print(f"\nafter the run: {load_line()}")
    resolved = ["--batch", str(args.batch), "--rounds", str(args.rounds), "--steps", str(args.steps)]
    resolved += ["--warmup", str(args.warmup), "--thread-counts", *map(str, args.thread_counts)]
    resolved += ["--seed", str(args.seed)] + (["--channels-last"] if args.channels_last else [])
    resolved += ["--kernel", args.kernel] if args.kernel != "eager" else []
    resolved += ["--profile", str(args.profile)] if args.profile > 0 else []
    print(f"reproduce: {reproduce_command(resolved)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
