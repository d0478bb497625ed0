"""PreciseBN: replace BatchNorm's running statistics by true population statistics (Wu & Johnson, 2021).

BN's running statistics are an exponential average over the last few dozen batches, computed while the weights were
still changing: with a large momentum, small batches or a fast-moving model they are a poor estimate of what the
final weights produce, and eval accuracy suffers. :func:`recalibrate_bn` runs the (fixed) model over many training
batches and sets each BN layer's ``running_mean``/``running_var`` to the mean and UNBIASED variance of ALL the
samples seen, every sample weighted equally (not an average of per-batch variances, which ignores how the batch means
spread). It works on any ``nn.Module`` and any iterable of batches, in one process or under ``torch.distributed``;
:class:`bn_lightning.callbacks.PreciseBN` calls it from a Lightning ``Trainer``.

How (fvcore's ``update_bn_stats`` is the model): during recalibration every layer has ``momentum=1`` and fresh
stand-in buffers, so its own running-statistics update writes the batch mean and unbiased batch variance; a forward
hook takes them (bn_lightning layers hand over :attr:`last_batch_stats` instead; layers whose update cannot be
read exactly get the statistics of their input). The batches' ``(mean, biased var, count)`` are merged exactly
(:func:`bn_lightning.functional.merge_stats`) in float64, under ``torch.distributed`` with one ``all_gather`` at the
end, so every rank ends with identical buffers equal to one process running the union of the data. The layers' own
buffers are written once, at the end, and are untouched if a batch raises.

Torch only: no Lightning import (a progress bar imports ``tqdm`` when asked for).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bn_lightning import distributed
from bn_lightning.functional import BatchStats, batch_stats, merge_stats
from bn_lightning.layers import has_batch_stats
from bn_lightning.validation import check_callable, check_int

__all__ = ["recalibrate_bn"]

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_FOLD = 32  # batches a layer keeps before merging them into its total: bounded memory, few merges


class _LayerStats:
    """One recalibrated layer: its own buffers and momentum (set aside), and the statistics of what it saw."""

    def __init__(self, layer: _BatchNorm) -> None:
        self.layer = layer
        self.momentum = layer.momentum
        self.buffers = {k: getattr(layer, k) for k in _BUFFERS if getattr(layer, k, None) is not None}
        running = self.buffers["running_mean"]
        #: the ranks this layer's training forward synchronises with (1: a local layer); its forward is a collective
        self.group_size = _group_size(layer)
        # torch's SyncBatchNorm writes the statistics of all ranks' batches (whose sizes this rank does not know),
        # 16-bit buffers round them: both take the statistics of their own input instead
        syncs = isinstance(layer, nn.SyncBatchNorm) and self.group_size > 1
        self.from_input = syncs or running.dtype not in (torch.float32, torch.float64)
        # our synchronised layers hand over their group's statistics, identical on its ranks: each counts a share
        self.share = self.group_size if has_batch_stats(layer) and not self.from_input else 1
        self.dtype = torch.float32 if running.device.type == "mps" else torch.float64  # MPS has no float64
        self.total = BatchStats(
            torch.zeros_like(running, dtype=self.dtype),
            torch.zeros_like(running, dtype=self.dtype),
            torch.zeros((), dtype=self.dtype, device=running.device),
        )
        self.pending: list[tuple[Tensor, Tensor, int | Tensor]] = []

    def start(self) -> None:
        """Momentum 1 and stand-in buffers: the forward's running-statistics update writes the batch's statistics."""
        self.layer.momentum = 1.0
        self.reset_stand_ins()

    def reset_stand_ins(self) -> None:
        # finite values: with momentum 1 torch computes 0 * old + batch, and 0 * NaN (left by an empty batch) is NaN
        for k, buf in self.buffers.items():
            setattr(self.layer, k, torch.ones_like(buf) if k == "running_var" else torch.zeros_like(buf))

    def restore(self) -> None:
        self.layer.momentum = self.momentum
        for k, buf in self.buffers.items():
            setattr(self.layer, k, buf)

    def hook(self, layer: nn.Module, args: tuple, output: Any) -> None:
        """After each forward of the layer: keep the batch's ``(mean, biased var, count)``."""
        x = args[0] if args else None
        count = x.numel() // x.shape[1] if isinstance(x, Tensor) and x.dim() >= 2 and x.shape[1] else 0
        kept = layer.last_batch_stats if has_batch_stats(layer) else None
        if layer.training and kept is not None and self.share > 1:
            # the group's statistics, identical on its ranks, each rank counting one share: also on a rank whose
            # batch is empty (its data ran out) while the others' are not
            self.add(kept.mean, kept.var, kept.count / self.share)
            if count < 2:
                self.reset_stand_ins()
        elif count < 2 or not layer.training:  # an empty batch (NaN stand-ins?), or a forward_fn's eval-mode call
            self.reset_stand_ins()
        elif kept is not None and not self.from_input:
            self.add(kept.mean, kept.var, kept.count)
        elif self.from_input:
            s = batch_stats(x.detach())  # type: ignore[union-attr]
            self.add(s.mean, s.var, s.count)
        else:  # the layer's update wrote the mean and the UNBIASED variance into the stand-ins
            self.add(layer.running_mean.clone(), layer.running_var * ((count - 1) / count), count)

    def add(self, mean: Tensor, var: Tensor, count: int | Tensor) -> None:
        self.pending.append((mean, var, count))
        if len(self.pending) == _FOLD:
            self.fold()

    def fold(self) -> None:
        """Merge the pending batches into the total, exactly (one :func:`merge_stats`)."""
        if not self.pending:
            return
        device = self.total.mean.device
        means = torch.stack([self.total.mean] + [m.to(self.dtype) for m, _, _ in self.pending])
        variances = torch.stack([self.total.var] + [v.to(self.dtype) for _, v, _ in self.pending])
        counts = [c for _, _, c in self.pending]
        if all(isinstance(c, int) for c in counts):
            n = torch.tensor(counts, dtype=self.dtype).to(device)
        else:
            n = torch.stack([torch.as_tensor(c, dtype=self.dtype, device=device) for c in counts])
        self.total = merge_stats(means, variances, torch.cat([self.total.count.view(1), n]))
        self.pending = []


