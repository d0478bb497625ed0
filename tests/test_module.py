"""BatchNormModule: the BN policy applied at construction, in configure_optimizers and configure_callbacks; training."""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import asdict
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bn_lightning.app.data import DigitsDataModule
from bn_lightning.callbacks import BatchNormFreeze, PreciseBN
from bn_lightning.callbacks.precise_bn import WHEN
from bn_lightning.layers import SyncBatchNorm, get_batchnorm_class
from bn_lightning.layers.frozen import FrozenBatchNormBase
from bn_lightning.module import BatchNormModule
from bn_lightning.policy import BatchNormPolicy, FreezePolicy, PreciseBNPolicy, impl_options
from tests.helpers.tiny import TinyBNNet

# one policy per implementation, with the options a digits batch of 32 makes sense for
POLICIES = {
    "torch": BatchNormPolicy(impl="torch"),
    "scratch": BatchNormPolicy(impl="scratch"),
    "sync": BatchNormPolicy(impl="sync"),  # one process: local BN
    "ghost": BatchNormPolicy(impl="ghost", options={"virtual_batch_size": 8}),
    "renorm": BatchNormPolicy(impl="renorm", options={"r_max": 2.0, "d_max": 1.0, "warmup_steps": 2}),
    "frozen": BatchNormPolicy(impl="frozen"),
}
BN_NAMES = ["net.features.1", "net.features.4", "net.head.1"]  # 2d, 2d, 1d in TinyBNNet


def tiny_net() -> TinyBNNet:
    """conv-BN2d x2 then Linear-BN1d, for (1, 8, 8) digits; built with torch's BN, as the configs build models."""
    return TinyBNNet(nn.BatchNorm2d, nn.BatchNorm1d, in_channels=1, num_classes=10)


def bn_layers(module: nn.Module) -> dict[str, nn.Module]:
    """Every BN layer, frozen ones (plain modules, not torch ``_BatchNorm``) included."""
    return {name: m for name, m in module.named_modules() if isinstance(m, _BatchNorm | FrozenBatchNormBase)}


def expected_class(impl: str, name: str) -> type[nn.Module]:
    return SyncBatchNorm if impl == "sync" else get_batchnorm_class(impl, 1 if name.startswith("net.head") else 2)


def fast_trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "limit_train_batches": 3,
        "limit_val_batches": 2,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        **kwargs,
    }
    return pl.Trainer(**options)


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=32)


# ---------------------------------------------------------------------------------------------- construction


@pytest.mark.parametrize("impl", list(POLICIES))
def test_layers_are_converted_at_construction(impl: str) -> None:
    net = tiny_net()
    weights = {name: layer.weight for name, layer in bn_layers(net).items()}
    module = BatchNormModule(net, bn_policy=POLICIES[impl], num_classes=10)
    layers = bn_layers(module)
    assert list(layers) == BN_NAMES
    assert module.net is net  # converted in place: the config's `model` object is the trained one
    for name, layer in layers.items():
        assert type(layer) is expected_class(impl, name), name
        # same tensors (frozen layers hold them as buffers)
        assert layer.weight.data_ptr() == weights[name.removeprefix("net.")].data_ptr()
    if impl == "ghost":
        assert all(layer.virtual_batch_size == 8 for layer in layers.values())
    if impl == "renorm":
        assert all((layer.r_max, layer.d_max, layer.warmup_steps) == (2.0, 1.0, 2) for layer in layers.values())


def test_default_policy_keeps_the_layers() -> None:
    net = TinyBNNet(get_batchnorm_class("scratch", 2), get_batchnorm_class("ghost", 1), in_channels=1, num_classes=10)
    before = {name: type(layer) for name, layer in bn_layers(net).items()}
    module = BatchNormModule(net)
    assert {name.removeprefix("net."): type(layer) for name, layer in bn_layers(module).items()} == before
    assert module.hparams.bn_policy == asdict(BatchNormPolicy()) and module.hparams.num_classes is None


