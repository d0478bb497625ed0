"""What the BN-watching callbacks share: one set of hooks per layer, batched statistics, one reduction per record.

Provides :class:`BatchNormCallbackBase` (abstract), :class:`LayerBatch` (what a subclass computes its values from),
:func:`find_batchnorm_layers` and :func:`layer_batch_stats`.

How a record works (on steps that do not record, the hooks return at once and no tensor op runs):

- the forward hooks of a watched layer only STASH what the statistics need: one copy of the running statistics and
  affine parameters as they were before the forward (``4 * C`` values), references to the batch statistics where the
  layer keeps them, and bounded samples of its input and output (taken in the hook: a following in-place ReLU
  overwrites the output);
- at ``on_train_batch_end`` the stashes of all layers are packed into padded ``(layers, channels)`` tensors (one
  ``cat`` and one ``index_select`` each) and a subclass computes every layer's values at once, so the number of ops
  does not grow with the number of layers;
- the hooks, the stashes and the packed tensors belong to a recorder shared by every BN callback watching the same
  model: BatchNormMonitor + RunningStatDrift copy, sample and pack everything once;
- the base reduces the ``(layers, values)`` tensor with ONE collective under DDP, copies it to the host ONCE, hands
  plain floats to :meth:`~BatchNormCallbackBase._on_record` on every rank (so decisions that raise are taken
  identically everywhere) and logs them on rank zero only.
"""

from __future__ import annotations

import fnmatch
import weakref
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from bn_lightning.functional import BatchStats, batch_stats
from bn_lightning.layers.batchnorm import ScratchBatchNormMixin
from bn_lightning.layers.sync import _wait

__all__ = ["REDUCTIONS", "BatchNormCallbackBase", "LayerBatch", "find_batchnorm_layers", "layer_batch_stats"]

REDUCTIONS = ("mean", "max", "min", "sum")
_REDUCE = {
    "mean": lambda t: t.nanmean(0),
    "sum": lambda t: t.nansum(0),
    "max": lambda t: torch.where(t.isnan(), -torch.inf, t).amax(0),
    "min": lambda t: torch.where(t.isnan(), torch.inf, t).amin(0),
}
#: below this running-stat update factor the batch statistics are computed from the input instead of recovered
_MIN_FACTOR = 1e-2
#: entries of the module-wide caches below before they are cleared (activation shapes and layouts rarely vary)
_MAX_CACHED = 256
#: sample positions and their channels, per (size, layout, device, k)
_PLANS: dict[Any, tuple[Tensor, Tensor]] = {}
#: gather indices of LayerBatch packing, per layout
_INDEXES: dict[Any, Tensor] = {}


