"""BatchNormGap: what the running statistics cost, measured on validation batches.

Provides :class:`BatchNormGap`. At the end of every validation epoch it evaluates a few validation batches twice,
once as evaluation does it (BN normalises with its running statistics) and once with every BN layer normalising
with the statistics of the batch itself, and logs the difference. A large gap means the running statistics, which
every evaluation and every deployed model uses, do not describe the activations: too high a momentum, too small
batches, a train/eval distribution shift, unsynchronised statistics under DDP, or stale statistics after a weight
update. Recalibrating them (PreciseBN) closes the gap.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

from bn_lightning import distributed
from bn_lightning.callbacks.discovery import find_batchnorm_layers
from bn_lightning.layers import SyncBatchNorm, has_batch_stats
from bn_lightning.validation import check_callable, check_int

__all__ = ["BatchNormGap"]

#: the packed per-rank sums, in order: sample-weighted loss sums, samples, sample-weighted metric sums, samples
_COLUMNS = ("loss_running", "loss_batch", "loss_count", "metric_running", "metric_batch", "metric_count")
_MISSING = object()


def _split(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"BatchNormGap expects (inputs, targets) batches (a tuple or list), got {type(batch).__name__}; "
        "evaluate such batches with BatchNormGap.measure(module, ((x, y) for ...))"
    )


def _num_samples(targets: Any, outputs: Any) -> int:
    for t in (targets, outputs):
        if isinstance(t, Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return 1


def _is_classification(outputs: Any, targets: Any) -> bool:
    """(N, K) floating logits and (N,) integer class labels: accuracy is well defined."""
    return (
        isinstance(outputs, Tensor)
        and isinstance(targets, Tensor)
        and outputs.dim() == 2
        and outputs.is_floating_point()
        and targets.dim() == 1
        and not targets.is_floating_point()
        and not targets.is_complex()
        and targets.dtype != torch.bool
        and targets.shape[0] == outputs.shape[0]
    )


def _accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    return (outputs.argmax(dim=1) == targets).float().mean()


def _scalar(value: Any, like: Tensor) -> Tensor:
    """A 0-d tensor of ``like``'s dtype and device (a non-scalar loss, e.g. ``reduction="none"``, is averaged)."""
    return torch.as_tensor(value).detach().to(device=like.device, dtype=like.dtype).mean()


def _first_loader(loaders: Any) -> Iterable | None:
    """The first of Lightning's validation dataloaders: a loader, a sequence of loaders or a mapping of loaders."""
    if loaders is None:
        return None
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


