"""BatchNormFreeze: eval-mode BN during training, from an epoch, a step, or for chosen layers; state in checkpoints."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset

from bn_lightning.callbacks.freeze import BatchNormFreeze
from tests.helpers.tiny import TinyBNNet, quiet_trainer

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")

BN_NAMES = ["net.features.1", "net.features.4", "net.head.1"]


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyBNNet(nn.BatchNorm2d, nn.BatchNorm1d)
        self.seen_modes: list[dict[str, bool]] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.seen_modes.append({n: m.training for n, m in self.named_modules() if isinstance(m, _BatchNorm)})
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _EagerTrainModule(_Module):
    """Switches the whole model back to training mode after validation, as Lightning < 2.2 did."""

    def on_validation_model_train(self) -> None:
        self.trainer.model.train()


class _Snapshots(Callback):
    """BN buffers and parameters at the start of training and at the end of every epoch."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        self.epochs.append(_bn_tensors(pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append(_bn_tensors(pl_module))


def _bn_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v.detach().clone()
        for name, m in module.named_modules()
        if isinstance(m, _BatchNorm)
        for k, v in [*m.named_buffers(recurse=False), *m.named_parameters(recurse=False)]
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], layer: str, kinds=("running_mean", "running_var")):
    return all(torch.equal(a[f"{layer}.{k}"], b[f"{layer}.{k}"]) for k in kinds)


def _loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 6, 6, generator=g) * 2 + 1
    return DataLoader(TensorDataset(x, torch.randint(0, 5, (n,), generator=g)), batch_size=batch_size)


def _trainer(callbacks, **kwargs) -> pl.Trainer:
    return quiet_trainer(callbacks=callbacks, **{"max_epochs": 1, **kwargs})


# ---------------------------------------------------------------------------------------------- freezing


@pytest.mark.parametrize("freeze_affine", [False, True])
def test_frozen_stats_are_bit_identical_over_an_epoch(freeze_affine):
    model, snaps = _Module(), _Snapshots()
    freeze = BatchNormFreeze(freeze_affine=freeze_affine)
    _trainer([freeze, snaps]).fit(model, _loader())
    before, after = snaps.epochs
    for layer in BN_NAMES:
        assert _same(before, after, layer, ("running_mean", "running_var", "num_batches_tracked")), layer
        # gamma/beta: unchanged only when frozen too
        assert _same(before, after, layer, ("weight", "bias")) == freeze_affine, layer
        assert model.get_submodule(layer).weight.requires_grad is not freeze_affine
    assert all(not any(modes.values()) for modes in model.seen_modes)  # eval-mode BN in every training step
    assert freeze.frozen and freeze.layer_names == BN_NAMES
    assert (freeze.frozen_epoch, freeze.frozen_step) == (0, 0)
    # the rest of the model did train
    assert not torch.equal(model.net.features[0].weight, _Module().net.features[0].weight)


def test_without_the_callback_the_stats_change():  # so that the test above can fail
    model, snaps = _Module(), _Snapshots()
    _trainer([snaps]).fit(model, _loader())
    assert not any(_same(*snaps.epochs, layer) for layer in BN_NAMES)


def test_never_sets_track_running_stats_false():
    model = _Module()
    freeze = BatchNormFreeze(freeze_affine=True)
    _trainer([freeze]).fit(model, _loader())
    for layer in BN_NAMES:
        bn = model.get_submodule(layer)
        assert bn.track_running_stats is True
        assert bn.running_mean is not None and bn.running_var is not None and bn.num_batches_tracked is not None


def test_freeze_is_reapplied_after_validation_switches_the_model_to_train_mode():
    model, snaps = _EagerTrainModule(), _Snapshots()
    freeze = BatchNormFreeze()
    # validation twice per epoch: the model is set to training mode in the middle of the epoch
    _trainer([freeze, snaps], val_check_interval=2, limit_val_batches=1).fit(model, _loader(), _loader(8))
    assert len(model.seen_modes) == 4
    assert all(not any(modes.values()) for modes in model.seen_modes)
    assert all(
        _same(*snaps.epochs, layer, ("running_mean", "running_var", "num_batches_tracked")) for layer in BN_NAMES
    )


def test_freeze_at_epoch():
    model, snaps = _Module(), _Snapshots()
    freeze = BatchNormFreeze(freeze_at_epoch=1)
    _trainer([freeze, snaps], max_epochs=3).fit(model, _loader())
    start, epoch0, epoch1, epoch2 = snaps.epochs
    for layer in BN_NAMES:
        assert not _same(start, epoch0, layer), layer  # before epoch 1: the stats are updated
        assert _same(epoch0, epoch1, layer) and _same(epoch1, epoch2, layer), layer  # from epoch 1: frozen
    assert (freeze.frozen_epoch, freeze.frozen_step) == (1, 4)
    assert [any(m.values()) for m in model.seen_modes] == [True] * 4 + [False] * 8


