"""Read what a run logged: CSVLogger's ``metrics.csv``, TensorBoard event files, the composed config, layer order.

Provides :func:`load_run` (one run directory into a :class:`RunData`), :class:`Series` and :class:`ReportError`
(input that no report can be made from). A ``metrics.csv`` cut short (a run killed while writing) is read up to
the last complete row, with a warning in :attr:`RunData.warnings`.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = ["BN_EVENT_KEYS", "ReportError", "RunData", "Series", "is_run_dir", "load_run", "natural_key"]

#: metric keys of bn_lightning's callbacks that are not per-layer statistics: ``bn/<key>/...``
BN_EVENT_KEYS = ("gap", "precise_bn", "freeze")
_LAYER_KEY = re.compile(r"^bn/(?P<layer>.+)/(?P<stat>[A-Za-z_]+)$")


class ReportError(Exception):
    """The input cannot give a report (no such directory, nothing logged, an unreadable file)."""


@dataclass
class Series:
    """One metric over training steps, sorted by step.

    Attributes:
        steps: global steps, ascending.
        values: the metric at those steps (float64; NaN where a row held no number).
    """

    steps: np.ndarray
    values: np.ndarray

    def last(self) -> float:
        """The last finite value, NaN if none.

        Example::

            >>> Series(np.array([0, 1, 2]), np.array([1.0, 2.0, float("nan")])).last()
            2.0
        """
        finite = self.values[np.isfinite(self.values)]
        return float(finite[-1]) if finite.size else math.nan


@dataclass
class RunData:
    """Everything a report draws from one run directory.

    Attributes:
        run_dir: the run directory.
        scalars: metric key -> :class:`Series`.
        epoch_of_step: ``(steps, epochs)`` pairs of the rows that logged both, to place step events on epoch axes.
        histograms: ``bn/<layer>/x_hat`` -> list of ``(step, bin_edges, counts)`` from TensorBoard.
        config: the composed Hydra config (``.hydra/config.yaml``) as a dict; ``None`` when absent.
        config_text: that file's text.
        overrides: the command-line overrides of the run (``.hydra/overrides.yaml``).
        layers: the BN layers with per-layer metrics, in network order when a checkpoint tells it.
        sources: the files read, relative to ``run_dir``.
        warnings: what could only be read in part, or not at all.
    """

    run_dir: Path
    scalars: dict[str, Series] = field(default_factory=dict)
    epoch_of_step: tuple[np.ndarray, np.ndarray] = field(default_factory=lambda: (np.zeros(0), np.zeros(0)))
    histograms: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    config_text: str | None = None
    overrides: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def layer_series(self, layer: str, stat: str) -> Series | None:
        """``bn/<layer>/<stat>``, or ``None`` if it was not logged."""
        return self.scalars.get(f"bn/{layer}/{stat}")

    def epoch_at(self, steps: np.ndarray) -> np.ndarray:
        """Global steps as (fractional) epochs: the end of epoch ``e`` is ``e + 1``.

        Lightning logs a value of the end of epoch ``e`` at its last step ``L``; callbacks that log at
        ``trainer.global_step`` after it (validation, the next epoch's start) log at ``L + 1``: both map to ``e + 1``.
        Steps in between are interpolated, steps after the last finished epoch extrapolated. Without any logged
        epoch: NaN.

        Example::

            >>> data = RunData(Path("."), epoch_of_step=(np.array([4.0, 9.0]), np.array([0.0, 1.0])))
            >>> data.epoch_at(np.array([0, 4, 5, 7, 9, 10, 12])).tolist()
            [0.0, 1.0, 1.0, 1.5, 2.0, 2.0, 2.4]
        """
        known_steps, epochs = self.epoch_of_step
        steps = np.asarray(steps, dtype=np.float64)
        if known_steps.size == 0:
            return np.full(steps.shape, np.nan)
        ends: dict[float, float] = {}
        for step, epoch in zip(known_steps.tolist(), epochs.tolist(), strict=True):
            ends[epoch] = max(ends.get(epoch, -np.inf), step)
        xs, ys = [0.0], [0.0]
        for epoch in sorted(ends):
            for x in (ends[epoch], ends[epoch] + 1):
                if x > xs[-1]:
                    xs.append(x)
                    ys.append(epoch + 1.0)
        out = np.interp(steps, xs, ys)
        slope = ys[-1] / xs[-1] if xs[-1] > 0 else 0.0  # epochs per step, on average
        return np.where(steps > xs[-1], ys[-1] + (steps - xs[-1]) * slope, out)


def natural_key(text: str) -> list[Any]:
    """Sort key that orders ``layer2`` before ``layer10``.

    Example::

        >>> sorted(["net.10.bn", "net.2.bn"], key=natural_key)
        ['net.2.bn', 'net.10.bn']
    """
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a run's logs (a ``metrics.csv`` or TensorBoard events below it, or Hydra's files)."""
    return (path / ".hydra").is_dir() or bool(_metrics_files(path)) or bool(_event_files(path))


def _metrics_files(run_dir: Path) -> list[Path]:
    files = [p for p in run_dir.rglob("metrics.csv") if "report" not in p.relative_to(run_dir).parts[:-1]]
    return sorted(files, key=lambda p: natural_key(str(p.relative_to(run_dir))))


def _event_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("events.out.tfevents.*"), key=lambda p: natural_key(str(p.relative_to(run_dir))))


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _read_csv(path: Path, shown: str, points: dict[str, dict[int, float]], warnings: list[str]) -> int:
    """Add the rows of one ``metrics.csv`` to ``points`` (key -> step -> value); returns the rows read."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        warnings.append(f"{shown}: cannot be read ({error}); skipped")
        return 0
    lines = text.splitlines()
    if not lines:
        warnings.append(f"{shown}: empty; skipped")
        return 0
    try:
        header = next(csv.reader([lines[0]]))
    except csv.Error as error:
        warnings.append(f"{shown}: the header is not CSV ({error}); skipped")
        return 0
    if "step" not in header:
        warnings.append(f"{shown}: no 'step' column (not a CSVLogger metrics file?); skipped")
        return 0
    step_col = header.index("step")
    complete = text.endswith("\n")
    rows = 0
    for number, line in enumerate(lines[1:], start=2):
        try:
            row = next(csv.reader([line]))
        except csv.Error:
            row = []
        last_line = number == len(lines)
        if len(row) != len(header) or (last_line and not complete):
            warnings.append(
                f"{shown}: line {number} is incomplete (was the run killed while writing?); "
                f"read the {rows} rows before it"
            )
            break
        step = _number(row[step_col])
        if not math.isfinite(step):
            continue
        for key, cell in zip(header, row, strict=True):
            if cell != "" and key != "step":
                points.setdefault(key, {})[int(step)] = _number(cell)
        rows += 1
    return rows


def _read_events(
    run_dir: Path, points: dict[str, dict[int, float]], histograms: dict[str, list], warnings: list[str], scalars: bool
) -> list[str]:
    """Histograms (and, with ``scalars``, scalars) from TensorBoard event files; returns the directories read."""
    files = _event_files(run_dir)
    if not files:
        return []
    try:
        from tensorboard.backend.event_processing import event_accumulator as ea
    except ImportError:
        warnings.append("TensorBoard event files found but the `tensorboard` package is not installed; skipped")
        return []
    read = []
    for directory in sorted({f.parent for f in files}, key=lambda p: natural_key(str(p))):
        accumulator = ea.EventAccumulator(str(directory), size_guidance={ea.HISTOGRAMS: 0, ea.SCALARS: 0})
        try:
            accumulator.Reload()
        except Exception as error:  # a truncated or foreign event file: the reader's errors vary
            warnings.append(f"{directory.relative_to(run_dir)}: TensorBoard events unreadable ({error}); skipped")
            continue
        tags = accumulator.Tags()
        for tag in tags.get("histograms", []):
            for event in accumulator.Histograms(tag):
                h = event.histogram_value
                limits = np.asarray(h.bucket_limit, dtype=np.float64)
                edges = np.concatenate([[h.min if np.isfinite(h.min) else limits[0]], limits])
                histograms.setdefault(tag, []).append((int(event.step), edges, np.asarray(h.bucket, np.float64)))
        if scalars:
            for tag in tags.get("scalars", []):
                for event in accumulator.Scalars(tag):
                    points.setdefault(tag, {})[int(event.step)] = float(event.value)
        read.append(str(directory.relative_to(run_dir)))
    for tag in histograms:
        histograms[tag].sort(key=lambda item: item[0])
    return read


def _checkpoint_layers(run_dir: Path) -> list[str]:
    """BN layer names in network order, from a checkpoint's state dict (the order modules were registered)."""
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: (p.name != "last.ckpt", p.name))
    for path in checkpoints:
        try:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("state_dict", {})
        except Exception:  # an unreadable checkpoint only costs the layer order
            continue
        return [key[: -len(".running_mean")] for key in state if key.endswith(".running_mean")]
    return []


