"""BatchNormMonitor in a real Trainer, and what it shares with RunningStatDrift through BatchNormCallbackBase.

The logged values are checked against statistics the test computes itself, in float64, from the BN layer's actual
input and output on a fixed batch (captured with the test's own forward hook).
"""

from __future__ import annotations

import glob

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bn_lightning
from bn_lightning.callbacks import BatchNormCallbackBase, BatchNormMonitor, RunningStatDrift, find_batchnorm_layers
from bn_lightning.callbacks.drift import gaussian_kl
from bn_lightning.monitoring import LayerHooks
from tests.helpers.lightning_ddp_callbacks import CapturingLogger
from tests.helpers.tiny import TinyBNNet

MONITOR_STATS = set(BatchNormMonitor.STATS)
GAMMA = [0.5, -2.0, 1e-4, 1.5]
BETA = [0.1, -0.2, 0.3, 0.4]


def _fixed_batch(n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    shift = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    return torch.randn(n, 3, 6, 6, generator=g) * scale + shift


class ConvBN(pl.LightningModule):
    """Conv2d -> BN; with ``capture`` the BN's input and output of every forward are kept (float64)."""

    def __init__(self, bn: nn.Module, capture: bool = True, lr: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, bn.num_features, 3)
        self.bn = bn
        self.lr = lr
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.hooks_seen: list[tuple[int, int]] = []
        self.val_batches = 0
        if capture:
            bn.register_forward_hook(self._capture)

    def _capture(self, layer, args, output):
        if layer.training:
            self.inputs.append(args[0].detach().double().clone())
            self.outputs.append(output.detach().double().clone())

    def forward(self, x):
        return self.bn(self.conv(x))

    def training_step(self, batch, batch_idx):
        self.hooks_seen.append((len(self.bn._forward_pre_hooks), len(self.bn._forward_hooks)))
        return self(batch[0]).relu().mean()

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1
        self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class NoBN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3 * 6 * 6, 2)

    def training_step(self, batch, batch_idx):
        return self.lin(batch[0].flatten(1)).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyBNNet(nn.BatchNorm2d, nn.BatchNorm1d)

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _bn(kind: str) -> nn.Module:
    if kind == "torch":
        bn = nn.BatchNorm2d(4)
    elif kind == "torch_cumulative":
        bn = nn.BatchNorm2d(4, momentum=None)
        bn.num_batches_tracked.fill_(3)  # cumulative average factor 1/4 on the next batch
    elif kind == "torch_cumulative_late":
        bn = nn.BatchNorm2d(4, momentum=None)
        bn.num_batches_tracked.fill_(20_000)  # factor 5e-5: too small to invert, stats come from the input
    elif kind == "ours":
        bn = bn_lightning.BatchNorm2d(4)
    elif kind == "torch_untracked":
        bn = nn.BatchNorm2d(4, track_running_stats=False)
    else:
        raise AssertionError(kind)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(GAMMA))
        bn.bias.copy_(torch.tensor(BETA))
        if bn.running_mean is not None:  # stats far from the batch's, so the recovery and the KL are non-trivial
            bn.running_mean.copy_(torch.tensor([0.3, -0.5, 1.0, 0.0]))
            bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 4.0]))
    return bn


def _fit(module, callbacks, tmp_path, *, data=None, batch_size=16, max_steps=1, logger=None, val_data=None, **kwargs):
    logger = CapturingLogger() if logger is None else logger
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        **kwargs,
    )
    x = _fixed_batch() if data is None else data
    val = None if val_data is None else DataLoader(TensorDataset(val_data), batch_size=batch_size)
    trainer.fit(module, DataLoader(TensorDataset(x), batch_size=batch_size), val)
    return logger, trainer


