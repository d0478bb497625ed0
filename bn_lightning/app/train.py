"""Training from a composed Hydra config, callable without the command line.

Provides :func:`train` (``cfg -> (metrics, objects)``, what tests call; :func:`build` then :func:`fit`),
:func:`train_and_report` (``train`` plus a printed summary), :func:`main` (the command line: ``scripts/train.py``, the
``bn-train`` console script and ``python -m bn_lightning.app.train`` all call it), :func:`config_dir` (where ``conf/``
is), :func:`check_config` (the checks made before anything is built), :class:`RankFilter` (tags log records with the
global rank) and the helpers :func:`instantiate_callbacks` and :func:`instantiate_loggers`. The config layout is the one
under ``conf/``: ``data``, ``model`` (the network), ``bn`` (the BatchNorm policy,
:class:`bn_lightning.policy.BatchNormPolicy`), ``module`` (the LightningModule around the network, which applies the
policy), ``callbacks``, ``logger`` and ``trainer``. Importing this module imports :mod:`bn_lightning.hydra`, which
registers the ``bn_lightning/*`` configs the ``conf/bn`` and ``conf/callbacks`` files start from.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.errors import InstantiationException
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from omegaconf import DictConfig, ListConfig, OmegaConf

import bn_lightning.hydra  # noqa: F401  (registers the bn_lightning/* configs that conf/ starts from)
from bn_lightning.functional import set_kernel
from bn_lightning.policy import BatchNormPolicy
from bn_lightning.validation import check_bool, check_int

__all__ = [
    "RankFilter",
    "build",
    "check_config",
    "config_dir",
    "fit",
    "instantiate_callbacks",
    "instantiate_loggers",
    "main",
    "train",
    "train_and_report",
]

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


# Trainer arguments whose type check_config() verifies before anything is built: name -> (minimum, optional).
_TRAINER_INTS = {
    "max_epochs": (-1, True),
    "min_epochs": (0, True),
    "max_steps": (-1, False),
    "num_nodes": (1, False),
    "num_sanity_val_steps": (-1, True),
    "check_val_every_n_epoch": (1, True),
    "log_every_n_steps": (1, True),
    "accumulate_grad_batches": (1, False),
}
_TRAINER_BOOLS = ("enable_progress_bar", "enable_model_summary", "enable_checkpointing", "sync_batchnorm")
_TRAINER_FRACTIONS = ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches")
# values of Trainer.fit(ckpt_path=...) that name a checkpoint Lightning finds itself
_CKPT_ALIASES = ("last", "best", "hpc", "registry")


def _check_fraction(name: str, value: Any) -> None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return
    raise ValueError(f"{name} must be None, an int >= 0 (batches) or a float in [0, 1] (a fraction), got {value!r}")


def check_config(cfg: DictConfig) -> None:
    """Check what would otherwise fail only after the model and the run's files were built.

    The basic types of the ``trainer`` node's counts, fractions and switches (``trainer.max_epochs=abc`` names the key
    here, where Lightning would end in a bare ``AssertionError``), and that ``ckpt_path``, if set, is a file (or one
    of Lightning's names ``last``, ``best``, ``hpc``, ``registry``, or a remote URL).

    Args:
        cfg: a config composed from ``conf/``.

    Raises:
        ValueError: a trainer count or fraction is not an int/float in range, or ``ckpt_path`` is not a file.
        TypeError: a trainer switch is not ``True``/``False``.

    Example::

        >>> from omegaconf import OmegaConf
        >>> check_config(OmegaConf.create({"trainer": {"max_epochs": "abc"}}))
        Traceback (most recent call last):
        ...
        ValueError: trainer.max_epochs must be None or an int >= -1, got 'abc'
    """
    trainer = cfg.get("trainer")
    if isinstance(trainer, DictConfig):
        for name, (minimum, optional) in _TRAINER_INTS.items():
            if name in trainer:
                check_int("", f"trainer.{name}", trainer[name], minimum, optional=optional)
        for name in _TRAINER_BOOLS:
            if name in trainer:
                check_bool("", f"trainer.{name}", trainer[name])
        for name in _TRAINER_FRACTIONS:
            if name in trainer:
                _check_fraction(f"trainer.{name}", trainer[name])
        devices = trainer.get("devices")
        ok_devices = isinstance(devices, str | ListConfig | list) or (
            isinstance(devices, int) and not isinstance(devices, bool) and (devices >= 1 or devices == -1)
        )
        if "devices" in trainer and not ok_devices:
            raise ValueError(
                f"trainer.devices must be an int >= 1, -1, 'auto' or a list of device ids, got {devices!r}"
            )
    if "report" in cfg:
        check_bool("", "report", cfg.get("report"))
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None:
        if not isinstance(ckpt_path, str):
            raise TypeError(f"ckpt_path must be a path (str) or null, got {ckpt_path!r}")
        if ckpt_path not in _CKPT_ALIASES and "://" not in ckpt_path and not Path(ckpt_path).is_file():
            raise ValueError(
                f"ckpt_path={ckpt_path} is not a file: give a checkpoint such as <run dir>/checkpoints/last.ckpt, "
                f"one of {_CKPT_ALIASES}, or null"
            )


def _available_cores() -> int | None:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count()


def _warn_about_launch(trainer: pl.Trainer, bn_policy: BatchNormPolicy) -> None:
    """Warn (once, from rank 0) about launches that run but not as the config suggests."""
    if bn_policy.impl == "sync" and trainer.world_size == 1:
        rank_zero_warn(
            "bn=sync in a single process: there is no peer to synchronise with, so SyncBatchNorm normalises like "
            "plain BatchNorm. Launch several processes (e.g. trainer=ddp trainer.devices=2) to synchronise."
        )
    cores = _available_cores()
    if isinstance(trainer.accelerator, CPUAccelerator) and cores and trainer.num_devices > cores:
        rank_zero_warn(
            f"trainer.devices={trainer.num_devices} CPU processes on {cores} CPU core(s): the processes compete "
            "for the cores and the collectives wait on the slowest; use at most one process per core."
        )


def build(cfg: DictConfig) -> dict[str, Any]:
    """Check ``cfg`` and instantiate everything it describes, up to the Trainer; nothing is trained.

    Steps: check the trainer's basic types and ``ckpt_path`` (:func:`check_config`), validate the BN policy, choose
    the BN kernel (``cfg.bn_kernel``, see :func:`bn_lightning.functional.set_kernel`), seed (if ``cfg.seed`` is set),
    then instantiate ``cfg.data`` (the datamodule), ``cfg.model`` (the network), ``cfg.module`` (the
    LightningModule, given the network as ``net`` and ``cfg.bn`` as ``bn_policy``: it converts the BN layers and adds
    the policy's callbacks), ``cfg.callbacks`` and ``cfg.logger`` (mappings of name -> config; ``None`` entries are
    skipped) and ``cfg.trainer``; warn about a launch that does not do what the config suggests (``bn=sync`` in one
    process, more CPU processes than cores). Every bad config value raises here (``ValueError``, ``TypeError`` or
    Hydra's ``InstantiationException``), which is why :func:`main` reports errors of this phase in one line.

    Args:
        cfg: a config composed from ``conf/`` (``scripts/train.py`` or ``hydra.compose``).

    Returns:
        ``cfg``, ``datamodule``, ``model`` (the network, its BN layers converted by the module), ``bn_policy``,
        ``module``, ``callbacks`` (the config's; the policy's own are in ``trainer.callbacks``), ``loggers`` and
        ``trainer``, by name.
    """
    check_config(cfg)
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
    _warn_about_launch(trainer, bn_policy)
    return {
        "cfg": cfg,
        "datamodule": datamodule,
        "model": model,
        "bn_policy": bn_policy,
        "module": module,
        "callbacks": callbacks,
        "loggers": loggers,
        "trainer": trainer,
    }


def fit(objects: dict[str, Any]) -> dict[str, float]:
    """Log the resolved config to the loggers and fit what :func:`build` made, resuming from ``cfg.ckpt_path``.

    Args:
        objects: :func:`build`'s result.

    Returns:
        Each of ``trainer.callback_metrics`` (``val/acc``, ``val/loss``, ``train/loss_epoch``, ...) as a float, from
        the last epoch.
    """
    cfg, trainer, loggers = objects["cfg"], objects["trainer"], objects["loggers"]
    _log_hyperparameters(loggers, cfg, objects["module"])
    ckpt_path = cfg.get("ckpt_path")
    log.info("Starting training" + (f", resuming from {ckpt_path}" if ckpt_path else ""))
    try:
        trainer.fit(model=objects["module"], datamodule=objects["datamodule"], ckpt_path=ckpt_path)
    finally:
        _finish_wandb(loggers)
    return {name: float(value) for name, value in trainer.callback_metrics.items()}


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """The whole training run, without the command line: :func:`build`, then :func:`fit`.

    Args:
        cfg: a config composed from ``conf/`` (``scripts/train.py`` or ``hydra.compose``).

    Returns:
        ``(metrics, objects)``: :func:`fit`'s metrics and :func:`build`'s objects.
    """
    objects = build(cfg)
    return fit(objects), objects


def train_and_report(cfg: DictConfig, objects: dict[str, Any] | None = None) -> float | None:
    """Run :func:`train` and print where the run was written and the final ``val/acc`` (from rank 0 only).

    With ``cfg.report`` true, rank zero then writes the run's HTML report (:func:`write_run_report`).

    Args:
        cfg: a config composed from ``conf/``.
        objects: what :func:`build` already made from ``cfg`` (``None``: build it here).

    Returns:
        The final ``val/acc`` (the value a Hydra sweeper would optimise), or ``None`` if validation never ran.
    """
    objects = build(cfg) if objects is None else objects
    metrics = fit(objects)
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
        if cfg.get("report"):
            write_run_report(cfg.get("output_dir") or trainer.default_root_dir)
    return val_acc


def write_run_report(run_dir: str | Path) -> Path | None:
    """Write ``bn-report``'s page of ``run_dir`` and print its path; a report that cannot be made only warns.

    Args:
        run_dir: the run directory.

    Returns:
        The page, or ``None`` if nothing could be reported.
    """
    from bn_lightning.report import ReportError, write_report  # matplotlib loads only when a report is asked for

    try:
        report = write_report(run_dir)
    except ReportError as error:
        log.warning(f"No report: {error}")
        return None
    for warning in report.warnings:
        log.warning(f"Report: {warning}")
    print(f"Report written to: {report.page}")
    return report.page


class RankFilter(logging.Filter):
    """Sets ``record.rank`` to the process's global rank, for a format such as ``[rank %(rank)s]``.

    Under DDP every rank writes to the run's one log file; the rank tells their lines apart. The rank is the one
    Lightning knows (from ``RANK``/``LOCAL_RANK``/``SLURM_PROCID`` at start, from the strategy once it is set up).
    ``conf/hydra/default.yaml`` installs it on the console and file handlers.

    Example::

        >>> record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
        >>> RankFilter().filter(record), record.rank
        (True, 0)
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Tag ``record`` with the rank; never drops it."""
        record.rank = getattr(rank_zero_only, "rank", 0)
        return True


def config_dir() -> Path:
    """The directory of the app's configs: ``bn_lightning/conf`` in an installed wheel, else the checkout's ``conf/``.

    A wheel built from the checkout carries a copy of the top-level ``conf/`` (``setup.py`` copies it at build time);
    an editable install reads the checkout's ``conf/`` itself.

    Example::

        >>> (config_dir() / "config.yaml").is_file()
        True
    """
    packaged = Path(__file__).resolve().parents[1] / "conf"
    if (packaged / "config.yaml").is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "conf"


def _launched_rank() -> int:
    """The global rank an external launcher gave this process: torchrun's ``RANK``, srun's ``SLURM_PROCID``, or 0."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    return 0


def _follower_overrides(argv: list[str]) -> list[str]:
    """Hydra overrides that keep a rank > 0 started by torchrun or srun from writing a run directory of its own.

    Each such process composes the config itself and would create its own timestamped ``hydra.run.dir``. It runs in
    the working directory instead (Lightning broadcasts rank 0's checkpoint and log directories, and only rank 0
    writes them), saves no ``.hydra`` copy and logs to the console only. With an explicit ``hydra.run.dir`` (e.g.
    ``outputs/train/runs/$SLURM_JOB_ID``, the same on every rank) the rank uses it and appends to its log file.
    Lightning's own re-executed ranks pass rank 0's ``hydra.run.dir`` and are left as they are.
    """
    if _launched_rank() == 0 or any(arg in ("-m", "--multirun") for arg in argv):
        return []
    given = {arg.split("=", 1)[0].lstrip("+~") for arg in argv if "=" in arg}
    extra = [] if "hydra.output_subdir" in given else ["hydra.output_subdir=null"]
    if "hydra.run.dir" not in given:
        extra += [
            "hydra.run.dir=.",
            "hydra.job_logging.root.handlers=[console]",
            "++hydra.job_logging.handlers.file.delay=true",
        ]
    return extra


def _one_line(error: BaseException) -> str:
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _task(cfg: DictConfig) -> float | None:
    """The Hydra task: :func:`train_and_report`; a bad config value ends in one line ``Error: ...`` and exit code 2.

    Only errors raised while the run is built (:func:`build`: every config check and instantiation) are shortened;
    an error during training keeps its traceback.
    """
    try:
        objects = build(cfg)
    except (ValueError, TypeError, InstantiationException) as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error(_one_line(error))
        print(f"Error: {_one_line(error)}", file=sys.stderr)
        print("Set the environment variable HYDRA_FULL_ERROR=1 for the complete stack trace.", file=sys.stderr)
        sys.exit(2)
    return train_and_report(cfg, objects)


def main() -> None:
    """The command line: ``bn-train [group=option ...] [key=value ...]``, composing :func:`config_dir`'s ``config``.

    ``scripts/train.py``, the ``bn-train`` console script and ``python -m bn_lightning.app.train`` all run this.
    Hydra's own flags work (``--cfg job``, ``-m``, ``--help``); the final ``val/acc`` is what a sweeper optimises.
    """
    sys.argv += _follower_overrides(sys.argv[1:])
    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")(_task)()


if __name__ == "__main__":
    main()
