"""The scripts the README quotes run: the PreciseBN demo shows what it claims, the benchmarks run at a tiny size."""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_demo_precise_bn_repairs_the_running_statistics(capsys):
    _load("demo_precise_bn").main(["--epochs", "1"])
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        parts = line.rsplit(maxsplit=2)
        try:
            rows[parts[0].strip()] = (float(parts[1]), float(parts[2]))
        except (ValueError, IndexError):
            continue  # a header or prose line
    before, after = rows["drift KL (population || running)"]
    assert after < 1e-3 < before
    gap_before, gap_after = rows["gap loss (running - batch)"]
    assert abs(gap_after) < abs(gap_before)


# the benchmarks the README quotes: a tiny run of each, so that they cannot rot between measurements. They run in a
# subprocess: they set torch's thread count for their whole process.
@pytest.mark.parametrize(
    "script,args",
    [
        ("bench_layers", ["--shape", "4", "4", "8", "8", "--rounds", "2", "--warmup", "0", "--threads", "1"]),
        ("bench_precise_bn", ["--num-batches", "1", "--batch-size", "4", "--rounds", "1", "--warmup", "0"]),
        ("bench_guard", ["--rounds", "1", "--steps", "1", "--warmup-steps", "0", "--threads", "1"]),
        ("bench_variants", ["--shape", "8", "4", "4", "4", "--rounds", "2", "--warmup", "0", "--threads", "1"]),
        ("bench_step", ["--batch", "4", "--rounds", "1", "--steps", "1", "--warmup", "0", "--thread-counts", "1"]),
        ("bench_overhead", ["--rounds", "2", "--warmup", "0", "--number", "2", "--blocked"]),
        pytest.param(
            "bench_sync",
            ["--rounds", "2", "--warmup", "0", "--batch", "2", "--malloc", "keep"],
            marks=pytest.mark.ddp,
            id="bench_sync",
        ),
    ],
)
def test_benchmark_scripts_run_and_print_how_to_reproduce(script, args):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{script}.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "reproduce: " in out.stdout
    if script == "bench_sync":  # the A/B of gloo's event-loop policy and the verdict against the floor are printed
        assert "sync_stock_loop - scratch" in out.stdout and "extra / floor" in out.stdout


def test_benchmark_thread_option_is_validated():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_layers.py"), "--threads", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2 and "--threads must be >= 1, got 0" in out.stderr


@pytest.mark.parametrize("k", [2, 3, 4, 5, 7])
def test_round_orders_balance_positions_and_predecessors(k):
    bench = _load("_bench")
    names = [f"c{i}" for i in range(k)]
    rounds = 2 if k == 2 else 700 if k > 5 else len(list(itertools.permutations(names)))
    orders = bench.round_orders(names, rounds)
    assert len(orders) == rounds and all(sorted(order) == names for order in orders)
    positions = Counter((name, i) for order in orders for i, name in enumerate(order))
    sequence = [name for order in orders for name in order]
    sequence.append(sequence[0])  # the cycle repeats: its first round follows its last
    pairs = Counter(zip(sequence, sequence[1:], strict=False))
    if k > 5:  # seeded shuffles: close to balanced
        assert min(positions.values()) > 0.7 * rounds / k
        return
    assert set(positions.values()) == {rounds // k}  # every candidate equally often in every position
    others = {pairs[(a, b)] for a in names for b in names if a != b}
    assert len(others) == 1 and others != {0}  # ...and right after every other candidate equally often
    if k > 2:
        assert all(pairs[(a, a)] == 0 for a in names)


def test_interleaved_times_every_candidate_once_per_round_with_varied_neighbours():
    bench = _load("_bench")
    calls = []
    times = bench.interleaved({n: (lambda n=n: calls.append(n)) for n in "abc"}, repeats=6, warmup=1)
    assert {n: len(t) for n, t in times.items()} == {"a": 6, "b": 6, "c": 6}
    timed = calls[3:]
    predecessors = {(timed[i - 1], timed[i]) for i in range(1, len(timed))}
    assert {("b", "a"), ("c", "a")} <= predecessors  # a rotation would only ever run "a" after "c"


def test_readme_figure_script_copies_the_reports_heatmap(tmp_path):
    out = tmp_path / "figure.png"
    shrink = ("trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1")
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "readme_figure.py"),
            "--out",
            str(out),
            "--keep",
            str(tmp_path / "run"),
            *shrink,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Figure written to: {out}" in result.stdout
    assert out.read_bytes() == (tmp_path / "run" / "report" / "heatmap_drift_kl.png").read_bytes()
