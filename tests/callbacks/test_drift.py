"""RunningStatDrift in a real Trainer: drift values against an independent computation, health checks, resume, DDP.

What it shares with BatchNormMonitor (cadence, hooks, validation, include/exclude) is tested in test_monitor.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bn_lightning
from bn_lightning.app.data import DigitsDataModule
from bn_lightning.app.models import SmallCNN
from bn_lightning.callbacks import BatchNormHealthError, BatchNormMonitor, RunningStatDrift
from bn_lightning.callbacks.drift import CHECKS
from tests.helpers.lightning_ddp_callbacks import STEPS, CapturingLogger

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNNING_MEAN = [0.3, -0.5, 1.0, 0.0]
RUNNING_VAR = [0.5, 2.0, 1.0, 4.0]


def _batches(n: int = 2, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n * size, 3, 6, 6, generator=g) + torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    return x * torch.linspace(0.5, 2.0, n).repeat_interleave(size).view(-1, 1, 1, 1)  # batches differ


class ConvBN(pl.LightningModule):
    """Conv2d -> BN; keeps every training forward's BN input and the running statistics after it (float64)."""

    def __init__(self, bn: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, bn.num_features, 3)
        self.bn = bn
        self.inputs: list[torch.Tensor] = []
        self.running: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handle = bn.register_forward_hook(self._capture)

    def _capture(self, layer, args, output):
        if layer.training:
            self.inputs.append(args[0].detach().double().clone())
            if layer.running_mean is not None:
                self.running.append((layer.running_mean.double().clone(), layer.running_var.double().clone()))

    def training_step(self, batch, batch_idx):
        return self.bn(self.conv(batch[0])).relu().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _bn(kind: str, **kwargs) -> nn.Module:
    if kind == "torch":
        bn = nn.BatchNorm2d(4, **kwargs)
    elif kind == "torch_cumulative":
        bn = nn.BatchNorm2d(4, momentum=None)
        bn.num_batches_tracked.fill_(3)
    elif kind == "ours":
        bn = bn_lightning.BatchNorm2d(4, **kwargs)
    elif kind == "torch_untracked":
        return nn.BatchNorm2d(4, track_running_stats=False)
    else:
        raise AssertionError(kind)
    bn.running_mean.copy_(torch.tensor(RUNNING_MEAN))
    bn.running_var.copy_(torch.tensor(RUNNING_VAR))
    return bn


def _trainer(tmp_path, callbacks, max_steps, logger=None, **kwargs) -> pl.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=CapturingLogger() if logger is None else logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def _fit(module, callbacks, tmp_path, data, batch_size=16, max_steps=2, **kwargs):
    trainer = _trainer(tmp_path, callbacks, max_steps, **kwargs)
    trainer.fit(module, DataLoader(TensorDataset(data), batch_size=batch_size))
    return trainer.logger, trainer


def _kl(mean0, var0, mean1, var1):
    return 0.5 * (torch.log(var1 / var0) + (var0 + (mean0 - mean1) ** 2) / var1 - 1)


def _no_alerts(cb: RunningStatDrift) -> bool:
    return all(not counts for counts in cb.alerts.values())


# ---------------------------------------------------------------------------------------------- logged values


@pytest.mark.parametrize("kind", ["torch", "torch_cumulative", "ours"])
def test_logged_drift_matches_independent_computation(tmp_path, kind):
    bn = _bn(kind)
    module = ConvBN(bn)
    before = [(torch.tensor(RUNNING_MEAN, dtype=torch.float64), torch.tensor(RUNNING_VAR, dtype=torch.float64))]
    logger, _ = _fit(module, [RunningStatDrift(log_every_n_steps=1, min_batch_size=2)], tmp_path, _batches())
    rows = logger.bn_rows()
    assert [step for step, _ in rows] == [1, 2]
    before.append(module.running[0])  # record 2 compares with the running statistics left by step 1
    for k, ((_, metrics), x, (rm0, rv0)) in enumerate(zip(rows, module.inputs, before, strict=True)):
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
        kl = _kl(mean, var + bn.eps, rm0, rv0 + bn.eps)
        assert kl.mean() > 0.05  # non-trivial
        assert metrics["bn/bn/drift_kl"] == pytest.approx(kl.mean().item(), rel=1e-4)
        assert metrics["bn/bn/drift_kl_max"] == pytest.approx(kl.max().item(), rel=1e-4)
        assert metrics["bn/bn/batch_size"] == 16
        assert metrics["bn/bn/collapsed_frac"] == 0.0
        assert metrics["bn/bn/nonfinite_running"] == 0.0
        assert "bn/bn/rank_disagreement" not in metrics  # one process
        if k == 0:  # no previous record yet: the velocities are not logged
            assert "bn/bn/rm_velocity" not in metrics and "bn/bn/rv_velocity" not in metrics
        else:
            (rm1, rv1), (rm2, rv2) = module.running
            assert metrics["bn/bn/rm_velocity"] == pytest.approx(((rm2 - rm1).norm() / rm1.norm()).item(), rel=1e-4)
            assert metrics["bn/bn/rv_velocity"] == pytest.approx(((rv2 - rv1).norm() / rv1.norm()).item(), rel=1e-4)


