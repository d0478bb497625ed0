"""Launching the app: the trainer group, two torchrun 'nodes' on one machine, failing ranks, the installed copy."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.nn.modules.batchnorm import _BatchNorm

from bn_lightning.app.train import config_dir
from tests.helpers.app import QUICK_RUN

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train.py"
TINY = (*QUICK_RUN, "callbacks=none")


class SaveBNBuffers(pl.Callback):
    """Test hook: at the end of fit every rank saves its BN buffers to ``<directory>/rank<global rank>.pt``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        buffers = {
            f"{name}.{key}": value.clone()
            for name, module in pl_module.named_modules()
            if isinstance(module, _BatchNorm)
            for key, value in module.named_buffers(recurse=False)
        }
        torch.save(buffers, Path(self.directory) / f"rank{trainer.global_rank}.pt")


class FailAtStep(pl.Callback):
    """Test hook: rank ``rank`` raises (``how="raise"``) or kills itself (``how="kill"``) at training batch ``step``."""

    def __init__(self, rank: int = 1, step: int = 1, how: str = "raise") -> None:
        self.rank, self.step, self.how = rank, step, how

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and batch_idx == self.step:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"test failure in rank {self.rank} at step {self.step}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    # the test hooks above are imported by the training processes as tests.app.test_launch
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _run_dirs(cwd: Path) -> list[Path]:
    return sorted(p for p in (cwd / "outputs" / "train" / "runs").iterdir() if p.is_dir())


@pytest.mark.parametrize("option", ["default", "ddp", "gpu", "ddp_gpu"])
def test_trainer_options_compose(option: str) -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"trainer={option}", "output_dir=."])
    expected = {"default": ("cpu", None), "ddp": ("cpu", "ddp"), "gpu": ("gpu", None), "ddp_gpu": ("gpu", "ddp")}
    assert (cfg.trainer.accelerator, cfg.trainer.get("strategy")) == expected[option]
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trainer_gpu_trains(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "trainer=gpu", f"hydra.run.dir={tmp_path}", *TINY],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Final val/acc:" in proc.stdout


@pytest.mark.slow
@pytest.mark.ddp
def test_two_torchrun_nodes_train_together(tmp_path: Path) -> None:
    """Two torchrun 'nodes' on localhost, bn=sync: same BN buffers, one run directory, one report (rank zero)."""
    port = _free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run"]  # the `torchrun` console script, without PATH lookup
    procs = [
        subprocess.Popen(
            [
                *torchrun,
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={node}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                str(SCRIPT),
                "trainer=ddp",
                "trainer.num_nodes=2",
                "trainer.devices=1",
                "bn=sync",
                "report=true",
                *TINY,
                "+callbacks.save_bn._target_=tests.app.test_launch.SaveBNBuffers",
                f"+callbacks.save_bn.directory={tmp_path}",
            ],
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    assert outputs[0].count("Final val/acc:") == 1 and "Final val/acc:" not in outputs[1]
    assert outputs[0].count("Report written to:") == 1 and "Report written to:" not in outputs[1]  # rank zero only

    (run_dir,) = _run_dirs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs", "rank0.pt", "rank1.pt"]
    assert (run_dir / "csv" / "version_0" / "metrics.csv").is_file()
    assert (run_dir / "report" / "index.html").is_file()
    log = (run_dir / "train.log").read_text()
    assert "[rank 0]" in log and "[rank 1]" not in log  # node 1 logs to its own console

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and any(k.endswith("running_mean") for k in rank0)
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=key)
    assert int(rank0[next(k for k in rank0 if k.endswith("num_batches_tracked"))]) == 2


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_ends_the_run(tmp_path: Path, how: str) -> None:
    """An exception in (or the death of) rank 1 at step 1 ends the whole run with a non-zero code, without a hang."""
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "trainer=ddp",
            "trainer.devices=2",
            f"hydra.run.dir={tmp_path}",
            *TINY,
            "trainer.limit_train_batches=4",
            "+callbacks.fail._target_=tests.app.test_launch.FailAtStep",
            f"+callbacks.fail.how={how}",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode != 0
    assert "Final val/acc:" not in proc.stdout
    if how == "raise":
        assert "test failure in rank 1 at step 1" in proc.stderr


@pytest.mark.slow
def test_wheel_ships_the_configs_and_trains_from_them(tmp_path: Path) -> None:
    """``pip wheel .`` copies conf/ into bn_lightning/conf; the unpacked wheel composes from its copy, anywhere."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-w", str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0 and "No matching distribution found for setuptools" in proc.stdout + proc.stderr:
        pytest.skip("building a wheel in an isolated environment needs the package index")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (wheel,) = (tmp_path / "dist").glob("bn_lightning-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        conf = {p.relative_to(ROOT).as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
        assert {f"bn_lightning/{name}" for name in conf} <= names
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "bn-train = bn_lightning.app.train:main" in archive.read(entry_points).decode()
        archive.extractall(tmp_path / "site")

    # the installed layout, without the checkout: the app finds bn_lightning/conf next to its code
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = "import bn_lightning.app.train as t; print(t.config_dir()); t.main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "--cfg", "job", "bn=ghost"], cwd=work, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0] == str(tmp_path / "site" / "bn_lightning" / "conf")
    assert "impl: ghost" in proc.stdout and not list(work.iterdir())


@pytest.mark.parametrize("command", ["module", "console"])
def test_entry_points_compose_outside_the_checkout(tmp_path: Path, command: str) -> None:
    """``python -m bn_lightning.app.train`` and ``bn-train`` find the configs from any working directory."""
    bn_train = Path(sys.executable).with_name("bn-train")
    if command == "console" and not bn_train.exists():
        pytest.skip("the bn-train console script is not installed (pip install -e . installs it)")
    argv = [str(bn_train)] if command == "console" else [sys.executable, "-m", "bn_lightning.app.train"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [*argv, "--cfg", "job", "bn=sync", "trainer=ddp"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "impl: sync" in proc.stdout and "strategy: ddp" in proc.stdout
    assert not list(tmp_path.iterdir())  # --cfg prints the config and writes nothing