def find_batchnorm_layers(
    module: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> dict[str, _BatchNorm]:
    """Qualified name -> BN layer (torch's, ours, SyncBatchNorm), filtered by ``fnmatch`` patterns on the name.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Sequential(nn.BatchNorm1d(4)))
        >>> list(find_batchnorm_layers(net)), list(find_batchnorm_layers(net, exclude=["2.*"]))
        (['1', '2.0'], ['1'])
    """
    found = {}
    for name, m in module.named_modules():
        if not isinstance(m, _BatchNorm):
            continue
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        found[name] = m
    return found


def _update_factor(layer: _BatchNorm) -> float:
    """The weight of the batch in the running-stat update ``layer`` is about to do (0 when it cannot be known)."""
    if layer.momentum is not None:
        return float(layer.momentum)
    nbt = layer.num_batches_tracked
    return 1.0 / float(nbt + 1) if nbt is not None else 0.0


def layer_batch_stats(layer: _BatchNorm, x: Tensor, before: tuple[Tensor, Tensor, Tensor | None] | None) -> BatchStats:
    """The per-channel batch statistics ``layer`` just normalised ``x`` with, as cheaply as possible.

    - bn_lightning layers keep them (:attr:`~bn_lightning.layers.ScratchBatchNormMixin.last_batch_stats`): free;
    - torch layers that updated their running statistics with a factor ``f >= 0.01``: recovered from the update in
      O(channels), inverting ``running = (1 - f) * before + f * batch`` (``before`` = the running mean, variance and
      ``num_batches_tracked`` before the forward; relative error ~1e-7 / f);
    - otherwise (no tracking, tiny or zero momentum, ``momentum=None`` after 100 batches, eval-mode layer): computed
      from ``x``, one pass over the activation.

    The callbacks do the same for all their layers at once (:class:`LayerBatch`); this is the one-layer form.
    """
    if isinstance(layer, ScratchBatchNormMixin) and layer.last_batch_stats is not None:
        return layer.last_batch_stats
    count = x.numel() // max(x.shape[1], 1)
    if before is not None and layer.training and layer.track_running_stats and count > 1:
        rm0, rv0, nbt0 = before
        if layer.momentum is None:
            factor = 1.0 / float(nbt0 + 1) if nbt0 is not None else 0.0
        else:
            factor = float(layer.momentum)
        # inverting the update divides float32 rounding by the factor: below 1e-2 (momentum=None after 100 batches)
        # it would cost more than 1e-5 relative error, so compute from the input instead
        if factor >= _MIN_FACTOR:
            mean = (layer.running_mean.float() - (1 - factor) * rm0) / factor
            unbiased = (layer.running_var.float() - (1 - factor) * rv0) / factor
            return BatchStats(mean, (unbiased * ((count - 1) / count)).clamp_(min=0), count)
    return batch_stats(x.detach())


# ---------------------------------------------------------------------------------------------- samples


def _sample_plan(t: Tensor, k: int, cache: dict[Any, Any] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Where to sample ``t`` ``(N, C, *)``: ``(source, idx, channels)``; ``torch.take(source, idx)`` is the sample.

    Dense tensors (contiguous, channels-last) are read in memory order, others in logical order, neither copied.
    The indices (at most ``k``, drawn once per size, layout and device, seeded by the size) and their channels are
    cached (in ``cache``, by default a module-wide one), so successive records look at the same positions.
    """
    cache = _PLANS if cache is None else cache
    dense_cl = not t.is_contiguous() and (
        (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))
    )
    if t.dim() >= 2 and (dense_cl or t.is_contiguous()):
        source = t.as_strided((t.numel(),), (1,), t.storage_offset()) if dense_cl else t  # memory order
        channel_stride = t.stride(1)
    else:
        source = t  # take() reads in logical order, without a copy
        channel_stride = t[0, 0].numel() if t.dim() >= 2 and t.shape[0] else 1
    channels_dim = t.shape[1] if t.dim() >= 2 else 1
    key = (t.numel(), channel_stride, channels_dim, t.device, k)
    plan = cache.get(key)
    if plan is None:
        n = t.numel()
        if n <= k:
            idx = torch.arange(n, device=t.device)
        else:
            g = torch.Generator(device="cpu").manual_seed(n)
            # sorted: the same positions, read in memory order (a random gather from a large tensor misses the cache)
            idx = torch.randperm(n, generator=g)[:k].sort().values.to(t.device)
        plan = (idx, torch.div(idx, channel_stride, rounding_mode="floor") % max(channels_dim, 1))
        if len(cache) >= _MAX_CACHED:
            cache.clear()
        cache[key] = plan
    return source, plan[0], plan[1]


# ---------------------------------------------------------------------------------------------- the recorder


class _Entry:
    """What one armed forward of one layer stashed."""

    __slots__ = ("batch", "count", "factor", "has_bias", "has_weight", "samples", "snap", "stats", "tracked")

    def __init__(self, snap: Tensor, tracked: bool, has_weight: bool, has_bias: bool, factor: float) -> None:
        self.snap = snap  # [running_mean, running_var, weight, bias] before the forward, zeros where absent
        self.tracked = tracked
        self.has_weight = has_weight
        self.has_bias = has_bias
        self.factor = factor
        self.stats: tuple[Tensor, Tensor] | None = None  # None: recovered from the running-stat update
        self.count = 0
        self.batch = 0
        self.samples: dict[int, tuple[Tensor, Tensor | None, Tensor]] = {}  # k -> (output, input, channels)


class LayerBatch:
    """Every watched layer's stash of one recording step, packed into padded ``(layers, ...)`` tensors.

    Rows follow the callback's layers; channels are padded with zeros to the widest layer ``W``. Rows of layers that
    did not run in the step hold zeros: a subclass must give them NaN values (``ran`` says which).

    Attributes:
        mean: ``(L, W)`` batch means (float32); ``var``: ``(L, W)`` biased batch variances.
        before: ``(L, 4, W)`` running mean, running variance, weight and bias before the forward (zeros where absent).
        running: ``(L, 2, W)`` running mean and variance after the forward.
        mask: ``(L, W)`` bool, the layer's channels; ``channels``: ``(L,)`` float, their number.
        eps: ``(L, 1)`` the layers' ``eps``.
        ran, tracked, has_weight, has_bias: ``(L,)`` bool: the layer ran in the step; had running statistics
            before the forward; has a weight; has a bias.
        batch: ``(L,)`` float, the input's dim 0 (NaN where the layer did not run).
    """

    def __init__(self, recorder: _Recorder, entries: list[_Entry | None], **tensors: Tensor) -> None:
        self._recorder = recorder
        self._entries = entries
        self.mean: Tensor = tensors["mean"]
        self.var: Tensor = tensors["var"]
        self.before: Tensor = tensors["before"]
        self.running: Tensor = tensors["running"]
        self.mask: Tensor = tensors["mask"]
        self.channels: Tensor = tensors["channels"]
        self.eps: Tensor = tensors["eps"]
        self.ran: Tensor = tensors["ran"]
        self.tracked: Tensor = tensors["tracked"]
        self.has_weight: Tensor = tensors["has_weight"]
        self.has_bias: Tensor = tensors["has_bias"]
        self.batch: Tensor = tensors["batch"]

    _FIELDS = ("mean", "var", "before", "running", "mask", "channels", "eps")
    _FLAGS = ("ran", "tracked", "has_weight", "has_bias", "batch")

    @property
    def ran_list(self) -> list[bool]:
        """Which rows' layers ran in the step, as Python bools."""
        return [e is not None for e in self._entries]

    def select(self, rows: Tensor, row_list: list[int], width: int) -> LayerBatch:
        """The rows ``rows`` (``row_list`` in Python), channels cut to ``width``."""
        tensors = {f: getattr(self, f).index_select(0, rows) for f in self._FIELDS + self._FLAGS}
        for f in self._FIELDS:
            if f != "channels" and f != "eps":
                tensors[f] = tensors[f][..., :width]
        return LayerBatch(self._recorder, [self._entries[i] for i in row_list], **tensors)

    def samples(self, k: int, with_input: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """The ``k``-element samples the hooks took, padded: ``(out, mask, count, inp, channels)``.

        ``out``/``inp``: ``(L, K)`` float32 output/input samples (zeros past each row's length), ``mask`` their valid
        entries, ``count`` ``(L,)`` their number (0 where the layer did not run), ``channels`` ``(L, K)`` the channel
        of each input sample; ``inp`` and ``channels`` are ``None`` without ``with_input``.
        """
        rec = self._recorder
        outs, ins, chans, at = [], [], [], []
        lengths = []
        for i, e in enumerate(self._entries):
            s = None if e is None else e.samples.get(k)
            if s is None:
                lengths.append(0)
                continue
            outs.append(s[0])
            ins.append(s[1])
            chans.append(s[2])
            at.append((i, 0, 1))
            lengths.append(s[0].numel())
        rows, width = len(self._entries), max(lengths, default=0)
        device = self.mean.device
        mask, count = rec.length_mask(tuple(lengths), width, device)
        shape = (rows, 1, width)
        if len(outs) == rows and all(n == width for n in lengths):  # no padding (the usual case): no gather either
            out = torch.stack(outs).float()
        else:
            out = rec.pack(outs, at, shape, device).view(rows, width).float()
        if not with_input:
            return out, mask, count, None, None
        if len(outs) == rows and all(n == width for n in lengths):
            inp = torch.stack(ins).float()  # type: ignore[arg-type]
        else:
            inp = rec.pack([t for t in ins if t is not None], at, shape, device).view(rows, width).float()
        # the channels of the cached sample positions: packed once per layout (identity-checked, ids can be reused)
        key = ("channels", shape, tuple(id(c) for c in chans), device)
        cached = rec.cached(key, lambda: (chans, rec.pack(chans, at, shape, device).view(rows, width)))
        if any(a is not b for a, b in zip(cached[0], chans, strict=True)):
            cached = rec._cache[key] = (chans, rec.pack(chans, at, shape, device).view(rows, width))
        return out, mask, count, inp, cached[1]


class _Recorder:
    """The forward hooks of every BN layer watched by a BN callback on one model, and what they stash.

    Callbacks :meth:`attach` with their layers (the recorder watches the union, one pre-forward and one forward hook
    per layer whatever the number of callbacks) and call :meth:`begin` at every training batch start: the first
    call of a step clears the previous step's stashes, and the hooks stash when any callback records in the step.
    :meth:`batch` packs the stashes once per step, for every callback.
    """

    _BY_MODEL: weakref.WeakKeyDictionary[nn.Module, _Recorder] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self.subscribers: dict[int, tuple[BatchNormCallbackBase, list[_BatchNorm]]] = {}
        self.rows: list[_BatchNorm] = []
        self.handles: dict[_BatchNorm, tuple[Any, Any]] = {}
        self.armed = False
        self._armed_by: set[int] = set()
        self.entries: dict[_BatchNorm, _Entry] = {}
        self._pending: dict[_BatchNorm, _Entry] = {}
        self._begun: set[int] = set()
        self._wants: dict[int, bool] = {}
        self._batch: LayerBatch | None = None
        self._cache: dict[Any, Any] = {}
        self._zeros: dict[Any, Tensor] = {}

    # ------------------------------------------------------------------ subscription

    @classmethod
    def attach(cls, model: nn.Module, callback: BatchNormCallbackBase, layers: list[_BatchNorm]) -> _Recorder:
        recorder = cls._BY_MODEL.get(model)
        if recorder is None:
            recorder = cls._BY_MODEL[model] = cls()
        recorder.subscribers[id(callback)] = (callback, layers)
        recorder._rebuild()
        return recorder

    def detach(self, callback: BatchNormCallbackBase) -> None:
        self.subscribers.pop(id(callback), None)
        self._begun.discard(id(callback))
        self._rebuild()
        if not self.subscribers:
            for model, recorder in list(self._BY_MODEL.items()):
                if recorder is self:
                    del self._BY_MODEL[model]

    def _rebuild(self) -> None:
        rows: dict[_BatchNorm, None] = {}
        for _, layers in self.subscribers.values():
            rows.update(dict.fromkeys(layers))
        for layer in [m for m in self.handles if m not in rows]:
            for handle in self.handles.pop(layer):
                handle.remove()
        for layer in rows:
            if layer not in self.handles:
                self.handles[layer] = (
                    layer.register_forward_pre_hook(self._pre),
                    layer.register_forward_hook(self._post),
                )
        self.rows = list(rows)
        self._cache = {}
        self._batch = None
        self.entries, self._pending = {}, {}
        self.armed = False
        self._armed_by = set()

    def begin(self, callback: BatchNormCallbackBase, recording: bool) -> None:
        """Called by every subscriber at every training batch start."""
        key = id(callback)
        if key in self._begun:  # the first call of a new step
            self._begun = set()
            self.armed, self._armed_by = False, set()
            if self.entries or self._pending or self._batch is not None:
                self.entries, self._pending, self._batch = {}, {}, None
            self._wants = {}
        self._begun.add(key)
        if recording:
            self.armed = True
            self._armed_by.add(key)
            request = callback._sample_request()
            if request is not None:
                k, with_input = request
                self._wants[k] = self._wants.get(k, False) or with_input

    def end(self, callback: BatchNormCallbackBase) -> None:
        """Called by a recording subscriber at its batch end: the hooks stop stashing once all of them are done.

        A validation run may come before the next batch; the stashes stay until the next step begins.
        """
        self._armed_by.discard(id(callback))
        self.armed = bool(self._armed_by)

    # ------------------------------------------------------------------ hooks

    def _zeros_like(self, layer: _BatchNorm, ref: Tensor) -> Tensor:
        key = (layer.num_features, ref.dtype, ref.device)
        z = self._zeros.get(key)
        if z is None:
            z = self._zeros[key] = torch.zeros(layer.num_features, dtype=ref.dtype, device=ref.device)
        return z

    def _pre(self, layer: _BatchNorm, args: tuple) -> None:
        if not self.armed:
            return
        rm, rv, w, b = layer.running_mean, layer.running_var, layer.weight, layer.bias
        tracked = bool(layer.track_running_stats) and rm is not None and rv is not None
        present = [t for t in (rm, rv, w, b) if t is not None]
        if not present:
            return
        zeros = self._zeros_like(layer, present[0])
        if not tracked:
            rm = rv = zeros
        with torch.no_grad():
            snap = torch.cat([rm, rv, zeros if w is None else w, zeros if b is None else b])
        factor = _update_factor(layer) if tracked else 0.0
        self._pending[layer] = _Entry(snap, tracked, w is not None, b is not None, factor)

    def _post(self, layer: _BatchNorm, args: tuple, output: Any) -> None:
        if not self.armed or not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            return
        x = args[0]
        entry = self._pending.pop(layer, None)
        if entry is None:  # a layer without running statistics or affine parameters
            zeros = self._zeros_like(layer, x)
            entry = _Entry(torch.cat([zeros, zeros, zeros, zeros]), False, False, False, 0.0)
        entry.count = x.numel() // max(x.shape[1], 1) if x.dim() >= 2 else x.numel()
        entry.batch = x.shape[0] if x.dim() else 1
        with torch.no_grad():
            if isinstance(layer, ScratchBatchNormMixin) and layer.last_batch_stats is not None:
                entry.stats = (layer.last_batch_stats.mean, layer.last_batch_stats.var)
            elif not (entry.tracked and layer.training and entry.count > 1 and entry.factor >= _MIN_FACTOR):
                stats = batch_stats(x.detach())
                entry.stats = (stats.mean, stats.var)
            # else: recovered from the running-stat update at batch end, for all layers at once
            for k, with_input in self._wants.items():
                source, idx, channels = _sample_plan(output, k)
                out = torch.take(source, idx)  # a copy: a following in-place ReLU would change the output
                inp = None
                if with_input:
                    source, idx, channels = _sample_plan(x, k)
                    inp = torch.take(source, idx)
                entry.samples[k] = (out, inp, channels)
        self.entries[layer] = entry

    # ------------------------------------------------------------------ packing

    def cached(self, key: Any, make: Any) -> Any:
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = make()
        return value

    def pack(self, pieces: list[Tensor], at: list[tuple[int, int, int]], shape: tuple[int, int, int], device) -> Tensor:
        """Place 1-d ``pieces`` into a zero-padded ``shape = (rows, slots, width)`` tensor: one cat, one gather.

        ``at[i] = (row, slot, slots)``: piece ``i`` fills ``slots`` consecutive slots of ``row`` from ``slot``, each
        with ``len(piece) / slots`` values.
        """
        if not pieces:
            return torch.zeros(shape, device=device)
        lengths = tuple(p.numel() for p in pieces)
        ref = pieces[0]
        key = (shape, lengths, tuple(at), ref.device)
        idx = _INDEXES.get(key)
        if idx is None:  # module-wide: a fresh recorder (every fit) finds the layouts of the previous one
            if len(_INDEXES) >= _MAX_CACHED:
                _INDEXES.clear()
            idx = _INDEXES[key] = _pack_index(lengths, at, shape).to(ref.device)
        fill = self.cached(("fill", ref.dtype, ref.device), lambda: torch.zeros(1, dtype=ref.dtype, device=ref.device))
        return torch.cat([*pieces, fill]).index_select(0, idx).view(shape)

    def length_mask(self, lengths: tuple[int, ...], width: int, device) -> tuple[Tensor, Tensor]:
        """``(rows, width)`` mask of the first ``lengths[row]`` entries, and ``lengths`` as a float tensor."""

        def make() -> tuple[Tensor, Tensor]:
            n = torch.tensor(lengths, device=device)
            return torch.arange(width, device=device) < n.unsqueeze(1), n.float()

        return self.cached(("mask", lengths, width, device), make)

    def batch(self, device: torch.device) -> LayerBatch:
        """Every row's stash of this step, packed (once per step, whoever asks first)."""
        if self._batch is not None:
            return self._batch
        rows = self.rows
        n, width = len(rows), max((m.num_features for m in rows), default=0)
        entries = [self.entries.get(m) for m in rows]
        snaps, snap_at, running, running_at, direct, direct_at, meta = [], [], [], [], [], [], []
        nan = float("nan")
        for i, (layer, e) in enumerate(zip(rows, entries, strict=True)):
            if e is None:
                meta.append((0.0, 0.0, 0.0, 0.0, 1.0, 1.0, nan))
                continue
            snaps.append(e.snap)
            snap_at.append((i, 0, 4))
            if e.tracked:
                running += [layer.running_mean, layer.running_var]
                running_at += [(i, 0, 1), (i, 1, 1)]
            if e.stats is not None:
                direct += list(e.stats)
                direct_at += [(i, 0, 1), (i, 1, 1)]
                factor, correction = 1.0, 1.0
            else:
                factor, correction = e.factor, (e.count - 1) / e.count
            meta.append((1.0, float(e.tracked), float(e.has_weight), float(e.has_bias), factor, correction, e.batch))
        device = snaps[0].device if snaps else device
        with torch.no_grad():
            before = self.pack(snaps, snap_at, (n, 4, width), device).float()
            after = self.pack(running, running_at, (n, 2, width), device).float()
            m = torch.tensor(meta, dtype=torch.float32, device=device)
            flags = m[:, :4] > 0.5
            factor, correction = m[:, 4:5], m[:, 5:6]
            if len(direct) == 2 * len(snaps):  # every layer that ran kept its statistics: nothing to recover
                stats = self.pack(direct, direct_at, (n, 2, width), device).float()
                mean, var = stats[:, 0], stats[:, 1]
            else:
                # running = (1 - f) * before + f * batch (unbiased variance), for every layer at once
                mean = (after[:, 0] - (1 - factor) * before[:, 0]) / factor
                var = ((after[:, 1] - (1 - factor) * before[:, 1]) / factor * correction).clamp_(min=0)
                if direct:
                    stats = self.pack(direct, direct_at, (n, 2, width), device).float()
                    is_direct = torch.tensor([e is not None and e.stats is not None for e in entries], device=device)
                    mean = torch.where(is_direct.unsqueeze(1), stats[:, 0], mean)
                    var = torch.where(is_direct.unsqueeze(1), stats[:, 1], var)

            def static() -> tuple[Tensor, Tensor, Tensor]:
                mask, channels = self.length_mask(tuple(m.num_features for m in rows), width, device)
                eps = torch.tensor([float(m.eps) for m in rows], dtype=torch.float32, device=device).view(-1, 1)
                return mask, channels, eps

            mask, channels, eps = self.cached(("static", device), static)
        self._batch = LayerBatch(
            self,
            entries,
            mean=mean,
            var=var,
            before=before,
            running=after,
            mask=mask,
            channels=channels,
            eps=eps,
            ran=flags[:, 0],
            tracked=flags[:, 1],
            has_weight=flags[:, 2],
            has_bias=flags[:, 3],
            batch=m[:, 6],
        )
        return self._batch

    def batch_for(self, callback: BatchNormCallbackBase, device: torch.device) -> LayerBatch:
        """:meth:`batch` restricted to ``callback``'s layers, in its order."""
        full = self.batch(device)
        _, layers = self.subscribers[id(callback)]
        width = max((m.num_features for m in layers), default=0)
        if layers == self.rows and width == full.mean.shape[1]:
            return full
        row_list = [self.rows.index(m) for m in layers]
        rows = self.cached(("rows", id(callback)), lambda: torch.tensor(row_list, device=full.mean.device))
        return full.select(rows, row_list, width)


def _pack_index(lengths: tuple[int, ...], at: list[tuple[int, int, int]], shape: tuple[int, int, int]) -> Tensor:
    rows, slots, width = shape
    total = sum(lengths)
    idx = [total] * (rows * slots * width)  # the fill value, appended after the pieces
    offset = 0
    for length, (row, slot, span) in zip(lengths, at, strict=True):
        c = length // span
        for j in range(span):
            start = ((row * slots) + slot + j) * width
            idx[start : start + c] = range(offset + j * c, offset + (j + 1) * c)
        offset += length
    return torch.tensor(idx, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- the callbacks


class BatchNormCallbackBase(Callback):
    """Base of :class:`~bn_lightning.callbacks.BatchNormMonitor` and :class:`~bn_lightning.callbacks.RunningStatDrift`.

    Args:
        log_every_n_steps: record every this many training batches; ``None`` uses the Trainer's
            ``log_every_n_steps``.
        include: ``fnmatch`` patterns of BN layer names (qualified, e.g. ``"net.features.*"``) to watch.
        exclude: patterns of BN layer names to skip.
        prefix: metric key prefix; keys are ``<prefix>/<layer>/<stat>``.
    """

    #: stat name -> cross-rank reduction ("mean", "max", "min" or "sum"); set by subclasses
    STATS: dict[str, str] = {}
    #: stats computed under DDP from every rank's values (see :meth:`_derive`)
    DERIVED: tuple[str, ...] = ()

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        prefix: str = "bn",
    ) -> None:
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 1
        ):
            raise ValueError(f"log_every_n_steps must be a positive int or None, got {log_every_n_steps!r}")
        for arg, value in (("include", include), ("exclude", exclude)):
            if isinstance(value, str):
                raise TypeError(f"{arg} must be a sequence of name patterns, got the string {value!r}")
        self.log_every_n_steps = log_every_n_steps
        self.include = None if include is None else list(include)
        self.exclude = None if exclude is None else list(exclude)
        self.prefix = prefix
        self._layers: dict[str, _BatchNorm] = {}
        self._recorder: _Recorder | None = None
        self._armed = False
        self.batches_seen = 0
        self.records = 0

    # ------------------------------------------------------------------ subclass interface

    def _compute(self, batch: LayerBatch) -> Tensor:
        """The values of :attr:`STATS` (in order) then the extra columns, ``(layers, width)`` on the device.

        Rows of layers that did not run in the step (``batch.ran`` false) must be NaN.
        """
        raise NotImplementedError

    def _sample_request(self) -> tuple[int, bool] | None:
        """``(k, with_input)``: the hooks keep ``k``-element samples of the output (and input) on recording steps."""
        return None

    def _derive(self, per_rank: Tensor) -> Tensor:
        """Under DDP: the :attr:`DERIVED` statistics ``(layers, len(DERIVED))`` of the per-rank values.

        ``per_rank`` is ``(world, layers, columns)``; computed on the device, before the host copy.
        """
        raise NotImplementedError

    def _on_record(
        self, trainer: pl.Trainer, values: dict[str, dict[str, float]], extras: dict[str, list[float]], step: int
    ) -> None:
        """Called on EVERY rank after a record.

        Receives the reduced values (layer -> stat -> float; NaN values dropped) and the extra columns (layer ->
        floats).
        """

    # ------------------------------------------------------------------ hooks

    def _install(self, pl_module: pl.LightningModule) -> None:
        self._remove()
        self._layers = find_batchnorm_layers(pl_module, self.include, self.exclude)
        if self._layers:
            self._recorder = _Recorder.attach(pl_module, self, list(self._layers.values()))

    def _remove(self) -> None:
        if self._recorder is not None:
            self._recorder.detach(self)
            self._recorder = None
        self._armed = False

    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the BN layers being watched (after the fit started)."""
        return list(self._layers)

    def _every(self, trainer: pl.Trainer) -> int:
        return self.log_every_n_steps or max(int(trainer.log_every_n_steps), 1)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the strategy set up the model: a LayerSync plugin has already converted the layers
        self._install(pl_module)
        if not self._layers:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"{type(self).__name__}: the model has no BatchNorm layer to watch; it will log nothing.")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning does not call teardown after an exception: without this the hooks stay on the model (armed, if
        # the exception came mid-step)
        self._remove()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self._armed = bool(self._layers) and self.batches_seen % self._every(trainer) == 0
        if self._recorder is not None:
            self._recorder.begin(self, self._armed)

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        armed, self._armed = self._armed, False
        self.batches_seen += 1
        if not armed or self._recorder is None:
            return
        self._recorder.end(self)
        # a row for EVERY watched layer (NaN where this rank did not run it): every rank sends the same shape
        local = self._compute(self._recorder.batch_for(self, pl_module.device)).float()
        reduced, per_rank = self._reduce(trainer, local)
        names = list(self.STATS)
        if per_rank.shape[0] > 1 and self.DERIVED:  # statistics of the per-rank values, still on the device
            reduced = torch.cat([reduced[:, : len(names)], self._derive(per_rank), reduced[:, len(names) :]], dim=1)
            names += list(self.DERIVED)
        host = reduced.cpu()  # the ONE host transfer of this record
        values: dict[str, dict[str, float]] = {}
        extras: dict[str, list[float]] = {}
        k = len(names)
        for name, row in zip(self._layers, host.tolist(), strict=True):
            stats = row[:k]
            if all(v != v for v in stats):  # all NaN: no rank ran this layer in this step
                continue
            values[name] = {key: v for key, v in zip(names, stats, strict=True) if v == v}
            extras[name] = row[k:]
        step = trainer.global_step
        self.records += 1
        self._log(trainer, values, step)
        self._on_record(trainer, values, extras, step)

    # ------------------------------------------------------------------ reduction and logging

    def _extra_width(self) -> int:
        """Number of extra (unnamed, summed across ranks) columns after :attr:`STATS`, e.g. histogram bins."""
        return 0

    def _reduce(self, trainer: pl.Trainer, local: Tensor) -> tuple[Tensor, Tensor]:
        """Reduce the ``(layers, columns)`` tensor across ranks with ONE all-gather; NaN entries are ignored.

        Returns the reduced tensor and the per-rank tensor ``(world, layers, columns)`` (world 1 without DDP).
        """
        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return local, local.unsqueeze(0)
        gathered = [torch.empty_like(local) for _ in range(trainer.world_size)]
        _wait(dist.all_gather(gathered, local.contiguous(), async_op=True), local.device.type == "cpu")
        per_rank = torch.stack(gathered)
        hows = list(self.STATS.values()) + ["sum"] * self._extra_width()
        columns = [_REDUCE[how](per_rank[:, :, j]) for j, how in enumerate(hows)]
        return (torch.stack(columns, dim=1) if columns else local), per_rank

    def _log(self, trainer: pl.Trainer, values: dict[str, dict[str, float]], step: int) -> None:
        if not trainer.is_global_zero or not trainer.loggers:
            return
        metrics = {f"{self.prefix}/{layer}/{stat}": v for layer, stats in values.items() for stat, v in stats.items()}
        if not metrics:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ checkpoints

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, include=self.include, exclude=self.exclude)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"batches_seen": self.batches_seen, "records": self.records}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_seen = int(state_dict.get("batches_seen", 0))
        self.records = int(state_dict.get("records", 0))
