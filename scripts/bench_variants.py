"""Benchmark: GhostBatchNorm2d and BatchRenorm2d against bn_lightning's plain BatchNorm2d, train forward+backward.

Each round times every candidate once on the same input, in rotating orders (scripts/_bench.py); the ratio is the
median over rounds of candidate / plain. Renorm is timed past its warm-up (its r/d clamps active), Ghost with
``--virtual-batches`` virtual batches.

Run: python scripts/bench_variants.py [--shape 64 64 32 32] [--virtual-batches 4] [--rounds 24] [--threads 2]
"""

from __future__ import annotations

import argparse

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

import bn_lightning as bnl


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[64, 64, 32, 32], metavar=("N", "C", "H", "W"))
    parser.add_argument("--virtual-batches", type=int, default=4, help="Ghost BN: virtual batches per batch")
    parser.add_argument("--rounds", type=int, default=24, help="timed interleaved rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_option(parser)
    args = parser.parse_args()
    apply_threads_option(parser, args)
    n, c, h, w = args.shape
    if args.virtual_batches < 1 or n % args.virtual_batches:
        parser.error(f"--virtual-batches must divide the batch size {n}, got {args.virtual_batches}")
    torch.manual_seed(args.seed)
    x = torch.randn(n, c, h, w, requires_grad=True)
    grad = torch.randn(n, c, h, w)
    layers = {
        "plain": bnl.BatchNorm2d(c),
        "ghost": bnl.GhostBatchNorm2d(c, virtual_batch_size=n // args.virtual_batches),
        "renorm": bnl.BatchRenorm2d(c, warmup_steps=0),
    }

    def step(layer: torch.nn.Module) -> None:
        x.grad = None
        layer(x).backward(grad)

    print("bench_variants: Ghost and Renorm BN vs bn_lightning's plain BatchNorm2d, train fwd+bwd (CPU, float32)")
    for line in environment_lines():
        print(line)
    print(f"shape (N, C, H, W): {tuple(args.shape)}, ghost: {args.virtual_batches} virtual batches")
    print(f"rounds {args.rounds}, warmup {args.warmup}")
    times = interleaved({k: (lambda m=m: step(m)) for k, m in layers.items()}, args.rounds, args.warmup)
    rows = []
    for name, t in times.items():
        q1, q3 = ratio_quartiles(t, times["plain"])
        rows.append([name, median(t) * 1e3, f"{median_ratio(t, times['plain']):.2f}x", f"[{q1:.2f}, {q3:.2f}]"])
    print_table(["candidate", "time ms", "ratio", "[q1, q3]"], rows)
    print("after the run: " + load_line())
    rerun = ["--shape", *map(str, args.shape), "--virtual-batches", str(args.virtual_batches), "--rounds"]
    rerun += [str(args.rounds), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    if args.threads is not None:
        rerun += ["--threads", str(args.threads)]
    print("reproduce: " + reproduce_command(rerun))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