def _expected(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The monitor's statistics, computed from the layer's input ``x`` and output ``y`` in float64."""
    mean = x.mean(dim=(0, 2, 3))
    std = x.var(dim=(0, 2, 3), unbiased=False).sqrt()
    gamma = torch.tensor(GAMMA, dtype=torch.float64).abs()
    return {
        "batch_mean": mean.mean().item(),
        "batch_std": std.mean().item(),
        "max_abs_mean": mean.abs().max().item(),
        "min_std": std.min().item(),
        "max_std": std.max().item(),
        "collapsed_frac": 0.0,
        "nonfinite_channels": 0.0,
        "out_std": y.std(unbiased=False).item(),
        "out_nonpos_frac": (y <= 0).double().mean().item(),
        "gamma_abs_min": gamma.min().item(),
        "gamma_near_zero": 1.0,
        "beta_mean": sum(BETA) / len(BETA),
    }


# ---------------------------------------------------------------------------------------------- logged values


@pytest.mark.parametrize("kind", ["torch", "torch_cumulative", "torch_cumulative_late", "ours", "torch_untracked"])
def test_logged_stats_match_independent_computation(tmp_path, kind):
    module = ConvBN(_bn(kind))
    # sample_size >= numel: the output "sample" is the whole output, so its statistics are exact
    logger, _ = _fit(module, [BatchNormMonitor(log_every_n_steps=1, sample_size=10_000)], tmp_path)
    rows = logger.bn_rows()
    assert [step for step, _ in rows] == [1]
    logged = {k.removeprefix("bn/bn/"): v for k, v in rows[0][1].items()}
    assert set(logged) == MONITOR_STATS
    expected = _expected(module.inputs[0], module.outputs[0])
    for stat, value in expected.items():
        assert logged[stat] == pytest.approx(value, rel=1e-4, abs=1e-6), stat


def test_stats_recovered_from_torch_running_update_are_those_of_the_batch(tmp_path):
    # a second step from the stats the first step left: the recovery inverts the update against a fresh snapshot
    module = ConvBN(_bn("torch"))
    x = torch.cat([_fixed_batch(), _fixed_batch() * 3 - 1])
    logger, _ = _fit(module, [BatchNormMonitor(log_every_n_steps=1, sample_size=10_000)], tmp_path, data=x, max_steps=2)
    rows = logger.bn_rows()
    assert [step for step, _ in rows] == [1, 2]
    for (_, metrics), xin, yout in zip(rows, module.inputs, module.outputs, strict=True):
        expected = _expected(xin, yout)
        for stat in ("batch_mean", "batch_std", "max_abs_mean", "min_std", "max_std"):
            assert metrics[f"bn/bn/{stat}"] == pytest.approx(expected[stat], rel=1e-4), stat


@pytest.mark.parametrize("kind", ["torch", "ours"])
def test_nonfinite_input_channel_is_counted(tmp_path, kind):
    module = ConvBN(_bn(kind))
    with torch.no_grad():
        module.conv.weight[2] = float("nan")  # BN input channel 2 is all NaN
    logger, _ = _fit(module, [BatchNormMonitor(log_every_n_steps=1)], tmp_path)
    ((_, metrics),) = logger.bn_rows()
    assert metrics["bn/bn/nonfinite_channels"] == 1.0
    assert "bn/bn/batch_mean" not in metrics  # NaN values are dropped, not logged
    assert metrics["bn/bn/gamma_abs_min"] == pytest.approx(1e-4)


def test_collapsed_channels_and_near_zero_gamma(tmp_path):
    bn = _bn("ours")
    module = ConvBN(bn)
    with torch.no_grad():
        module.conv.weight[:2] = 0.0  # channels 0 and 1: constant (the conv bias) -> zero variance
        bn.weight.copy_(torch.tensor([0.0, 1e-5, 1.0, 1.0]))
    logger, _ = _fit(module, [BatchNormMonitor(log_every_n_steps=1)], tmp_path)
    ((_, metrics),) = logger.bn_rows()
    assert metrics["bn/bn/collapsed_frac"] == 0.5
    assert metrics["bn/bn/min_std"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["bn/bn/gamma_near_zero"] == 2.0
    assert metrics["bn/bn/gamma_abs_min"] == 0.0


class Mixed(pl.LightningModule):
    """Three BN layers of different widths and kinds, each followed by an in-place ReLU; keeps, per training forward
    of every BN layer, its input, output, weight and bias and running statistics before and after (float64)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3),
            bn_lightning.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(64, 32),
            nn.BatchNorm1d(32, momentum=None),
            nn.ReLU(inplace=True),
            nn.Linear(32, 2),
        )
        self.seen: dict[str, list[dict[str, torch.Tensor]]] = {}
        for name, bn in find_batchnorm_layers(self).items():
            bn.register_forward_pre_hook(lambda m, args, name=name: self._before(name, m))
            bn.register_forward_hook(lambda m, args, out, name=name: self._after(name, m, args[0], out))

    def _before(self, name, bn):
        if bn.training:
            self.seen.setdefault(name, []).append(
                {
                    "rm0": bn.running_mean.double().clone(),
                    "rv0": bn.running_var.double().clone(),
                    "gamma": bn.weight.detach().double().clone(),
                    "beta": bn.bias.detach().double().clone(),
                }
            )

    def _after(self, name, bn, x, y):
        if bn.training:
            self.seen[name][-1].update(
                x=x.detach().double().clone(),
                y=y.detach().double().clone(),
                rm=bn.running_mean.double().clone(),
                rv=bn.running_var.double().clone(),
                eps=bn.eps,
            )

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)  # weights change: gamma/beta are read before the forward


