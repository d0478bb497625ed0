"""What a report says in words: health alerts recomputed from the logged metrics, and the layers that drift most.

Provides :func:`health_alerts` (the checks of :class:`~bn_lightning.health.HealthChecks`, with the run's
own thresholds, on every recorded step) and :func:`drift_ranking`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bn_lightning.health import HealthChecks
from bn_lightning.report.runs import RunData

__all__ = ["AlertRow", "DriftRow", "drift_ranking", "health_alerts", "run_checks"]

#: the per-layer statistics the health checks read
_CHECKED = ("batch_size", "collapsed_frac", "drift_kl", "nonfinite_running", "nonfinite_batch")
_THRESHOLDS = ("min_batch_size", "max_drift_kl", "collapse_var", "max_collapsed_frac", "drift_warmup_steps")


@dataclass(frozen=True)
class AlertRow:
    """One failed check of one layer: where it first failed, how often, what was seen and what to do."""

    layer: str
    check: str
    first_step: int
    records: int
    seen: str
    advice: str


@dataclass(frozen=True)
class DriftRow:
    """A layer's drift: the last recorded ``drift_kl``, its mean over the last quarter of records and its peak."""

    layer: str
    last: float
    recent_mean: float
    peak: float


def _get(config: dict[str, Any] | None, *path: str) -> Any:
    node: Any = config
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def run_checks(data: RunData) -> tuple[HealthChecks, bool, int]:
    """The health checks with the run's thresholds, whether its BN layers were synchronised, and its world size.

    The thresholds come from the composed config's ``callbacks.bn_drift`` (the defaults without one).
    """
    drift = _get(data.config, "callbacks", "bn_drift") or {}
    given = {k: drift[k] for k in _THRESHOLDS if isinstance(drift, dict) and drift.get(k) is not None}
    try:
        checks = HealthChecks(**given)
    except (TypeError, ValueError):
        checks = HealthChecks()
    synchronised = _get(data.config, "bn", "impl") == "sync" or bool(_get(data.config, "trainer", "sync_batchnorm"))
    devices, nodes = _get(data.config, "trainer", "devices"), _get(data.config, "trainer", "num_nodes")
    world = (devices if isinstance(devices, int) else 1) * (nodes if isinstance(nodes, int) else 1)
    return checks, synchronised, max(world, 1)


def health_alerts(data: RunData) -> list[AlertRow]:
    """Every (layer, check) that failed on some recorded step, in network order, with its first failure.

    Example::

        >>> from pathlib import Path
        >>> from bn_lightning.report.runs import Series
        >>> data = RunData(Path("."), layers=["bn1"])
        >>> data.scalars["bn/bn1/batch_size"] = Series(np.array([0, 5]), np.array([4.0, 4.0]))
        >>> [(a.layer, a.check, a.first_step, a.records) for a in health_alerts(data)]
        [('bn1', 'small_batch', 0, 2)]
    """
    checks, synchronised, world = run_checks(data)
    rows = []
    for layer in data.layers:
        series = {stat: data.layer_series(layer, stat) for stat in _CHECKED}
        series = {stat: s for stat, s in series.items() if s is not None}
        if "batch_size" not in series:  # RunningStatDrift did not record this layer
            continue
        steps = np.unique(np.concatenate([s.steps for s in series.values()]))
        found: dict[str, list[Any]] = {}
        for step in steps.tolist():
            stats = {}
            for stat, s in series.items():
                at = np.searchsorted(s.steps, step)
                if at < s.steps.size and s.steps[at] == step:
                    stats[stat] = float(s.values[at])
            for alert in checks.evaluate(stats, step, synchronised, world):  # logged after `step` batches
                if alert.check in found:
                    found[alert.check][1] += 1
                else:
                    found[alert.check] = [step, 1, alert]
        for check, (first, count, alert) in found.items():
            rows.append(AlertRow(layer, check, first, count, alert.seen, alert.advice))
    return rows


def drift_ranking(data: RunData, top: int = 10) -> list[DriftRow]:
    """The ``top`` layers by mean ``drift_kl`` over the last quarter of their records (most drift first)."""
    rows = []
    for layer in data.layers:
        series = data.layer_series(layer, "drift_kl")
        if series is None:
            continue
        finite = series.values[np.isfinite(series.values)]
        if finite.size == 0:
            continue
        recent = finite[-max(1, finite.size // 4) :]
        peak_series = data.layer_series(layer, "drift_kl_max")
        peaks = peak_series.values[np.isfinite(peak_series.values)] if peak_series is not None else finite
        rows.append(DriftRow(layer, float(finite[-1]), float(recent.mean()), float(peaks.max(initial=finite.max()))))
    rows.sort(key=lambda r: -r.recent_mean)
    return rows[:top]
