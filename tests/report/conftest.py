"""One real short training run with `report=true` (CSV + TensorBoard, PreciseBN, a freeze, the gap), shared."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train.py"
# 3 epochs of 6 steps, every step recorded; PreciseBN before each validation; BN frozen from epoch 2
RUN = (
    "logger=many",
    "callbacks=[default,bn_gap]",
    "bn.precise_bn.enabled=true",
    "bn.precise_bn.num_batches=2",
    "bn.freeze.freeze_at_epoch=2",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
)


def run_train(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(run directory, stdout) of one run that wrote its report at the end."""
    base = tmp_path_factory.mktemp("report_run")
    run_dir = base / "run"
    result = run_train(base, *RUN, "report=true", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stdout
