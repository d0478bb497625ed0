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
from typing_extensions import override

from bn_lightning.callbacks.base import BatchNormCallbackBase
from bn_lightning.callbacks.recorder import LayerBatch
from bn_lightning.callbacks.sampling import sample_plan
from bn_lightning.validation import check_int, check_number

__all__ = ["BatchNormMonitor", "sample_flat"]


def sample_flat(t: Tensor, k: int, cache: dict[Any, Any] | None = None) -> tuple[Tensor, Tensor]:
    """A fixed random sample of at most ``k`` elements of ``t`` ``(N, C, *)`` and the channel of each.

    Reads the tensor in memory order for contiguous and channels-last tensors, in logical order otherwise, without
    copying it, so the cost is O(k) whatever the activation size. The indices are drawn once per (size, layout,
    device) and cached in ``cache`` (default: the cache the callbacks share), so successive records look at the same
    positions.

    Returns:
        ``(values, channels)``, both of length ``min(k, t.numel())``.

    Example::

        >>> values, channels = sample_flat(torch.arange(24.0).view(2, 3, 4), k=5)
        >>> len(values), bool(((values // 4) % 3 == channels).all())
        (5, True)
    """
    source, idx, channels = sample_plan(t, k, cache)
    return torch.take(source, idx), channels


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
        owner = type(self).__name__
        self.histogram = histogram
        self.bins = check_int(owner, "bins", bins)
        self.hist_range = float(check_number(owner, "hist_range", hist_range, low=0, low_open=True))
        self.sample_size = check_int(owner, "sample_size", sample_size)
        self.collapse_var = check_number(owner, "collapse_var", collapse_var, low=0, low_open=True)
        self.near_zero_gamma = check_number(owner, "near_zero_gamma", near_zero_gamma, low=0, low_open=True)

    @override
    def extra_width(self) -> int:
        return self.bins if self.histogram else 0

    @override
    def sample_request(self) -> tuple[int, bool]:
        return self.sample_size, self.histogram

    @override
    def compute(self, batch: LayerBatch) -> Tensor:
        mean, var, mask, n = batch.mean, batch.var, batch.mask, batch.channels
        std = var.clamp(min=0).sqrt()
        inf = torch.inf
        gamma = batch.before[:, 2].abs()
        nan = torch.full((), float("nan"), device=mean.device)
        out, out_mask, out_n, inp, channels = batch.samples(self.sample_size, self.histogram)
        out_mean = out.sum(1, keepdim=True) / out_n.unsqueeze(1)
        out_var = torch.where(out_mask, out - out_mean, 0).square().sum(1) / out_n
        # padding is 0 in every packed tensor: sums need no mask, nor maxima of non-negative values
        columns = [
            mean.sum(1) / n,
            std.sum(1) / n,
            mean.abs().amax(1),
            torch.where(mask, std, inf).amin(1),
            std.amax(1),
            ((var <= self.collapse_var) & mask).sum(1) / n,
            (~torch.isfinite(mean + var)).sum(1),
            out_var.sqrt(),
            ((out <= 0) & out_mask).sum(1) / out_n,
            torch.where(batch.has_weight, torch.where(mask, gamma, inf).amin(1), nan),
            torch.where(batch.has_weight, ((gamma < self.near_zero_gamma) & mask).sum(1), nan),
            torch.where(batch.has_bias, batch.before[:, 3].sum(1) / n, nan),
        ]
        values = torch.stack([c.float() for c in columns], dim=1)
        if inp is not None and channels is not None:  # with the histogram
            xhat = (inp - mean.gather(1, channels)) * torch.rsqrt(var.gather(1, channels) + batch.eps)
            values = torch.cat([values, self._histograms(xhat, out_mask)], dim=1)
        return torch.where(batch.ran.unsqueeze(1), values, nan)

    def _histograms(self, xhat: Tensor, mask: Tensor) -> Tensor:
        """Row-wise ``torch.histc(xhat.clamp(-r, r), bins, -r, r)`` of the ``mask``-ed entries, ``(L, bins)``."""
        lim, bins = self.hist_range, self.bins
        clamped = xhat.clamp(-lim, lim)
        valid = mask & (clamped == clamped)  # histc skips NaN
        # histc's bin: (x - min) * bins / (max - min), the right edge in the last bin
        pos = torch.where(valid, (clamped + lim) * bins / (2 * lim), 0).long().clamp_(max=bins - 1)
        pos += torch.arange(0, xhat.shape[0] * bins, bins, device=xhat.device).unsqueeze(1)
        counts = torch.zeros(xhat.shape[0] * bins, device=xhat.device)
        return counts.index_add_(0, pos.view(-1), valid.view(-1).float()).view(-1, bins)

    @override
    def on_record(self, trainer, values, extras, step) -> None:  # type: ignore[override]
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
