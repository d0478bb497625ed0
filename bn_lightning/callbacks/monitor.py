"""BatchNormMonitor: what every BN layer sees and does, logged as cheaply as a scalar.

Provides :class:`BatchNormMonitor`. Per BN layer ``<layer>`` (its qualified module name), on training steps every
``log_every_n_steps``, it logs ``bn/<layer>/<stat>`` for the stats in :attr:`BatchNormMonitor.STATS`, plus a
fixed-bin histogram of the normalised input ``x_hat`` from a bounded sample to TensorBoard and W&B.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor
from typing_extensions import override

from bn_lightning.callbacks.base import BatchNormCallbackBase, delegated
from bn_lightning.monitoring import LayerBatch, MonitorStats, sample_flat

__all__ = ["BatchNormMonitor", "sample_flat"]


class BatchNormMonitor(BatchNormCallbackBase):
    """Log per-layer activation statistics of every BN layer, cheap enough to leave on.

    Works with torch's BN layers, bn_lightning's and SyncBatchNorm. Nothing is computed on steps that do not log;
    on steps that do, each layer's statistics come from what the layer computed anyway (bn_lightning layers keep
    their batch statistics; for torch's they are recovered in O(channels) from the running-stat update), all values
    stay on the device, and one host copy per logging step carries every layer's numbers. Under DDP the values are
    reduced across ranks with one collective and logged on rank zero only.

    Logged per layer (``bn/<layer>/<stat>``): ``batch_mean``, ``batch_std``, ``max_abs_mean``, ``min_std``,
    ``max_std``, ``collapsed_frac``, ``nonfinite_channels``, ``out_std``, ``out_nonpos_frac``, ``gamma_abs_min``,
    ``gamma_near_zero``, ``beta_mean``: each is defined in :class:`~bn_lightning.monitoring.MonitorStats`, the
    statistic set this callback records.

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

    STATS = MonitorStats.STATS

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
        #: the statistic set this callback records
        self.stats = MonitorStats(
            histogram, bins, hist_range, sample_size, collapse_var, near_zero_gamma, owner=type(self).__name__
        )

    histogram = delegated("histogram")
    bins = delegated("bins")
    hist_range = delegated("hist_range")
    sample_size = delegated("sample_size")
    collapse_var = delegated("collapse_var")
    near_zero_gamma = delegated("near_zero_gamma")

    @override
    def extra_width(self) -> int:
        return self.stats.extra_width()

    @override
    def sample_request(self) -> tuple[int, bool]:
        return self.stats.sample_request()

    @override
    def compute(self, batch: LayerBatch) -> Tensor:
        return self.stats.compute(batch)

    @override
    def on_record(self, trainer, values, extras, step) -> None:  # type: ignore[override]
        if not (self.histogram and trainer.is_global_zero and trainer.loggers):
            return
        edges = self.stats.edges()
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
