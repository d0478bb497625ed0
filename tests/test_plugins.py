"""SyncBatchNormPlugin in a real Lightning Trainer: 2 CPU processes with strategy="ddp"."""

from __future__ import annotations

import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

from bn_lightning.plugins import SyncBatchNormPlugin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, mode, *extra):
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "helpers", "lightning_ddp.py"), str(tmp_path), mode, *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return ranks, torch.load(tmp_path / "after_fit.pt", weights_only=False)


def _loops(tmp_path, rank):
    return [torch.load(tmp_path / f"loops_{when}{rank}.pt") for when in ("training", "after")]


@pytest.mark.ddp
@pytest.mark.slow
def test_trainer_cpu_ddp_with_plugin_synchronises_and_reverts(tmp_path):
    (r0, r1), after = _run(tmp_path, "plugin")
    assert {cls for cls, _ in r0.values()} == {"bn_lightning.layers.sync.SyncBatchNorm"}
    for name in r0:
        torch.testing.assert_close(r0[name][1], r1[name][1], msg=name)  # synced: identical on both ranks
    assert set(after.values()) == {"BatchNorm2d", "BatchNorm1d"}  # reverted to the exact torch classes
    if sys.platform.startswith("linux"):  # gloo's event loops idle while the plugin is applied, restored after
        for rank in range(2):
            training, after_fit = _loops(tmp_path, rank)
            assert training and set(training) == {os.SCHED_IDLE}
            assert set(after_fit) == {os.SCHED_OTHER}


@pytest.mark.ddp
@pytest.mark.slow
def test_without_plugin_the_ranks_buffers_diverge(tmp_path):
    (r0, r1), _ = _run(tmp_path, "none")
    assert any(not torch.allclose(r0[n][1], r1[n][1]) for n in r0)  # so the test above can fail
    if sys.platform.startswith("linux"):  # nothing else changes gloo's scheduling
        for rank in range(2):
            training, after_fit = _loops(tmp_path, rank)
            assert training and set(training) == {os.SCHED_OTHER} and set(after_fit) <= {os.SCHED_OTHER}


def test_plugin_with_sync_batchnorm_true_is_refused():
    with pytest.raises(MisconfigurationException, match="sync_batchnorm=True"):
        pl.Trainer(accelerator="cpu", devices=1, sync_batchnorm=True, plugins=[SyncBatchNormPlugin()], logger=False)


def test_plugin_validates_arguments():
    with pytest.raises(ValueError, match="group_size"):
        SyncBatchNormPlugin(group_size=0)
    with pytest.raises(TypeError, match="include"):
        SyncBatchNormPlugin(include="net.*")
    with pytest.raises(TypeError, match="idle_gloo_loop must be True or False"):
        SyncBatchNormPlugin(idle_gloo_loop="yes")


def test_plugin_apply_and_revert_in_one_process_respects_patterns():
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(2), torch.nn.Sequential(torch.nn.BatchNorm1d(3)))
    plugin = SyncBatchNormPlugin(include=["1.*"])
    converted = plugin.apply(net)
    assert type(converted[0]) is torch.nn.BatchNorm2d
    assert type(converted[1][0]).__name__ == "SyncBatchNorm"
    assert type(plugin.revert(converted)[1][0]) is torch.nn.BatchNorm1d


@pytest.mark.ddp
@pytest.mark.slow
def test_group_size_one_syncs_nobody(tmp_path):
    (r0, r1), _ = _run(tmp_path, "plugin", "1")
    assert {cls for cls, _ in r0.values()} == {"bn_lightning.layers.sync.SyncBatchNorm"}
    assert any(not torch.allclose(r0[n][1], r1[n][1]) for n in r0)  # two groups of one: each rank on its own
