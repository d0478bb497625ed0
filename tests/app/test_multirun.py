"""Multirun (`-m`): the summary that MultirunSummary writes, and multiruns whose jobs would start DDP ranks."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bn_lightning.app.summary import (
    COLUMNS,
    EXTERNAL_LAUNCHERS,
    MultirunDDPError,
    MultirunSummary,
    summarize_run,
    trainer_processes,
)
from tests.helpers.app import QUICK_RUN_LOGGED

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train.py"
TINY = QUICK_RUN_LOGGED
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def run_cli(cwd: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def read_summary(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.mark.slow
def test_multirun_writes_and_prints_summary(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(tmp_path, "-m", "bn=torch,scratch", "bn.momentum=0.01,0.1", *TINY, f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]

    columns, rows = read_summary(sweep / "summary.csv")
    assert columns == ["overrides", "val/acc", "val/loss", "bn/gap/loss", "drift_kl_max", "run_dir"]
    assert len(rows) == 4
    combos = {tuple(o for o in row["overrides"].split() if o.startswith("bn")) for row in rows}
    assert combos == {(f"bn={bn}", f"bn.momentum={m}") for bn in ("torch", "scratch") for m in ("0.01", "0.1")}
    run_dirs = {Path(row["run_dir"]) for row in rows}
    assert len(run_dirs) == 4 and all(d.parent == sweep and (d / ".hydra").is_dir() for d in run_dirs)
    for row in rows:
        assert 0.0 <= float(row["val/acc"]) <= 1.0 and math.isfinite(float(row["val/loss"]))
        assert float(row["drift_kl_max"]) >= 0.0  # RunningStatDrift is in callbacks=default
        assert row["bn/gap/loss"] == ""  # BatchNormGap is not
    # the printed table: the header, then one line per job naming what differs between the jobs
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == list(COLUMNS))
    table = lines[header + 1 : header + 5]
    assert [line.split()[:2] for line in table] == [
        ["bn=torch", "bn.momentum=0.01"],
        ["bn=torch", "bn.momentum=0.1"],
        ["bn=scratch", "bn.momentum=0.01"],
        ["bn=scratch", "bn.momentum=0.1"],
    ]
    assert f"Multirun summary (4 jobs): {sweep / 'summary.csv'}" in result.stdout


@pytest.mark.parametrize(
    "sweep",
    [
        ("bn=torch,sync", "trainer=ddp"),  # DDP in the config without the sweep: stops before the sweep directory
        ("trainer=ddp", "trainer.devices=2,3"),
    ],
)
def test_multirun_with_ddp_stops_at_once(tmp_path: Path, sweep: tuple[str, ...]) -> None:
    result = run_cli(tmp_path, "-m", *sweep, *TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=120)
    assert result.returncode == 1
    assert "Multirun (-m) cannot run DDP jobs" in result.stderr
    assert "lightning-hydra-template#226" in result.stderr and "for bn in torch sync" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no sweep directory, nothing written by a second rank


@pytest.mark.slow
def test_multirun_stops_before_a_ddp_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(tmp_path, "-m", "trainer=default,ddp", *TINY, "callbacks=none", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 1
    assert "job 1: trainer.strategy=ddp, 2 processes" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # rank 1 never started: no second sweep directory
    assert not (sweep / "summary.csv").exists()
    assert not list((sweep / "1").rglob("metrics.csv"))  # job 1 stopped before training


def hydra_config(mode: str = "MULTIRUN", launcher: str = BASIC_LAUNCHER, **trainer: object) -> OmegaConf:
    return OmegaConf.create(
        {
            "trainer": {"strategy": "auto", "devices": 1, "num_nodes": 1, **trainer},
            "hydra": {"mode": mode, "launcher": {"_target_": launcher}, "job": {"num": 0}, "overrides": {"task": []}},
        }
    )


def test_ddp_check_decides_by_launcher_and_mode() -> None:
    callback = MultirunSummary()
    with pytest.raises(MultirunDDPError, match=r"trainer.strategy=ddp, 2 processes"):
        callback.on_multirun_start(hydra_config(strategy="ddp", devices=2))
    with pytest.raises(MultirunDDPError, match=r"job 0: trainer.strategy=auto, 4 processes"):
        callback.on_job_start(hydra_config(devices=2, num_nodes=2), task_function=print)
    # exits with the message (status 1) rather than a warning: Hydra turns callbacks' Exceptions into warnings
    assert not issubclass(MultirunDDPError, Exception) and issubclass(MultirunDDPError, SystemExit)
    # single-process jobs, a single DDP run and SLURM jobs (whose ranks srun starts) pass
    callback.on_multirun_start(hydra_config())
    callback.on_job_start(hydra_config(mode="RUN", strategy="ddp", devices=2), task_function=print)
    callback.on_multirun_start(hydra_config(launcher=EXTERNAL_LAUNCHERS[0], strategy="ddp", devices=2))


@pytest.mark.parametrize(
    ("trainer", "expected"),
    [
        ({"strategy": "ddp", "devices": 2}, (2, "ddp")),
        ({"devices": [0, 1, 2], "num_nodes": 2}, (6, "auto")),
        ({"devices": "1"}, (1, "auto")),
        ({"devices": -1}, (None, "auto")),
        ({"strategy": {"_target_": "my.DDPStrategy"}}, (None, "my.DDPStrategy")),
        (None, (None, "auto")),
    ],
)
def test_trainer_processes(trainer: dict | None, expected: tuple) -> None:
    assert trainer_processes(trainer) == expected


def write_job(sweep: Path, num: int, overrides: list[str], metrics: str | None) -> Path:
    run = sweep / str(num)
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"job": {"num": num}}}), run / ".hydra" / "hydra.yaml")
    if metrics is not None:
        (run / "csv" / "version_0").mkdir(parents=True)
        (run / "csv" / "version_0" / "metrics.csv").write_text(metrics)
    return run


def test_summary_finds_jobs_under_the_sweep_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A launcher that runs on_job_end elsewhere: the jobs are found from their .hydra/overrides.yaml."""
    header = "epoch,step,val/acc,val/loss,bn/gap/loss,bn/a/drift_kl_max,bn/b/drift_kl_max\n"
    first = write_job(tmp_path, 1, ["bn=scratch"], header + "0,9,,,,0.25,nan\n0,9,0.5,1.25,,,\n0,9,,,0.125,,\n")
    second = write_job(tmp_path, 0, ["bn=torch"], None)  # no CSV logger: empty cells
    callback = MultirunSummary()
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))

    columns, rows = read_summary(tmp_path / "summary.csv")
    assert columns == list(COLUMNS)
    assert rows == [
        {"overrides": "bn=torch", "val/acc": "", "val/loss": "", "bn/gap/loss": "", "drift_kl_max": "",
         "run_dir": str(second)},
        {"overrides": "bn=scratch", "val/acc": "0.5", "val/loss": "1.25", "bn/gap/loss": "0.125",
         "drift_kl_max": "0.25", "run_dir": str(first)},
    ]  # fmt: skip
    out = capsys.readouterr().out
    assert any(line.split()[:5] == ["bn=scratch", "0.5000", "1.2500", "0.1250", "0.2500"] for line in out.splitlines())


def test_summarize_run_takes_the_newest_log(tmp_path: Path) -> None:
    old = tmp_path / "csv" / "version_0"
    new = tmp_path / "csv" / "version_1"
    for directory, acc in ((old, "0.1"), (new, "0.9")):
        directory.mkdir(parents=True)
        (directory / "metrics.csv").write_text(f"step,val/acc\n1,{acc}\n")
    os.utime(old / "metrics.csv", (1, 1))
    assert summarize_run(tmp_path)["val/acc"] == 0.9


def test_summary_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="filename"):
        MultirunSummary(filename="a/summary.csv")
    with pytest.raises(TypeError, match="print_table"):
        MultirunSummary(print_table="yes")