def _group_size(layer: _BatchNorm) -> int:
    """How many ranks ``layer``'s training forward synchronises its statistics over (1: none, a local layer)."""
    if not layer.training:
        return 1
    if isinstance(layer, nn.SyncBatchNorm):
        return distributed.world_size(layer.process_group)
    if has_batch_stats(layer):
        reducer = layer._stats_reducer()  # the layer's own answer: None when it does not synchronise (now)
        if reducer is not None:
            return int(getattr(reducer, "world_size", distributed.world_size(getattr(layer, "process_group", None))))
    return 1


def _empty_like(batch: Any) -> Any:
    """``batch`` with every tensor in it (through tuples, lists and dicts) replaced by a new one of 0 rows."""
    if isinstance(batch, Tensor):
        return batch.new_empty((0, *batch.shape[1:])) if batch.dim() > 0 else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: _empty_like(v) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_empty_like(v) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_empty_like(v) for v in batch)
    return batch


_END = object()  # what next() returns when a rank's loader is exhausted
_RAN_OUT, _HAS_DATA, _NEVER_HAD_DATA = 0.0, 1.0, 2.0


def _agree_on_step(has_data: bool, had_data: bool, device: torch.device, process_group: Any) -> bool:
    """Every rank's state before a lock-step batch (ONE small all-reduce); whether any rank still has data.

    Raises on every rank alike when a rank has never had a batch (it cannot join with an empty one) while others do.
    """
    size = distributed.world_size(process_group)
    states = torch.zeros(size, dtype=torch.float32, device=device)
    state = _HAS_DATA if has_data else _RAN_OUT if had_data else _NEVER_HAD_DATA
    states[dist.get_rank(process_group)] = state
    states = distributed.all_reduce_sum(states, process_group).tolist()
    if _HAS_DATA not in states:
        return False
    empty = [r for r, v in enumerate(states) if v == _NEVER_HAD_DATA]
    if empty:
        raise RuntimeError(
            f"recalibrate_bn: rank{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))} of {size} yielded no "
            "batch at all, while the model holds BN layers that synchronise their statistics across ranks (their "
            "forward is a collective every rank must join, and a rank without any batch cannot join with an empty "
            "one of the right structure); give every rank at least one batch (DistributedSampler does). Nothing "
            "was changed."
        )
    return True


def _module_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (through tuples, lists and dicts) moved to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


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


