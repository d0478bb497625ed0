"""BatchNormRecorder in plain training loops: the callbacks' keys and values, cadence, hooks, resuming, health."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import bn_lightning
from bn_lightning import BatchNormRecorder
from bn_lightning.callbacks import BatchNormMonitor, RunningStatDrift
from bn_lightning.monitoring import (
    BatchNormHealthError,
    DriftStats,
    LayerHooks,
    MonitorStats,
    gaussian_kl,
)
from tests.helpers.lightning_ddp_callbacks import CapturingLogger
from tests.helpers.tiny import TinyBNNet, quiet_trainer

STEPS, BATCH, EVERY = 5, 16, 2


def _data(steps: int = STEPS, batch: int = BATCH, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 3, 6, 6, generator=g) * 2 + 0.5, torch.randint(0, 5, (batch,), generator=g))
        for _ in range(steps)
    ]


def _net(bn2d=nn.BatchNorm2d, bn1d=nn.BatchNorm1d) -> nn.Module:
    torch.manual_seed(0)
    return TinyBNNet(bn2d, bn1d, activation=nn.SiLU)


def _train(net: nn.Module, data, rec: BatchNormRecorder | None, between=None) -> list[dict[str, float]]:
    """A plain loop: SGD steps, ``rec.step()`` after each; ``between(net)`` runs between a step and ``rec.step()``."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out = []
    for x, y in data:
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if between is not None:
            between(net)
        out.append(rec.step() if rec is not None else {})
    return out