def test_freeze_at_step():
    model = _Module()
    freeze = BatchNormFreeze(freeze_at_step=3)
    _trainer([freeze], max_epochs=2).fit(model, _loader())
    assert [any(m.values()) for m in model.seen_modes] == [True] * 3 + [False] * 5
    assert all(int(model.get_submodule(layer).num_batches_tracked) == 3 for layer in BN_NAMES)
    assert (freeze.frozen_epoch, freeze.frozen_step) == (0, 3)


@pytest.mark.parametrize(
    ("include", "exclude", "frozen"),
    [
        (["net.features.*"], None, ["net.features.1", "net.features.4"]),
        (None, ["net.features.*"], ["net.head.1"]),
        (["net.*"], ["*.4"], ["net.features.1", "net.head.1"]),
    ],
)
def test_name_patterns_select_the_layers(include, exclude, frozen):
    model, snaps = _Module(), _Snapshots()
    freeze = BatchNormFreeze(include=include, exclude=exclude, freeze_affine=True)
    _trainer([freeze, snaps]).fit(model, _loader())
    assert freeze.layer_names == frozen
    for layer in BN_NAMES:
        assert _same(*snaps.epochs, layer) == (layer in frozen), layer
        assert model.get_submodule(layer).weight.requires_grad == (layer not in frozen), layer


# ---------------------------------------------------------------------------------------------- unfreezing


def test_unfreeze_at_epoch_restores_updates_and_requires_grad():
    model, snaps = _Module(), _Snapshots()
    model.net.head[1].bias.requires_grad_(False)  # was frozen before: must stay frozen after the unfreeze
    freeze = BatchNormFreeze(freeze_affine=True, unfreeze_at_epoch=1)
    _trainer([freeze, snaps], max_epochs=2).fit(model, _loader())
    start, epoch0, epoch1 = snaps.epochs
    for layer in BN_NAMES:
        assert _same(start, epoch0, layer, ("running_mean", "running_var", "weight")), layer
        assert not _same(epoch0, epoch1, layer, ("running_mean",)) and not _same(epoch0, epoch1, layer, ("weight",))
        assert model.get_submodule(layer).weight.requires_grad, layer
    assert model.net.head[1].bias.requires_grad is False
    assert not freeze.frozen
    assert (freeze.frozen_epoch, freeze.unfrozen_epoch, freeze.unfrozen_step) == (0, 1, 4)
    assert [any(m.values()) for m in model.seen_modes] == [False] * 4 + [True] * 4


def test_freeze_and_unfreeze_are_logged_as_events():
    from tests.helpers.lightning_ddp_callbacks import CapturingLogger

    logger = CapturingLogger()
    freeze = BatchNormFreeze(freeze_at_epoch=1, unfreeze_at_epoch=2)
    _trainer([freeze], max_epochs=3, logger=logger).fit(_Module(), _loader())
    events = [(step, m["bn/freeze/frozen_layers"]) for step, m in logger.rows if "bn/freeze/frozen_layers" in m]
    assert events == [(4, float(len(BN_NAMES))), (8, 0.0)]  # 4 steps per epoch: the starts of epochs 1 and 2


def test_manual_freeze_and_unfreeze_without_a_trainer():
    net = TinyBNNet(nn.BatchNorm2d, nn.BatchNorm1d)
    freeze = BatchNormFreeze(include=["head.*"], freeze_affine=True)
    assert freeze.freeze(net) == ["head.1"]
    assert net.training and not net.head[1].training and net.features[1].training
    assert not net.head[1].weight.requires_grad and not net.head[1].bias.requires_grad
    assert (freeze.frozen_epoch, freeze.frozen_step) == (None, None)
    x = torch.randn(4, 3, 6, 6)
    before = net.head[1].running_mean.clone()
    net(x).sum().backward()
    assert torch.equal(net.head[1].running_mean, before)
    assert net.head[1].weight.grad is None and net.features[1].weight.grad is not None
    freeze.unfreeze()
    assert net.head[1].training and net.head[1].weight.requires_grad and not freeze.frozen
    net(x)
    assert not torch.equal(net.head[1].running_mean, before)
    freeze.unfreeze()  # a no-op when not frozen


