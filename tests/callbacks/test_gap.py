"""BatchNormGap: the cost of the running statistics, measured on validation batches."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bn_lightning.callbacks.gap import BatchNormGap
from bn_lightning.layers import BatchNorm1d as ScratchBatchNorm1d
from tests.helpers.tiny import quiet_trainer


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 Gaussian classes in 6-d, far from the origin (so the BN statistics matter)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 2.0 * nn.functional.one_hot(y, 6).float() + torch.randn(n, 6, generator=g)
    return x * 3 + 4, y


def _mlp(width: int = 32, depth: int = 3, momentum: float | None = 0.1) -> nn.Sequential:
    layers: list[nn.Module] = []
    fan_in = 6
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.BatchNorm1d(width, momentum=momentum), nn.ReLU()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, 3))


class _Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 0.1) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class _RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def _recompute_running_stats(net: nn.Module, x: torch.Tensor, batch_size: int = 64) -> None:
    """Exact population statistics: cumulative averages (momentum None) over the training set, in training mode."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm1d)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    was_training = net.training
    net.train()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            net(x[i : i + batch_size])
    net.train(was_training)
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum


def _hand_gap(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Running vs batch statistics on one batch, by hand, on a copy."""
    net = copy.deepcopy(net).eval()
    with torch.no_grad():
        out_r = net(x)
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
        out_b = net(x)
    loss_r, loss_b = nn.functional.cross_entropy(out_r, y).item(), nn.functional.cross_entropy(out_b, y).item()
    acc_r = (out_r.argmax(1) == y).float().mean().item()
    acc_b = (out_b.argmax(1) == y).float().mean().item()
    return {
        "loss": loss_r - loss_b,
        "loss_running": loss_r,
        "loss_batch": loss_b,
        "metric": acc_r - acc_b,
        "metric_running": acc_r,
        "metric_batch": acc_b,
    }


def _bn_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}


# ---------------------------------------------------------------------------------------------- the gap itself


def test_gap_is_large_with_noisy_running_stats_and_small_after_recomputing_them():
    torch.manual_seed(0)
    x_train, y_train = _data(128, 1)
    x_val, y_val = _data(128, 2)
    model = _Classifier(_mlp(momentum=0.9))
    gap = BatchNormGap(num_batches=2)
    # validate 4 times per epoch: each measurement sees running statistics left by a different pair of samples
    trainer = quiet_trainer(max_epochs=3, callbacks=[gap], val_check_interval=16, limit_val_batches=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(
            model,
            DataLoader(TensorDataset(x_train, y_train), batch_size=2, shuffle=True),
            DataLoader(TensorDataset(x_val, y_val), batch_size=64),
        )
    # momentum 0.9 and 2 samples per batch: the running statistics are those of the last couple of samples
    assert len(gap.history) == 12
    broken = sorted(values["loss"] for _, values in gap.history)
    median = (broken[5] + broken[6]) / 2
    assert median > 0.25  # 0.3 to 2.3 over seeds 0-11 (seed 0: 1.5)

    _recompute_running_stats(model.net, x_train)
    fixed = gap.measure(model, [(x_val[:64], y_val[:64]), (x_val[64:], y_val[64:])])
    assert abs(fixed["loss"]) < 0.05
    assert abs(fixed["loss"]) < median / 5
    assert fixed["loss_batch"] == pytest.approx(gap.last["loss_batch"])  # the batch path ignores running stats


def test_measure_matches_a_hand_computation_on_a_fixed_batch():
    torch.manual_seed(0)
    net = _mlp(width=8, depth=2, momentum=0.5)
    x, y = _data(16, 3)
    with torch.no_grad():  # running statistics from one unrepresentative batch
        net.train()(x[:4] + 1.0)
    values = BatchNormGap().measure(net, [(x, y)])
    expected = _hand_gap(net, x, y)
    assert values.keys() == expected.keys()
    for key, value in expected.items():
        assert values[key] == pytest.approx(value, abs=1e-6), key
    assert values["loss"] == pytest.approx(values["loss_running"] - values["loss_batch"])


def test_batches_are_weighted_by_their_size():
    torch.manual_seed(0)
    net = _mlp(width=8, depth=1)
    x, y = _data(24, 4)
    values = BatchNormGap().measure(net, [(x[:16], y[:16]), (x[16:], y[16:])])
    a, b = _hand_gap(net, x[:16], y[:16]), _hand_gap(net, x[16:], y[16:])
    for key in ("loss_running", "loss_batch", "metric_running", "metric_batch"):
        assert values[key] == pytest.approx((16 * a[key] + 8 * b[key]) / 24, abs=1e-6), key


def test_measure_restores_modes_and_buffers_bit_identically():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(6, 8),
        nn.BatchNorm1d(8, momentum=None),  # cumulative average: num_batches_tracked matters
        nn.Dropout(0.5),
        nn.ReLU(),
        nn.Linear(8, 8),
        ScratchBatchNorm1d(8),  # bn_lightning's layer: keeps last_batch_stats
        nn.Linear(8, 3),
    )
    x, y = _data(32, 5)
    with torch.no_grad():
        net.train()(x)  # non-trivial buffers, last_batch_stats set
    net[5].eval()  # a mix of modes: the model trains, one BN is in eval mode, dropout is on
    modes = {name: m.training for name, m in net.named_modules()}
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    last_stats = net[5].last_batch_stats
    values = BatchNormGap().measure(net, [(x[:16], y[:16]), (x[16:], y[16:])])
    assert values
    assert {name: m.training for name, m in net.named_modules()} == modes
    for k, v in net.state_dict().items():
        assert torch.equal(v, buffers[k]), k  # bit-identical, num_batches_tracked included
        assert v.dtype == buffers[k].dtype
    assert net[5].last_batch_stats is last_stats


def test_dropout_stays_off_in_the_batch_statistics_pass():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Dropout(0.9), nn.ReLU(), nn.Linear(16, 3))
    x, y = _data(32, 6)
    gap = BatchNormGap()
    first = gap.measure(net.train(), [(x, y)])
    second = gap.measure(net, [(x, y)])
    assert first == second  # deterministic: no dropout in either pass
    assert first == pytest.approx(_hand_gap(net, x, y), abs=1e-6)


def test_measure_restores_everything_when_the_forward_raises():
    net = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = _data(1, 7)  # one sample: BN cannot normalise with batch statistics
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNormGap().measure(net, [(x, y)])
    assert net.training and all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, buffers[k]), k


# ---------------------------------------------------------------------------------------------- loss and metric


def test_loss_fn_and_metric_fn_arguments():
    torch.manual_seed(0)
    net = _mlp(width=8, depth=1)
    x, y = _data(16, 8)

    def mean_logit(out, target):
        return out.mean()

    def top_logit(out, target):
        return out.max(dim=1).values.mean()

    values = BatchNormGap(loss_fn=mean_logit, metric_fn=top_logit).measure(net, [(x, y)])
    clone = copy.deepcopy(net).eval()
    with torch.no_grad():
        out_r = clone(x)
        clone[1].train()
        out_b = clone(x)
    assert values["loss_running"] == pytest.approx(out_r.mean().item(), abs=1e-6)
    assert values["loss_batch"] == pytest.approx(out_b.mean().item(), abs=1e-6)
    assert values["metric_running"] == pytest.approx(out_r.max(1).values.mean().item(), abs=1e-6)
    assert values["metric_batch"] == pytest.approx(out_b.max(1).values.mean().item(), abs=1e-6)


def test_default_loss_is_the_modules_loss_fn_or_criterion_attribute():
    torch.manual_seed(0)
    x, y = _data(16, 9)
    model = _Classifier(_mlp(width=8, depth=1))
    default = BatchNormGap().measure(model, [(x, y)])

    model.criterion = nn.CrossEntropyLoss(label_smoothing=0.5)
    smoothed = BatchNormGap().measure(model, [(x, y)])
    assert smoothed["loss_running"] != pytest.approx(default["loss_running"])
    assert smoothed["metric_running"] == default["metric_running"]

    model.loss_fn = lambda out, target: torch.zeros(())  # loss_fn wins over criterion
    assert BatchNormGap().measure(model, [(x, y)])["loss_running"] == 0.0

    explicit = BatchNormGap(loss_fn=nn.functional.cross_entropy).measure(model, [(x, y)])
    assert explicit["loss_running"] == pytest.approx(default["loss_running"])  # the argument wins


def test_no_metric_for_regression_outputs():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    x = torch.randn(16, 6)
    values = BatchNormGap(loss_fn=nn.functional.mse_loss).measure(net, [(x, torch.randn(16, 1))])
    assert sorted(values) == ["loss", "loss_batch", "loss_running"]


def test_batches_must_be_input_target_pairs():
    net = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    with pytest.raises(TypeError, match="inputs, targets"):
        BatchNormGap().measure(net, [{"x": torch.randn(4, 6)}])
    assert BatchNormGap().measure(net, []) == {}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_batches": 0}, ValueError, "num_batches"),
        ({"num_batches": -2}, ValueError, "num_batches"),
        ({"num_batches": 1.5}, ValueError, "num_batches"),
        ({"num_batches": True}, ValueError, "num_batches"),
        ({"loss_fn": "cross_entropy"}, TypeError, "loss_fn"),
        ({"metric_fn": 3}, TypeError, "metric_fn"),
        ({"prefix": ""}, ValueError, "prefix"),
    ],
)
def test_arguments_are_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        BatchNormGap(**kwargs)


# ---------------------------------------------------------------------------------------------- in a Trainer


def _loaders(val_batches: int = 3):
    x, y = _data(32, 10)
    xv, yv = _data(16 * val_batches, 11)
    return DataLoader(TensorDataset(x, y), batch_size=8), DataLoader(TensorDataset(xv, yv), batch_size=16)


def test_logs_at_validation_end_to_the_loggers_and_not_during_the_sanity_check():
    torch.manual_seed(0)
    logger = _RecordingLogger()
    gap = BatchNormGap(num_batches=2, prefix="norm")
    trainer = quiet_trainer(max_epochs=2, callbacks=[gap], logger=logger, num_sanity_val_steps=2, log_every_n_steps=1)
    trainer.fit(_Classifier(_mlp(width=8, depth=1)), *_loaders())
    assert [step for step, _ in gap.history] == [4, 8]  # two validations after training; none in the sanity check
    logged = [(step, m) for step, m in logger.records if any(k.startswith("norm/gap/") for k in m)]
    assert [step for step, _ in logged] == [4, 8]
    assert logged[-1][1] == {f"norm/gap/{k}": v for k, v in gap.last.items()}
    assert set(logged[-1][1]) == {f"norm/gap/{k}" for k in ("loss", "loss_running", "loss_batch")} | {
        f"norm/gap/{k}" for k in ("metric", "metric_running", "metric_batch")
    }


def test_evaluates_num_batches_of_the_first_val_dataloader_and_restores_the_model():
    torch.manual_seed(0)
    model = _Classifier(_mlp(width=8, depth=1))
    calls = []
    model.net.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    train, val = _loaders(val_batches=5)
    other = DataLoader(TensorDataset(*_data(4, 12)), batch_size=4)
    gap = BatchNormGap(num_batches=3)
    state = _bn_state(model)
    trainer = quiet_trainer(callbacks=[gap], limit_val_batches=1)
    trainer.validate(model, [val, other], verbose=False)
    # 1 validation_step per dataloader (limit_val_batches=1), then 3 batches x 2 passes of the FIRST dataloader
    assert calls == [16, 4] + [16] * 6
    assert gap.last
    assert all(m.training for m in model.modules())  # Lightning restored train mode; so did we, before it
    for k, v in _bn_state(model).items():
        assert torch.equal(v, state[k]), k


def test_warns_and_logs_nothing_without_batchnorm():
    class _NoBN(_Classifier):
        def __init__(self) -> None:
            super().__init__(nn.Sequential(nn.Linear(6, 3)))

    gap = BatchNormGap()
    trainer = quiet_trainer(callbacks=[gap])
    with pytest.warns(UserWarning, match="no BatchNorm layer"):
        trainer.validate(_NoBN(), _loaders()[1], verbose=False)
    assert gap.last == {} and gap.history == []


# ---------------------------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world_size: int) -> dict[str, float]:
    import torch.distributed as dist

    torch.manual_seed(0)  # same model on every rank
    net = _mlp(width=8, depth=2, momentum=0.5)
    x, y = _data(48, 13)
    with torch.no_grad():
        net.train()(x[:4] + 1.0)
    # rank-specific shards of different sizes: rank 0 two batches of 8, rank 1 one batch of 16 (+ padding rows)
    shard = [(x[:8], y[:8]), (x[8:16], y[8:16])] if rank == 0 else [(x[16:32], y[16:32])]

    def reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    return BatchNormGap().measure(net, shard, reduce=reduce)


@pytest.mark.ddp
def test_ddp_ranks_agree_on_the_sample_weighted_average_of_their_shards():
    from tests.helpers.ddp import run_distributed

    results = run_distributed(_ddp_worker, 2)
    assert results[0] == results[1]  # one all_reduce: every rank holds the same values
    torch.manual_seed(0)
    net = _mlp(width=8, depth=2, momentum=0.5)
    x, y = _data(48, 13)
    with torch.no_grad():
        net.train()(x[:4] + 1.0)
    pooled = BatchNormGap().measure(net, [(x[:8], y[:8]), (x[8:16], y[8:16]), (x[16:32], y[16:32])])
    assert results[0] == pytest.approx(pooled, abs=1e-6)