def test_momentum_eps_include_exclude() -> None:
    policy = BatchNormPolicy(impl="scratch", momentum=0.01, eps=1e-3, include=["net.features.*"], exclude=["*.4"])
    module = BatchNormModule(tiny_net(), bn_policy=policy)
    layers = bn_layers(module)
    selected = layers["net.features.1"]
    assert type(selected) is get_batchnorm_class("scratch", 2)
    assert (selected.momentum, selected.eps) == (0.01, 1e-3)
    for name in ("net.features.4", "net.head.1"):  # left as built
        assert type(layers[name]).__module__.startswith("torch.")
        assert (layers[name].momentum, layers[name].eps) == (0.1, 1e-5)
    assert list(module.bn_layers()) == ["net.features.1"]


def test_momentum_and_eps_without_conversion() -> None:
    module = BatchNormModule(tiny_net(), bn_policy={"momentum": 0.3, "eps": 1e-4})
    assert all((layer.momentum, layer.eps) == (0.3, 1e-4) for layer in bn_layers(module).values())
    assert all(type(layer).__module__.startswith("torch.") for layer in bn_layers(module).values())


# ---------------------------------------------------------------------------------------------- hparams and inputs


def test_policy_as_dataclass_dict_or_dictconfig() -> None:
    policy = BatchNormPolicy(
        impl="ghost",
        options={"virtual_batch_size": 4},
        momentum=0.05,
        freeze=FreezePolicy(freeze_at_epoch=3, include=["net.features.*"]),
        precise_bn=PreciseBNPolicy(num_batches=7),
    )
    as_dict = asdict(policy)
    as_dict["impl"] = "Ghost_BatchNorm"  # an alias, stored under the canonical name
    as_dictconfig = OmegaConf.structured(policy)  # what Hydra's ConfigStore schema gives
    for given in (policy, as_dict, as_dictconfig, OmegaConf.create(as_dict)):
        module = BatchNormModule(tiny_net(), bn_policy=given)
        assert module.hparams.bn_policy == asdict(policy)
        assert module.bn_policy == policy
        # plain data, so loggers and torch.load(weights_only=True) take it
        assert type(module.hparams.bn_policy) is dict and type(module.hparams.bn_policy["freeze"]) is dict


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match=r"'layernorm'.*expected one of \['frozen', 'ghost', 'renorm', 'scratch'"):
        BatchNormPolicy(impl="layernorm")
    with pytest.raises(ValueError, match=r"impl.*'bogus'.*'renorm', 'scratch', 'sync', 'torch'"):
        BatchNormModule(tiny_net(), bn_policy={"impl": "bogus"})
    with pytest.raises(TypeError, match="impl"):
        BatchNormPolicy(impl=3)
    with pytest.raises(ValueError, match=r"\['virtual_batchsize'\] are not options of impl 'ghost'.*'virtual_batch"):
        BatchNormPolicy(impl="ghost", options={"virtual_batchsize": 8})
    with pytest.raises(ValueError, match="allowed: none"):
        BatchNormPolicy(impl="torch", options={"r_max": 3})
    with pytest.raises(ValueError, match="need an impl"):
        BatchNormPolicy(options={"virtual_batch_size": 8})
    with pytest.raises(ValueError, match=r"momentum must be a number >= 0 and <= 1, got 2"):
        BatchNormPolicy(momentum=2)
    with pytest.raises(ValueError, match="eps must be a number > 0"):
        BatchNormPolicy(eps=0.0)
    with pytest.raises(TypeError, match="include must be None or a list"):
        BatchNormPolicy(include="net.*")
    with pytest.raises(TypeError, match="no_weight_decay"):
        BatchNormPolicy(no_weight_decay="yes")
    with pytest.raises(ValueError, match=r"unknown keys \['momentun'\]; allowed keys are \['impl'"):
        BatchNormPolicy.from_config({"momentun": 0.1})
    with pytest.raises(ValueError, match=r"freeze has unknown keys \['epoch'\]"):
        BatchNormPolicy(freeze={"epoch": 3})
    with pytest.raises(ValueError, match="at most one of freeze_at_epoch"):
        BatchNormPolicy(freeze={"freeze_at_epoch": 3, "freeze_at_step": 10})
    with pytest.raises(ValueError, match="unfreeze_at_epoch must be greater"):
        FreezePolicy(freeze_at_epoch=3, unfreeze_at_epoch=2)
    with pytest.raises(ValueError, match=r"when must be one of \('before_validation', 'epoch_end', 'fit_end'\)"):
        BatchNormPolicy(precise_bn={"when": "sometimes"})
    with pytest.raises(ValueError, match="num_batches must be an int >= 1"):
        PreciseBNPolicy(num_batches=0)
    with pytest.raises(TypeError, match="bn_policy|BatchNormPolicy must be"):
        BatchNormModule(tiny_net(), bn_policy="torch")


