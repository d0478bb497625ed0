"""The hooks: forward hooks on BN layers that stash what a record needs, packed once per step for every reader.

Provides :class:`LayerHooks` and :class:`LayerBatch`. One :class:`LayerHooks` serves every recorder of a model
(:mod:`bn_lightning.monitoring.registry`): :class:`~bn_lightning.monitoring.BatchNormRecorder` and, through it, the
Lightning and Fabric callbacks.

How a record works (on steps that do not record, the hooks return at once and no tensor op runs):

- the forward hooks of a watched layer only STASH what the statistics need: one copy of the running statistics and
  affine parameters as they were before the forward (``4 * C`` values), references to the batch statistics where the
  layer keeps them, and bounded samples of its input and output (taken in the hook: a following in-place ReLU
  overwrites the output);
- after the step, :meth:`LayerHooks.batch` packs the stashes of all layers into padded ``(layers, channels)``
  tensors (one ``cat`` and one ``index_select`` each, :class:`~bn_lightning.monitoring.packing.Packer`), once for
  every reader, so the number of ops does not grow with the number of layers; torch layers' batch statistics are
  recovered from their running-stat update for all layers at once
  (:mod:`~bn_lightning.monitoring.recovery`).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from bn_lightning.functional import batch_stats
from bn_lightning.layers import has_batch_stats
from bn_lightning.monitoring.packing import Packer
from bn_lightning.monitoring.recovery import MIN_FACTOR, update_factor
from bn_lightning.monitoring.sampling import sample_plan

__all__ = ["LayerHooks", "LayerBatch"]


class _Entry:
    """What one recording forward of one layer stashed."""

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

    Rows follow the reader's layers; channels are padded with zeros to the widest layer ``W``. Rows of layers that
    did not run in the step hold zeros: a reader must give them NaN values (``ran`` says which).

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

    _FIELDS = ("mean", "var", "before", "running", "mask", "channels", "eps")
    _FLAGS = ("ran", "tracked", "has_weight", "has_bias", "batch")

    def __init__(self, packer: Packer, entries: list[_Entry | None], **tensors: Tensor) -> None:
        self._packer = packer
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
        return LayerBatch(self._packer, [self._entries[i] for i in row_list], **tensors)

    def samples(self, k: int, with_input: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """The ``k``-element samples the hooks took, padded: ``(out, mask, count, inp, channels)``.

        ``out``/``inp``: ``(L, K)`` float32 output/input samples (zeros past each row's length), ``mask`` their valid
        entries, ``count`` ``(L,)`` their number (0 where the layer did not run), ``channels`` ``(L, K)`` the channel
        of each input sample; ``inp`` and ``channels`` are ``None`` without ``with_input``.
        """
        packer = self._packer
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
        mask, count = packer.length_mask(tuple(lengths), width, device)
        shape = (rows, 1, width)
        unpadded = len(outs) == rows and all(n == width for n in lengths)  # the usual case: no gather either
        out = torch.stack(outs).float() if unpadded else packer.pack(outs, at, shape, device).view(rows, width).float()
        if not with_input:
            return out, mask, count, None, None
        if unpadded:
            inp = torch.stack(ins).float()  # type: ignore[arg-type]
        else:
            inp = packer.pack([t for t in ins if t is not None], at, shape, device).view(rows, width).float()
        # the channels of the cached sample positions: packed once per layout (identity-checked, ids can be reused)
        key = ("channels", shape, tuple(id(c) for c in chans), device)
        cached = packer.cached(key, lambda: (chans, packer.pack(chans, at, shape, device).view(rows, width)))
        if any(a is not b for a, b in zip(cached[0], chans, strict=True)):
            cached = packer.put(key, (chans, packer.pack(chans, at, shape, device).view(rows, width)))
        return out, mask, count, inp, cached[1]


class LayerHooks:
    """The forward hooks of the BN layers its readers watch, and what they stash on recording steps.

    Readers (any hashable key: the recorders use themselves) :meth:`subscribe` with their layers; the object
    watches the union, one pre-forward and one forward hook per layer whatever the number of readers. Every reader
    calls :meth:`begin` at every training step start (the first call of a step clears the previous step's stashes;
    the hooks stash when any reader records in the step) and :meth:`end` when its step is over; :meth:`batch` packs
    the stashes once per step, for every reader, and :meth:`batch_for` restricts them to one reader's layers.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> hooks = LayerHooks()
        >>> hooks.subscribe("me", [net[1]])
        >>> hooks.begin("me", recording=True)
        >>> _ = net(torch.randn(8, 3))
        >>> hooks.end("me")
        >>> batch = hooks.batch(torch.device("cpu"))
        >>> tuple(batch.mean.shape), batch.ran_list
        ((1, 4), [True])
        >>> hooks.unsubscribe("me")  # the last reader gone: the hooks are removed
        >>> net[1]._forward_hooks
        OrderedDict()
    """

    def __init__(self) -> None:
        self.subscribers: dict[Hashable, list[_BatchNorm]] = {}
        self.rows: list[_BatchNorm] = []
        self.handles: dict[_BatchNorm, tuple[Any, Any]] = {}
        self.armed = False
        self._armed_by: set[Hashable] = set()
        self.entries: dict[_BatchNorm, _Entry] = {}
        self._pending: dict[_BatchNorm, _Entry] = {}
        self._begun: set[Hashable] = set()
        self._wants: dict[int, bool] = {}
        self._batch: LayerBatch | None = None
        self._packer = Packer()
        self._zeros: dict[Any, Tensor] = {}
        self.grad_only = False
        self._grad_only_by: dict[Hashable, bool] = {}

    # ------------------------------------------------------------------ subscription

    def subscribe(self, key: Hashable, layers: list[_BatchNorm]) -> None:
        """Watch ``layers`` for the reader ``key`` (replacing its previous layers)."""
        self.subscribers[key] = layers
        self._rebuild()

    def unsubscribe(self, key: Hashable) -> None:
        """Stop watching for ``key``; hooks of layers no reader watches any more are removed."""
        self.subscribers.pop(key, None)
        self._begun.discard(key)
        self._rebuild()

    def _rebuild(self) -> None:
        rows: dict[_BatchNorm, None] = {}
        for layers in self.subscribers.values():
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
        self._packer.clear()
        self._batch = None
        self.entries, self._pending = {}, {}
        self.armed = False
        self._armed_by = set()
        self._grad_only_by, self.grad_only = {}, False

    # ------------------------------------------------------------------ steps

    def begin(
        self, key: Hashable, recording: bool, sample: tuple[int, bool] | None = None, grad_only: bool = False
    ) -> None:
        """Called by every reader at every training step start.

        Args:
            key: the reader.
            recording: whether the reader records in this step (the hooks stash when any reader does).
            sample: ``(k, with_input)``: keep ``k``-element samples of the output (and of the input) too.
            grad_only: the reader ignores forwards run without gradients (``torch.no_grad``, inference mode: an
                evaluation between two training steps); the hooks skip them when every recording reader does.
        """
        if key in self._begun:  # the first call of a new step
            self._begun = set()
            self.armed, self._armed_by, self._grad_only_by = False, set(), {}
            if self.entries or self._pending or self._batch is not None:
                self.entries, self._pending, self._batch = {}, {}, None
            self._wants = {}
        self._begun.add(key)
        if recording:
            self.armed = True
            self._armed_by.add(key)
            self._grad_only_by[key] = grad_only
            self.grad_only = all(self._grad_only_by.values())
            if sample is not None:
                k, with_input = sample
                self._wants[k] = self._wants.get(k, False) or with_input

    def end(self, key: Hashable) -> None:
        """Called by a recording reader after its step: the hooks stop stashing once all of them are done.

        A validation run may come before the next step; the stashes stay until the next step begins.
        """
        self._armed_by.discard(key)
        self._grad_only_by.pop(key, None)
        self.armed = bool(self._armed_by)
        self.grad_only = all(self._grad_only_by.values())

    # ------------------------------------------------------------------ hooks

    def _zeros_like(self, layer: _BatchNorm, ref: Tensor) -> Tensor:
        key = (layer.num_features, ref.dtype, ref.device)
        z = self._zeros.get(key)
        if z is None:
            z = self._zeros[key] = torch.zeros(layer.num_features, dtype=ref.dtype, device=ref.device)
        return z

    def _skips(self) -> bool:
        return not self.armed or (self.grad_only and not torch.is_grad_enabled())

    def _pre(self, layer: _BatchNorm, args: tuple) -> None:
        if self._skips():
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
        factor = update_factor(layer) if tracked else 0.0
        self._pending[layer] = _Entry(snap, tracked, w is not None, b is not None, factor)

    def _post(self, layer: _BatchNorm, args: tuple, output: Any) -> None:
        if self._skips() or not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            return
        x = args[0]
        entry = self._pending.pop(layer, None)
        if entry is None:  # a layer without running statistics or affine parameters
            zeros = self._zeros_like(layer, x)
            entry = _Entry(torch.cat([zeros, zeros, zeros, zeros]), False, False, False, 0.0)
        entry.count = x.numel() // max(x.shape[1], 1) if x.dim() >= 2 else x.numel()
        entry.batch = x.shape[0] if x.dim() else 1
        with torch.no_grad():
            kept = layer.last_batch_stats if has_batch_stats(layer) else None
            if kept is not None:
                entry.stats = (kept.mean, kept.var)
            elif not (entry.tracked and layer.training and entry.count > 1 and entry.factor >= MIN_FACTOR):
                stats = batch_stats(x.detach())
                entry.stats = (stats.mean, stats.var)
            # else: recovered from the running-stat update at batch end, for all layers at once
            for k, with_input in self._wants.items():
                source, idx, channels = sample_plan(output, k)
                out = torch.take(source, idx)  # a copy: a following in-place ReLU would change the output
                inp = None
                if with_input:
                    source, idx, channels = sample_plan(x, k)
                    inp = torch.take(source, idx)
                entry.samples[k] = (out, inp, channels)
        self.entries[layer] = entry

    # ------------------------------------------------------------------ packing

    def batch(self, device: torch.device) -> LayerBatch:
        """Every row's stash of this step, packed (once per step, whoever asks first)."""
        if self._batch is not None:
            return self._batch
        rows, packer = self.rows, self._packer
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
            before = packer.pack(snaps, snap_at, (n, 4, width), device).float()
            after = packer.pack(running, running_at, (n, 2, width), device).float()
            m = torch.tensor(meta, dtype=torch.float32, device=device)
            flags = m[:, :4] > 0.5
            factor, correction = m[:, 4:5], m[:, 5:6]
            if len(direct) == 2 * len(snaps):  # every layer that ran kept its statistics: nothing to recover
                stats = packer.pack(direct, direct_at, (n, 2, width), device).float()
                mean, var = stats[:, 0], stats[:, 1]
            else:
                # running = (1 - f) * before + f * batch (unbiased variance), for every layer at once
                mean = (after[:, 0] - (1 - factor) * before[:, 0]) / factor
                var = ((after[:, 1] - (1 - factor) * before[:, 1]) / factor * correction).clamp_(min=0)
                if direct:
                    stats = packer.pack(direct, direct_at, (n, 2, width), device).float()
                    is_direct = torch.tensor([e is not None and e.stats is not None for e in entries], device=device)
                    mean = torch.where(is_direct.unsqueeze(1), stats[:, 0], mean)
                    var = torch.where(is_direct.unsqueeze(1), stats[:, 1], var)

            def static() -> tuple[Tensor, Tensor, Tensor]:
                mask, channels = packer.length_mask(tuple(m.num_features for m in rows), width, device)
                eps = torch.tensor([float(m.eps) for m in rows], dtype=torch.float32, device=device).view(-1, 1)
                return mask, channels, eps

            mask, channels, eps = packer.cached(("static", device), static)
        self._batch = LayerBatch(
            packer,
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

    def batch_for(self, key: Hashable, device: torch.device) -> LayerBatch:
        """:meth:`batch` restricted to the layers of the reader ``key``, in its order."""
        full = self.batch(device)
        layers = self.subscribers[key]
        width = max((m.num_features for m in layers), default=0)
        if layers == self.rows and width == full.mean.shape[1]:
            return full
        row_list = [self.rows.index(m) for m in layers]
        rows = self._packer.cached(("rows", key), lambda: torch.tensor(row_list, device=full.mean.device))
        return full.select(rows, row_list, width)
