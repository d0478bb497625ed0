"""What every BN layer sees and does: :class:`MonitorStats`, the statistic set of BatchNormMonitor.

Provides :class:`MonitorStats` and :func:`sample_flat`. Every value comes from what the layer computed anyway (its
batch statistics, recovered from the running-stat update for torch's layers), its affine parameters and bounded
samples of its input and output, so a record costs O(channels + samples) per layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from bn_lightning.monitoring.hooks import LayerBatch
from bn_lightning.monitoring.sampling import sample_plan
from bn_lightning.monitoring.statistics import Statistics
from bn_lightning.validation import check_int, check_number

__all__ = ["MonitorStats", "sample_flat"]


def sample_flat(t: Tensor, k: int, cache: dict[Any, Any] | None = None) -> tuple[Tensor, Tensor]:
    """A fixed random sample of at most ``k`` elements of ``t`` ``(N, C, *)`` and the channel of each.

    Reads the tensor in memory order for contiguous and channels-last tensors, in logical order otherwise, without
    copying it, so the cost is O(k) whatever the activation size. The indices are drawn once per (size, layout,
    device) and cached in ``cache`` (default: the cache the recorders share), so successive records look at the same
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


class MonitorStats(Statistics):
    """Per-layer activation statistics (``bn/<layer>/<stat>`` for the stats of :attr:`STATS`).

    Input statistics are per channel over the batch:

    - ``batch_mean``: mean over channels of the channel means of the layer's INPUT;
    - ``batch_std``: mean over channels of the channel (biased) standard deviations;
    - ``max_abs_mean``, ``min_std``, ``max_std``: extremes over channels;
    - ``collapsed_frac``: fraction of channels whose batch variance is <= ``collapse_var`` (dead channels);
    - ``nonfinite_channels``: channels whose batch statistics are NaN/inf (the input held a non-finite value);
    - ``out_std``, ``out_nonpos_frac``: std of the OUTPUT and the fraction of outputs <= 0 (what a following ReLU
      zeroes), from a bounded sample of ``sample_size`` elements;
    - ``gamma_abs_min``, ``gamma_near_zero``, ``beta_mean``: affine parameters (absent without ``affine``).

    With ``histogram=True`` the extra columns are a ``bins``-bin histogram of ``x_hat = (x - mean) / sqrt(var +
    eps)`` on ``[-hist_range, hist_range]`` (values beyond go to the end bins), from the same bounded sample;
    :meth:`edges` gives the bin edges.

    Args:
        histogram: compute the ``x_hat`` histograms.
        bins: histogram bins.
        hist_range: the histogram spans ``[-hist_range, hist_range]``.
        sample_size: elements sampled per layer for the histogram and the output statistics.
        collapse_var: a channel whose batch variance is at most this counts as collapsed.
        near_zero_gamma: ``|gamma|`` below this counts as near zero.
        owner: the name errors about the arguments start with.

    Raises:
        ValueError: for an argument out of its range.

    Example::

        >>> stats = MonitorStats(histogram=False, sample_size=256)
        >>> stats.sample_request(), stats.extra_width()
        ((256, False), 0)
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
        histogram: bool = True,
        bins: int = 64,
        hist_range: float = 6.0,
        sample_size: int = 4096,
        collapse_var: float = 1e-6,
        near_zero_gamma: float = 1e-3,
        owner: str = "MonitorStats",
    ) -> None:
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

    def edges(self) -> list[float]:
        """The ``bins + 1`` histogram bin edges."""
        return torch.linspace(-self.hist_range, self.hist_range, self.bins + 1).tolist()

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
