"""Every option of every config group under conf/ composes, and instantiates what it describes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import hydra
import lightning.pytorch as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bn_lightning.app.schemas import BatchNormPolicyConfig
from bn_lightning.app.train import instantiate_callbacks, instantiate_loggers
from bn_lightning.callbacks import BatchNormFreeze, BatchNormGap, BatchNormMonitor, PreciseBN, RunningStatDrift
from bn_lightning.layers import SyncBatchNorm, get_batchnorm_class
from bn_lightning.module import BatchNormModule
from bn_lightning.policy import BatchNormPolicy, FreezePolicy, PreciseBNPolicy
from tests.helpers.app import QUICK_RUN

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def options(group: str) -> list[str]:
    """The options of a config group: the yaml files in conf/<group>/."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_config(output_dir: Path | str, overrides: tuple[str, ...] = (), hydra_config: bool = False) -> DictConfig:
    """Compose conf/config.yaml with ``overrides``, writing under ``output_dir`` instead of Hydra's run dir."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"output_dir={output_dir}", *overrides], return_hydra_config=hydra_config)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> DictConfig:
    """The default config, composed once for the tests that only read it."""
    return compose_config(tmp_path_factory.mktemp("run"))


def test_groups_have_the_expected_options() -> None:
    assert {"digits", "synthetic"} <= set(options("data"))
    assert {"cnn", "mlp", "resnet20"} <= set(options("model"))
    assert set(options("bn")) == {"frozen", "ghost", "renorm", "scratch", "sync", "torch"}
    bn_callbacks = {"bn_monitor", "bn_drift", "precise_bn", "bn_gap", "bn_freeze"}
    assert {"default", "none", *bn_callbacks} <= set(options("callbacks"))
    assert {"default", "ddp"} <= set(options("trainer"))
    assert {"csv", "many", "tensorboard", "wandb"} <= set(options("logger"))
    assert options("experiment"), "conf/experiment/ needs at least one example"
    assert options("hydra") == ["default"]


def test_default_config(cfg: DictConfig) -> None:
    assert cfg.data._target_ == "bn_lightning.app.data.DigitsDataModule"
    assert cfg.model._target_ == "bn_lightning.app.models.SmallCNN"
    assert cfg.model.norm == "torch"  # models are built with torch BN; the module converts them to bn.impl
    assert cfg.bn.impl == "torch" and cfg.module._target_ == "bn_lightning.module.BatchNormModule"
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    assert cfg.seed == 42 and cfg.ckpt_path is None and cfg.task_name == "train"
    assert cfg.module.scheduler.T_max == cfg.trainer.max_epochs
    OmegaConf.resolve(cfg)  # every interpolation resolves


def test_hydra_run_dir(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ("task_name=demo",), hydra_config=True)
    assert cfg.hydra.run.dir.startswith("outputs/demo/runs/")
    assert cfg.hydra.sweep.dir.startswith("outputs/demo/multiruns/")
    # resolves only inside a real run, where hydra.runtime.output_dir is set
    raw = OmegaConf.to_container(cfg.hydra.job_logging, resolve=False)
    assert raw["handlers"]["file"]["filename"] == "${hydra.runtime.output_dir}/${task_name}.log"


@pytest.mark.parametrize("data", options("data"))
def test_data_instantiates(tmp_path: Path, data: str) -> None:
    cfg = compose_config(tmp_path, (f"data={data}",))
    dm = hydra.utils.instantiate(cfg.data)
    assert isinstance(dm, pl.LightningDataModule)
    # data_info, which the model configs read, must describe what the datamodule yields
    assert dm.num_classes == cfg.data_info.num_classes
    assert tuple(dm.input_shape) == tuple(cfg.data_info.input_shape)
    assert cfg.data_info.in_channels == dm.input_shape[0]
    assert cfg.data_info.in_features == torch.Size(dm.input_shape).numel()


def expected_bn_class(impl: str, layer: nn.Module) -> type[nn.Module]:
    return SyncBatchNorm if impl == "sync" else get_batchnorm_class(impl, 1 if isinstance(layer, nn.BatchNorm1d) else 2)


@pytest.mark.parametrize("bn", options("bn"))
@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("data", options("data"))
def test_model_instantiates_for_every_data(tmp_path: Path, data: str, model: str, bn: str) -> None:
    cfg = compose_config(tmp_path, (f"data={data}", f"model={model}", f"bn={bn}"))
    net = hydra.utils.instantiate(cfg.model)
    assert isinstance(net, nn.Module)
    built = {name: m for name, m in net.named_modules() if isinstance(m, _BatchNorm)}
    assert built, f"{model} has no BatchNorm layer"
    assert all(type(m).__module__.startswith("torch.nn") for m in built.values())  # one path: torch BN, then convert
    module = hydra.utils.instantiate(cfg.module, net=net, bn_policy=cfg.bn)
    for name, layer in built.items():
        assert type(net.get_submodule(name)) is expected_bn_class(cfg.bn.impl, layer), name
    x = torch.randn(4, *cfg.data_info.input_shape)
    assert module(x).shape == (4, cfg.data_info.num_classes)


@pytest.mark.parametrize("bn", options("bn"))
def test_bn_option_is_a_valid_policy(tmp_path: Path, bn: str) -> None:
    cfg = compose_config(tmp_path, (f"bn={bn}",))
    assert OmegaConf.get_type(cfg.bn) is BatchNormPolicyConfig  # typed by the registered `bn_lightning/bn` option
    policy = BatchNormPolicy.from_config(cfg.bn)
    if bn == "frozen":  # fine-tuning style: torch BN, frozen half way through the default 10 epochs
        assert policy.impl == "torch" and policy.freeze is not None and policy.freeze.freeze_at_epoch == 5
    else:
        assert policy.impl == cfg.bn.impl == bn
    # every key has a comment; block headers (a key with nothing after the colon) may go without
    for line in (CONF_DIR / "bn" / f"{bn}.yaml").read_text().splitlines():
        if re.match(r"^\s*(- )?\w+:\s*\S", line) and "defaults" not in line:
            assert "#" in line, f"bn/{bn}.yaml: no comment on {line.strip()!r}"


def test_bn_policy_overrides(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ("bn=ghost", "bn.options.virtual_batch_size=8", "bn.momentum=0.01"))
    assert BatchNormPolicy.from_config(cfg.bn) == BatchNormPolicy(
        impl="ghost", options={"virtual_batch_size": 8}, momentum=0.01
    )
    # the nested policies are off until one of their fields is set
    assert BatchNormPolicy.from_config(compose_config(tmp_path).bn).precise_bn is None
    cfg = compose_config(tmp_path, ("bn.precise_bn.num_batches=5", "bn.freeze.freeze_at_step=3"))
    policy = BatchNormPolicy.from_config(cfg.bn)
    assert policy.precise_bn == PreciseBNPolicy(num_batches=5) and policy.freeze == FreezePolicy(freeze_at_step=3)
    cfg = compose_config(tmp_path, ("bn=frozen", "bn.freeze=null", "bn.precise_bn.enabled=true"))
    policy = BatchNormPolicy.from_config(cfg.bn)
    assert policy.freeze is None and policy.precise_bn == PreciseBNPolicy()


@pytest.mark.parametrize(
    ("override", "key"),
    [("bn.momentun=0.1", "momentun"), ("bn.momentum=[0.1]", "bn.momentum"), ("bn.freeze.at_epok=1", "at_epok")],
)
def test_bn_typo_or_type_fails_at_composition(tmp_path: Path, override: str, key: str) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(tmp_path, (override,))
    assert key in str(err.value) + str(err.value.__cause__)


def test_unknown_bn_option_lists_the_real_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(tmp_path, ("bn=sinc",))
    message = str(err.value)
    assert "sinc" in message and all(o in message for o in options("bn")) and "base_policy" not in message


@pytest.mark.parametrize(
    ("override", "error", "match"),
    [
        ("bn.impl=gost", ValueError, r"impl.*'gost'.*expected one of \['frozen', 'ghost', 'renorm', 'scratch', 'sync'"),
        ("bn.momentum=2", ValueError, r"momentum must be a number >= 0 and <= 1, got 2"),
        ("bn.momentum=fast", ValueError, r"momentum must be a number >= 0 and <= 1, 'cumulative' .* got 'fast'"),
        ("bn.eps=0", ValueError, r"eps must be"),
        ("bn.precise_bn.when=sometimes", ValueError, r"when must be one of"),
    ],
)
def test_bad_bn_values_raise_naming_the_key(tmp_path: Path, override: str, error: type, match: str) -> None:
    """Values a type cannot judge fail when the policy is built, the first thing train() does."""
    cfg = compose_config(tmp_path, (override,))
    with pytest.raises(error, match=match):
        BatchNormPolicy.from_config(cfg.bn)


@pytest.mark.parametrize("bn", ["torch", "scratch"])
def test_bn_momentum_cumulative_reaches_the_layers(tmp_path: Path, bn: str) -> None:
    """`bn.momentum=cumulative` is torch's momentum=None: every BN layer averages all batches equally."""
    from bn_lightning.app.train import train

    cfg = compose_config(tmp_path, (*QUICK_RUN, f"bn={bn}", "bn.momentum=cumulative", "model=cnn"))
    _, objects = train(cfg)
    bns = [m for m in objects["model"].modules() if isinstance(m, _BatchNorm)]
    assert bns and all(m.momentum is None for m in bns)
    assert all(int(m.num_batches_tracked) == 2 for m in bns)  # QUICK_RUN: 2 training batches
    assert objects["module"].hparams.bn_policy["momentum"] == "cumulative"
    # the default keeps each layer's momentum; a number sets it
    for override, expected in (((), 0.1), (("bn.momentum=1",), 1.0)):
        cfg = compose_config(tmp_path, (f"bn={bn}", "model=cnn", *override))
        module = hydra.utils.instantiate(cfg.module, net=hydra.utils.instantiate(cfg.model), bn_policy=cfg.bn)
        assert {m.momentum for m in module.modules() if isinstance(m, _BatchNorm)} == {expected}


