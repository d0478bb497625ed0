"""A fit interrupted after some epochs and resumed from last.ckpt ends where the uninterrupted fit ends."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from bn_lightning.app.train import train
from bn_lightning.callbacks import BatchNormGap, BatchNormMonitor, PreciseBN, RunningStatDrift
from tests.app.test_train import shrunk_config

EPOCHS = 3
# every BN callback watches the run; the cosine schedule spans EPOCHS in both runs (T_max is part of the scheduler's
# state, so a resumed fit keeps the T_max of the fit it continues)
RESUME = (
    "trainer.limit_train_batches=3",
    f"module.scheduler.T_max={EPOCHS}",
    "++callbacks.precise_bn={_target_:bn_lightning.callbacks.PreciseBN,num_batches:2}",
    "++callbacks.bn_gap={_target_:bn_lightning.callbacks.BatchNormGap,num_batches:1}",
)
STOP = 1  # epochs of the interrupted run


def read_rows(log_dir: str) -> list[dict[str, str]]:
    """The logged values, row by row, without the empty cells and the wall-clock times (``.../seconds``)."""
    with open(Path(log_dir) / "metrics.csv") as f:
        rows = csv.DictReader(f)
        return [{key: value for key, value in row.items() if value and not key.endswith("seconds")} for row in rows]


def fit(output_dir: Path, epochs: int, *overrides: str) -> DictConfig:
    return shrunk_config(output_dir, *RESUME, f"trainer.max_epochs={epochs}", *overrides)


def assert_same(a: Any, b: Any, what: str) -> None:
    """``a`` and ``b`` hold the same values, tensors compared bit for bit (nested dicts, lists and tuples)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), what
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), what
        for key in a:
            assert_same(a[key], b[key], f"{what}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{what}[{i}]")
    else:
        assert a == b, what


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_resumed_fit_equals_uninterrupted_fit(tmp_path: Path) -> None:
    _, whole = train(fit(tmp_path / "whole", EPOCHS))
    _, first = train(fit(tmp_path / "split", STOP))
    last = tmp_path / "split" / "checkpoints" / "last.ckpt"
    _, resumed = train(fit(tmp_path / "split", EPOCHS, f"ckpt_path={last}"))

    trainer, resumed_trainer = whole["trainer"], resumed["trainer"]
    watched = {type(cb) for cb in resumed_trainer.callbacks}
    assert {BatchNormMonitor, RunningStatDrift, PreciseBN, BatchNormGap} <= watched
    assert resumed_trainer.current_epoch == trainer.current_epoch == EPOCHS
    assert resumed_trainer.global_step == trainer.global_step == 3 * EPOCHS

    # weights and BN buffers (running statistics, num_batches_tracked), bit for bit
    assert_same(whole["module"].state_dict(), resumed["module"].state_dict(), "module")
    # optimizer: momentum buffers and hyperparameters
    opt = trainer.optimizers[0].state_dict()
    assert opt["state"]
    assert_same(opt, resumed_trainer.optimizers[0].state_dict(), "optimizer")
    scheduler = trainer.lr_scheduler_configs[0].scheduler.state_dict()
    assert_same(scheduler, resumed_trainer.lr_scheduler_configs[0].scheduler.state_dict(), "scheduler")

    # what the BN callbacks carry from epoch to epoch (counters, previous statistics, alerts)
    for kind in (BatchNormMonitor, RunningStatDrift, PreciseBN, BatchNormGap):
        (state,) = [cb.state_dict() for cb in trainer.callbacks if type(cb) is kind]
        (resumed_state,) = [cb.state_dict() for cb in resumed_trainer.callbacks if type(cb) is kind]
        assert_same(state, resumed_state, kind.__name__)

    # every logged value, per step and epoch: the interrupted run's rows followed by the resumed run's
    rows = read_rows(trainer.log_dir)
    split_rows = read_rows(first["trainer"].log_dir) + read_rows(resumed_trainer.log_dir)
    assert Path(resumed_trainer.log_dir).name == "version_1"
    assert any(key.startswith("bn/") and "drift" in key for row in rows for key in row), "no drift metric logged"
    assert {row["epoch"] for row in rows if "epoch" in row} == {str(epoch) for epoch in range(EPOCHS)}
    assert split_rows == rows


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_last_ckpt_is_the_last_epoch(tmp_path: Path) -> None:
    # nothing changes the network (no step, BN running statistics kept): val/acc never improves after epoch 0
    frozen = ("module.optimizer.lr=0", "bn.momentum=0", "trainer.limit_train_batches=3")
    _, objects = train(shrunk_config(tmp_path, f"trainer.max_epochs={EPOCHS}", *frozen))
    best = objects["trainer"].checkpoint_callback
    assert isinstance(best, ModelCheckpoint) and best.monitor == "val/acc"
    assert Path(best.best_model_path).name == "epoch_000.ckpt"
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == EPOCHS - 1 and last["global_step"] == 3 * EPOCHS
