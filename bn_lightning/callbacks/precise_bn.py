"""PreciseBN: replace BatchNorm's running statistics by true population statistics (Wu & Johnson, 2021).

BN's running statistics are an exponential average over the last few dozen batches, computed while the weights were
still changing: with a large momentum, small batches or a fast-moving model they are a poor estimate of what the
final weights produce, and eval accuracy suffers. PreciseBN runs the (fixed) model over many training batches and
sets each BN layer's ``running_mean``/``running_var`` to the mean and UNBIASED variance of ALL the samples seen,
every sample weighted equally (not an average of per-batch variances, which ignores how the batch means spread).

Provides:

- :func:`recalibrate_bn`: the function; works on any ``nn.Module`` and any iterable of batches, in one process or
  under ``torch.distributed`` (one collective, at the end);
- :class:`PreciseBN`: the Lightning callback that calls it on the training data before each validation, at the end
  of every ``n`` epochs, or once at the end of the fit.

How the statistics are gathered, per recalibrated layer and batch, with no extra pass over the activations, no
kernel launch of its own and no host synchronisation: during recalibration every layer's ``momentum`` is 1.0, so its
own running-statistics update writes the batch mean and UNBIASED batch variance; a forward pre-hook points
``running_mean``/``running_var`` of torch's layers at the next row of a ``(32, C)`` table, so the layer writes there
(biased = unbiased * (n - 1) / n, ``n = numel / C``); bn_lightning layers hand over ``last_batch_stats``. Every 32
batches the rows are folded into a float64 total with :func:`bn_lightning.functional.merge_stats` (exact, Chan et
al.), and under DDP one ``all_gather`` of the packed per-layer ``(count, mean, var)`` merges the ranks at the end, so
every rank ends with identical buffers equal to one process running the union of the data. The layers' own buffers
are out of the forward's way until then: they are written once, at the end, and are untouched if a batch raises.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import CombinedLoader, rank_zero_only, rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader
from typing_extensions import override

from bn_lightning.functional import BatchStats, batch_stats, merge_stats
from bn_lightning.layers.batchnorm import ScratchBatchNormMixin
from bn_lightning.layers.sync import _wait

__all__ = ["PreciseBN", "recalibrate_bn"]

#: when :class:`PreciseBN` recalibrates
WHEN = ("before_validation", "epoch_end", "fit_end")

_ROWS = 32  # batches kept per layer before they are merged into the running total
_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class _LayerStats:
    """Streaming per-channel ``(mean, biased var, count)`` of one layer: a float64 total plus up to 32 pending batches.

    Two ways in, both without a kernel launch of their own per batch:

    - ``table`` (torch's layers): before each forward the layer's ``running_mean``/``running_var`` are pointed at the
      next free row of a ``(32, C)`` table; with momentum 1 the layer's own update writes the batch mean and unbiased
      variance there (:meth:`claim_row`, then :meth:`commit_row` with the count);
    - a list (bn_lightning layers, statistics computed from the input): :meth:`add` keeps references to the batch
      statistics the forward produced anyway.

    Every 32 batches (and at the end) the pending rows are folded into the total with ONE
    :func:`~bn_lightning.functional.merge_stats` (exact, Chan et al.): a few dozen small kernels per 32 batches.
    """

    def __init__(self, buffer: Tensor, table: bool) -> None:
        self.device = buffer.device
        self.dtype = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
        channels = buffer.numel()
        self.mean = torch.zeros(channels, device=self.device, dtype=self.dtype)
        self.var = torch.zeros_like(self.mean)
        self.count = torch.zeros((), device=self.device, dtype=self.dtype)
        self.table = table
        self.rows: list[tuple[Tensor, Tensor, int | Tensor]] = []
        self.counts: list[int] = []
        if table:  # finite initial rows: with momentum 1 torch computes 0 * old + batch, and 0 * NaN is NaN
            self.table_mean = torch.zeros(_ROWS, channels, device=self.device, dtype=buffer.dtype)
            self.table_var = torch.ones_like(self.table_mean)
            self.row_views = list(zip(self.table_mean.unbind(0), self.table_var.unbind(0), strict=True))

    def claim_row(self) -> int:
        """The table row the next forward writes into."""
        if len(self.counts) == _ROWS:
            self._fold()
        return len(self.counts)

    def commit_row(self, row: int, count: int) -> None:
        """Keep the row just written, over ``count`` values; ``count < 2`` discards (and re-initialises) it."""
        if count > 1:
            self.counts.append(count)
        else:
            self.table_mean[row].zero_()
            self.table_var[row].fill_(1.0)

    def add(self, mean: Tensor, var: Tensor, count: int | Tensor) -> None:
        """Add one batch's statistics (``var`` biased); ``count`` a Python int, or a tensor on the device."""
        self.rows.append((mean, var, count))
        if len(self.rows) == _ROWS:
            self._fold()

    def _counts_tensor(self, counts: list[int]) -> Tensor:
        host = torch.tensor(counts, dtype=self.dtype)
        return host.to(self.device, non_blocking=True) if self.device.type != "cpu" else host

    def _fold(self) -> None:
        if self.table and self.counts:
            k = len(self.counts)
            n = self._counts_tensor(self.counts)
            means = self.table_mean[:k].to(self.dtype)
            variances = self.table_var[:k].to(self.dtype) * ((n - 1) / n).unsqueeze(1)  # unbiased -> biased
            self.counts = []
        elif self.rows:
            means = torch.stack([m.to(self.dtype) for m, _, _ in self.rows])
            variances = torch.stack([v.to(self.dtype) for _, v, _ in self.rows])
            if all(isinstance(c, int) for _, _, c in self.rows):
                n = self._counts_tensor([c for _, _, c in self.rows])  # type: ignore[misc]
            else:
                n = torch.stack([torch.as_tensor(c, dtype=self.dtype, device=self.device) for _, _, c in self.rows])
            self.rows = []
        else:
            return
        merged = merge_stats(
            torch.cat([self.mean.unsqueeze(0), means]),
            torch.cat([self.var.unsqueeze(0), variances]),
            torch.cat([self.count.view(1), n.to(self.dtype)]),
        )
        self.mean, self.var, self.count = merged.mean, merged.var, merged.count
        if self.table:
            self.table_mean.zero_()
            self.table_var.fill_(1.0)

    def result(self) -> BatchStats:
        """The statistics of everything added: ``(mean, biased var, count)``, ``count`` a 0-d tensor."""
        self._fold()
        return BatchStats(self.mean, self.var, self.count)


@dataclass
class _Target:
    """One layer being recalibrated, its own buffers (out of its way until the end) and its momentum."""

    name: str
    layer: _BatchNorm
    stats: _LayerStats
    buffers: dict[str, Tensor]
    momentum: float | None
    share: int  # ranks that see the same (synchronised) statistics of this layer: each adds 1/share of the count
    from_input: bool  # compute the statistics from the input (torch SyncBatchNorm across ranks, 16-bit buffers)
    row: int = 0  # the table row the current forward writes into


def _process_group_size(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _global_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(getattr(rank_zero_only, "rank", 0))


def _module_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _batch_size(batch: Any) -> int:
    """Samples in a batch: dim 0 of its first tensor (depth first through tuples, lists, dicts); 0 if none."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for item in batch:
            n = _batch_size(item)
            if n:
                return n
    return 0


def _feed(model: nn.Module, batch: Any, forward_fn: Callable[[nn.Module, Any], Any] | None) -> None:
    """Run ``model`` on ``batch``: ``forward_fn(model, batch)``, or the tensor, or a tuple/list's first element."""
    if forward_fn is not None:
        forward_fn(model, batch)
    elif isinstance(batch, Tensor):
        model(batch)
    elif isinstance(batch, (tuple, list)) and len(batch) > 0:
        model(batch[0])
    elif isinstance(batch, Mapping):
        raise TypeError(
            f"recalibrate_bn cannot tell which entry of a dict batch (keys {list(batch)}) is the model input; pass "
            "forward_fn=lambda model, batch: model(batch['...'])"
        )
    else:
        raise TypeError(
            f"recalibrate_bn feeds a tensor, or the first element of a tuple/list, got a batch of type "
            f"{type(batch).__name__}; pass forward_fn(model, batch)"
        )


def _syncs_across_ranks(layer: _BatchNorm) -> bool:
    """Whether ``torch.nn.SyncBatchNorm`` will merge its batch statistics across ranks in this process."""
    return isinstance(layer, nn.SyncBatchNorm) and _process_group_size(layer.process_group) > 1


def _select_layers(model: nn.Module) -> tuple[list[tuple[str, _BatchNorm]], list[str]]:
    """(recalibrated layers, names of the BN layers left alone: eval mode or no running statistics)."""
    chosen, skipped = [], []
    for name, m in model.named_modules():
        if not isinstance(m, _BatchNorm):
            continue
        tracked = m.track_running_stats and m.running_mean is not None and m.running_var is not None
        (chosen if m.training and tracked else skipped).append((name, m))
    return chosen, [name for name, _ in skipped]


def _pre_hook(target: _Target) -> Callable[..., None]:
    """For torch's layers: point the running buffers at the next table row; the forward's update fills it."""
    stats, buffers = target.stats, target.layer._buffers  # Module.__setattr__ costs 5 us, a dict write 0.1

    def hook(module: nn.Module, args: tuple) -> None:
        target.row = row = stats.claim_row()
        buffers["running_mean"], buffers["running_var"] = stats.row_views[row]

    return hook


def _post_hook(target: _Target) -> Callable[..., None]:
    def hook(layer: nn.Module, args: tuple, output: Any) -> None:
        x = args[0] if args else None
        count = x.numel() // x.shape[1] if isinstance(x, Tensor) and x.dim() >= 2 and x.shape[1] else 0
        stats = target.stats
        if stats.table:  # momentum 1: the row holds this batch's mean and unbiased variance
            stats.commit_row(target.row, count)
            return
        if count == 0:
            return
        scratch = layer.last_batch_stats if isinstance(layer, ScratchBatchNormMixin) else None
        if scratch is not None and not target.from_input:
            # a tensor count: merged across the layer's process group, identical on its `share` ranks
            share = target.share if isinstance(scratch.count, Tensor) else 1
            stats.add(scratch.mean, scratch.var, scratch.count / share if share > 1 else scratch.count)
        else:
            s = batch_stats(x.detach())  # type: ignore[union-attr]
            stats.add(s.mean, s.var, s.count)

    return hook


def _recalibrate(
    model: nn.Module,
    dataloader: Iterable,
    num_batches: int,
    step: Callable[[Any], None],
    progress: bool,
    process_group: Any,
    caller: str,
) -> dict[str, Any]:
    """The shared body of :func:`recalibrate_bn` and :class:`PreciseBN`; ``step(batch)`` runs one forward."""
    start = time.perf_counter()
    chosen, skipped = _select_layers(model)
    if not chosen:
        why = (
            "has no BatchNorm layer" if not skipped else f"has no BatchNorm layer in training mode ({skipped} are not)"
        )
        rank_zero_warn(f"{caller}: the model {why} with running statistics to recalibrate; nothing was done.")
        return {}
    world = _process_group_size(process_group)
    targets = []
    for name, layer in chosen:
        rm = layer.running_mean
        from_input = _syncs_across_ranks(layer) or rm.dtype not in (torch.float32, torch.float64)  # type: ignore[union-attr]
        scratch = isinstance(layer, ScratchBatchNormMixin)
        targets.append(
            _Target(
                name=name,
                layer=layer,
                stats=_LayerStats(rm, table=not scratch and not from_input),  # type: ignore[arg-type]
                buffers={k: getattr(layer, k) for k in _BUFFERS if getattr(layer, k, None) is not None},
                momentum=layer.momentum,
                share=_process_group_size(getattr(layer, "process_group", None)) if scratch else 1,
                from_input=from_input,
            )
        )
    modes = [(m, m.training) for m in model.modules()]
    handles = []
    seen_batches = seen_samples = 0
    try:
        with torch.no_grad():
            for t in targets:
                # the layer's own buffers stay out of the forward's way (untouched if anything fails): it updates
                # stand-ins (table rows for torch's layers) with momentum 1; they get the result at the end
                t.layer.momentum = 1.0
                for k, buf in t.buffers.items():
                    setattr(t.layer, k, torch.ones_like(buf) if k == "running_var" else torch.zeros_like(buf))
                if t.stats.table:
                    handles.append(t.layer.register_forward_pre_hook(_pre_hook(t)))
                handles.append(t.layer.register_forward_hook(_post_hook(t)))
            total: int | None = None
            if hasattr(dataloader, "__len__"):
                try:
                    total = min(num_batches, len(dataloader))  # type: ignore[arg-type]
                except TypeError:
                    total = None
            show = progress and _global_rank() == 0
            bar = _progress_bar(total or num_batches, caller) if show else None
            try:
                # range first: zip stops without pulling a batch past num_batches from the loader
                for _, batch in zip(range(num_batches), dataloader, strict=False):
                    seen_samples += _batch_size(batch)
                    step(batch)
                    seen_batches += 1
                    if bar is not None:
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
            info = _finish(targets, world, process_group, seen_samples)
    finally:
        for handle in handles:
            handle.remove()
        for t in targets:
            t.layer.momentum = t.momentum
            for k, buf in t.buffers.items():
                setattr(t.layer, k, buf)
        for m, training in modes:
            m.training = training
    if seen_batches < num_batches:
        rank_zero_warn(
            f"{caller}: asked for num_batches={num_batches} but the dataloader yielded only {seen_batches} "
            f"batch{'es' if seen_batches != 1 else ''}; the statistics use those {seen_batches}."
        )
    info.update(
        num_batches=seen_batches,
        layers=[t.name for t in targets],
        skipped=skipped,
        seconds=time.perf_counter() - start,
    )
    return info


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


def _finish(targets: list[_Target], world: int, process_group: Any, seen_samples: int) -> dict[str, Any]:
    """Merge across ranks (one all_gather), write the layers' own buffers; returns what needed the ranks' numbers."""
    results = [t.stats.result() for t in targets]
    num_samples: int = seen_samples
    if world > 1:
        device = targets[0].stats.mean.device
        dtype = targets[0].stats.mean.dtype
        header = torch.full((1,), float(seen_samples), dtype=dtype, device=device)
        packed = torch.cat([header] + [torch.cat([r.count.view(1), r.mean, r.var]).to(device) for r in results])
        gathered = [torch.empty_like(packed) for _ in range(world)]
        _wait(dist.all_gather(gathered, packed, group=process_group, async_op=True), packed.device.type == "cpu")
        rows = torch.stack(gathered)
        merged, offset = [], 1
        for r in results:
            c = r.mean.numel()
            m = merge_stats(
                rows[:, offset + 1 : offset + 1 + c], rows[:, offset + 1 + c : offset + 1 + 2 * c], rows[:, offset]
            )
            merged.append(BatchStats(m.mean.to(r.mean.device), m.var.to(r.mean.device), m.count.to(r.mean.device)))
            offset += 1 + 2 * c
        results = merged
        num_samples = int(rows[:, 0].sum().item())  # the one host read, once
    for t, r in zip(targets, results, strict=True):
        n = r.count
        present = n > 0  # a layer no batch reached keeps its old statistics
        unbiased = r.var * n / (n - 1).clamp(min=1)
        rm, rv = t.buffers["running_mean"], t.buffers["running_var"]
        rm.copy_(torch.where(present, r.mean, rm.to(r.mean.dtype)))
        rv.copy_(torch.where(present, unbiased, rv.to(r.mean.dtype)))
    if targets and targets[0].stats.mean.device.type == "cuda":
        torch.cuda.synchronize(targets[0].stats.mean.device)  # so that the reported seconds include the device work
    return {"num_samples": num_samples, "world_size": world}


def recalibrate_bn(
    model: nn.Module,
    dataloader: Iterable,
    num_batches: int = 200,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    process_group: Any | None = None,
) -> dict[str, Any]:
    r"""Set every training-mode BN layer's running statistics to the population statistics of ``num_batches`` batches.

    For each recalibrated layer and channel, over the ``n`` values its input held in all batches together (ranks
    included under DDP):

    .. math::

        \text{running\_mean} = \frac{1}{n} \sum_i x_i, \qquad
        \text{running\_var} = \frac{1}{n - 1} \sum_i (x_i - \text{running\_mean})^2

    i.e. exactly the mean and unbiased variance of the concatenated data, every sample weighted equally whatever the
    batch sizes. The model runs in its CURRENT mode: BN layers in training mode normalise with batch statistics, as in
    training (PreciseBN); layers in eval mode (frozen) and layers without running statistics are left alone, their
    buffers bit-identical. Parameters, gradients and optimizer state are not touched (``torch.no_grad``); each
    layer's ``momentum`` and ``num_batches_tracked`` and every module's ``training`` flag are restored. A layer's own
    buffers (the same tensor objects) are written once, at the end: if a batch raises they are untouched; a layer no
    batch reached keeps its values. Cheap: no extra pass over activations, no host synchronisation per batch.

    Batches are fed as: a tensor as is; a tuple/list's first element (as ``torch.optim.swa_utils.update_bn``); or
    anything through ``forward_fn(model, batch)`` (required for dict batches). Tensors are moved to ``device``.

    Under ``torch.distributed`` (initialised, more than one rank in ``process_group``), every rank must call this
    together: each accumulates its own data and ONE ``all_gather`` at the end merges them, so all ranks end with
    identical buffers equal to a single process over the union of their data. Layers that synchronise their
    statistics (SyncBatchNorm) are counted once, not once per rank; their forward is itself a collective, so with
    those, every rank must yield the same number of batches (``DistributedSampler`` does).

    Args:
        model: the network; its BN layers in training mode are recalibrated.
        dataloader: any iterable of batches, typically the TRAINING dataloader (augmentations and all).
        num_batches: how many batches to use (200 in the paper, for ImageNet batches of 32); a shorter iterable is
            used whole, with a warning.
        forward_fn: ``forward_fn(model, batch)`` runs the model on a batch (its return value is ignored).
        device: where to move the batch's tensors; default: the device of the model's first parameter.
        progress: show a tqdm progress bar (on global rank zero only).
        process_group: the ranks to reduce over (``None``: all).

    Returns:
        ``{"num_batches": batches this rank ran, "num_samples": samples over all ranks, "world_size": ...,
        "seconds": ..., "layers": names recalibrated, "skipped": names of BN layers left alone}``; ``{}`` when the
        model has no BN layer to recalibrate (a warning says so).

    Raises:
        ValueError: ``num_batches`` is not a positive int.
        TypeError: a batch the default feeding cannot handle (a dict, ...) and no ``forward_fn``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> batches = [torch.randn(n, 3) for n in (5, 3, 7)]  # any iterable of batches works, sizes may differ
        >>> info = recalibrate_bn(model, batches, num_batches=3, progress=False)
        >>> info["num_batches"], info["num_samples"], info["layers"]
        (3, 15, ['1'])
        >>> with torch.no_grad():
        ...     h = model[0](torch.cat(batches)).double()
        >>> torch.allclose(model[1].running_mean.double(), h.mean(0), atol=1e-6)
        True
        >>> torch.allclose(model[1].running_var.double(), h.var(0), atol=1e-5)  # unbiased
        True
    """
    if not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1:
        raise ValueError(f"recalibrate_bn: num_batches must be a positive int, got {num_batches!r}")
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(f"recalibrate_bn: forward_fn must be callable(model, batch), got {forward_fn!r}")
    target = torch.device(device) if device is not None else _module_device(model)

    def step(batch: Any) -> None:
        _feed(model, move_data_to_device(batch, target), forward_fn)

    return _recalibrate(model, dataloader, num_batches, step, progress, process_group, "recalibrate_bn")


class PreciseBN(Callback):
    """Recompute BN population statistics on training batches during ``fit``: PreciseBN (Wu & Johnson, 2021).

    Calls :func:`recalibrate_bn` with the LightningModule's own ``forward`` on ``num_batches`` batches of
    ``trainer.train_dataloader``, moved to the device by the strategy (the module's batch-transfer hooks run) and
    run in the precision plugin's forward context (autocast for mixed precision). BN layers are recalibrated in the
    modes the last training step used (frozen, eval-mode BN layers stay untouched), even though Lightning has put
    the model in eval mode at validation start; the modes are restored afterwards. The global random state is
    forked, so recalibrating does not change the data order or dropout masks of the training that follows.
    Under DDP every rank recalibrates on its shard and the ranks' statistics are merged (one collective).

    Logs ``<prefix>/precise_bn/seconds`` and ``<prefix>/precise_bn/num_samples`` to the trainer's loggers on global
    rank zero.

    Args:
        num_batches: training batches per recalibration (200 in the paper).
        when: ``"before_validation"``: before every validation run of ``fit`` (not the sanity check), so the
            validation metrics and the checkpoints chosen from them use precise statistics; ``"epoch_end"``: at the
            end of every ``every_n_epochs``-th training epoch (after that epoch's validation); ``"fit_end"``: once,
            when training ends (after the last checkpoint was saved: save the model yourself).
        every_n_epochs: for ``when="epoch_end"``: recalibrate after every this many epochs.
        forward_fn: ``forward_fn(pl_module, batch)`` runs the module on a (device) batch; default: ``pl_module(x)``
            with ``x`` the batch, or its first element for tuple/list batches. Required for dict batches, several
            training dataloaders, or a module without ``forward``.
        progress: show a progress bar on rank zero; ``None``: when the trainer shows one.
        prefix: metric key prefix.

    Raises:
        ValueError: an invalid argument (its name and the allowed values are in the message).

    Example::

        >>> cb = PreciseBN(num_batches=100, when="epoch_end", every_n_epochs=2)
        >>> cb.when, cb.num_batches, cb.runs
        ('epoch_end', 100, 0)
        >>> PreciseBN(when="sometimes")
        Traceback (most recent call last):
            ...
        ValueError: PreciseBN: when must be one of ('before_validation', 'epoch_end', 'fit_end'), got 'sometimes'
    """

    def __init__(
        self,
        num_batches: int = 200,
        when: str = "before_validation",
        every_n_epochs: int = 1,
        forward_fn: Callable[[pl.LightningModule, Any], Any] | None = None,
        progress: bool | None = None,
        prefix: str = "bn",
    ) -> None:
        if not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1:
            raise ValueError(f"PreciseBN: num_batches must be a positive int, got {num_batches!r}")
        if when not in WHEN:
            raise ValueError(f"PreciseBN: when must be one of {WHEN}, got {when!r}")
        if not isinstance(every_n_epochs, int) or isinstance(every_n_epochs, bool) or every_n_epochs < 1:
            raise ValueError(f"PreciseBN: every_n_epochs must be a positive int, got {every_n_epochs!r}")
        if forward_fn is not None and not callable(forward_fn):
            raise ValueError(f"PreciseBN: forward_fn must be None or callable(pl_module, batch), got {forward_fn!r}")
        if progress is not None and not isinstance(progress, bool):
            raise ValueError(f"PreciseBN: progress must be True, False or None, got {progress!r}")
        self.num_batches = num_batches
        self.when = when
        self.every_n_epochs = every_n_epochs
        self.forward_fn = forward_fn
        self.progress = progress
        self.prefix = prefix
        self.runs = 0
        self.batches_run = 0
        self.last_info: dict[str, Any] = {}
        self._modules: list[nn.Module] = []
        self._train_modes: list[bool] | None = None
        self._has_bn = True

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if (
            stage == TrainerFn.FITTING
            and self.forward_fn is None
            and type(pl_module).forward is pl.LightningModule.forward
        ):
            raise ValueError(
                f"PreciseBN: {type(pl_module).__name__} defines no forward(); pass forward_fn(pl_module, batch)"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._modules = list(pl_module.modules())
        self._train_modes = None
        self._has_bn = any(isinstance(m, _BatchNorm) for m in self._modules)
        if not self._has_bn:
            rank_zero_warn("PreciseBN: the model has no BatchNorm layer; the callback will do nothing.")

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        # the modes training really used (after every hook that freezes layers ran); a list of bools, microseconds
        self._train_modes = [m.training for m in self._modules]

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "before_validation" and not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._run(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "epoch_end" and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._run(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # not on_fit_end: Lightning calls that after tearing down the strategy (DDP's process group is gone)
        if self.when == "fit_end":
            self._run(trainer, pl_module)

    # ------------------------------------------------------------------ the work

    def _loader(self, trainer: pl.Trainer) -> Iterable | None:
        loader = trainer.train_dataloader
        if loader is None:
            return None
        if isinstance(loader, DataLoader):
            if loader.persistent_workers and loader.num_workers > 0:
                # iter() of a persistent-workers loader RESETS its live iterator: mid-epoch (val_check_interval) that
                # would restart training's epoch under it. A shallow copy without the iterator gets its own workers.
                loader = copy.copy(loader)
                loader._iterator = None
            return loader
        if isinstance(loader, (Mapping, list, tuple)):
            if self.forward_fn is None:
                raise ValueError(
                    "PreciseBN: the trainer has several training dataloaders; pass forward_fn(pl_module, batch) to "
                    "say how to feed their combined batch"
                )
            combined = CombinedLoader(loader, mode="max_size_cycle")
            return (batch for batch, _, _ in combined)
        return loader

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._has_bn:  # warned once, at fit start
            return
        loader = self._loader(trainer)
        if loader is None:
            rank_zero_warn("PreciseBN: the trainer has no training dataloader to recalibrate on; skipped.")
            return
        forward_fn = self.forward_fn
        precision = trainer.precision_plugin

        def step(batch: Any) -> None:
            batch = trainer.strategy.batch_to_device(batch)
            with precision.forward_context():
                _feed(pl_module, batch, forward_fn)

        progress = self.progress if self.progress is not None else trainer.progress_bar_callback is not None
        modules = self._modules or list(pl_module.modules())
        before = [m.training for m in modules]
        if self._train_modes is not None and len(self._train_modes) == len(modules):
            for m, training in zip(modules, self._train_modes, strict=True):
                m.training = training
        else:
            pl_module.train()
        device = pl_module.device
        rng_devices = []
        if device.type == "cuda":
            rng_devices = [device.index if device.index is not None else torch.cuda.current_device()]
        try:
            with torch.random.fork_rng(devices=rng_devices):
                info = _recalibrate(pl_module, loader, self.num_batches, step, progress, None, "PreciseBN")
        finally:
            for m, training in zip(modules, before, strict=True):
                m.training = training
        self.last_info = info
        if not info:
            return
        self.runs += 1
        self.batches_run += info["num_batches"]
        if trainer.is_global_zero:
            metrics = {
                f"{self.prefix}/precise_bn/seconds": float(info["seconds"]),
                f"{self.prefix}/precise_bn/num_samples": float(info["num_samples"]),
            }
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ checkpoints

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(when=self.when, num_batches=self.num_batches, prefix=self.prefix)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "batches_run": self.batches_run}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.runs = int(state_dict.get("runs", 0))
        self.batches_run = int(state_dict.get("batches_run", 0))