class BatchNormGap(Callback):
    r"""Log what evaluating with the running statistics costs, against normalising with batch statistics.

    At the end of every validation epoch (not during the sanity check), the first ``num_batches`` batches of the
    (first) validation dataloader are evaluated twice under ``torch.no_grad()``:

    - **running**: the normal evaluation path, ``model.eval()``: BN normalises with ``running_mean``/``running_var``;
    - **batch**: every BN layer in training mode, everything else still in eval mode (dropout stays off), so BN
      normalises with the statistics of the batch, as in training.

    and it logs, with ``<p>`` = ``prefix``:

    - ``<p>/gap/loss`` = ``loss_running - loss_batch``, with ``<p>/gap/loss_running`` and ``<p>/gap/loss_batch``;
    - ``<p>/gap/metric`` = ``metric_running - metric_batch`` (with ``_running`` and ``_batch``) when a metric is
      available: ``metric_fn(outputs, targets)`` if given, else the classification accuracy when the outputs are
      ``(N, K)`` logits and the targets ``(N,)`` integer labels. For accuracy, a NEGATIVE gap is what the running
      statistics cost.

    Losses and metrics are averaged over samples (each batch's value weighted by its size). A gap near zero means the
    running statistics describe the validation activations as well as the batches do; a large positive loss gap
    means eval-time statistics are wrong (momentum too high, tiny batches, unsynchronised ranks, stale statistics):
    recalibrate them (PreciseBN) or fix the cause.

    The measurement leaves no trace: the training flag of every module and every buffer of every BN layer
    (``running_mean``, ``running_var``, ``num_batches_tracked``) are restored bit-identically afterwards (the buffers
    are snapshotted and copied back, so momentum, including ``None``, does not matter).

    Batches are ``(inputs, targets, ...)`` tuples or lists, moved to the device by the strategy (the LightningModule's
    batch-transfer hooks run); the model is called as ``pl_module(inputs)``, under the Trainer's precision context.
    Batches need more than one value per BN channel (the batch pass is BN in training mode).

    Under DDP each rank evaluates its own shard of the validation data and the per-rank sums are reduced with ONE
    ``all_reduce`` of a packed tensor, so every rank logs and holds the same values. With SyncBatchNorm layers (which
    communicate in training mode) the ranks first agree on the number of batches, so that no rank waits for a peer.

    The values are logged directly to the Trainer's loggers on rank zero (``logger.log_metrics(..., step=
    trainer.global_step)``) and kept on every rank in :attr:`last` (short keys: ``"loss"``, ``"loss_running"``, ...)
    and :attr:`history`.

    Args:
        num_batches: how many validation batches to evaluate (per rank).
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar (mean over the batch). ``None``: the LightningModule's
            ``loss_fn`` or ``criterion`` attribute if it is callable, else :func:`torch.nn.functional.cross_entropy`.
        metric_fn: ``metric_fn(outputs, targets)`` -> scalar (mean over the batch). ``None``: accuracy when the batch
            looks like classification, else no metric.
        prefix: metric key prefix; keys are ``<prefix>/gap/<name>``.

    Raises:
        ValueError: if ``num_batches`` is not a positive int or ``prefix`` is empty.
        TypeError: if ``loss_fn`` or ``metric_fn`` is neither ``None`` nor callable.

    Example::

        >>> from bn_lightning.callbacks.gap import BatchNormGap
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, momentum=0.9), nn.ReLU(), nn.Linear(8, 3))
        >>> with torch.no_grad():
        ...     _ = net(torch.randn(2, 4) * 5 + 3)  # a single 2-sample batch: poor running statistics
        >>> gap = BatchNormGap(num_batches=2)
        >>> batches = [(torch.randn(32, 4), torch.randint(0, 3, (32,))) for _ in range(2)]
        >>> before = net[1].running_mean.clone()
        >>> values = gap.measure(net, batches)
        >>> sorted(values)
        ['loss', 'loss_batch', 'loss_running', 'metric', 'metric_batch', 'metric_running']
        >>> values["loss"] > 0, values["loss"] == values["loss_running"] - values["loss_batch"]
        (True, True)
        >>> torch.equal(before, net[1].running_mean), net.training  # buffers and modes restored
        (True, True)
    """

    def __init__(
        self,
        num_batches: int = 4,
        loss_fn: Callable[[Any, Any], Any] | None = None,
        metric_fn: Callable[[Any, Any], Any] | None = None,
        prefix: str = "bn",
    ) -> None:
        self.num_batches = check_int("BatchNormGap", "num_batches", num_batches)
        self.loss_fn = check_callable("BatchNormGap", "loss_fn", loss_fn, "(outputs, targets) -> scalar", optional=True)
        self.metric_fn = check_callable(
            "BatchNormGap", "metric_fn", metric_fn, "(outputs, targets) -> scalar", optional=True
        )
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"BatchNormGap: prefix must be a non-empty string, got {prefix!r}")
        self.prefix = prefix
        #: the latest measurement (short keys: "loss", "loss_running", "loss_batch", "metric", ...); {} before any
        self.last: dict[str, float] = {}
        #: every measurement so far, oldest first: ``(global_step, values)``
        self.history: list[tuple[int, dict[str, float]]] = []
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ measurement

    def _resolve_loss_fn(self, module: nn.Module) -> Callable[[Any, Any], Any]:
        if self.loss_fn is not None:
            return self.loss_fn
        for attr in ("loss_fn", "criterion"):
            fn = getattr(module, attr, None)
            if callable(fn):
                return fn
        return F.cross_entropy

    def _row(self, out_running: Any, out_batch: Any, targets: Any, loss_fn: Callable, like: Tensor) -> Tensor:
        """The packed :data:`_COLUMNS` of one batch, a 1-d tensor on the device (no host synchronisation)."""
        n = _num_samples(targets, out_running)
        loss_r, loss_b = _scalar(loss_fn(out_running, targets), like), _scalar(loss_fn(out_batch, targets), like)
        zero = like.new_zeros(())
        if self.metric_fn is not None:
            met_r, met_b = (
                _scalar(self.metric_fn(out_running, targets), like),
                _scalar(self.metric_fn(out_batch, targets), like),
            )
            m = n
        elif _is_classification(out_running, targets) and _is_classification(out_batch, targets):
            met_r, met_b = _scalar(_accuracy(out_running, targets), like), _scalar(_accuracy(out_batch, targets), like)
            m = n
        else:
            met_r, met_b, m = zero, zero, 0
        return torch.stack([loss_r * n, loss_b * n, zero + n, met_r * m, met_b * m, zero + m])

    def measure(
        self, module: nn.Module, batches: Iterable[Any], reduce: Callable[[Tensor], Tensor] | None = None
    ) -> dict[str, float]:
        """Evaluate ``batches`` with running and with batch statistics; restore modes and buffers exactly.

        Works on any ``nn.Module`` (no Trainer needed); the batches must already be on the module's device.

        Args:
            module: the model; called as ``module(inputs)``.
            batches: ``(inputs, targets, ...)`` tuples or lists; all of them are evaluated.
            reduce: sums the packed per-rank sums across ranks (in place or not), e.g. an ``all_reduce``; ``None``:
                single process.

        Returns:
            ``{"loss", "loss_running", "loss_batch"}`` and, when a metric is available, ``{"metric",
            "metric_running", "metric_batch"}``; empty if there was no batch (on any rank).
        """
        layers = list(find_batchnorm_layers(module).values())
        loss_fn = self._resolve_loss_fn(module)
        modes = [(m, m.training) for m in module.modules()]
        buffers = [(b, b.detach().clone()) for layer in layers for b in layer.buffers(recurse=False)]
        scratch = [(layer, layer.__dict__.get("last_batch_stats", _MISSING)) for layer in layers]
        scratch = [(layer, s) for layer, s in scratch if has_batch_stats(layer)]
        sums: Tensor | None = None
        try:
            with torch.no_grad():
                module.eval()
                for batch in batches:
                    inputs, targets = _split(batch)
                    for layer in layers:
                        layer.training = False
                    out_running = module(inputs)
                    for layer in layers:
                        layer.training = True
                    out_batch = module(inputs)
                    for buf, saved in buffers:  # the next running pass must see the running statistics untouched
                        buf.copy_(saved)
                    like = sums if sums is not None else self._accumulator(module, out_running)
                    row = self._row(out_running, out_batch, targets, loss_fn, like)
                    sums = row if sums is None else sums + row
        finally:
            for m, flag in modes:
                m.training = flag
            with torch.no_grad():
                for buf, saved in buffers:
                    buf.copy_(saved)
            for layer, saved in scratch:
                if saved is _MISSING:
                    layer.__dict__.pop("last_batch_stats", None)
                else:
                    layer.last_batch_stats = saved  # type: ignore[attr-defined]
        if sums is None:
            sums = self._accumulator(module, None).new_zeros(len(_COLUMNS))
        if reduce is not None:
            sums = reduce(sums)
        return self._finish(sums)

    @staticmethod
    def _accumulator(module: nn.Module, outputs: Any) -> Tensor:
        """A 0-d tensor giving the device and dtype of the sums: float64 except on MPS (which lacks it)."""
        device = outputs.device if isinstance(outputs, Tensor) else None
        if device is None:
            tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
            device = tensor.device if tensor is not None else torch.device("cpu")
        dtype = torch.float32 if device.type == "mps" else torch.float64
        return torch.zeros((), device=device, dtype=dtype)

    @staticmethod
    def _finish(sums: Tensor) -> dict[str, float]:
        s = dict(zip(_COLUMNS, sums.cpu().tolist(), strict=True))  # the ONE host transfer
        if s["loss_count"] <= 0:
            return {}
        out = {"loss_running": s["loss_running"] / s["loss_count"], "loss_batch": s["loss_batch"] / s["loss_count"]}
        out["loss"] = out["loss_running"] - out["loss_batch"]
        if s["metric_count"] > 0:
            out["metric_running"] = s["metric_running"] / s["metric_count"]
            out["metric_batch"] = s["metric_batch"] / s["metric_count"]
            out["metric"] = out["metric_running"] - out["metric_batch"]
        return {k: out[k] for k in sorted(out)}

    # ------------------------------------------------------------------ Lightning hooks

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"BatchNormGap: {message}")

    def _batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Iterable) -> Iterator[Any]:
        host = itertools.islice(loader, self.num_batches)
        syncs = any(isinstance(m, (nn.SyncBatchNorm, SyncBatchNorm)) for m in pl_module.modules())
        if syncs and distributed.world_size() > 1:
            # SyncBatchNorm communicates in training mode: every rank must run the same number of batch passes
            held = list(host)
            counts = trainer.strategy.all_gather(torch.tensor(len(held), device=trainer.strategy.root_device))
            host = iter(held[: int(counts.min())])
        return (trainer.strategy.batch_to_device(batch, dataloader_idx=0) for batch in host)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if not find_batchnorm_layers(pl_module):
            self._warn_once("no_bn", "the model has no BatchNorm layer; there is no gap to measure.")
            return
        loader = _first_loader(trainer.val_dataloaders)
        if loader is None:
            return
        reduce = distributed.all_reduce_sum if distributed.world_size() > 1 else None  # one collective, all sums
        with trainer.precision_plugin.forward_context():
            values = self.measure(pl_module, self._batches(trainer, pl_module, loader), reduce=reduce)
        if not values:
            self._warn_once("empty", "the validation dataloader yielded no batch; nothing measured.")
            return
        step = trainer.global_step
        self.last = values
        self.history.append((step, values))
        if trainer.is_global_zero:
            metrics = {f"{self.prefix}/gap/{k}": v for k, v in values.items()}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
