"""BatchNormMonitor: what every BN layer sees and does, logged as cheaply as a scalar.

Provides :class:`BatchNormMonitor`. Per BN layer ``<layer>`` (its qualified module name), on training steps every
``log_every_n_steps``, it logs ``bn/<layer>/<stat>`` for the stats in :attr:`BatchNormMonitor.STATS`, plus a
fixed-bin histogram of the normalised input ``x_hat`` from a bounded sample to TensorBoard and W&B.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from bn_lightning.callbacks._base import BatchNormCallbackBase, layer_batch_stats

__all__ = ["BatchNormMonitor", "sample_flat"]


def sample_flat(t: Tensor, k: int, cache: dict[Any, Tensor]) -> tuple[Tensor, Tensor]:
    """A fixed random sample of at most ``k`` elements of ``t`` ``(N, C, *)`` and the channel of each.

    Reads the tensor in memory order (free for contiguous and channels-last tensors; other layouts are copied), so the
    cost is O(k) whatever the activation size. The indices are drawn once per (size, layout, device) and cached, so
    successive records look at the same positions.

    Returns:
        ``(values, channels)``, both of length ``min(k, t.numel())``.
    """
    dense = t.dim() >= 2 and (
        t.is_contiguous()
        or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))
    )
    if dense:
        flat = t.as_strided((t.numel(),), (1,), t.storage_offset())  # memory order, no copy
        channel_stride = t.stride(1)
    else:
        flat = t.reshape(-1)  # logical order
        channel_stride = t[0, 0].numel() if t.shape[0] else 1
    key = (t.numel(), channel_stride, t.shape[1], t.device)
    idx = cache.get(key)
    if idx is None:
        n = t.numel()
        if n <= k:
            idx = torch.arange(n, device=t.device)
        else:
            g = torch.Generator(device="cpu").manual_seed(n)
            idx = torch.randperm(n, generator=g)[:k].to(t.device)
        cache[key] = idx
    channels = torch.div(idx, channel_stride, rounding_mode="floor") % max(t.shape[1], 1)
    return flat[idx], channels


class BatchNormMonitor(BatchNormCallbackBase):
    """Log per-layer activation statistics of every BN layer, cheap enough to leave on.

    Works with torch's BN layers, bn_lightning's and SyncBatchNorm. Nothing is computed on steps that do not log;
    on steps that do, each layer's statistics come from what the layer computed anyway (bn_lightning layers keep
    their batch statistics; for torch's they are recovered in O(channels) from the running-stat update), all values
    stay on the device, and one host copy per logging step carries every layer's numbers. Under DDP the values are
    reduced across ranks with one collective and logged on rank zero only.

    Logged per layer (``bn/<layer>/<stat>``), input statistics being per channel over the batch:

    - ``batch_mean``: mean over channels of the channel means of the layer's INPUT;
    - ``batch_std``: mean over channels of the channel (biased) standard deviations;
    - ``max_abs_mean``, ``min_std``, ``max_std``: extremes over channels;
    - ``collapsed_frac``: fraction of channels whose batch variance is <= ``collapse_var`` (dead channels);
    - ``nonfinite_channels``: channels whose batch statistics are NaN/inf (the input held a non-finite value);
    - ``out_std``, ``out_nonpos_frac``: std of the OUTPUT and the fraction of outputs <= 0 (what a following ReLU
      zeroes), from a bounded sample of ``sample_size`` elements;
    - ``gamma_abs_min``, ``gamma_near_zero``, ``beta_mean``: affine parameters (not logged without ``affine``).

    With ``histogram=True``, a ``bins``-bin histogram of ``x_hat = (x - mean) / sqrt(var + eps)`` on
    ``[-hist_range, hist_range]`` (values beyond go to the end bins), from the same bounded sample, goes to
    TensorBoard (``add_histogram_raw``) and W&B (``wandb.Histogram``) when those loggers are attached.

    Args:
        log_every_n_steps: record every this many training batches; ``None``: the Trainer's ``log_every_n_steps``.
        include: ``fnmatch`` patterns of BN layer names to watch (``None``: all).
        exclude: patterns of BN layer names to skip.
        histogram: log the ``x_hat`` histograms.
        bins: histogram bins.
        hist_range: the histogram spans ``[-hist_range, hist_range]``.
        sample_size: elements sampled per layer for the histogram and the output statistics.
        collapse_var: a channel whose batch variance is at most this counts as collapsed.
        near_zero_gamma: ``|gamma|`` below this counts as near zero.
        prefix: metric key prefix.

    Example::

        >>> import lightning.pytorch as pl
        >>> from bn_lightning.callbacks import BatchNormMonitor
        >>> trainer = pl.Trainer(callbacks=[BatchNormMonitor(log_every_n_steps=50)], logger=False,
        ...                      enable_progress_bar=False, enable_model_summary=False)
    """

    STATS = {
        "batch_mean": "mean",
        "batch_std": "mean",
        "max_abs_mean": "max",
        "min_std": "min",
        "max_std": "max",
        "collapsed_frac": "mean",
        "nonfinite_channels": "max",
        "out_std": "mean",
        "out_nonpos_frac": "mean",
        "gamma_abs_min": "min",
        "gamma_near_zero": "max",
        "beta_mean": "mean",
    }

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        histogram: bool = True,
        bins: int = 64,
        hist_range: float = 6.0,
        sample_size: int = 4096,
        collapse_var: float = 1e-6,
        near_zero_gamma: float = 1e-3,
        prefix: str = "bn",
    ) -> None:
        super().__init__(log_every_n_steps, include, exclude, prefix)
        for arg, value in (("bins", bins), ("sample_size", sample_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        for arg, value in (
            ("hist_range", hist_range),
            ("collapse_var", collapse_var),
            ("near_zero_gamma", near_zero_gamma),
        ):
            if not value > 0:
                raise ValueError(f"{arg} must be > 0, got {value!r}")
        self.histogram = histogram
        self.bins = bins
        self.hist_range = float(hist_range)
        self.sample_size = sample_size
        self.collapse_var = collapse_var
        self.near_zero_gamma = near_zero_gamma
        self._index_cache: dict[Any, Tensor] = {}

    def _extra_width(self) -> int:
        return self.bins if self.histogram else 0

    def _layer_values(self, name: str, layer: _BatchNorm, x: Tensor, y: Tensor) -> Tensor:
        stats = layer_batch_stats(layer, x, self._snapshots.get(name))
        mean, var = stats.mean.float(), stats.var.float()
        std = var.clamp(min=0).sqrt()
        nan = torch.full((), float("nan"), device=mean.device)
        if layer.weight is not None:
            gamma = layer.weight.detach().float().abs()
            gamma_stats = [gamma.min(), (gamma < self.near_zero_gamma).float().sum()]
        else:
            gamma_stats = [nan, nan]
        beta = layer.bias.detach().float().mean() if layer.bias is not None else nan
        y_sample, _ = sample_flat(y, self.sample_size, self._index_cache)
        y_sample = y_sample.float()
        values = [
            mean.mean(),
            std.mean(),
            mean.abs().max(),
            std.min(),
            std.max(),
            (var <= self.collapse_var).float().mean(),
            (~torch.isfinite(mean + var)).float().sum(),
            y_sample.std(correction=0) if y_sample.numel() else nan,
            (y_sample <= 0).float().mean() if y_sample.numel() else nan,
            *gamma_stats,
            beta,
        ]
        out = torch.stack([v.reshape(()).to(mean.device) for v in values])
        if not self.histogram:
            return out
        x_sample, channels = sample_flat(x, self.sample_size, self._index_cache)
        xhat = (x_sample.float() - mean[channels]) * torch.rsqrt(var[channels] + layer.eps)
        lim = self.hist_range
        hist = torch.histc(xhat.clamp(-lim, lim), bins=self.bins, min=-lim, max=lim)
        return torch.cat([out, hist])

    def _on_record(self, trainer, values, extras, step) -> None:  # type: ignore[override]
        if not (self.histogram and trainer.is_global_zero and trainer.loggers):
            return
        lim, bins = self.hist_range, self.bins
        edges = torch.linspace(-lim, lim, bins + 1).tolist()
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_histogram_raw"):  # TensorBoard
                for layer, counts in extras.items():
                    _tb_histogram(experiment, f"{self.prefix}/{layer}/x_hat", counts, edges, step)
            elif type(logger).__name__ == "WandbLogger":
                import wandb

                hists = {
                    f"{self.prefix}/{layer}/x_hat": wandb.Histogram(np_histogram=(counts, edges))
                    for layer, counts in extras.items()
                }
                experiment.log({**hists, "trainer/global_step": step})


def _tb_histogram(writer: Any, tag: str, counts: list[float], edges: list[float], step: int) -> None:
    """Write pre-binned counts as a TensorBoard histogram (no raw values needed)."""
    num = sum(counts)
    if num <= 0:
        return
    centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
    total = sum(c * m for c, m in zip(counts, centers, strict=True))
    squares = sum(c * m * m for c, m in zip(counts, centers, strict=True))
    writer.add_histogram_raw(
        tag,
        min=edges[0],
        max=edges[-1],
        num=int(num),
        sum=total,
        sum_squares=squares,
        bucket_limits=edges[1:],
        bucket_counts=counts,
        global_step=step,
    )