def test_layer_without_running_stats_has_no_drift(tmp_path):
    module = ConvBN(_bn("torch_untracked"))
    drift, monitor = RunningStatDrift(log_every_n_steps=1), BatchNormMonitor(log_every_n_steps=1, histogram=False)
    logger, _ = _fit(module, [drift, monitor], tmp_path, _batches(size=4), batch_size=4)  # small batch, yet no alert
    keys = {k for _, metrics in logger.bn_rows() for k in metrics}
    assert keys == {f"bn/bn/{stat}" for stat in BatchNormMonitor.STATS}  # the monitor only
    assert drift.records == 2 and _no_alerts(drift)


# ------------------------------------------------------------------------------------------- health checks


def _broken(tmp_path, actions=None, max_steps=3):
    """Per-device batch of 2 with momentum 0.9: what the small_batch check is for."""
    drift = RunningStatDrift(log_every_n_steps=1, actions=actions)
    module = ConvBN(_bn("torch", momentum=0.9))
    _fit(module, [drift], tmp_path, _batches(size=2), batch_size=2, max_steps=max_steps)
    return drift, module


def test_small_batch_warns_once_and_counts_every_record(tmp_path):
    with pytest.warns(UserWarning, match="'small_batch' failed for layer 'bn' at step 1") as record:
        drift, _ = _broken(tmp_path, max_steps=4)
    assert sum("small_batch" in str(w.message) for w in record) == 1
    assert drift.alerts["small_batch"] == {"bn": 4}
    assert all(not drift.alerts[check] for check in CHECKS if check != "small_batch")


def test_small_batch_raise_stops_the_fit_and_removes_the_hooks(tmp_path):
    module = ConvBN(_bn("torch", momentum=0.9))
    module.handle.remove()
    drift = RunningStatDrift(log_every_n_steps=1, actions={"small_batch": "raise"})
    with pytest.raises(BatchNormHealthError, match="per-device batch of 2 is below 8"):
        _fit(module, [drift], tmp_path, _batches(size=2), batch_size=2, max_steps=3)
    assert drift.alerts["small_batch"] == {"bn": 1} and drift.records == 1
    for name, m in module.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name


def test_ignore_counts_without_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="BatchNorm health check")
        drift, _ = _broken(tmp_path, actions={"small_batch": "ignore"})
    assert drift.alerts["small_batch"] == {"bn": 3}


@pytest.mark.parametrize("kind", ["torch", "ours"])
@pytest.mark.parametrize("action", ["warn", "raise", "ignore"])
def test_nonfinite_running_var_is_flagged(tmp_path, kind, action):
    bn = _bn(kind)
    bn.running_var[1] = float("nan")
    drift = RunningStatDrift(log_every_n_steps=1, actions={"nonfinite": action})
    module = ConvBN(bn)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if action == "raise":
            with pytest.raises(BatchNormHealthError, match="'nonfinite' failed for layer 'bn'.*1 non-finite"):
                _fit(module, [drift], tmp_path, _batches())
        else:
            logger, _ = _fit(module, [drift], tmp_path, _batches())
            for _, metrics in logger.bn_rows():
                assert metrics["bn/bn/nonfinite_running"] == 1.0
                assert "bn/bn/drift_kl" not in metrics  # NaN: not logged
                assert metrics["bn/bn/batch_size"] == 16
    warned = [w for w in record if "'nonfinite' failed" in str(w.message)]
    assert len(warned) == (1 if action == "warn" else 0)
    assert drift.alerts["nonfinite"] == {"bn": 1 if action == "raise" else 2}