def test_impl_options() -> None:
    assert impl_options("ghost") == ["virtual_batch_size"]
    assert impl_options("renorm") == ["d_max", "r_max", "sync", "warmup_steps"]
    assert impl_options("torch") == impl_options("scratch") == impl_options("sync") == impl_options("frozen") == []


def test_nested_policies_are_the_callbacks_arguments() -> None:
    # the policy's fields ARE the callbacks' arguments: asdict(policy) builds the callback
    freeze = FreezePolicy(freeze_at_step=4, include=["net.*"], exclude=["net.head.*"], freeze_affine=True)
    callback = BatchNormFreeze(**asdict(freeze))
    assert {name: getattr(callback, name) for name in asdict(freeze)} == asdict(freeze)
    precise = PreciseBNPolicy(num_batches=7, when="epoch_end", every_n_epochs=3)
    callback = PreciseBN(**asdict(precise))
    assert {name: getattr(callback, name) for name in asdict(precise)} == asdict(precise)
    # the defaults agree too
    for policy_cls, callback_cls in ((FreezePolicy, BatchNormFreeze), (PreciseBNPolicy, PreciseBN)):
        defaults = inspect.signature(callback_cls.__init__).parameters
        assert {name: defaults[name].default for name in asdict(policy_cls())} == asdict(policy_cls())
    # one list of PreciseBN's `when` choices
    assert {PreciseBNPolicy(when=when).when for when in WHEN} == set(WHEN)


def test_module_argument_validation() -> None:
    with pytest.raises(TypeError, match="`net` must be an nn.Module"):
        BatchNormModule("resnet")
    with pytest.raises(ValueError, match="`num_classes` must be None or an integer >= 2"):
        BatchNormModule(tiny_net(), num_classes=1)
    with pytest.raises(TypeError, match="`loss` must be callable"):
        BatchNormModule(tiny_net(), loss="cross_entropy")
    with pytest.raises(TypeError, match="`optimizer` must be callable"):
        BatchNormModule(tiny_net(), optimizer={"lr": 0.1})
    # a layer the implementation lacks: ghost BN has no 3d layer
    net3d = nn.Sequential(nn.Conv3d(1, 2, 1), nn.BatchNorm3d(2))
    with pytest.raises(ValueError, match="Cannot convert BN layer 'net.1'"):
        BatchNormModule(net3d, bn_policy={"impl": "ghost"})


# ---------------------------------------------------------------------------------------------- optimizer


def _groups_by_param(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}


def test_no_weight_decay_groups_use_the_partials_value() -> None:
    sgd = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3)
    module = BatchNormModule(tiny_net(), bn_policy={"impl": "scratch"}, optimizer=sgd)
    optimizer = module.configure_optimizers()
    decay = _groups_by_param(optimizer)
    bn_params = {id(p) for layer in bn_layers(module).values() for p in layer.parameters(recurse=False)}
    assert len(bn_params) == 6 and set(decay) == {id(p) for p in module.parameters()}
    for pid, wd in decay.items():
        assert wd == (0.0 if pid in bn_params else 1e-3)
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(decay) - 6, 6]


