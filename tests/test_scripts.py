"""The scripts the README quotes run: the PreciseBN demo shows what it claims, the benchmarks run at a tiny size."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
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


def test_benchmark_thread_option_is_validated():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_layers.py"), "--threads", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2 and "--threads must be >= 1, got 0" in out.stderr
