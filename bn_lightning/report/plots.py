"""The report's pictures, drawn with matplotlib's Agg backend (no display needed), one PNG per plot.

Provides :func:`draw_run` (every plot of one run: heatmaps of layers x steps, training curves with BN events,
``x_hat`` histograms over time or per-layer summary lines) and :func:`draw_sweep_curves`. A plot whose metrics were
not logged is not drawn: it comes back as a :class:`NotDrawn` that says why, for the page to show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, whatever the environment's display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm, Normalize  # noqa: E402

from bn_lightning.report.runs import RunData, Series  # noqa: E402

__all__ = ["DPI", "HEATMAPS", "WIDTH_PX", "Figure", "NotDrawn", "draw_run", "draw_sweep_curves"]

#: every PNG is this many pixels wide (10 inches at :data:`DPI`); the page scales it down on small screens
WIDTH_PX = 1000
DPI = 100
#: heatmaps: per-layer statistic -> (file stem, title, what it shows)
HEATMAPS = {
    "drift_kl": ("heatmap_drift_kl", "Drift: KL(batch || running) per layer", "nats, log scale"),
    "rm_velocity": ("heatmap_rm_velocity", "Running-mean velocity per layer", "relative change per record, log scale"),
    "rv_velocity": ("heatmap_rv_velocity", "Running-var velocity per layer", "relative change per record, log scale"),
    "batch_std": ("heatmap_batch_std", "Batch std per layer", "mean over channels of the batch std"),
}
_MAX_HIST_LAYERS = 4
_CURVES = (
    ("Loss", ("train/loss_step", "train/loss_epoch", "val/loss")),
    ("Accuracy", ("train/acc", "val/acc")),
    ("BN train/eval gap (loss with running stats - with batch stats)", ("bn/gap/loss",)),
)


@dataclass(frozen=True)
class Figure:
    """A drawn plot: its PNG's file name (beside the page), title and caption."""

    filename: str
    title: str
    caption: str


@dataclass(frozen=True)
class NotDrawn:
    """A plot that could not be drawn, and why."""

    title: str
    reason: str


def _figure(height_in: float, rows: int = 1) -> tuple[plt.Figure, np.ndarray]:
    fig, axes = plt.subplots(rows, 1, figsize=(WIDTH_PX / DPI, height_in), dpi=DPI, squeeze=False)
    return fig, axes[:, 0]