def test_no_weight_decay_off_gives_one_group() -> None:
    sgd = functools.partial(torch.optim.SGD, lr=0.1, weight_decay=1e-3)
    module = BatchNormModule(tiny_net(), bn_policy={"no_weight_decay": False}, optimizer=sgd)
    optimizer = module.configure_optimizers()
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == 1e-3


def test_no_weight_decay_with_optimizer_defaults() -> None:
    # the partial does not say: the optimizer's own default (AdamW: 0.01) applies to the decayed group
    module = BatchNormModule(tiny_net(), optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    assert [g["weight_decay"] for g in module.configure_optimizers().param_groups] == [0.01, 0.0]
    # no factory: default_optimizer, SGD with weight decay 5e-4
    assert [g["weight_decay"] for g in BatchNormModule(tiny_net()).configure_optimizers().param_groups] == [5e-4, 0.0]
    # frozen BN has no parameters: the empty group is dropped
    frozen = BatchNormModule(tiny_net(), bn_policy={"impl": "frozen"})
    assert [g["weight_decay"] for g in frozen.configure_optimizers().param_groups] == [5e-4]


def test_scheduler_is_built_on_the_grouped_optimizer() -> None:
    sched = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1)
    config = BatchNormModule(tiny_net(), scheduler=sched).configure_optimizers()
    assert len(config["optimizer"].param_groups) == 2
    assert config["lr_scheduler"] == {"scheduler": config["lr_scheduler"]["scheduler"], "interval": "epoch"}


# ---------------------------------------------------------------------------------------------- callbacks


def test_configure_callbacks() -> None:
    freeze_mod = pytest.importorskip("bn_lightning.callbacks.freeze")
    precise_mod = pytest.importorskip("bn_lightning.callbacks.precise_bn")
    assert BatchNormModule(tiny_net()).configure_callbacks() == []

    policy = {
        "freeze": {"freeze_at_epoch": 2, "include": ["net.features.*"], "freeze_affine": True, "unfreeze_at_epoch": 4},
        "precise_bn": {"num_batches": 20, "when": "epoch_end", "every_n_epochs": 2},
    }
    module = BatchNormModule(tiny_net(), bn_policy=policy)
    freeze, precise = module.configure_callbacks()
    assert isinstance(freeze, freeze_mod.BatchNormFreeze)
    assert (freeze.freeze_at_epoch, freeze.freeze_at_step, freeze.include, freeze.exclude) == (
        2,
        None,
        ["net.features.*"],
        None,
    )
    assert freeze.freeze_affine and freeze.unfreeze_at_epoch == 4
    assert isinstance(precise, precise_mod.PreciseBN)
    assert (precise.num_batches, precise.when, precise.every_n_epochs) == (20, "epoch_end", 2)
    assert module.configure_callbacks()[0] is not freeze  # fresh ones each fit

    only_freeze = BatchNormModule(tiny_net(), bn_policy={"freeze": {"freeze_at_step": 10}}).configure_callbacks()
    assert [type(cb) for cb in only_freeze] == [freeze_mod.BatchNormFreeze]


