"""Bad input at run time: one line naming the key and what is allowed, exit code 2, nothing built; launch warnings."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import bn_lightning.app.train as app_train
from bn_lightning.app.train import check_config, config_dir, train
from bn_lightning.policy import BatchNormPolicy
from tests.helpers.app import QUICK_RUN

ROOT = Path(__file__).resolve().parents[2]
TINY = QUICK_RUN


def run_cli(cwd: Path, *args: str, full_error: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args],
        cwd=cwd,
        env={**env, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epochs=abc", "Error: trainer.max_epochs must be None or an int >= -1, got 'abc'"),
        ("bn_kernel=fast", "Error: unknown BN kernel 'fast'"),
        ("report=sometimes", "Error: report must be True or False, got 'sometimes'"),
    ],
)
def test_cli_bad_value_is_one_line_and_builds_nothing(tmp_path: Path, override: str, message: str) -> None:
    proc = run_cli(tmp_path, override)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("Error: ") == 1
    (run_dir,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "train.log"]  # Hydra's own files only


def test_cli_error_during_training_keeps_its_traceback(tmp_path: Path) -> None:
    # a loss that cannot take class targets: a ValueError in training_step, not a config check
    proc = run_cli(tmp_path, *TINY, "module.loss._target_=torch.nn.BCEWithLogitsLoss", "~module.loss.label_smoothing")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ValueError: Target size" in proc.stderr
    assert not any(line.startswith("Error: ") for line in proc.stderr.splitlines())  # not shortened to one line


def test_cli_full_error_shows_the_traceback(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "trainer.max_epochs=abc", full_error=True)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ValueError: trainer.max_epochs must be" in proc.stderr


@pytest.mark.parametrize(
    ("trainer", "error"),
    [
        ({"max_epochs": "abc"}, "trainer.max_epochs must be None or an int >= -1, got 'abc'"),
        ({"max_epochs": 2.5}, "trainer.max_epochs must be None or an int >= -1, got 2.5"),
        ({"num_nodes": 0}, "trainer.num_nodes must be an int >= 1, got 0"),
        ({"devices": 0}, "trainer.devices must be an int >= 1, -1, 'auto' or a list of device ids, got 0"),
        ({"limit_train_batches": 1.5}, r"trainer.limit_train_batches must be None, an int >= 0 \(batches\) or a float"),
        ({"limit_val_batches": "all"}, "trainer.limit_val_batches must be None, an int >= 0"),
        ({"enable_progress_bar": "yes"}, "trainer.enable_progress_bar must be True or False, got 'yes'"),
    ],
)
def test_check_config_names_the_trainer_key(trainer: dict, error: str) -> None:
    with pytest.raises((ValueError, TypeError), match=error):
        check_config(OmegaConf.create({"trainer": trainer}))


def test_check_config_accepts_the_shipped_trainers_and_checkpoint_names(tmp_path: Path) -> None:
    ckpt = tmp_path / "last.ckpt"
    ckpt.touch()
    for option in ("default", "ddp", "gpu", "ddp_gpu"):
        for ckpt_path in ("null", str(ckpt), "last", "best", "s3://bucket/last.ckpt"):
            with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
                cfg = compose("config", overrides=[f"trainer={option}", "output_dir=.", f"ckpt_path={ckpt_path}"])
            check_config(cfg)
    with pytest.raises(ValueError, match=r"ckpt_path=.*nothing\.ckpt is not a file.*\('last', 'best', 'hpc'"):
        check_config(OmegaConf.create({"ckpt_path": str(tmp_path / "nothing.ckpt")}))


def test_missing_checkpoint_fails_before_anything_is_built(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={tmp_path}", f"ckpt_path={tmp_path}/last.ckpt"])
    with pytest.raises(ValueError, match="last.ckpt is not a file"):
        train(cfg)
    assert not list(tmp_path.iterdir())


def test_check_config_runs_before_anything_is_built(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={tmp_path}", "trainer.max_epochs=abc"])
    with pytest.raises(ValueError, match="trainer.max_epochs"):
        train(cfg)
    assert not list(tmp_path.iterdir())


def test_sync_in_one_process_warns_once(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={tmp_path}", "bn=sync", "callbacks=none", *TINY])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    messages = [str(w.message) for w in caught if "bn=sync in a single process" in str(w.message)]
    assert len(messages) == 1 and "trainer=ddp" in messages[0]


@pytest.mark.parametrize(("devices", "cores", "warns"), [(3, 2, True), (2, 2, False), (2, None, False)])
def test_more_cpu_processes_than_cores_warns(
    monkeypatch: pytest.MonkeyPatch, devices: int, cores: int | None, warns: bool
) -> None:
    monkeypatch.setattr(app_train, "_available_cores", lambda: cores)
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=devices, logger=False, enable_checkpointing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        app_train._warn_about_launch(trainer, BatchNormPolicy())
    messages = [str(w.message) for w in caught if "CPU processes on" in str(w.message)]
    assert len(messages) == (1 if warns else 0)
    if warns:
        assert messages[0].startswith(f"trainer.devices={devices} CPU processes on {cores} CPU core(s)")