def test_bad_bn_option_value_raises_naming_the_key(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ("bn=ghost", "bn.options.virtual_batch_size=0"))
    with pytest.raises(ValueError, match=r"options: .*virtual_batch_size must be an int >= 1, got 0"):
        BatchNormPolicy.from_config(cfg.bn)


def test_misspelt_option_exits_without_traceback(tmp_path: Path) -> None:
    script = CONF_DIR.parent / "scripts" / "train.py"
    result = subprocess.run([sys.executable, str(script), "bn=sinc"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0
    assert "Could not find 'bn/sinc'" in result.stderr and "Traceback" not in result.stderr
    assert "base_policy" not in result.stderr


def test_module_instantiates(cfg: DictConfig) -> None:
    net = hydra.utils.instantiate(cfg.model)
    module = hydra.utils.instantiate(cfg.module, net=net, bn_policy=cfg.bn)
    assert isinstance(module, BatchNormModule) and module.net is net
    assert module.hparams.bn_policy == BatchNormPolicy.from_config(cfg.bn).to_dict()
    assert isinstance(module.criterion, nn.CrossEntropyLoss)
    opt_cfg = module.configure_optimizers()
    optimizer, scheduler = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["lr"] == cfg.module.optimizer.lr
    # bn.no_weight_decay: BN gamma/beta in a group of their own, without weight decay
    assert [g["weight_decay"] for g in optimizer.param_groups] == [cfg.module.optimizer.weight_decay, 0.0]
    assert isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert scheduler.T_max == cfg.trainer.max_epochs


def test_module_without_scheduler(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ("module.scheduler=null",))
    module = hydra.utils.instantiate(cfg.module, net=hydra.utils.instantiate(cfg.model), bn_policy=cfg.bn)
    assert isinstance(module.configure_optimizers(), torch.optim.SGD)


@pytest.mark.parametrize("callbacks", options("callbacks"))
def test_callbacks_instantiate(tmp_path: Path, callbacks: str) -> None:
    cfg = compose_config(tmp_path, (f"callbacks={callbacks}",))
    objs = instantiate_callbacks(cfg.callbacks)
    assert all(isinstance(cb, pl.Callback) for cb in objs)
    if callbacks == "default":
        ckpt = next(cb for cb in objs if isinstance(cb, ModelCheckpoint) and cb.monitor)
        assert Path(ckpt.dirpath) == tmp_path / "checkpoints"
        assert ckpt.monitor == "val/acc" and ckpt.mode == "max"
        assert any(isinstance(cb, LearningRateMonitor) for cb in objs)
        assert any(isinstance(cb, BatchNormMonitor) for cb in objs)  # the training script watches BN by default
        assert any(isinstance(cb, RunningStatDrift) for cb in objs)
    if callbacks == "none":
        assert objs == []
    single = {"bn_monitor": BatchNormMonitor, "bn_drift": RunningStatDrift, "precise_bn": PreciseBN}
    single |= {"bn_gap": BatchNormGap, "bn_freeze": BatchNormFreeze}
    if callbacks in single:
        assert [type(cb) for cb in objs] == [single[callbacks]]


@pytest.mark.parametrize("callbacks", ["bn_monitor", "bn_drift", "precise_bn", "bn_gap", "bn_freeze"])
def test_bn_callback_file_starts_from_the_registered_node(callbacks: str) -> None:
    """No second copy of the defaults: the file only places the `bn_lightning/callbacks` option."""
    text = (CONF_DIR / "callbacks" / f"{callbacks}.yaml").read_text()
    keys = [line for line in text.splitlines() if line and not line.startswith(("#", " ", "defaults:"))]
    assert keys == [] and f"- /bn_lightning/callbacks@{callbacks}: " in text


def test_callback_can_be_dropped(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ("callbacks.lr_monitor=null", "callbacks.bn_drift=null"))
    kept = {type(cb) for cb in instantiate_callbacks(cfg.callbacks)}
    assert BatchNormMonitor in kept and not kept & {LearningRateMonitor, RunningStatDrift}


LOGGER_TYPES = {
    "csv": [CSVLogger],
    "tensorboard": [TensorBoardLogger],
    "wandb": [WandbLogger],
    "many": [CSVLogger, TensorBoardLogger],
}


@pytest.mark.parametrize("logger", options("logger"))
def test_loggers_instantiate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logger: str) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose_config(tmp_path, (f"logger={logger}",))
    objs = instantiate_loggers(cfg.logger)
    assert [type(lg) for lg in objs] == LOGGER_TYPES[logger]
    for lg in objs:
        assert Path(lg.save_dir).is_relative_to(tmp_path)
    if logger == "wandb":
        assert cfg.logger.wandb.offline is True


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_instantiates(tmp_path: Path, trainer: str) -> None:
    if "gpu" in trainer and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    cfg = compose_config(tmp_path, (f"trainer={trainer}",))
    obj = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert isinstance(obj, pl.Trainer)
    assert obj.max_epochs == cfg.trainer.max_epochs
    if trainer == "ddp":
        assert obj.num_devices == 2 and type(obj.strategy).__name__ == "DDPStrategy"


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_composes(tmp_path: Path, experiment: str) -> None:
    cfg = compose_config(tmp_path, (f"experiment={experiment}",))
    assert cfg.task_name == experiment  # each experiment writes to outputs/<its name>/
    OmegaConf.resolve(cfg)
    net = hydra.utils.instantiate(cfg.model)
    assert net(torch.randn(2, *cfg.data_info.input_shape)).shape == (2, cfg.data_info.num_classes)


def test_bn_sync_adds_the_plugin_to_the_trainer(tmp_path: Path) -> None:
    from bn_lightning.plugins import SyncBatchNormPlugin

    cfg = compose_config(tmp_path, ("bn=sync", "trainer=ddp"))
    assert cfg.bn.impl == "sync"  # the module converts; the plugin points the layers at its process group under DDP
    plugin = hydra.utils.instantiate(cfg.trainer.plugins)
    assert isinstance(plugin, SyncBatchNormPlugin) and plugin.group_size is None