def _expected_mixed(seen: list[dict[str, torch.Tensor]], step: int, drift_every: int | None) -> dict[str, float]:
    """Monitor (and with ``drift_every``, drift) statistics of one layer at one step, in float64."""
    s = seen[step]
    x, y = s["x"], s["y"]
    dims = [d for d in range(x.dim()) if d != 1]
    mean, var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
    std = var.sqrt()
    expected = {
        "batch_mean": mean.mean(),
        "batch_std": std.mean(),
        "max_abs_mean": mean.abs().max(),
        "min_std": std.min(),
        "max_std": std.max(),
        "collapsed_frac": 0.0,
        "nonfinite_channels": 0.0,
        "out_std": y.std(unbiased=False),
        "out_nonpos_frac": (y <= 0).double().mean(),
        "gamma_abs_min": s["gamma"].abs().min(),
        "gamma_near_zero": (s["gamma"].abs() < 1e-3).sum(),
        "beta_mean": s["beta"].mean(),
    }
    if drift_every is not None:
        kl = gaussian_kl(mean, var + s["eps"], s["rm0"], s["rv0"] + s["eps"])
        nonfinite_batch = (~torch.isfinite(mean) | ~torch.isfinite(var)).sum()
        expected.update(drift_kl=kl.mean(), drift_kl_max=kl.max(), batch_size=8, nonfinite_running=0.0)
        expected.update(nonfinite_batch=nonfinite_batch)
        if step >= drift_every:  # against the running statistics of the previous record
            rm1, rv1 = seen[step - drift_every]["rm"], seen[step - drift_every]["rv"]
            expected["rm_velocity"] = (s["rm"] - rm1).norm() / rm1.norm()
            expected["rv_velocity"] = (s["rv"] - rv1).norm() / rv1.norm()
    return {k: float(v) for k, v in expected.items()}


@pytest.mark.parametrize(("monitor_every", "drift_every"), [(1, 1), (2, 1), (1, 2)])
def test_all_layers_of_a_mixed_model_match_independent_computation(tmp_path, monitor_every, drift_every):
    # three layers of widths 8, 16, 32 packed together; a drift watching a narrower subset shares the monitor's
    # hooks, on its own cadence
    module = Mixed()
    monitor = BatchNormMonitor(log_every_n_steps=monitor_every, sample_size=100_000)
    drift = RunningStatDrift(log_every_n_steps=drift_every, exclude=["net.8"], min_batch_size=2)
    data = torch.cat([_fixed_batch(), _fixed_batch() * 2 - 1])
    logger, _ = _fit(module, [monitor, drift], tmp_path, data=data, batch_size=8, max_steps=4)
    logged: dict[int, dict[str, float]] = {}
    for step, metrics in logger.bn_rows():
        logged.setdefault(step - 1, {}).update(metrics)
    steps = sorted(set(range(0, 4, monitor_every)) | set(range(0, 4, drift_every)))
    assert sorted(logged) == steps
    for step in steps:
        for name, seen in module.seen.items():
            with_drift = name != "net.8" and step % drift_every == 0
            expected = _expected_mixed(seen, step, drift_every if with_drift else None)
            if step % monitor_every:  # the drift's only (both log collapsed_frac)
                expected = {k: v for k, v in expected.items() if with_drift and k in RunningStatDrift.STATS}
            keys = {k.split("/")[-1] for k in logged[step] if k.split("/")[1] == name}
            assert keys == set(expected), (step, name)
            for stat, value in expected.items():
                where = (step, name, stat)
                assert logged[step][f"bn/{name}/{stat}"] == pytest.approx(value, rel=1e-4, abs=1e-6), where