def _save(fig: plt.Figure, out_dir: Path, stem: str) -> str:
    name = f"{stem}.png"
    fig.savefig(out_dir / name, dpi=DPI)  # no bbox_inches="tight": the size stays WIDTH_PX wide
    plt.close(fig)
    return name


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges around sorted centres (half-way between neighbours)."""
    if centres.size == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    mids = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - mids[0]], mids, [2 * centres[-1] - mids[-1]]])


def _norm(values: np.ndarray, log: bool) -> Normalize:
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    if log and positive.size:
        top = float(positive.max())
        return LogNorm(vmin=max(float(positive.min()), top * 1e-6), vmax=top if top > 0 else 1.0)
    if finite.size:
        low, high = float(finite.min()), float(finite.max())
        return Normalize(vmin=low, vmax=high if high > low else low + 1.0)
    return Normalize(0.0, 1.0)


def _label_layers(ax: plt.Axes, layers: Sequence[str]) -> None:
    step = max(1, len(layers) // 40)  # at most ~40 labels stay readable
    ticks = list(range(0, len(layers), step))
    ax.set_yticks(ticks)
    ax.set_yticklabels([layers[i] for i in ticks], fontsize=8 if len(layers) < 25 else 6)


def _heatmap(data: RunData, stat: str, out_dir: Path) -> Figure | NotDrawn:
    stem, title, unit = HEATMAPS[stat]
    series = [(layer, data.layer_series(layer, stat)) for layer in data.layers]
    series = [(layer, s) for layer, s in series if s is not None and np.isfinite(s.values).any()]
    if not series:
        return NotDrawn(title, f"no `bn/<layer>/{stat}` metric was logged (RunningStatDrift / BatchNormMonitor)")
    layers = [layer for layer, _ in series]
    steps = np.unique(np.concatenate([s.steps for _, s in series]))
    grid = np.full((len(layers), steps.size), np.nan)
    for row, (_, s) in enumerate(series):
        grid[row, np.searchsorted(steps, s.steps)] = s.values
    log = stat != "batch_std" or _spread(grid) > 100
    fig, (ax,) = _figure(max(3.0, 1.5 + 0.24 * len(layers)))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    y_edges = np.arange(len(layers) + 1) - 0.5
    mesh = ax.pcolormesh(
        _edges(steps.astype(np.float64)),
        y_edges,
        np.ma.masked_invalid(grid),
        cmap=cmap,
        norm=_norm(grid, log),
        shading="flat",
    )
    ax.set_ylim(len(layers) - 0.5, -0.5)  # the first layer on top
    _label_layers(ax, layers)
    ax.set_xlabel("global step")
    ax.set_title(title)
    fig.colorbar(mesh, ax=ax, label=unit, pad=0.01)
    fig.tight_layout()
    caption = (
        f"{len(layers)} layers (network order, input at the top) x {steps.size} recorded steps; grey: not recorded."
    )
    return Figure(_save(fig, out_dir, stem), title, caption)


def _spread(values: np.ndarray) -> float:
    positive = values[np.isfinite(values) & (values > 0)]
    return float(positive.max() / positive.min()) if positive.size else 0.0


def _events(data: RunData) -> list[tuple[float, str, str]]:
    """(epoch, label, line style) of PreciseBN runs and freeze / unfreeze events."""
    events = []
    precise = data.scalars.get("bn/precise_bn/seconds")
    if precise is not None:
        events += [(x, "PreciseBN", "--") for x in data.epoch_at(precise.steps).tolist()]
    freeze = data.scalars.get("bn/freeze/frozen_layers")
    if freeze is not None:
        for x, value in zip(data.epoch_at(freeze.steps).tolist(), freeze.values.tolist(), strict=True):
            events.append((x, "BN frozen" if value > 0 else "BN unfrozen", ":"))
    return [e for e in events if np.isfinite(e[0])]


def _curves(data: RunData, out_dir: Path) -> Figure | NotDrawn:
    title = "Training curves"
    panels = [(name, [(k, data.scalars[k]) for k in keys if k in data.scalars]) for name, keys in _CURVES]
    panels = [(name, found) for name, found in panels if found]
    if not panels:
        return NotDrawn(title, "no train/val loss, accuracy or bn/gap metric was logged")
    if data.epoch_of_step[0].size == 0:
        return NotDrawn(title, "no `epoch` column was logged, so steps cannot be placed on an epoch axis")
    fig, axes = _figure(2.6 * len(panels) + 0.4, rows=len(panels))
    events = _events(data)
    for ax, (name, found) in zip(axes, panels, strict=True):
        for key, series in found:
            faint = key.endswith("_step")
            ax.plot(
                data.epoch_at(series.steps),
                series.values,
                label=key,
                alpha=0.35 if faint else 1.0,
                linewidth=0.8 if faint else 1.6,
                marker=None if faint else "o",
                markersize=3,
            )
        seen = set()
        for x, label, style in events:
            ax.axvline(
                x,
                color="black" if label == "PreciseBN" else "tab:red",
                linestyle=style,
                linewidth=1,
                label=None if label in seen else label,
            )
            seen.add(label)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("epoch")
    fig.tight_layout()
    caption = "Whole numbers are epoch ends; dashed: PreciseBN recalibrations; dotted: BN freeze / unfreeze."
    return Figure(_save(fig, out_dir, "curves"), title, caption)


def _hist_layers(data: RunData, chosen: Sequence[str] | None, ranked: Sequence[str]) -> list[str]:
    available = [layer for layer in data.layers if f"bn/{layer}/x_hat" in data.histograms]
    if chosen:
        return [layer for layer in chosen if layer in available]
    picks = [available[0], available[-1], *ranked] if available else []
    out: list[str] = []
    for layer in picks:
        if layer in available and layer not in out:
            out.append(layer)
    return out[:_MAX_HIST_LAYERS]


def _histograms(data: RunData, layers: list[str], out_dir: Path) -> Figure:
    title = "x_hat histograms over time"
    fig, axes = _figure(2.4 * len(layers) + 0.4, rows=len(layers))
    for ax, layer in zip(axes, layers, strict=True):
        records = data.histograms[f"bn/{layer}/x_hat"]
        edges = records[0][1]
        steps = np.array([r[0] for r in records], dtype=np.float64)
        same = [r for r in records if r[1].shape == edges.shape]
        counts = np.stack([r[2] for r in same], axis=1)
        fractions = counts / np.maximum(counts.sum(axis=0, keepdims=True), 1.0)
        mesh = ax.pcolormesh(
            _edges(steps[: len(same)]),
            edges,
            np.ma.masked_less_equal(fractions, 0),
            cmap="magma",
            norm=LogNorm(vmin=1e-4, vmax=1.0),
            shading="flat",
        )
        ax.set_ylabel("x_hat")
        ax.set_title(layer, fontsize=10)
        fig.colorbar(mesh, ax=ax, label="fraction", pad=0.01)
    axes[-1].set_xlabel("global step")
    fig.tight_layout()
    caption = (
        "Distribution of the normalised input x_hat = (x - mean) / sqrt(var + eps) at each recorded step; a "
        "healthy layer keeps a steady band around 0 with unit spread."
    )
    return Figure(_save(fig, out_dir, "xhat_histograms"), title, caption)


def _summary_lines(data: RunData, out_dir: Path) -> Figure | NotDrawn:
    title = "Per-layer activation summary"
    stats = ("batch_mean", "batch_std", "out_std")
    present = [s for s in stats if any(data.layer_series(layer, s) is not None for layer in data.layers)]
    if not present:
        return NotDrawn(title, "no BatchNormMonitor metrics (`bn/<layer>/batch_mean`, ...) were logged")
    fig, axes = _figure(2.4 * len(present) + 0.4, rows=len(present))
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, max(len(data.layers), 1)))
    for ax, stat in zip(axes, present, strict=True):
        for colour, layer in zip(colours, data.layers, strict=False):
            series = data.layer_series(layer, stat)
            if series is not None:
                ax.plot(series.steps, series.values, color=colour, linewidth=1.2, label=layer)
        ax.set_title(stat, fontsize=10)
        ax.grid(alpha=0.3)
    if len(data.layers) <= 10:
        axes[0].legend(fontsize=7, ncol=2)
    axes[-1].set_xlabel("global step")
    fig.tight_layout()
    caption = (
        "One line per layer, coloured from the input (dark) to the output (light); x_hat histograms need "
        "the TensorBoard logger (`logger=tensorboard` or `logger=many`)."
    )
    return Figure(_save(fig, out_dir, "layer_summary"), title, caption)


def draw_run(
    data: RunData, out_dir: Path, hist_layers: Sequence[str] | None = None, ranked: Sequence[str] = ()
) -> list[Figure | NotDrawn]:
    """Draw every plot of one run into ``out_dir``.

    Args:
        data: the run, from :func:`~bn_lightning.report.runs.load_run`.
        out_dir: where the PNGs go (created by the caller).
        hist_layers: layers whose ``x_hat`` histograms to draw; ``None``: the first, the last and the most drifting.
        ranked: layers by drift, most first (for the default choice of ``hist_layers``).

    Returns:
        One :class:`Figure` or :class:`NotDrawn` per plot, in page order.
    """
    plots: list[Figure | NotDrawn] = [_heatmap(data, stat, out_dir) for stat in HEATMAPS]
    plots.append(_curves(data, out_dir))
    layers = _hist_layers(data, hist_layers, ranked)
    if layers:
        plots.append(_histograms(data, layers, out_dir))
    else:
        if hist_layers:
            have = [layer for layer in data.layers if f"bn/{layer}/x_hat" in data.histograms]
            plots.append(
                NotDrawn(
                    "x_hat histograms over time",
                    f"no x_hat histograms for {', '.join(hist_layers)} (layers with histograms: "
                    f"{', '.join(have) or 'none'})",
                )
            )
        plots.append(_summary_lines(data, out_dir))
    return plots


def draw_sweep_curves(
    runs: Sequence[tuple[str, RunData]], out_dir: Path, keys: Sequence[str] = ("val/acc", "val/loss")
) -> list[Figure | NotDrawn]:
    """Overlaid curves of ``keys`` over epochs, one line per run (a sweep's comparison)."""
    plots: list[Figure | NotDrawn] = []
    for key in keys:
        title = f"{key} per run"
        found = [(name, data, data.scalars[key]) for name, data in runs if key in data.scalars]
        if not found:
            plots.append(NotDrawn(title, f"no run logged `{key}`"))
            continue
        fig, (ax,) = _figure(4.0)
        for name, data, series in found:
            x = _x_epochs(data, series)
            ax.plot(x, series.values, marker="o", markersize=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        plots.append(Figure(_save(fig, out_dir, "sweep_" + key.replace("/", "_")), title, "One line per job."))
    return plots


def _x_epochs(data: RunData, series: Series) -> np.ndarray:
    x = data.epoch_at(series.steps)
    return x if np.isfinite(x).all() else series.steps.astype(np.float64)