def test_collapse_is_flagged(tmp_path):
    module = ConvBN(_bn("ours"))
    with torch.no_grad():
        module.conv.weight[:3] = 0.0  # 3 of 4 channels constant: dead units
    with pytest.warns(UserWarning, match="'collapse' failed.*75% of the channels"):
        logger, _ = _fit(module, [RunningStatDrift(log_every_n_steps=1)], tmp_path, _batches())
    assert logger.bn_rows()[0][1]["bn/bn/collapsed_frac"] == 0.75


@pytest.mark.parametrize(("warmup", "flagged"), [(0, True), (2, False)])
def test_drift_check_waits_for_warmup(tmp_path, warmup, flagged):
    bn = _bn("torch")
    bn.running_mean.fill_(10.0)  # far from every batch
    drift = RunningStatDrift(log_every_n_steps=1, drift_warmup_steps=warmup, actions={"drift": "ignore"})
    _fit(ConvBN(bn), [drift], tmp_path, _batches())
    assert drift.alerts["drift"] == ({"bn": 2} if flagged else {})


def test_healthy_run_raises_no_alert(tmp_path):
    dm = DigitsDataModule(batch_size=32, seed=0)

    class Digits(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = SmallCNN(in_channels=1, channels=(8, 16))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    # default thresholds; the drift check switched on once the running stats had ~3 / momentum batches to catch up
    drift = RunningStatDrift(log_every_n_steps=1, drift_warmup_steps=30)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="BatchNorm health check")
        trainer = _trainer(tmp_path, [drift, BatchNormMonitor(log_every_n_steps=5)], max_steps=40)
        trainer.fit(Digits(), dm.train_dataloader())
    assert drift.records == 40 and _no_alerts(drift)
    last = trainer.logger.bn_rows()[-1][1]
    assert 0 < last["bn/net.features.1/drift_kl"] < 0.5


# ---------------------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"actions": {"dirft": "warn"}}, r"health check in actions must be one of \('nonfinite'.*got 'dirft'"),
        ({"actions": {"drift": "explode"}}, r"actions\['drift'\] must be one of"),
        ({"min_batch_size": 0}, "min_batch_size"),
        ({"max_drift_kl": 0.0}, "max_drift_kl"),
        ({"max_collapsed_frac": 1.5}, "max_collapsed_frac"),
        ({"drift_warmup_steps": -1}, "drift_warmup_steps"),
    ],
)
def test_drift_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunningStatDrift(**kwargs)


def test_unnamed_checks_warn():
    cb = RunningStatDrift(actions={"collapse": "raise"})
    assert cb.actions == {"nonfinite": "warn", "small_batch": "warn", "collapse": "raise", "drift": "warn"}


# -------------------------------------------------------------------------------------------- checkpoints


def test_state_dict_round_trip_and_old_checkpoints():
    cb = RunningStatDrift()
    cb.batches_seen, cb.records = 7, 3
    cb.alerts["drift"]["a"] = 2
    cb._previous = {"a": (torch.ones(2), torch.full((2,), 2.0))}
    fresh = RunningStatDrift()
    fresh.load_state_dict(cb.state_dict())
    assert (fresh.batches_seen, fresh.records, fresh.alerts["drift"]) == (7, 3, {"a": 2})
    torch.testing.assert_close(fresh._previous["a"][1], torch.full((2,), 2.0))
    old = RunningStatDrift()
    old.load_state_dict({"batches_seen": 4})  # a checkpoint from before records/previous/alerts existed
    assert (old.batches_seen, old.records, old._previous) == (4, 0, {})
    assert old.alerts == {check: {} for check in CHECKS}


