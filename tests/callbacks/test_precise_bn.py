"""The PreciseBN callback: when it runs, the training modes it uses, what it leaves alone, its arguments."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bn_lightning as B
from bn_lightning.callbacks.precise_bn import PreciseBN, recalibrate_bn
from tests.helpers.tiny import TinyBNNet

# -------------------------------------------------------------------------------------------- callback


class _ListLogger(Logger):
    def __init__(self):
        super().__init__()
        self.logged = []

    @property
    def name(self):
        return "list"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))


class _Module(pl.LightningModule):
    def __init__(self, freeze: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyBNNet(nn.BatchNorm2d, B.BatchNorm1d)
        self.freeze = freeze
        self.val_modes = []

    def forward(self, x):
        return self.net(x)

    def on_train_epoch_start(self):
        if self.freeze:
            self.net.features[4].eval()  # frozen during training: PreciseBN must leave it alone

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        self.val_modes.append(any(m.training for m in self.modules()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _data(n=32, shuffle=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g) + 2.0
    return DataLoader(TensorDataset(x, torch.randint(0, 5, (n,), generator=g)), batch_size=8, shuffle=shuffle)


def _trainer(callbacks, logger=False, **kwargs):
    kwargs.setdefault("max_epochs", 2)
    kwargs.setdefault("num_sanity_val_steps", 2)
    kwargs.setdefault("limit_val_batches", 2)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _fit(trainer, module, train, val=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train, val if val is not None else _data(16, seed=1))


def test_callback_before_validation_recalibrates_with_the_training_modes():
    module = _Module(freeze=True)
    frozen_before = {k: v.clone() for k, v in module.net.features[4].named_buffers()}
    cb, logger = PreciseBN(num_batches=4), _ListLogger()
    train = _data()
    _fit(_trainer([cb], logger=logger), module, train)
    assert cb.runs == 2 and cb.batches_run == 8  # two validations; the sanity check did not recalibrate
    assert module.val_modes and not any(module.val_modes)  # eval mode restored for validation
    for k, v in module.net.features[4].named_buffers():
        assert torch.equal(v, frozen_before[k]), k  # frozen during training: its buffers left alone
    assert not module.net.features[4].training and module.net.features[1].training
    # no training step after the last validation: the buffers are what recalibrate_bn gives on the final model
    by_hand = copy.deepcopy(module)
    recalibrate_bn(by_hand, train, num_batches=4, progress=False)
    for (k, v), (_, w) in zip(module.state_dict().items(), by_hand.state_dict().items(), strict=True):
        torch.testing.assert_close(v, w, rtol=1e-6, atol=1e-6, msg=k)
    seconds = [m for _, m in logger.logged if "bn/precise_bn/seconds" in m]
    assert len(seconds) == 2 and seconds[0]["bn/precise_bn/num_samples"] == 32.0


def test_callback_does_not_change_training():
    def params(cb):
        module = _Module()
        _fit(_trainer(cb), module, _data(shuffle=True))
        return {k: v for k, v in module.state_dict().items() if "running" not in k and "num_batches" not in k}

    with_cb, without = params([PreciseBN(num_batches=3)]), params([])
    for k, v in without.items():
        assert torch.equal(with_cb[k], v), k  # same data order, same steps: the RNG was forked


@pytest.mark.parametrize(("when", "every", "runs"), [("epoch_end", 2, 1), ("fit_end", 1, 1), ("epoch_end", 1, 3)])
def test_callback_epoch_end_and_fit_end(when, every, runs):
    cb = PreciseBN(num_batches=2, when=when, every_n_epochs=every)
    module = _Module()
    _fit(
        _trainer([cb], max_epochs=3, limit_train_batches=2, limit_val_batches=0, num_sanity_val_steps=0),
        module,
        _data(),
    )
    assert cb.runs == runs and cb.batches_run == 2 * runs
    assert all(m.training for m in module.modules())


def test_callback_validate_only_does_nothing():
    cb = PreciseBN(num_batches=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer([cb]).validate(_Module(), _data(16))
    assert cb.runs == 0


def test_callback_forward_fn_and_module_without_forward():
    class NoForward(_Module):
        forward = pl.LightningModule.forward

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    with pytest.raises(ValueError, match="forward_fn"):
        _fit(_trainer([PreciseBN(num_batches=2)], max_epochs=1), NoForward(), _data())
    seen = []
    cb = PreciseBN(num_batches=2, forward_fn=lambda m, batch: seen.append(batch[0].device) or m.net(batch[0]))
    _fit(_trainer([cb], max_epochs=1), NoForward(), _data())
    assert cb.runs == 1 and len(seen) == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_batches": 0}, ValueError, "num_batches"),
        ({"when": "always"}, ValueError, "when must be one of"),
        ({"every_n_epochs": 0}, ValueError, "every_n_epochs"),
        ({"forward_fn": 3}, TypeError, "forward_fn"),
        ({"progress": "yes"}, TypeError, "progress"),
    ],
)
def test_callback_validates_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        PreciseBN(**kwargs)


def test_callback_state_dict_round_trip_and_state_key():
    cb = PreciseBN(num_batches=5)
    cb.runs, cb.batches_run = 3, 15
    other = PreciseBN(num_batches=5)
    other.load_state_dict(cb.state_dict())
    assert (other.runs, other.batches_run) == (3, 15)
    other.load_state_dict({})  # an old checkpoint without the keys
    assert (other.runs, other.batches_run) == (0, 0)
    assert cb.state_key != PreciseBN(num_batches=5, when="fit_end").state_key


class _CountingModule(_Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.seen += index.tolist()
        return super().training_step((x, y), batch_idx)


def test_callback_mid_epoch_validation_keeps_persistent_workers_epoch_intact():
    """iter() of a persistent-workers DataLoader resets its live iterator: PreciseBN must not disturb the epoch."""
    n = 48
    data = TensorDataset(torch.randn(n, 3, 8, 8), torch.randint(0, 5, (n,)), torch.arange(n))
    train = DataLoader(data, batch_size=8, num_workers=1, persistent_workers=True)
    module, cb = _CountingModule(), PreciseBN(num_batches=2)
    _fit(_trainer([cb], max_epochs=1, val_check_interval=2, num_sanity_val_steps=0), module, train)
    assert cb.runs == 3 and module.seen == list(range(n))  # every sample once, in order


def test_callback_model_without_bn_warns_once():
    class NoBN(_Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))

    cb = PreciseBN(num_batches=2)
    trainer = _trainer([cb], max_epochs=2, num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(NoBN(), _data(), _data(16))
    assert cb.runs == 0 and sum("no BatchNorm layer" in str(w.message) for w in record) == 1


class _TwoLoaders(_Module):
    def training_step(self, batch, batch_idx):
        return sum(nn.functional.cross_entropy(self(x), y) for x, y in batch.values())


def test_callback_several_train_loaders_need_forward_fn():
    train = {"a": _data(16), "b": _data(16, seed=3)}
    with pytest.raises(ValueError, match="several training dataloaders"):
        _fit(_trainer([PreciseBN(num_batches=2)], max_epochs=1, num_sanity_val_steps=0), _TwoLoaders(), train)
    seen = []

    def forward_fn(module, batch):
        seen.append(sorted(batch))
        module(torch.cat([batch["a"][0], batch["b"][0]]))

    cb = PreciseBN(num_batches=2, forward_fn=forward_fn)
    _fit(_trainer([cb], max_epochs=1, num_sanity_val_steps=0), _TwoLoaders(), {"a": _data(16), "b": _data(16, seed=3)})
    assert cb.runs == 1 and seen == [["a", "b"], ["a", "b"]]