# ------------------------------------------------------------------- cadence, hooks, validation (shared base)


@pytest.mark.parametrize("cls", [BatchNormMonitor, RunningStatDrift])
def test_records_only_every_n_batches_and_computes_nothing_in_between(tmp_path, monkeypatch, cls):
    computed, stashed = [], []
    compute, post = cls.compute, LayerHooks._post

    def computing(self, batch):
        computed.append((self.batches_seen, batch.ran_list))
        return compute(self, batch)

    def stashing(self, layer, args, output):
        if self.armed:
            stashed.append(layer.training)
        return post(self, layer, args, output)

    monkeypatch.setattr(cls, "compute", computing)
    monkeypatch.setattr(LayerHooks, "_post", stashing)
    cb = cls(log_every_n_steps=3)
    data = torch.cat([_fixed_batch()] * 2)[:28]  # 7 batches of 4
    logger, trainer = _fit(ConvBN(_bn("torch"), capture=False), [cb], tmp_path, data=data, batch_size=4, max_steps=7)
    assert trainer.global_step == 7
    assert cb.batches_seen == 7 and cb.records == 3
    assert computed == [(1, [True]), (4, [True]), (7, [True])]  # at the end of batches 0, 3, 6
    assert stashed == [True] * 3  # the hooks stash nothing on the other steps
    assert [step for step, _ in logger.bn_rows()] == [1, 4, 7]  # batches 0, 3, 6, logged at trainer.global_step