def _warn(message: str) -> None:
    if not distributed.is_distributed() or dist.get_rank() == 0:
        warnings.warn(message, UserWarning, stacklevel=3)


def _merge_ranks(layers: list[_LayerStats], samples: int, process_group: Any) -> tuple[list[BatchStats], int]:
    """Every layer's statistics over all ranks and the ranks' total samples: ONE ``all_gather`` of a packed tensor."""
    totals = [s.total for s in layers]
    if distributed.world_size(process_group) == 1:
        return totals, samples
    ref = totals[0].mean
    header = torch.full((1,), float(samples), dtype=ref.dtype, device=ref.device)
    packed = torch.cat([header] + [torch.cat([t.count.view(1), t.mean, t.var]).to(ref.device) for t in totals])
    rows = distributed.all_gather(packed, process_group)  # (world, 1 + sum(1 + 2 C))
    merged, offset = [], 1
    for t in totals:
        c = t.mean.numel()
        mean, var = rows[:, offset + 1 : offset + 1 + c], rows[:, offset + 1 + c : offset + 1 + 2 * c]
        m = merge_stats(mean, var, rows[:, offset])
        merged.append(BatchStats(m.mean.to(t.mean.device), m.var.to(t.mean.device), m.count.to(t.mean.device)))
        offset += 1 + 2 * c
    return merged, int(rows[:, 0].sum().item())