def test_policy_callbacks_join_the_fit(tmp_path: Path, digits: DigitsDataModule) -> None:
    freeze_mod = pytest.importorskip("bn_lightning.callbacks.freeze")
    precise_mod = pytest.importorskip("bn_lightning.callbacks.precise_bn")
    # the features freeze at step 2; PreciseBN recalibrates the layers still training (the head) before validation
    freeze_features = FreezePolicy(freeze_at_step=2, include=["net.features.*"])
    policy = BatchNormPolicy(impl="scratch", freeze=freeze_features, precise_bn=PreciseBNPolicy(num_batches=2))
    module = BatchNormModule(tiny_net(), bn_policy=policy, num_classes=10)
    trainer = fast_trainer(tmp_path)
    trainer.fit(module, datamodule=digits)
    freeze = next(cb for cb in trainer.callbacks if isinstance(cb, freeze_mod.BatchNormFreeze))
    precise = next(cb for cb in trainer.callbacks if isinstance(cb, precise_mod.PreciseBN))
    assert freeze.frozen and freeze.frozen_step == 2 and sorted(freeze.layer_names) == BN_NAMES[:2]
    assert precise.runs == 1 and precise.last_info["layers"] == ["net.head.1"]  # before the one validation
    assert math.isfinite(trainer.callback_metrics["val/loss"])


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("impl", list(POLICIES))
def test_trains_on_digits_with_each_impl(tmp_path: Path, digits: DigitsDataModule, impl: str) -> None:
    torch.manual_seed(0)
    policy = POLICIES[impl]
    module = BatchNormModule(tiny_net(), bn_policy=policy, num_classes=10)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    trainer = fast_trainer(tmp_path)
    trainer.fit(module, datamodule=digits)

    assert trainer.global_step == 3
    metrics = trainer.callback_metrics
    assert {"train/loss_step", "train/loss_epoch", "train/acc", "val/loss", "val/acc"} <= set(metrics)
    assert math.isfinite(metrics["val/loss"]) and 0.0 <= float(metrics["val/acc"]) <= 1.0
    assert module.hparams.bn_policy == asdict(policy) and module.hparams.num_classes == 10
    for name, layer in bn_layers(module).items():
        assert type(layer) is expected_class(impl, name), name  # no plugin in one process: classes stay
        if impl != "frozen":  # the statistics were updated, the affine parameters trained
            assert not torch.equal(layer.running_mean, torch.zeros_like(layer.running_mean))
            assert not torch.equal(layer.weight, before[f"{name}.weight"])
        else:
            assert torch.equal(layer.running_mean, torch.zeros_like(layer.running_mean))


def test_custom_loss_and_no_accuracy(tmp_path: Path, digits: DigitsDataModule) -> None:
    calls = []

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(logits.shape)
        return F.cross_entropy(logits, y, label_smoothing=0.1)

    module = BatchNormModule(tiny_net(), loss=loss)  # no num_classes: not logged as a classification
    trainer = fast_trainer(tmp_path, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(module, datamodule=digits)
    assert len(calls) == 2 and "val/loss" in trainer.callback_metrics
    assert not any(key.endswith("/acc") for key in trainer.callback_metrics)

    smoothed = BatchNormModule(tiny_net(), loss=nn.CrossEntropyLoss(label_smoothing=0.2), num_classes=10)
    assert isinstance(smoothed.criterion, nn.CrossEntropyLoss) and "loss" not in smoothed.hparams


def test_checkpoint_rebuilds_the_policy(tmp_path: Path, digits: DigitsDataModule) -> None:
    policy = BatchNormPolicy(impl="ghost", options={"virtual_batch_size": 8}, momentum=0.2)
    module = BatchNormModule(tiny_net(), bn_policy=policy, num_classes=10)
    trainer = fast_trainer(tmp_path, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(module, datamodule=digits)
    path = tmp_path / "ghost.ckpt"
    trainer.save_checkpoint(path)
    # plain data only: torch's default weights_only loading works
    assert torch.load(path, weights_only=True)["hyper_parameters"]["bn_policy"] == asdict(policy)
    loaded = BatchNormModule.load_from_checkpoint(path, net=tiny_net())
    assert loaded.bn_policy == policy
    for (name, layer), original in zip(bn_layers(loaded).items(), bn_layers(module).values(), strict=True):
        assert type(layer) is expected_class("ghost", name) and layer.momentum == 0.2
        assert torch.equal(layer.running_mean, original.running_mean)
