"""Benchmark: the fixed cost of one BN call (our BatchNorm2d vs torch's) on a tiny input, where data costs nothing.

What a small activation pays per call whatever its size: Python, dispatch and the per-channel ops. Each sample is
the mean of ``--number`` calls; candidates run in interleaved rounds (scripts/_bench.py). Workloads: training
forward without grad, training forward+backward, eval forward. The input's mean sits ``--mean-offset`` standard
deviations from zero (3 by default: the path most of ResNet-20's BN inputs take; 0: the uncentred path).
``--blocked`` adds our layer with the small-input kernel switched off (``ours_blocked``: the blocked float32 kernels
that serve inputs above ``bn_lightning.functional.small.SMALL_VALUES``), for an A/B of the two on one input.

Run: python scripts/bench_overhead.py [--shape 2 4 8 8] [--mean-offset 3] [--rounds 20] [--number 200] [--threads 1]
     [--blocked]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _bench import (
    add_threads_option,
    apply_threads_option,
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

import bn_lightning as bnl
import bn_lightning.functional.small as small


def _workloads(
    layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, small_limit: int
) -> dict[str, Callable[[], None]]:
    """One call of each workload on ``layer``, with ``SMALL_VALUES`` set to ``small_limit`` while it runs."""

    def forward() -> None:
        small.SMALL_VALUES = small_limit
        layer.train()
        with torch.no_grad():
            layer(x)

    def forward_backward() -> None:
        small.SMALL_VALUES = small_limit
        layer.train()
        x.grad = None
        layer(x).backward(grad)

    def eval_forward() -> None:
        small.SMALL_VALUES = small_limit
        layer.eval()
        with torch.no_grad():
            layer(x)

    return {"train fwd": forward, "train fwd+bwd": forward_backward, "eval fwd": eval_forward}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[2, 4, 8, 8], metavar=("N", "C", "H", "W"))
    parser.add_argument("--mean-offset", type=float, default=3.0, help="the input's mean, in standard deviations")
    parser.add_argument("--rounds", type=int, default=20, help="timed interleaved rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--number", type=int, default=200, help="calls per timed sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blocked", action="store_true", help="also time ours with the small-input kernel off")
    add_threads_option(parser)
    args = parser.parse_args()
    if args.threads is None:
        args.threads = 1
    apply_threads_option(parser, args)
    if args.number < 1 or args.rounds < 1:
        parser.error(f"--number and --rounds must be >= 1, got {args.number} and {args.rounds}")
    torch.manual_seed(args.seed)
    c = args.shape[1]
    x = (torch.randn(args.shape) + args.mean_offset).requires_grad_()
    grad = torch.randn(args.shape)
    limit = small.SMALL_VALUES
    layers = {"ours": (bnl.BatchNorm2d(c), limit), "torch": (nn.BatchNorm2d(c), limit)}
    if args.blocked:
        layers["ours_blocked"] = (bnl.BatchNorm2d(c), 0)

    print("bench_overhead: fixed cost per BN call, bn_lightning.BatchNorm2d vs torch.nn.BatchNorm2d (CPU, float32)")
    for line in environment_lines():
        print(line)
    print(f"shape (N, C, H, W): {tuple(args.shape)}, mean offset {args.mean_offset} std, {args.number} calls/sample")
    rows = []
    for workload in ("train fwd", "train fwd+bwd", "eval fwd"):
        fns = {name: _workloads(layer, x, grad, lim)[workload] for name, (layer, lim) in layers.items()}
        times = interleaved(fns, args.rounds, args.warmup, number=args.number)
        for name, t in times.items():
            q1, q3 = ratio_quartiles(t, times["torch"])
            ratio = f"{median_ratio(t, times['torch']):.2f}x"
            rows.append([workload, name, median(t) * 1e6, ratio, f"[{q1:.2f}, {q3:.2f}]"])
    print_table(["workload", "candidate", "us per call", "ratio", "[q1, q3]"], rows, floatfmt=".1f")
    small.SMALL_VALUES = limit
    print("after the run: " + load_line())
    rerun = ["--shape", *map(str, args.shape), "--mean-offset", str(args.mean_offset), "--rounds", str(args.rounds)]
    rerun += ["--warmup", str(args.warmup), "--number", str(args.number), "--seed", str(args.seed)]
    rerun += ["--threads", str(args.threads)] + (["--blocked"] if args.blocked else [])
    print("reproduce: " + reproduce_command(rerun))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
