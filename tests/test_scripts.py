"""The demo script the README quotes runs, and shows what it claims: PreciseBN removes the drift and the gap."""

from __future__ import annotations

import importlib.util
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