def recalibrate_bn(
    model: nn.Module,
    dataloader: Iterable,
    num_batches: int = 200,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    device: torch.device | str | Callable[[Any], Any] | None = None,
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
    batch sizes. The model runs in its CURRENT mode: torch ``_BatchNorm`` layers in training mode normalise with
    batch statistics, as in training (PreciseBN), and are recalibrated; layers in eval mode, layers without running
    statistics and frozen BN layers (:class:`~bn_lightning.layers.FrozenBatchNorm2d`, not a ``_BatchNorm``) are left
    alone, their buffers bit-identical. Parameters, gradients and optimizer state are not touched
    (``torch.no_grad``); each layer's ``momentum`` and ``num_batches_tracked`` and every module's ``training`` flag
    are restored. A layer's own buffers (the same tensor objects) are written once, at the end: if a batch raises they
    are untouched; a layer no batch reached keeps its values.

    Batches are fed as: a tensor as is; a tuple/list's first element (as ``torch.optim.swa_utils.update_bn``); or
    anything through ``forward_fn(model, batch)`` (required for dict batches).

    Under ``torch.distributed`` (initialised, more than one rank in ``process_group``), every rank must call this
    together: each accumulates its own data and ONE ``all_gather`` at the end merges them, so all ranks end with
    identical buffers equal to a single process over the union of their data, whatever the number of batches each
    rank yields. Layers that synchronise their statistics (SyncBatchNorm: ours, torch's, Batch Renormalization with
    ``sync``) are counted once, not once per rank; their forward is itself a collective that every rank must join,
    so with those the ranks run in lock step: before each batch ONE small all-reduce tells every rank whether any
    rank still has data, and a rank whose loader ran out joins with an empty batch (its first batch's structure, 0
    rows), so the result equals one process running, batch after batch, the concatenation of the ranks' batches.
    A rank that yields no batch at all cannot build an empty one: then every rank raises the same ``RuntimeError``
    (buffers untouched).

    Args:
        model: the network; its BN layers in training mode are recalibrated.
        dataloader: any iterable of batches, typically the TRAINING dataloader (augmentations and all).
        num_batches: how many batches to use (200 in the paper, for ImageNet batches of 32); a shorter iterable is
            used whole, with a warning.
        forward_fn: ``forward_fn(model, batch)`` runs the model on a batch (its return value is ignored).
        device: where to move the batch's tensors (default: the device of the model's first parameter), or a
            callable ``batch -> batch`` that moves them (e.g. a Lightning strategy's ``batch_to_device``).
        progress: show a tqdm progress bar (on global rank zero only).
        process_group: the ranks to reduce over (``None``: all).

    Returns:
        ``{"num_batches": batches this rank ran, "num_samples": samples over all ranks, "world_size": ...,
        "seconds": ..., "layers": names recalibrated, "skipped": names of BN layers left alone}``; ``{}`` when the
        model has no BN layer to recalibrate (a warning says so).

    Raises:
        ValueError: ``num_batches`` is not a positive int.
        TypeError: ``forward_fn`` is not callable; a batch the default feeding cannot handle (a dict, ...) and no
            ``forward_fn``.
        RuntimeError: with synchronising layers under ``torch.distributed``, a rank yielded no batch while another
            did (raised on every rank).

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
    check_int("recalibrate_bn", "num_batches", num_batches)
    check_callable("recalibrate_bn", "forward_fn", forward_fn, "(model, batch)", optional=True)
    if callable(device):
        move = device
    else:
        target = torch.device(device) if device is not None else _module_device(model)
        move = lambda batch: _to_device(batch, target)  # noqa: E731
    start = time.perf_counter()
    layers, skipped = [], []
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            tracked = m.track_running_stats and m.running_mean is not None and m.running_var is not None
            (layers if m.training and tracked else skipped).append(name)
    if not layers:
        why = f"has no BatchNorm layer in training mode ({skipped} are not)" if skipped else "has no BatchNorm layer"
        _warn(f"recalibrate_bn: the model {why} with running statistics to recalibrate; nothing was done.")
        return {}
    modules = dict(model.named_modules())
    stats = [_LayerStats(modules[name]) for name in layers]  # type: ignore[arg-type]
    modes = [(m, m.training) for m in model.modules()]
    handles = []
    seen_batches = seen_samples = 0
    # a layer whose forward is a collective makes every batch a lock step: the ranks agree on each one
    lockstep = distributed.world_size(process_group) > 1 and any(
        _group_size(m) > 1 for m in model.modules() if isinstance(m, _BatchNorm)
    )
    device_of_stats = stats[0].total.mean.device
    bar = None
    if progress and (not distributed.is_distributed() or dist.get_rank() == 0):
        from tqdm.auto import tqdm

        try:
            total = min(num_batches, len(dataloader))  # type: ignore[arg-type]
        except TypeError:  # no length, or an iterable-style dataset's loader
            total = num_batches
        bar = tqdm(total=total, desc="recalibrate_bn", unit="batch", leave=False, dynamic_ncols=True)
    try:
        with torch.no_grad():
            for s in stats:
                s.start()
                handles.append(s.layer.register_forward_hook(s.hook))
            iterator, empty, exhausted = iter(dataloader), None, False
            for _ in range(num_batches):  # never pulls a batch past num_batches from the loader
                batch = _END if exhausted else next(iterator, _END)
                exhausted = batch is _END
                if lockstep:
                    if not _agree_on_step(not exhausted, empty is not None, device_of_stats, process_group):
                        break
                elif exhausted:
                    break
                if exhausted:  # this rank's data ran out: it joins the others' collectives with an empty batch
                    _feed(model, move(empty), forward_fn)
                    continue
                if empty is None:
                    empty = _empty_like(batch)
                seen_samples += _batch_size(batch)
                _feed(model, move(batch), forward_fn)
                seen_batches += 1
                if bar is not None:
                    bar.update(1)
            for s in stats:
                s.fold()
            results, num_samples = _merge_ranks(stats, seen_samples, process_group)
            for s, r in zip(stats, results, strict=True):
                present = r.count > 0  # a layer no batch reached keeps its statistics
                unbiased = r.var * r.count / (r.count - 1).clamp(min=1)
                rm, rv = s.buffers["running_mean"], s.buffers["running_var"]
                rm.copy_(torch.where(present, r.mean, rm.to(r.mean.dtype)))
                rv.copy_(torch.where(present, unbiased, rv.to(r.mean.dtype)))
    finally:
        if bar is not None:
            bar.close()
        for handle in handles:
            handle.remove()
        for s in stats:
            s.restore()
        for m, training in modes:
            m.training = training
    if seen_batches < num_batches:
        _warn(
            f"recalibrate_bn: asked for num_batches={num_batches} but the dataloader yielded only {seen_batches} "
            f"batch{'es' if seen_batches != 1 else ''}; the statistics use those {seen_batches}."
        )
    if stats[0].total.mean.device.type == "cuda":
        torch.cuda.synchronize(stats[0].total.mean.device)  # so that the reported seconds include the device work
    return {
        "num_batches": seen_batches,
        "num_samples": num_samples,
        "world_size": distributed.world_size(process_group),
        "seconds": time.perf_counter() - start,
        "layers": layers,
        "skipped": skipped,
    }
