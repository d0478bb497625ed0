"""bn_lightning.fabric: the Fabric callbacks in one process, and the documented loop on 2 gloo processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from lightning.fabric import Fabric
from torch import nn

import bn_lightning
from bn_lightning.fabric import BatchNormRecorderCallback, SyncRunningStatsCallback, unwrap_model
from tests.helpers.fabric_ddp import (
    EVERY,
    LR,
    PER_RANK,
    RECAL_BATCHES,
    STEPS,
    CapturingFabricLogger,
    buffers,
    global_batches,
    make_net,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fabric_run(cb: BatchNormRecorderCallback, steps: int, state: dict | None = None):
    logger = CapturingFabricLogger()
    fabric = Fabric(accelerator="cpu", devices=1, callbacks=[cb], loggers=logger)
    model = fabric.setup(make_net())
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=LR))
    if state is not None:
        cb.load_state_dict(state)  # before on_train_start: applied when the recorder is made
    fabric.call("on_train_start", fabric=fabric, model=model)
    for x, y in global_batches(steps, seed=1):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        fabric.call("on_train_batch_end", fabric=fabric)
    return logger, model


def test_recorder_callback_logs_the_recorder_metrics_and_removes_its_hooks():
    cb = BatchNormRecorderCallback(every_n_steps=EVERY)
    logger, model = _fabric_run(cb, STEPS)
    assert [step for step, _ in logger.rows] == [1, 3]
    net = make_net()  # the same run, by hand, with the plain recorder
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    expected = []
    with bn_lightning.BatchNormRecorder(net, every_n_steps=EVERY) as rec:
        for x, y in global_batches(STEPS, seed=1):
            loss = nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            expected.append(rec.step())
    assert [m for _, m in logger.rows] == [expected[0], expected[2]]  # layer names without Fabric's wrappers
    assert "bn/features.1/drift_kl" in logger.rows[0][1]
    state = cb.state_dict()
    assert state["steps"] == STEPS and state["records"] == 2
    cb.on_train_end()
    assert cb.recorder is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unwrap_model(model).modules())


def test_recorder_callback_resumes_from_its_state_dict():
    first = BatchNormRecorderCallback(every_n_steps=3)
    _fabric_run(first, 2)
    resumed = BatchNormRecorderCallback(every_n_steps=3)
    logger, _ = _fabric_run(resumed, 2, state=first.state_dict())
    assert [step for step, _ in logger.rows] == [4]  # steps 3 and 4 of a run recording steps 1 and 4
    resumed.on_train_end()
    first.on_train_end()


def test_fabric_callbacks_refuse_bad_arguments_and_misuse():
    with pytest.raises(ValueError, match="BatchNormRecorderCallback: every_n_steps"):
        BatchNormRecorderCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="SyncRunningStatsCallback: reduce"):
        SyncRunningStatsCallback(reduce="median")
    with pytest.raises(ValueError, match="SyncRunningStatsCallback: when"):
        SyncRunningStatsCallback(when=("on_train_batch_end",))
    with pytest.raises(RuntimeError, match="on_train_start"):
        BatchNormRecorderCallback().on_train_batch_end(fabric=None)


# ------------------------------------------------------------------ 2 processes


def _reference() -> tuple[list[dict[str, float]], dict, dict]:
    """One process, torch's BN, the concatenated batches: the records, trained and recalibrated buffers."""
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    records = []
    with bn_lightning.BatchNormRecorder(net, every_n_steps=EVERY) as rec:
        for x, y in global_batches(STEPS, seed=1):
            loss = nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            records.append(rec.step())
    trained = buffers(net)
    recal = [(x,) for x, _ in global_batches(RECAL_BATCHES, seed=2)]
    bn_lightning.recalibrate_bn(net, recal, num_batches=RECAL_BATCHES, progress=False)
    return [r for r in records if r], trained, buffers(net)


# per device or from per-rank samples: not those of one process on the concatenated batch
_PER_DEVICE = ("batch_size", "out_std", "out_nonpos_frac", "rank_disagreement")


@pytest.mark.ddp
def test_documented_fabric_loop_on_two_processes(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "helpers", "fabric_ddp.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ROOT},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    records, trained, recalibrated = _reference()

    # metrics logged once: by rank zero, at the recording steps
    assert [step for step, _ in ranks[0]["rows"]] == [1, 3] and ranks[1]["rows"] == []
    assert [m for _, m in ranks[0]["rows"]] == [m for _, m in ranks[0]["records"]]
    # the same reduced values on both ranks, those of one process on the concatenated batches
    assert ranks[0]["records"] == ranks[1]["records"]
    for (step, got), expected in zip(ranks[0]["records"], records, strict=True):
        assert {k for k in got if not k.endswith(_PER_DEVICE)} == {k for k in expected if not k.endswith(_PER_DEVICE)}
        for key, value in expected.items():
            if not key.endswith(_PER_DEVICE):
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (step, key)
        assert all(got[k] == PER_RANK for k in got if k.endswith("batch_size"))
        assert all(got[k] == 0.0 for k in got if k.endswith("rank_disagreement"))  # synchronised: no disagreement

    for stage, reference in (("trained", trained), ("recalibrated", recalibrated)):
        assert ranks[0][stage].keys() == reference.keys()
        for name, expected in reference.items():
            for a, b, ref in zip(ranks[0][stage][name], ranks[1][stage][name], expected, strict=True):
                assert torch.equal(a, b), (stage, name)  # identical buffers on both ranks
                torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-5, msg=f"{stage} {name}")
    assert ranks[0]["hooks_left"] == ranks[1]["hooks_left"] == 0

    # sync_running_stats through the Fabric callback: the ranks' mixture, identical everywhere
    assert ranks[0]["disagreement"]["bn/0/rank_disagreement"] > 0.1
    assert ranks[0]["disagreement"] == ranks[1]["disagreement"]
    (m0, v0, n0), (m1, v1, _) = ranks[0]["before_sync"]["0"], ranks[1]["before_sync"]["0"]
    mean = (m0.double() + m1.double()) / 2
    var = (v0.double() + v1.double()) / 2 + ((m0.double() - mean) ** 2 + (m1.double() - mean) ** 2) / 2
    for r in range(2):
        got_mean, got_var, got_n = ranks[r]["after_sync"]["0"]
        torch.testing.assert_close(got_mean.double(), mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_var.double(), var, rtol=1e-6, atol=1e-6)
        assert got_n == n0 and ranks[r]["syncs"] == 1
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["after_sync"]["0"], ranks[1]["after_sync"]["0"], strict=True))