def _layers(scalars: dict[str, Any], histograms: dict[str, Any], run_dir: Path) -> list[str]:
    found = set()
    for key in list(scalars) + list(histograms):
        match = _LAYER_KEY.match(key)
        if match and match["layer"].split("/")[0] not in BN_EVENT_KEYS:
            found.add(match["layer"])
    ordered = [name for name in _checkpoint_layers(run_dir) if name in found]
    return ordered + sorted(found - set(ordered), key=natural_key)


def _read_config(run_dir: Path, data: RunData) -> None:
    config = run_dir / ".hydra" / "config.yaml"
    if config.is_file():
        data.config_text = config.read_text(encoding="utf-8", errors="replace")
        try:
            loaded = yaml.safe_load(data.config_text)
            data.config = loaded if isinstance(loaded, dict) else None
        except yaml.YAMLError as error:
            data.warnings.append(f".hydra/config.yaml: not YAML ({error}); the config is shown as text")
        data.sources.append(".hydra/config.yaml")
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        try:
            loaded = yaml.safe_load(overrides.read_text(encoding="utf-8", errors="replace"))
            data.overrides = [str(o) for o in loaded] if isinstance(loaded, list) else []
        except yaml.YAMLError:
            data.overrides = []


def load_run(run_dir: str | Path) -> RunData:
    """Read one run directory.

    Args:
        run_dir: a run directory of the training script (or any directory with CSVLogger / TensorBoard logs).

    Returns:
        The run's metrics, histograms, config and layer order.

    Raises:
        ReportError: no such directory, or no metrics in it at all.

    Example::

        >>> load_run("/no/such/run")
        Traceback (most recent call last):
        ...
        bn_lightning.report.runs.ReportError: no such directory: /no/such/run
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ReportError(f"no such directory: {run_dir}")
    if not run_dir.is_dir():
        raise ReportError(f"not a directory: {run_dir} (give the run directory, e.g. outputs/train/runs/<time>)")
    data = RunData(run_dir=run_dir)
    points: dict[str, dict[int, float]] = {}
    csv_rows = 0
    for path in _metrics_files(run_dir):
        shown = str(path.relative_to(run_dir))
        rows = _read_csv(path, shown, points, data.warnings)
        csv_rows += rows
        if rows:
            data.sources.append(shown)
    data.sources += _read_events(run_dir, points, data.histograms, data.warnings, scalars=csv_rows == 0)
    _read_config(run_dir, data)
    if not points and not data.histograms:
        why = "; ".join(data.warnings) or "no metrics.csv (CSVLogger) and no TensorBoard event files below it"
        raise ReportError(f"no metrics in {run_dir}: {why}")
    for key, by_step in points.items():
        steps = np.fromiter(sorted(by_step), dtype=np.int64, count=len(by_step))
        data.scalars[key] = Series(steps, np.array([by_step[s] for s in steps.tolist()], dtype=np.float64))
    epoch = data.scalars.get("epoch")
    if epoch is not None:
        ok = np.isfinite(epoch.values)
        data.epoch_of_step = (epoch.steps[ok].astype(np.float64), epoch.values[ok])
    data.layers = _layers(data.scalars, data.histograms, run_dir)
    return data
