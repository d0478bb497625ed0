"""`experiment=small_batch`: BatchNorm's small-batch pathology on purpose, and what RunningStatDrift says about it."""

from __future__ import annotations

import warnings
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import bn_lightning.hydra  # noqa: F401  (registers the bn_lightning/* groups the experiment uses)
from bn_lightning.app.summary import summarize_run
from bn_lightning.app.train import train
from bn_lightning.policy import BatchNormPolicy
from tests.helpers.app import QUICK_RUN_LOGGED

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"


def small_batch_config(output_dir: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"output_dir={output_dir}", "experiment=small_batch", *overrides])


def test_small_batch_composes(tmp_path: Path) -> None:
    cfg = small_batch_config(tmp_path)
    assert cfg.data.batch_size <= 4 and cfg.bn.momentum is None  # tiny per-device batches, default momentum
    assert cfg.model._target_ == "bn_lightning.app.models.MLP" and cfg.data.val_batch_size == 64
    assert cfg.callbacks.bn_drift._target_ == "bn_lightning.callbacks.RunningStatDrift"
    assert cfg.callbacks.bn_gap._target_ == "bn_lightning.callbacks.BatchNormGap"
    assert cfg.task_name == "small_batch"
    # the cures of docs/experiments.md compose on top of it
    assert small_batch_config(tmp_path, "bn=renorm").bn.impl == "renorm"
    assert small_batch_config(tmp_path, "bn=sync", "trainer=ddp").trainer.devices == 2
    precise = BatchNormPolicy.from_config(small_batch_config(tmp_path, "bn.precise_bn.enabled=true").bn)
    assert precise.precise_bn is not None and precise.precise_bn.when == "before_validation"


def test_small_batch_run_warns(tmp_path: Path) -> None:
    cfg = small_batch_config(
        tmp_path,
        *QUICK_RUN_LOGGED,
        "callbacks.bn_gap.num_batches=2",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    messages = [str(w.message) for w in caught]
    assert any("health check 'small_batch' failed" in m and "per-device batch of 2" in m for m in messages), messages
    assert summarize_run(tmp_path)["bn/gap/loss"] is not None  # BatchNormGap logged to the CSV logger