def test_resume_from_last_ckpt_continues_the_callbacks(tmp_path):
    data = _batches(n=4, size=4)  # 4 batches of 4: small_batch alerts to count

    def run(max_steps, ckpt_path=None):
        monitor = BatchNormMonitor(log_every_n_steps=2, histogram=False)
        drift = RunningStatDrift(log_every_n_steps=2)
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
        trainer = _trainer(tmp_path, [monitor, drift, ckpt], max_steps, enable_checkpointing=True)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            trainer.fit(ConvBN(_bn("torch")), DataLoader(TensorDataset(data), batch_size=4), ckpt_path=ckpt_path)
        small = [w for w in record if "'small_batch' failed" in str(w.message)]
        return monitor, drift, trainer.logger.bn_rows(), small

    monitor, drift, rows, small = run(4)
    assert (monitor.batches_seen, monitor.records, drift.records) == (4, 2, 2)
    assert drift.alerts["small_batch"] == {"bn": 2} and len(small) == 1
    assert os.path.exists(tmp_path / "ckpt" / "last.ckpt")

    monitor, drift, rows, small = run(8, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert (monitor.batches_seen, monitor.records) == (8, 4)
    assert (drift.batches_seen, drift.records) == (8, 4)
    assert drift.alerts["small_batch"] == {"bn": 4}
    assert small == []  # already warned about before the resume: counted, not printed again
    assert [step for step, _ in rows] == [5, 5, 7, 7]  # batches 4 and 6, one call per callback
    first = {k: v for _, metrics in rows[:2] for k, v in metrics.items()}
    assert math.isfinite(first["bn/bn/rm_velocity"]) and first["bn/bn/rm_velocity"] > 0  # from the restored state
    assert math.isfinite(first["bn/bn/rv_velocity"])


# --------------------------------------------------------------------------------------------------- DDP


def _run_ddp(tmp_path, mode: str) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "helpers", "lightning_ddp_callbacks.py"), str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": ROOT},
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _disagreement(ranks: list[dict], layer: str) -> float:
    rm = torch.stack([r["running"][layer][0].double() for r in ranks])
    rv = torch.stack([r["running"][layer][1].double() for r in ranks])
    eps = ranks[0]["running"][layer][2]
    return ((rm - rm.mean(0)).abs() / (rv.mean(0) + eps).sqrt()).max().item()


def _last_values(rows, stat: str) -> dict[str, float]:
    step, metrics = [row for row in rows if any(k.endswith(stat) for k in row[1])][-1]
    assert step == STEPS
    return {k.split("/")[1]: v for k, v in metrics.items() if k.endswith(stat)}


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_without_sync_reports_rank_disagreement(tmp_path):
    r0, r1 = _run_ddp(tmp_path, "none")
    assert r0["records"] == r1["records"] == (STEPS, STEPS)  # both ranks recorded in step
    assert r1["rows"] == []  # logged on rank zero only
    disagreement = _last_values(r0["rows"], "rank_disagreement")
    assert set(disagreement) == {"net.1", "net.6"}
    assert disagreement["net.1"] > 0.05
    for layer, value in disagreement.items():  # the last record saw the final running statistics
        assert value == pytest.approx(_disagreement([r0, r1], layer), rel=1e-4, abs=1e-6), layer
    assert {k.split("/")[-1] for _, m in r0["rows"] for k in m} >= set(BatchNormMonitor.STATS)


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_with_sync_batchnorm_plugin_agrees(tmp_path):
    r0, r1 = _run_ddp(tmp_path, "sync")
    assert r0["records"] == r1["records"] == (STEPS, STEPS)
    disagreement = _last_values(r0["rows"], "rank_disagreement")
    assert set(disagreement) == {"net.1", "net.6"}
    assert all(value < 1e-5 for value in disagreement.values()), disagreement
    for layer in disagreement:
        torch.testing.assert_close(r0["running"][layer][0], r1["running"][layer][0])


@pytest.mark.parametrize("kind", ["torch", "ours"])
def test_nonfinite_input_is_named_as_the_cause(tmp_path, kind):
    """A NaN in the input batch: the message says the batch statistics were non-finite, before guessing a cause."""
    data = _batches()
    data[0, 0, 0, 0] = float("nan")  # the first batch; the conv spreads it to every channel
    drift = RunningStatDrift(log_every_n_steps=1, actions={"nonfinite": "raise"})
    message = r"'nonfinite' failed for layer 'bn' at step 1: the batch statistics of 4 channels are non-finite"
    with pytest.raises(BatchNormHealthError, match=message + r".*input held NaN/inf.*BatchNormGuard"):
        _fit(ConvBN(_bn(kind)), [drift], tmp_path, data)


def test_small_batch_of_a_sync_layer_counts_every_rank():
    from bn_lightning.health import HealthChecks

    checks = HealthChecks(min_batch_size=8)
    local = checks.evaluate({"batch_size": 2}, batches_seen=1)
    assert [a.check for a in local] == ["small_batch"] and "bn=sync" in local[0].advice
    assert "Ghost" not in local[0].seen + local[0].advice  # smaller virtual batches would not help
    assert checks.evaluate({"batch_size": 4}, batches_seen=1, synchronised=True, world_size=2) == []
    synced = checks.evaluate({"batch_size": 2}, batches_seen=1, synchronised=True, world_size=2)
    assert "synchronised statistics come from 4 samples" in synced[0].seen and "bn=sync" not in synced[0].advice
