"""Training from a composed Hydra config, callable without the command line.

Provides :func:`train` (``cfg -> (metrics, objects)``, what tests call), :func:`train_and_report` (``train`` plus a
printed summary; what ``scripts/train.py`` calls) and the helpers :func:`instantiate_callbacks` and
:func:`instantiate_loggers`. The config layout is the one under ``conf/``: ``data``, ``model`` (the network), ``bn``
(the BatchNorm policy, :class:`bn_lightning.policy.BatchNormPolicy`), ``module`` (the LightningModule around the
network, which applies the policy), ``callbacks``, ``logger`` and ``trainer``. Importing this module imports
:mod:`bn_lightning.hydra`: the policy's schema (``bn/base_policy``, where the ``conf/bn`` files start from) is then
in Hydra's ConfigStore.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import bn_lightning.hydra  # noqa: F401  (registers the `bn/base_policy` schema the conf/bn files start from)
from bn_lightning.functional import set_kernel
from bn_lightning.policy import BatchNormPolicy

__all__ = ["instantiate_callbacks", "instantiate_loggers", "train", "train_and_report"]

log = logging.getLogger(__name__)


def _instantiate_group(cfg: DictConfig | None, what: str) -> list[Any]:
    """Instantiate every non-null entry of a ``name -> {_target_: ...}`` config, in order."""
    if cfg is None:
        return []
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"The {what} config must be a mapping of name -> config, got {type(cfg).__name__}")
    objects = []
    for name, entry in cfg.items():
        if entry is None:  # `callbacks.lr_monitor=null` drops one entry
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ValueError(f"{what} entry {name!r} must be a config with a `_target_`, got {entry!r}")
        log.info(f"Instantiating {what} {name} <{entry._target_}>")
        objects.append(hydra.utils.instantiate(entry))
    return objects


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    """Instantiate the callbacks in ``cfg`` (a mapping of name -> config with ``_target_``), skipping ``None`` entries.

    Args:
        cfg: the ``callbacks`` node of the config, or ``None``.

    Returns:
        The callbacks, in config order.

    Raises:
        TypeError: ``cfg`` is not a mapping.
        ValueError: an entry has no ``_target_``.

    Example::

        >>> from omegaconf import OmegaConf
        >>> cfg = OmegaConf.create({"lr": {"_target_": "lightning.pytorch.callbacks.LearningRateMonitor"}, "x": None})
        >>> [type(c).__name__ for c in instantiate_callbacks(cfg)]
        ['LearningRateMonitor']
    """
    return _instantiate_group(cfg, "callback")


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """Instantiate the loggers in ``cfg`` (a mapping of name -> config with ``_target_``), skipping ``None`` entries.

    Args:
        cfg: the ``logger`` node of the config, or ``None``.

    Returns:
        The loggers, in config order.

    Raises:
        TypeError: ``cfg`` is not a mapping.
        ValueError: an entry has no ``_target_``.

    Example::

        >>> from omegaconf import OmegaConf
        >>> cfg = OmegaConf.create({"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": "."}})
        >>> [type(lg).__name__ for lg in instantiate_loggers(cfg)]
        ['CSVLogger']
    """
    return _instantiate_group(cfg, "logger")


@rank_zero_only
def _log_hyperparameters(loggers: list[Logger], cfg: DictConfig, module: pl.LightningModule) -> None:
    """Send the resolved config and the parameter counts to every logger (once, from rank 0).

    The config goes under ``cfg``: Lightning adds the module's and the datamodule's hyperparameters at the top level
    when fitting starts, and the datamodule's ``seed`` would otherwise overwrite the global ``seed``.
    """
    if not loggers:
        return
    hparams = {
        "cfg": OmegaConf.to_container(cfg, resolve=True),
        "params": {
            "total": sum(p.numel() for p in module.parameters()),
            "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        },
    }
    for logger in loggers:
        logger.log_hyperparams(hparams)


def _finish_wandb(loggers: list[Logger]) -> None:
    """Close the wandb run so that a second ``train`` in the same process starts a new one."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Instantiate everything ``cfg`` describes and fit; the whole training run, without the command line.

    Steps: choose the BN kernel (``cfg.bn_kernel``, see :func:`bn_lightning.functional.set_kernel`), seed (if
    ``cfg.seed`` is set), then instantiate ``cfg.data`` (the datamodule), ``cfg.model`` (the network),
    ``cfg.module`` (the LightningModule, given the network as ``net`` and ``cfg.bn`` as ``bn_policy``: it converts
    the BN layers and adds the policy's callbacks), ``cfg.callbacks`` and ``cfg.logger`` (mappings of name -> config;
    ``None`` entries are skipped) and ``cfg.trainer``; log the resolved config to the loggers and call
    ``trainer.fit``, resuming from ``cfg.ckpt_path`` if it is set.

    Args:
        cfg: a config composed from ``conf/`` (``scripts/train.py`` or ``hydra.compose``).

    Returns:
        ``(metrics, objects)``: ``metrics`` maps each of ``trainer.callback_metrics`` (``val/acc``, ``val/loss``,
        ``train/loss``, ...) to a float, from the last epoch; ``objects`` holds ``cfg``, ``datamodule``, ``model`` (the
        network, its BN layers converted by the module), ``bn_policy``, ``module``, ``callbacks`` (the config's; the
        policy's own are in ``trainer.callbacks``), ``loggers`` and ``trainer``.
    """
    # the module validates the policy again; checking it first makes a bad `bn` fail before anything is built
    bn_policy = BatchNormPolicy.from_config(cfg.get("bn"))
    if cfg.get("bn_kernel") is not None:
        set_kernel(cfg.bn_kernel)  # "eager" or "compiled"; anything else raises before anything is built

    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    log.info(f"Instantiating datamodule <{cfg.data._target_}>")
    datamodule: pl.LightningDataModule = hydra.utils.instantiate(cfg.data)

    log.info(f"Instantiating model <{cfg.model._target_}>")
    model = hydra.utils.instantiate(cfg.model)

    log.info(f"Instantiating module <{cfg.module._target_}> with BN policy {bn_policy}")
    module: pl.LightningModule = hydra.utils.instantiate(cfg.module, net=model, bn_policy=cfg.get("bn"))

    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))

    log.info(f"Instantiating trainer <{cfg.trainer._target_}>")
    # no loggers -> False: Trainer(logger=None) would add a default logger of its own
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    objects = {
        "cfg": cfg,
        "datamodule": datamodule,
        "model": model,
        "bn_policy": bn_policy,
        "module": module,
        "callbacks": callbacks,
        "loggers": loggers,
        "trainer": trainer,
    }
    _log_hyperparameters(loggers, cfg, module)

    ckpt_path = cfg.get("ckpt_path")
    log.info("Starting training" + (f", resuming from {ckpt_path}" if ckpt_path else ""))
    try:
        trainer.fit(model=module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        _finish_wandb(loggers)

    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    return metrics, objects


def train_and_report(cfg: DictConfig) -> float | None:
    """Run :func:`train` and print where the run was written and the final ``val/acc`` (from rank 0 only).

    Args:
        cfg: a config composed from ``conf/``.

    Returns:
        The final ``val/acc`` (the value a Hydra sweeper would optimise), or ``None`` if validation never ran.
    """
    metrics, objects = train(cfg)
    trainer: pl.Trainer = objects["trainer"]
    val_acc = metrics.get("val/acc")
    log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask
    if trainer.is_global_zero:
        print(f"Run written to: {cfg.get('output_dir', trainer.default_root_dir)}")
        print(f"Logs written to: {log_dir}")
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_path:
            score = checkpoint.best_model_score
            detail = f" ({checkpoint.monitor} {float(score):.4f})" if checkpoint.monitor and score is not None else ""
            print(f"Best checkpoint: {checkpoint.best_model_path}{detail}")
        print("Final val/acc: " + ("n/a" if val_acc is None else f"{val_acc:.4f}"))
    return val_acc
