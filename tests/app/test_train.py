"""train(cfg) end to end on shrunk configs, resuming, the experiment files, wandb offline and the real CLI."""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bn_lightning.app.train import train, train_and_report
from bn_lightning.layers import SyncBatchNorm, get_batchnorm_class
from bn_lightning.module import BatchNormModule
from bn_lightning.policy import BatchNormPolicy
from tests.helpers.app import QUICK_RUN_LOGGED

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"

# a couple of batches per epoch, quiet: each run takes about a second
SHRINK = QUICK_RUN_LOGGED


def shrunk_config(output_dir: Path, *overrides: str) -> DictConfig:
    """The config of conf/ with ``overrides``, shrunk to a few batches, writing under ``output_dir``."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"output_dir={output_dir}", *SHRINK, *overrides])


def read_metrics(log_dir: str) -> list[dict[str, str]]:
    with open(Path(log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def assert_bn_policy_applied(objects: dict, impl: str) -> None:
    """The network's BN layers are of ``impl``'s classes and the module's hparams hold the config's policy."""
    bns = [m for m in objects["model"].modules() if isinstance(m, _BatchNorm)]
    assert bns
    for layer in bns:
        dim = 1 if isinstance(layer, nn.BatchNorm1d) or "1d" in type(layer).__name__ else 2
        assert type(layer) is (SyncBatchNorm if impl == "sync" else get_batchnorm_class(impl, dim))
    policy = BatchNormPolicy.from_config(objects["cfg"].bn)
    assert objects["bn_policy"] == policy and objects["module"].hparams.bn_policy == policy.to_dict()


@pytest.mark.parametrize("bn", ["torch", "scratch"])
@pytest.mark.parametrize("model", ["cnn", "mlp", "resnet20"])
def test_train_fast(tmp_path: Path, model: str, bn: str) -> None:
    cfg = shrunk_config(tmp_path, f"model={model}", f"bn={bn}")
    metrics, objects = train(cfg)

    assert {"cfg", "datamodule", "model", "bn_policy", "module", "callbacks", "loggers", "trainer"} <= set(objects)
    assert objects["module"].net is objects["model"]
    assert_bn_policy_applied(objects, bn)

    assert objects["trainer"].global_step == 2
    assert 0.0 <= metrics["val/acc"] <= 1.0
    assert math.isfinite(metrics["val/loss"]) and math.isfinite(metrics["train/loss_epoch"])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    rows = read_metrics(objects["trainer"].log_dir)
    assert any(row["val/acc"] for row in rows) and any(row["train/acc"] for row in rows)


@pytest.mark.filterwarnings("ignore:bn=sync in a single process")  # tests/app/test_errors.py checks it
@pytest.mark.parametrize("bn", ["sync", "ghost", "renorm", "frozen"])
def test_train_fast_bn_policies(tmp_path: Path, bn: str) -> None:
    # frozen.yaml freezes at epoch 5; freeze at the start here, so the one short epoch runs frozen
    extra = ("bn.freeze.freeze_at_epoch=0",) if bn == "frozen" else ()
    metrics, objects = train(shrunk_config(tmp_path, f"bn={bn}", *extra))
    assert_bn_policy_applied(objects, "torch" if bn == "frozen" else bn)
    assert 0.0 <= metrics["val/acc"] <= 1.0 and math.isfinite(metrics["val/loss"])
    hparams = (Path(objects["trainer"].log_dir) / "hparams.yaml").read_text()
    assert "bn_policy:" in hparams and f"impl: {objects['bn_policy'].impl}" in hparams
    if bn == "frozen":  # the policy's BatchNormFreeze joined the Trainer's callbacks and froze every layer
        from bn_lightning.callbacks.freeze import BatchNormFreeze

        freeze = next(cb for cb in objects["trainer"].callbacks if isinstance(cb, BatchNormFreeze))
        assert freeze.frozen and freeze.frozen_epoch == 0 and len(freeze.layer_names) == 2


def test_train_refuses_a_bad_policy_before_building_anything(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'ghost'.*allowed: \['virtual_batch_size'\]"):
        train(shrunk_config(tmp_path, "bn=ghost", "+bn.options.virtual_batchsize=8"))
    assert not (tmp_path / "checkpoints").exists()


def test_train_logs_config_and_seed(tmp_path: Path) -> None:
    cfg = shrunk_config(tmp_path, "seed=7")
    _, objects = train(cfg)
    hparams = (Path(objects["trainer"].log_dir) / "hparams.yaml").read_text()
    assert "cfg:" in hparams and "seed: 7" in hparams and "SmallCNN" in hparams


def test_train_without_callbacks_or_loggers(tmp_path: Path) -> None:
    cfg = shrunk_config(tmp_path, "callbacks=none", "~logger")
    metrics, objects = train(cfg)
    assert objects["callbacks"] == [] and objects["loggers"] == []
    assert objects["trainer"].loggers == []
    assert "val/acc" in metrics


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_resume_from_last_ckpt(tmp_path: Path) -> None:
    _, first = train(shrunk_config(tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file()
    # plain data only in the checkpoint: it loads with torch.load(weights_only=True), torch's default
    module = BatchNormModule.load_from_checkpoint(last, net=hydra.utils.instantiate(first["cfg"].model))
    assert module.hparams.num_classes == 10 and module.hparams.bn_policy == first["bn_policy"].to_dict()

    # resume in the same run directory, as `scripts/train.py hydra.run.dir=<run> ckpt_path=<run>/checkpoints/last.ckpt`
    _, objects = train(shrunk_config(tmp_path, "trainer.max_epochs=2", f"ckpt_path={last}"))
    trainer = objects["trainer"]
    assert trainer.current_epoch == 2 and trainer.global_step == 4
    assert Path(trainer.log_dir).name == "version_1"  # the first run's logs are kept
    # only the second epoch ran in the resumed run
    epochs = {row["epoch"] for row in read_metrics(trainer.log_dir) if row["val/acc"]}
    assert epochs == {"1"}


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_experiment_runs(tmp_path: Path, experiment: str) -> None:
    metrics, objects = train(shrunk_config(tmp_path, f"experiment={experiment}"))
    assert objects["cfg"].task_name == experiment
    assert 0.0 <= metrics["val/acc"] <= 1.0


def test_wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    metrics, objects = train(shrunk_config(tmp_path, "logger=wandb"))
    assert "val/acc" in metrics
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline wandb run was written"


def test_train_and_report_prints_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    val_acc = train_and_report(shrunk_config(tmp_path))
    out = capsys.readouterr().out
    assert f"Run written to: {tmp_path}" in out
    assert re.search(r"Final val/acc: (\d\.\d{4})", out).group(1) == f"{val_acc:.4f}"


def run_cli(
    *args: str, timeout: float = 120, cwd: Path = ROOT, warnings: str = "ignore"
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": warnings}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_cli_default_config_reaches_accuracy(tmp_path: Path) -> None:
    """The real command line with the default config: the digits CNN must exceed 95% validation accuracy."""
    proc = run_cli(f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Run written to: {tmp_path}" in proc.stdout
    acc = float(re.search(r"Final val/acc: ([0-9.]+)", proc.stdout).group(1))
    assert acc > 0.95, proc.stdout
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert (tmp_path / "train.log").is_file()


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("bn", ["torch", "sync"])
def test_cli_ddp_two_cpu_processes(tmp_path: Path, bn: str) -> None:
    """`trainer=ddp`: Lightning re-runs the script for rank 1; both ranks train and rank 0 reports.

    Run from a fresh working directory with the default timestamped `hydra.run.dir`: the run writes exactly one
    directory (rank 1 reuses rank 0's), one train.log whose lines name their rank, and no `sync_dist` warning.
    With `bn=sync` the BN layers are synchronised over gloo on CPU, where torch's SyncBatchNorm refuses to run.
    """
    proc = run_cli("trainer=ddp", "trainer.devices=2", f"bn={bn}", *SHRINK, cwd=tmp_path, warnings="default")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["outputs"]
    (run_dir,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "checkpoints", "csv", "train.log"]
    if bn == "sync":  # synchronisation itself is checked in tests/test_plugins.py
        assert "SyncBatchNormPlugin" in (run_dir / ".hydra" / "config.yaml").read_text()
        assert "impl: sync" in (run_dir / "csv" / "version_0" / "hparams.yaml").read_text()
    assert proc.stdout.count("Final val/acc:") == 1  # printed by rank 0 only
    assert "GLOBAL_RANK: 1" in proc.stderr + proc.stdout
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    log = (run_dir / "train.log").read_text()
    assert "][rank 0][" in log and "][rank 1][" in log
    assert "sync_dist" not in proc.stderr  # epoch-level metrics are synchronised


def test_train_sets_the_bn_kernel_and_refuses_an_unknown_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bn_lightning import functional as BF
    from bn_lightning.functional import compiled as kernels

    monkeypatch.setattr(kernels, "_chosen", "eager")  # restored after the test: the kernel is process-wide
    with pytest.raises(ValueError, match="unknown BN kernel 'fast'"):
        train(shrunk_config(tmp_path, "bn_kernel=fast"))
    assert not (tmp_path / "checkpoints").exists()
    metrics, _ = train(shrunk_config(tmp_path, "bn=scratch", "model=mlp", "bn_kernel=compiled"))
    assert BF.get_kernel() == "compiled" and metrics["train/loss_epoch"] > 0


def test_statistics_callbacks_from_the_command_line(tmp_path: Path) -> None:
    """callbacks=[default,bn_guard,bn_accumulate,bn_sync_buffers] with accumulation: one BN update per step."""
    cfg = shrunk_config(
        tmp_path,
        "callbacks=[default,bn_guard,bn_accumulate,bn_sync_buffers]",
        "trainer.limit_train_batches=4",
        "trainer.accumulate_grad_batches=2",
    )
    _, objects = train(cfg)
    names = {type(c).__name__ for c in objects["callbacks"]}
    assert {"BatchNormGuard", "AccumulateBatchNormStats", "SyncBatchNormBuffers"} <= names
    assert objects["trainer"].global_step == 2  # 4 batches, 2 per optimizer step
    tracked = [int(m.num_batches_tracked) for m in objects["model"].modules() if isinstance(m, _BatchNorm)]
    assert tracked and set(tracked) == {2}  # without AccumulateBatchNormStats: 4