@pytest.mark.parametrize("every", [1, 2])
def test_gradient_accumulation_records_once_per_optimizer_step(tmp_path, every):
    """accumulate_grad_batches=3 over 7 batches an epoch: steps end after batches 2, 5 and 6 (the epoch's last);
    each recorded step is ONE CSV row, of the micro-batch after which the optimizer stepped."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    module = ConvBN(_bn("torch"))
    monitor = BatchNormMonitor(log_every_n_steps=every, sample_size=10_000, histogram=False)
    drift = RunningStatDrift(log_every_n_steps=every, min_batch_size=2)
    data = torch.cat([_fixed_batch()] * 2)[:28]  # 7 batches of 4
    logger = CSVLogger(tmp_path, name="csv", version=0)
    _, trainer = _fit(
        module,
        [monitor, drift],
        tmp_path,
        data=data,
        batch_size=4,
        max_steps=-1,
        max_epochs=2,
        logger=logger,
        accumulate_grad_batches=3,
    )
    assert trainer.global_step == 6
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("bn/bn/batch_mean")]
    steps = [int(r["step"]) for r in rows]
    recorded = [1, 2, 3, 4, 5, 6][::every]
    assert steps == recorded  # one row per recorded step, none for the other micro-batches
    assert monitor.records == drift.records == len(recorded)
    assert monitor.batches_seen == 14 and monitor.steps_seen == 6
    last_micro_batch = {1: 2, 2: 5, 3: 6, 4: 9, 5: 12, 6: 13}  # index of the training forward that ended the step
    for row, step in zip(rows, steps, strict=True):
        i = last_micro_batch[step]
        expected = _expected(module.inputs[i], module.outputs[i])
        assert float(row["bn/bn/batch_mean"]) == pytest.approx(expected["batch_mean"], rel=1e-4, abs=1e-6), step


def test_log_every_n_steps_none_follows_the_trainer(tmp_path):
    cb = BatchNormMonitor(histogram=False)
    data = torch.cat([_fixed_batch()] * 2)[:20]  # 5 batches of 4
    logger, _ = _fit(ConvBN(_bn("ours")), [cb], tmp_path, data=data, batch_size=4, max_steps=5, log_every_n_steps=2)
    assert cb.records == 3
    assert [step for step, _ in logger.bn_rows()] == [1, 3, 5]


@pytest.mark.parametrize("cls", [BatchNormMonitor, RunningStatDrift])
def test_hooks_installed_for_fit_and_removed_at_teardown(tmp_path, cls):
    module = ConvBN(_bn("torch"), capture=False)
    _fit(module, [cls(log_every_n_steps=1), cls(log_every_n_steps=2, prefix="other")], tmp_path, max_steps=2)
    assert module.hooks_seen == [(1, 1), (1, 1)]  # one pre-hook and one hook per layer, shared by the callbacks
    for name, m in module.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name


@pytest.mark.parametrize("cls", [BatchNormMonitor, RunningStatDrift])
def test_validation_and_sanity_check_neither_record_nor_touch_state(tmp_path, monkeypatch, cls):
    modes = []
    original = LayerHooks._post

    def spying(self, layer, args, output):
        if self.armed:
            modes.append(layer.training)
        return original(self, layer, args, output)

    monkeypatch.setattr(LayerHooks, "_post", spying)
    g = torch.Generator().manual_seed(3)
    train = torch.randn(24, 3, 6, 6, generator=g)  # 6 different batches of 4: the velocities are not zero
    val = torch.randn(8, 3, 6, 6, generator=g) * 5 + 3

    runs = []
    for with_val in (False, True):
        cb = cls(log_every_n_steps=1)
        kwargs = {"num_sanity_val_steps": 2, "val_check_interval": 2, "limit_val_batches": 2} if with_val else {}
        module = ConvBN(_bn("torch"))
        val_data = val if with_val else None
        logger, _ = _fit(
            module, [cb], tmp_path / str(with_val), data=train, batch_size=4, max_steps=6, val_data=val_data, **kwargs
        )
        assert module.val_batches == (2 + 3 * 2 if with_val else 0)  # sanity check + 3 validations of 2 batches
        runs.append((cb, logger.bn_rows()))
    (cb0, rows0), (cb1, rows1) = runs
    assert cb0.records == cb1.records == 6 and cb0.batches_seen == cb1.batches_seen == 6
    assert modes == [True] * 12  # only training forwards were looked at
    assert rows1 == rows0  # identical logged values: validation changed neither running stats nor callback state


# ------------------------------------------------------------------------------------------ layer selection


@pytest.mark.parametrize("cls", [BatchNormMonitor, RunningStatDrift])
@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (None, None, ["net.features.1", "net.features.4", "net.head.1"]),
        (["net.features.*"], None, ["net.features.1", "net.features.4"]),
        (None, ["*.4"], ["net.features.1", "net.head.1"]),
        (["net.features.*"], ["*.1"], ["net.features.4"]),
    ],
)
def test_include_exclude_select_layers(tmp_path, cls, include, exclude, expected):
    cb = cls(log_every_n_steps=1, include=include, exclude=exclude)
    logger, _ = _fit(Tiny(), [cb], tmp_path, batch_size=8)
    assert cb.layer_names == expected
    ((_, metrics),) = logger.bn_rows()
    assert {k.split("/")[1] for k in metrics} == set(expected)


def test_two_instances_have_distinct_state_keys():
    keys = {
        BatchNormMonitor().state_key,
        BatchNormMonitor(include=["a.*"]).state_key,
        BatchNormMonitor(prefix="bn2").state_key,
        RunningStatDrift().state_key,
    }
    assert len(keys) == 4


# ---------------------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("cls", [BatchNormMonitor, RunningStatDrift])
@pytest.mark.parametrize("value", [0, -1, 1.5, "10"])
def test_bad_log_every_n_steps(cls, value):
    with pytest.raises(ValueError, match="log_every_n_steps"):
        cls(log_every_n_steps=value)


@pytest.mark.parametrize("cls", [BatchNormMonitor, RunningStatDrift])
@pytest.mark.parametrize("arg", ["include", "exclude"])
def test_patterns_given_as_a_string_are_refused(cls, arg):
    with pytest.raises(TypeError, match=arg):
        cls(**{arg: "net.*"})


@pytest.mark.parametrize(
    ("arg", "value"), [("bins", 0), ("bins", 2.5), ("sample_size", 0), ("hist_range", 0.0), ("collapse_var", -1.0)]
)
def test_monitor_argument_validation(arg, value):
    with pytest.raises(ValueError, match=arg):
        BatchNormMonitor(**{arg: value})


# -------------------------------------------------------------------------------------- loggers and defaults


def test_histograms_and_scalars_reach_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version=0)
    module = ConvBN(_bn("ours"))
    _fit(module, [BatchNormMonitor(log_every_n_steps=1, sample_size=10_000)], tmp_path, logger=tb, max_steps=2)
    assert glob.glob(f"{tb.log_dir}/events.out.tfevents.*")
    acc = EventAccumulator(tb.log_dir, size_guidance={"histograms": 0, "scalars": 0}).Reload()
    assert "bn/bn/x_hat" in acc.Tags()["histograms"]
    assert "bn/bn/batch_mean" in acc.Tags()["scalars"]
    hists = acc.Histograms("bn/bn/x_hat")
    assert [h.step for h in hists] == [1, 2]
    numel = module.inputs[0].numel()
    assert hists[0].histogram_value.num == numel  # the whole input: every x_hat lands in a bin
    assert hists[0].histogram_value.min == -6.0 and hists[0].histogram_value.max == 6.0


def test_wandb_offline_fit_logs_histograms(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    made = []
    original = wandb.Histogram

    def histogram(*args, **kwargs):
        made.append(kwargs.get("np_histogram"))
        return original(*args, **kwargs)

    monkeypatch.setattr(wandb, "Histogram", histogram)
    capture = CapturingLogger()
    try:
        _fit(
            ConvBN(_bn("torch")),
            [BatchNormMonitor(log_every_n_steps=1, bins=16)],
            tmp_path,
            logger=[WandbLogger(save_dir=str(tmp_path), offline=True, project="bn-test"), capture],
            max_steps=2,
        )
    finally:
        wandb.finish()
    assert len(made) == 2
    counts, edges = made[0]
    assert len(counts) == 16 and len(edges) == 17
    assert len(capture.bn_rows()) == 2


@pytest.mark.parametrize("with_bn", [False, True])
def test_default_callbacks_just_work(tmp_path, with_bn):
    callbacks = [BatchNormMonitor(), RunningStatDrift()]
    if with_bn:
        logger, _ = _fit(Tiny(), callbacks, tmp_path, batch_size=8, max_steps=2)
        assert len(logger.bn_rows()) == 2  # one record each (Trainer's log_every_n_steps=50: batch 0 only)
        assert all(not counts for counts in callbacks[1].alerts.values())
    else:
        with pytest.warns(UserWarning, match="no BatchNorm layer") as record:
            logger, _ = _fit(NoBN(), callbacks, tmp_path, batch_size=8, max_steps=2)
        assert sum("no BatchNorm layer" in str(w.message) for w in record) == 2
        assert logger.bn_rows() == []
        assert [cb.records for cb in callbacks] == [0, 0]


def test_the_base_is_abstract_and_a_subclass_needs_only_compute_and_on_record(tmp_path):
    with pytest.raises(TypeError, match="abstract"):
        BatchNormCallbackBase()

    class Means(BatchNormCallbackBase):
        STATS = {"batch_mean": "mean"}

        def compute(self, batch):
            values = (batch.mean.sum(1) / batch.channels).unsqueeze(1)
            return torch.where(batch.ran.unsqueeze(1), values, float("nan"))

        def on_record(self, trainer, values, extras, step):
            self.seen = values

    cb = Means(log_every_n_steps=1)
    module = ConvBN(_bn("torch"))
    _fit(module, [cb], tmp_path, max_steps=1)
    expected = module.inputs[0].mean(dim=(0, 2, 3)).mean().item()
    assert cb.seen["bn"]["batch_mean"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