def test_manual_unfreeze_during_fit_wins_over_the_schedule():
    class _UnfreezeAfterTwoSteps(Callback):
        def __init__(self, freeze):
            self.freeze = freeze

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                self.freeze.unfreeze(pl_module)

    model = _Module()
    freeze = BatchNormFreeze()
    _trainer([freeze, _UnfreezeAfterTwoSteps(freeze)], max_epochs=2).fit(model, _loader())
    assert [any(m.values()) for m in model.seen_modes] == [False] * 2 + [True] * 6
    assert (freeze.freezes, freeze.unfreezes) == (1, 1)


# ---------------------------------------------------------------------------------------------- checkpoints


def test_state_is_saved_and_a_resumed_run_reapplies_the_freeze(tmp_path):
    class _FreezeByHandAtStep2(Callback):
        def __init__(self, freeze):
            self.freeze = freeze

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2 and not self.freeze.frozen:
                self.freeze.freeze(pl_module)

    model = _Module()
    first = BatchNormFreeze(freeze_at_epoch=50, freeze_affine=True)  # the schedule never fires in this test
    trainer = _trainer([first, _FreezeByHandAtStep2(first)])
    trainer.fit(model, _loader())
    path = tmp_path / "frozen.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["callbacks"][first.state_key]
    assert state["frozen"] and state["layer_names"] == BN_NAMES
    assert (state["frozen_epoch"], state["frozen_step"]) == (0, 2)
    assert state["requires_grad"] == {f"{n}.{p}": True for n in BN_NAMES for p in ("weight", "bias")}

    resumed_model, snaps = _Module(), _Snapshots()
    second = BatchNormFreeze(freeze_at_epoch=50, freeze_affine=True)
    assert second.state_key == first.state_key
    _trainer([second, snaps], max_epochs=2).fit(resumed_model, _loader(), ckpt_path=path)
    assert second.frozen and (second.frozen_epoch, second.frozen_step) == (0, 2)
    assert all(not any(modes.values()) for modes in resumed_model.seen_modes)
    assert len(resumed_model.seen_modes) == 4
    for layer in BN_NAMES:
        assert _same(*snaps.epochs, layer, ("running_mean", "running_var", "num_batches_tracked", "weight", "bias"))
        assert not resumed_model.get_submodule(layer).weight.requires_grad
        assert torch.equal(resumed_model.get_submodule(layer).running_mean, model.get_submodule(layer).running_mean)

    second.unfreeze()  # the saved requires_grad flags came with the checkpoint
    assert all(resumed_model.get_submodule(layer).weight.requires_grad for layer in BN_NAMES)


def test_load_state_dict_defaults_for_old_checkpoints():
    freeze = BatchNormFreeze()
    freeze.load_state_dict({})
    assert not freeze.frozen and freeze.layer_names == [] and freeze.frozen_epoch is None
    assert (freeze.freezes, freeze.unfreezes) == (0, 0)
    freeze.load_state_dict({"frozen": True, "layer_names": ["a"], "frozen_epoch": 3})
    assert freeze.frozen and freeze.freezes == 1 and freeze.frozen_step is None


def test_state_keys_differ_for_different_layer_selections():
    assert BatchNormFreeze(include=["a.*"]).state_key != BatchNormFreeze(include=["b.*"]).state_key


# ---------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"freeze_at_epoch": -1}, ValueError, "freeze_at_epoch"),
        ({"freeze_at_epoch": 1.5}, ValueError, "freeze_at_epoch"),
        ({"freeze_at_epoch": True}, ValueError, "freeze_at_epoch"),
        ({"freeze_at_step": -3}, ValueError, "freeze_at_step"),
        ({"freeze_at_epoch": 1, "freeze_at_step": 10}, ValueError, "at most one"),
        ({"unfreeze_at_epoch": 0}, ValueError, "unfreeze_at_epoch"),
        ({"freeze_at_epoch": 2, "unfreeze_at_epoch": 2}, ValueError, "unfreeze_at_epoch"),
        ({"unfreeze_at_epoch": -1}, ValueError, "unfreeze_at_epoch"),
        ({"include": "net.*"}, TypeError, "include"),
        ({"exclude": "net.*"}, TypeError, "exclude"),
        ({"freeze_affine": "yes"}, TypeError, "freeze_affine"),
    ],
)
def test_arguments_are_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        BatchNormFreeze(**kwargs)


def test_warns_when_no_layer_matches():
    with pytest.warns(UserWarning, match="no BatchNorm layer matches"):
        assert BatchNormFreeze(include=["nothing"]).freeze(TinyBNNet(nn.BatchNorm2d, nn.BatchNorm1d)) == []