class _Module(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


# ------------------------------------------------------------------ the callbacks' keys and values


def test_plain_loop_gives_the_callbacks_keys_and_values():
    """The same model and batches: the recorder's metrics ARE what the two Lightning callbacks log, bit for bit."""
    data = _data()
    net = _net()
    rec_net = copy.deepcopy(net)
    with BatchNormRecorder(rec_net, every_n_steps=EVERY) as rec:
        got = _train(rec_net, data, rec)

    logger = CapturingLogger()
    callbacks = [BatchNormMonitor(log_every_n_steps=EVERY, histogram=False), RunningStatDrift(log_every_n_steps=EVERY)]
    trainer = quiet_trainer(max_steps=STEPS, logger=logger, callbacks=callbacks)
    trainer.fit(_Module(copy.deepcopy(net)), torch.utils.data.DataLoader(data, batch_size=None))
    logged: dict[int, dict[str, float]] = {}
    for step, metrics in logger.bn_rows():
        logged.setdefault(step, {}).update({k.replace("bn/net.", "bn/"): v for k, v in metrics.items()})

    assert [bool(m) for m in got] == [True, False, True, False, True]
    recorded = {i + 1: m for i, m in enumerate(got) if m}
    assert sorted(logged) == sorted(recorded) == [1, 3, 5]
    for step, metrics in recorded.items():
        assert metrics == logged[step], step  # same keys, same floats
    layers = ["features.1", "features.4", "head.1"]
    keys = set(BatchNormMonitor.STATS) | set(RunningStatDrift.STATS) - {"rm_velocity", "rv_velocity"}
    assert {k for k in recorded[1]} == {f"bn/{layer}/{stat}" for layer in layers for stat in keys}
    assert {k.split("/")[-1] for k in recorded[3]} == set(BatchNormMonitor.STATS) | set(RunningStatDrift.STATS)


@pytest.mark.parametrize("kind", ["torch", "ours"])
def test_values_match_an_independent_float64_computation_of_the_last_forward(kind):
    """Two forwards per step (gradient accumulation): the record is of the second, checked by hand in float64."""
    bn = nn.BatchNorm2d(4) if kind == "torch" else bn_lightning.BatchNorm2d(4)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), bn, nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    seen = []
    bn.register_forward_pre_hook(
        lambda m, a: seen.append(
            (a[0].detach().double(), m.running_mean.double().clone(), m.running_var.double().clone())
        )
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    with BatchNormRecorder(net, every_n_steps=1) as rec:
        for _ in range(2):
            for micro in range(2):
                x = torch.randn(8, 3, 5, 5, generator=g) * (1 + micro) + micro
                net(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            metrics = rec.step()
    x, rm0, rv0 = seen[-1]
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    eps = bn.eps
    kl = gaussian_kl(mean, var + eps, rm0, rv0 + eps)
    expected = {
        "batch_mean": mean.mean(),
        "batch_std": var.sqrt().mean(),
        "max_abs_mean": mean.abs().max(),
        "drift_kl": kl.mean(),
        "drift_kl_max": kl.max(),
        "batch_size": 8,
    }
    for stat, value in expected.items():
        assert metrics[f"bn/1/{stat}"] == pytest.approx(float(value), rel=1e-4, abs=1e-6), stat


@pytest.mark.parametrize(
    "bn2d",
    [bn_lightning.GhostBatchNorm2d, bn_lightning.BatchRenorm2d, bn_lightning.SyncBatchNorm, nn.SyncBatchNorm],
    ids=["ghost", "renorm", "sync", "torch_sync"],
)
def test_every_trainable_bn_kind_is_recorded_and_frozen_ones_are_not(bn2d):
    kwargs = {"virtual_batch_size": 4} if bn2d is bn_lightning.GhostBatchNorm2d else {}
    net = TinyBNNet(lambda c: bn2d(c, **kwargs), bn_lightning.FrozenBatchNorm1d)
    with BatchNormRecorder(net, every_n_steps=1) as rec:
        assert rec.layer_names == ["features.1", "features.4"]  # the frozen head.1 is not watched
        metrics = _train(net, _data(steps=1), rec)[0]
    assert {k.split("/")[1] for k in metrics} == {"features.1", "features.4"}
    assert all(v == v for v in metrics.values())  # no NaN


# ------------------------------------------------------------------ cadence, hooks, evaluation between steps


def test_records_every_n_steps_and_does_nothing_in_between(monkeypatch):
    computed, stashed = [], []
    compute, post = MonitorStats.compute, LayerHooks._post

    def computing(self, batch):
        computed.append(len(stashed))
        return compute(self, batch)

    def stashing(self, layer, args, output):
        if not self._skips():
            stashed.append(layer)
        return post(self, layer, args, output)

    monkeypatch.setattr(MonitorStats, "compute", computing)
    monkeypatch.setattr(LayerHooks, "_post", stashing)
    net = _net()
    with BatchNormRecorder(net, every_n_steps=3) as rec:
        got = _train(net, _data(steps=7), rec)
    assert [bool(m) for m in got] == [True, False, False, True, False, False, True]
    assert computed == [3, 6, 9]  # three layers stashed on each recording step, none on the others
    assert rec.steps == 7 and rec.records == 3


def test_forwards_without_gradients_between_steps_are_not_recorded():
    data, other = _data(), _data(seed=5)

    def evaluate(net):
        net.eval()
        with torch.no_grad():
            net(other[0][0] * 10)
        with torch.inference_mode():
            net(other[1][0])
        net.train()

    runs = []
    for between in (None, evaluate):
        net = _net()
        with BatchNormRecorder(net, every_n_steps=1) as rec:
            runs.append(_train(net, data, rec, between))
    assert runs[0] == runs[1]  # bit for bit


def test_close_and_the_context_manager_remove_every_hook_and_recorders_do_not_disturb_each_other():
    data = _data()
    alone_net = _net()
    with BatchNormRecorder(alone_net, every_n_steps=1) as alone:
        expected = _train(alone_net, data, alone)

    net = _net()
    a = BatchNormRecorder(net, every_n_steps=1)
    b = BatchNormRecorder(net, every_n_steps=2, drift=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    got_a, got_b = [], []
    for x, y in data:
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        got_a.append(a.step())
        got_b.append(b.step())
    assert got_a == expected
    monitor_keys = {k for k in expected[0] if k.split("/")[-1] in MonitorStats.STATS}
    assert [set(m) for m in got_b] == [monitor_keys, set(), monitor_keys, set(), monitor_keys]
    assert all(got_b[i] == {k: expected[i][k] for k in monitor_keys} for i in (0, 2, 4))
    a.close()
    b.close()
    assert a.closed and b.closed
    for name, m in net.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
    assert a.step() == {}  # closed: records nothing


def test_resuming_from_state_dict_continues_cadence_and_velocities(tmp_path):
    data = _data(steps=6)
    net = _net()
    with BatchNormRecorder(net, every_n_steps=2) as rec:
        expected = _train(net, data, rec)

    net = _net()
    first = BatchNormRecorder(net, every_n_steps=2)
    got = _train(net, data[:3], first)
    torch.save(first.state_dict(), tmp_path / "rec.pt")
    first.close()
    second = BatchNormRecorder(net, every_n_steps=2)
    second.load_state_dict(torch.load(tmp_path / "rec.pt"))
    got += _train(net, data[3:], second)
    second.close()
    assert got == expected
    assert any(k.endswith("rm_velocity") for k in got[4])  # step 5 compared with step 3's running statistics


# ------------------------------------------------------------------ health checks, arguments


def test_health_checks_warn_once_or_raise():
    net = _net()
    with BatchNormRecorder(net, every_n_steps=1) as rec:
        with pytest.warns(UserWarning, match="per-device batch of 4 is below 8") as record:
            _train(net, _data(steps=3, batch=4), rec)
    assert sum("small_batch" in str(w.message) for w in record) == 3  # once per layer, then counted
    assert rec.statistics[1].alerts["small_batch"] == {"features.1": 3, "features.4": 3, "head.1": 3}

    net = _net()
    drift = DriftStats(actions={"small_batch": "raise"})
    with BatchNormRecorder(net, every_n_steps=1, monitor=False, drift=drift) as rec:
        with pytest.raises(BatchNormHealthError, match="'small_batch' failed for layer 'features.1' at step 1"):
            _train(net, _data(steps=1, batch=4), rec)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every_n_steps": 0}, ValueError, "BatchNormRecorder: every_n_steps"),
        ({"include": "features.*"}, TypeError, "include"),
        ({"monitor": "yes"}, TypeError, "monitor must be a bool or a MonitorStats"),
        ({"monitor": False, "drift": False}, ValueError, "nothing to record"),
        ({"statistics": [object()]}, TypeError, "statistics must be Statistics"),
        ({"drift": lambda: DriftStats(actions={"drift": "explode"})}, ValueError, r"DriftStats: actions\['drift'\]"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        BatchNormRecorder(_net(), **{k: v() if callable(v) else v for k, v in kwargs.items()})
