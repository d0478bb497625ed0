"""Frozen BN layers keep their statistics, bit for bit, through every tool that finds and updates BN layers.

Each tool runs on a model with frozen layers (``features.1``, ``features.4``: FrozenBatchNorm2d with non-trivial
buffers) and a trainable one (``head.1``: torch's BatchNorm1d): ours (``recalibrate_bn``, ``PreciseBN``,
``convert_sync_batchnorm``), torch's (``swa_utils.update_bn``, ``nn.SyncBatchNorm.convert_sync_batchnorm``) and
Lightning's (``StochasticWeightAveraging``, ``sync_batchnorm=True``). The tool must run without error, leave the frozen
layers' buffers ``torch.equal`` to what they were, and do its job on the trainable layer.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.plugins import TorchSyncBatchNorm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset

import bn_lightning as B
from bn_lightning.callbacks import PreciseBN
from bn_lightning.layers.frozen import FrozenBatchNormBase
from bn_lightning.plugins import SyncBatchNormPlugin
from tests.helpers.ddp import run_distributed
from tests.helpers.tiny import TinyBNNet, quiet_trainer

FROZEN = ["features.1", "features.4"]
TRAINABLE = "head.1"


def _model(dtype: torch.dtype = torch.float32, trainable: bool = True) -> TinyBNNet:
    """TinyBNNet with frozen BN2d layers holding non-trivial buffers and a trainable (or frozen) BN1d head."""
    torch.manual_seed(0)
    net = TinyBNNet(B.FrozenBatchNorm2d, nn.BatchNorm1d if trainable else B.FrozenBatchNorm1d).to(dtype)
    g = torch.Generator().manual_seed(1)
    for name in FROZEN:
        layer = net.get_submodule(name)
        for buffer, low, high in ((layer.weight, 0.5, 1.5), (layer.bias, -0.5, 0.5), (layer.running_mean, -1, 1)):
            buffer.copy_(torch.rand(buffer.shape, generator=g, dtype=dtype) * (high - low) + low)
        layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=g, dtype=dtype) + 0.5)
    return net


def _data(dtype: torch.dtype = torch.float32, batches: int = 4, batch_size: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batches * batch_size, 3, 6, 6, generator=g, dtype=dtype)
    return TensorDataset(x, torch.randint(0, 5, (batches * batch_size,), generator=g))


def _loader(dtype: torch.dtype = torch.float32) -> DataLoader:
    return DataLoader(_data(dtype), batch_size=8, shuffle=False)


def _frozen_state(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """Clones of every buffer of the frozen layers, by qualified name."""
    state = {}
    for name in FROZEN:
        for key, value in model.get_submodule(prefix + name).state_dict().items():
            state[f"{name}.{key}"] = value.detach().clone()
    return state


def _assert_frozen_untouched(model: nn.Module, before: dict[str, torch.Tensor], prefix: str = "") -> None:
    after = _frozen_state(model, prefix)
    assert sorted(after) == sorted(before)
    for key, value in after.items():
        assert torch.equal(value, before[key]), f"{key} changed"
    for name in FROZEN:
        assert isinstance(model.get_submodule(prefix + name), B.FrozenBatchNorm2d), name


def _head_inputs(model: TinyBNNet, loader: DataLoader) -> torch.Tensor:
    """What the trainable BN layer sees over the whole loader (frozen layers normalise the same in any mode)."""
    with torch.no_grad():
        return torch.cat([model.head[0](model.features(x)) for x, _ in loader])


class LitNet(pl.LightningModule):
    """A classifier around :func:`_model`; SGD with one optimizer, as StochasticWeightAveraging requires."""

    def __init__(self, trainable: bool = True) -> None:
        super().__init__()
        self.net = _model(trainable=trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):  # type: ignore[override]
        return torch.optim.SGD(self.parameters(), lr=0.05)


# ---------------------------------------------------------------- not a _BatchNorm


def test_frozen_layers_are_not_found_as_trainable_batchnorm():
    model = _model()
    for name in FROZEN:
        layer = model.get_submodule(name)
        assert not isinstance(layer, _BatchNorm) and isinstance(layer, FrozenBatchNormBase)
    assert [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)] == [TRAINABLE]
    for cls in (B.FrozenBatchNorm1d, B.FrozenBatchNorm2d, B.FrozenBatchNorm3d):
        assert not issubclass(cls, _BatchNorm)


# ---------------------------------------------------------------- ours: recalibrate_bn and PreciseBN


def test_recalibrate_bn_in_train_mode_leaves_frozen_layers_alone():
    model = _model(torch.float64).train()
    loader = _loader(torch.float64)
    before = _frozen_state(model)
    result = B.recalibrate_bn(model, loader, num_batches=4, progress=False)
    _assert_frozen_untouched(model, before)
    assert result["layers"] == [TRAINABLE]
    assert all(model.get_submodule(name).training for name in FROZEN)  # modes untouched too
    # the trainable layer holds the exact statistics of everything it saw
    z = _head_inputs(model, loader)
    torch.testing.assert_close(model.head[1].running_mean, z.mean(0), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(model.head[1].running_var, z.var(0), atol=1e-10, rtol=1e-10)


def test_precise_bn_callback_leaves_frozen_layers_alone_and_recalibrates_the_rest():
    module = LitNet()
    before = _frozen_state(module.net)
    trainer = quiet_trainer(max_epochs=2, callbacks=[PreciseBN(num_batches=4, when="fit_end", progress=False)])
    trainer.fit(module, train_dataloaders=_loader())
    _assert_frozen_untouched(module.net, before)
    # the callback's result is what recalibrate_bn gives on the trained model
    reference = copy.deepcopy(module.net).train()
    reference.head[1].reset_running_stats()
    B.recalibrate_bn(reference, _loader(), num_batches=4, progress=False)
    torch.testing.assert_close(module.net.head[1].running_mean, reference.head[1].running_mean)
    torch.testing.assert_close(module.net.head[1].running_var, reference.head[1].running_var)


# ---------------------------------------------------------------- torch: update_bn and convert_sync_batchnorm


def test_torch_swa_update_bn_leaves_frozen_layers_alone():
    model = _model(torch.float64).train()
    loader = _loader(torch.float64)
    before = _frozen_state(model)
    torch.optim.swa_utils.update_bn(loader, model)
    _assert_frozen_untouched(model, before)
    # the trainable layer was reset and re-estimated: its mean is the mean over the loader
    torch.testing.assert_close(model.head[1].running_mean, _head_inputs(model, loader).mean(0))
    assert model.head[1].momentum == 0.1  # update_bn restores it


@pytest.mark.parametrize("convert", ["torch", "bn_lightning", "lightning_plugin"])
def test_sync_batchnorm_conversion_leaves_frozen_layers_alone(convert):
    model = _model()
    frozen = {name: model.get_submodule(name) for name in FROZEN}
    before = _frozen_state(model)
    if convert == "torch":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        expected: type[nn.Module] = nn.SyncBatchNorm
    elif convert == "bn_lightning":
        model = B.convert_sync_batchnorm(model)
        expected = B.SyncBatchNorm
    else:  # what Trainer(sync_batchnorm=True) applies
        model = TorchSyncBatchNorm().apply(model)
        expected = nn.SyncBatchNorm
    assert type(model.head[1]) is expected
    for name, layer in frozen.items():
        assert model.get_submodule(name) is layer, name  # the same frozen object, not converted
    _assert_frozen_untouched(model, before)
    if convert == "bn_lightning":
        model = B.revert_sync_batchnorm(model)
        assert type(model.head[1]) is nn.BatchNorm1d
        assert all(model.get_submodule(name) is layer for name, layer in frozen.items())


# ---------------------------------------------------------------- Lightning: StochasticWeightAveraging


def test_lightning_stochastic_weight_averaging_leaves_frozen_layers_alone():
    module = LitNet()
    before = _frozen_state(module.net)
    trainable_before = module.net.head[1].running_mean.clone()
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1, annealing_epochs=1)
    trainer = quiet_trainer(max_epochs=3, callbacks=[swa])
    trainer.fit(module, train_dataloaders=_loader())
    _assert_frozen_untouched(module.net, before)
    assert swa.n_averaged is not None and int(swa.n_averaged) >= 2  # the averaging ran
    assert not torch.equal(module.net.head[1].running_mean, trainable_before)
    assert all(m.momentum == 0.1 for m in module.modules() if isinstance(m, _BatchNorm))  # restored by SWA


# ---------------------------------------------------------------- Lightning: sync_batchnorm=True in a DDP fit


def _ddp_fits(rank: int, world_size: int) -> dict[str, bool]:
    """Fits inside one initialised gloo process group (Lightning joins it); returns what each fit left intact.

    torch's ``nn.SyncBatchNorm`` refuses CPU input whenever a process group is initialised (even of one process):
    ``Trainer(sync_batchnorm=True)`` therefore fits on CPU only a model whose BN layers are all frozen (which the
    conversion leaves alone); the mixed model fits with bn_lightning's SyncBatchNormPlugin, which runs on CPU.
    """
    out = {}
    common = dict(strategy="ddp", accelerator="cpu", devices=1, max_epochs=1)
    for case, trainable, extra in (
        ("sync_batchnorm", False, {"sync_batchnorm": True}),
        ("plugin", True, {"plugins": [SyncBatchNormPlugin(idle_gloo_loop=False)]}),
    ):
        module = LitNet(trainable=trainable)
        frozen = {name: module.net.get_submodule(name) for name in FROZEN}
        before = _frozen_state(module.net)
        quiet_trainer(**common, **extra).fit(module, train_dataloaders=_loader())
        after = _frozen_state(module.net)
        out[case] = all(torch.equal(after[k], v) for k, v in before.items()) and all(
            module.net.get_submodule(name) is layer for name, layer in frozen.items()
        )
    return out


@pytest.mark.ddp
@pytest.mark.slow
def test_lightning_ddp_fits_with_sync_batchnorm_leave_frozen_layers_alone():
    (result,) = run_distributed(_ddp_fits, 1)
    assert result == {"sync_batchnorm": True, "plugin": True}
