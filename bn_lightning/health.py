"""BatchNorm health checks on one layer's recorded statistics: what was seen, and what to do about it.

Provides :class:`HealthChecks` (the thresholds and the checks, pure Python on a dict of numbers),
:class:`HealthAlert` (one failed check) and :class:`BatchNormHealthError` (a failed check whose action is
``"raise"``). :class:`~bn_lightning.callbacks.RunningStatDrift` runs them on every record;
``bn-report`` runs the same checks on the metrics a run logged, so the report's alert table and the warnings during
training say the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from bn_lightning.validation import check_int, check_number, check_probability

__all__ = ["CHECKS", "BatchNormHealthError", "HealthAlert", "HealthChecks"]

#: health checks and what they look at
CHECKS = ("nonfinite", "small_batch", "collapse", "drift")


class BatchNormHealthError(RuntimeError):
    """A failed health check whose action is ``"raise"`` (:class:`~bn_lightning.monitoring.DriftStats`)."""


@dataclass(frozen=True)
class HealthAlert:
    """One failed health check of one layer.

    Attributes:
        check: the check's name, one of :data:`CHECKS`.
        seen: what the recorded statistics show.
        advice: what to do about it.
    """

    check: str
    seen: str
    advice: str

    def message(self, layer: str, step: int) -> str:
        """The one-line message naming the layer and the step.

        Example::

            >>> HealthAlert("drift", "KL 2 nats", "recalibrate").message("net.bn1", 7)
            "BatchNorm health check 'drift' failed for layer 'net.bn1' at step 7: KL 2 nats; recalibrate."
        """
        where = f"BatchNorm health check '{self.check}' failed for layer '{layer}' at step {step}"
        return f"{where}: {self.seen}; {self.advice}."


def _value(stats: Mapping[str, float], key: str) -> float:
    """``stats[key]`` as a float; absent or NaN (a layer or step without that statistic) reads as 0."""
    value = stats.get(key)
    if value is None:
        return 0.0
    value = float(value)
    return 0.0 if math.isnan(value) else value


@dataclass(frozen=True)
class HealthChecks:
    """The thresholds of the health checks, and the checks themselves.

    The checks read one layer's statistics as :class:`~bn_lightning.callbacks.RunningStatDrift` records them
    (``batch_size``, ``collapsed_frac``, ``drift_kl``, ``nonfinite_running``, ``nonfinite_batch``); a missing key or
    a NaN passes.

    Args:
        min_batch_size: batches that give a layer fewer samples than this fail ``small_batch``.
        max_drift_kl: ``drift_kl`` above this (nats) fails ``drift``.
        collapse_var: a channel whose batch variance is at most this counts as collapsed (used when recording).
        max_collapsed_frac: more collapsed channels than this fraction fail ``collapse``.
        drift_warmup_steps: the ``drift`` check starts after this many training batches.

    Raises:
        ValueError: for a threshold out of its range.

    Example::

        >>> checks = HealthChecks(min_batch_size=8)
        >>> [a.check for a in checks.evaluate({"batch_size": 4, "collapsed_frac": 0.0}, batches_seen=1)]
        ['small_batch']
        >>> checks.evaluate({"batch_size": 4}, batches_seen=1, synchronised=True, world_size=2)
        []
    """

    min_batch_size: int = 8
    max_drift_kl: float = 0.5
    collapse_var: float = 1e-6
    max_collapsed_frac: float = 0.5
    drift_warmup_steps: int = 100

    def __post_init__(self) -> None:
        owner = "HealthChecks"
        check_int(owner, "min_batch_size", self.min_batch_size)
        check_number(owner, "max_drift_kl", self.max_drift_kl, low=0, low_open=True)
        check_number(owner, "collapse_var", self.collapse_var, low=0, low_open=True)
        check_probability(owner, "max_collapsed_frac", self.max_collapsed_frac)
        check_int(owner, "drift_warmup_steps", self.drift_warmup_steps, minimum=0)

    def evaluate(
        self,
        stats: Mapping[str, float],
        batches_seen: int,
        synchronised: bool = False,
        world_size: int = 1,
    ) -> list[HealthAlert]:
        """The failed checks of one layer's record.

        Args:
            stats: the layer's recorded statistics.
            batches_seen: training batches so far (the ``drift`` check waits for ``drift_warmup_steps``).
            synchronised: the layer is a SyncBatchNorm, so its statistics come from every rank's batch.
            world_size: number of ranks.

        Returns:
            One :class:`HealthAlert` per failed check, in the order of :data:`CHECKS`.
        """
        alerts = []
        running_bad, batch_bad = _value(stats, "nonfinite_running"), _value(stats, "nonfinite_batch")
        if running_bad > 0 or batch_bad > 0:
            alerts.append(self._nonfinite(int(running_bad), int(batch_bad)))
        if "batch_size" in stats and not math.isnan(float(stats["batch_size"])):
            alert = self._small_batch(int(stats["batch_size"]), synchronised, world_size)
            if alert is not None:
                alerts.append(alert)
        collapsed = _value(stats, "collapsed_frac")
        if collapsed > self.max_collapsed_frac:
            alerts.append(
                HealthAlert(
                    "collapse",
                    f"{collapsed:.0%} of the channels have batch variance <= {self.collapse_var:g}",
                    "dead units feed this layer: look at the layer before it (a ReLU after a large negative bias, "
                    "a learning rate too high) or lower the weight decay",
                )
            )
        drift = _value(stats, "drift_kl")
        if drift > self.max_drift_kl and batches_seen > self.drift_warmup_steps:
            alerts.append(
                HealthAlert(
                    "drift",
                    f"running statistics drift from the batch statistics by KL {drift:.3g} nats "
                    f"(threshold {self.max_drift_kl:g}), so eval-mode outputs differ from training",
                    "lower the momentum, or recalibrate with PreciseBN (`bn.precise_bn.enabled=true`)",
                )
            )
        return alerts

    @staticmethod
    def _nonfinite(running_bad: int, batch_bad: int) -> HealthAlert:
        seen = []
        if batch_bad:
            seen.append(f"the batch statistics of {batch_bad} channels are non-finite (the input held NaN/inf)")
        if running_bad:
            seen.append(f"the running statistics hold {running_bad} non-finite values")
        if batch_bad:
            advice = (
                "find where the NaN/inf enters (the data, or the layers before this one); BatchNormGuard keeps such "
                "batches out of the running statistics"
            )
        else:
            advice = (
                "the activations overflowed: lower the learning rate, use loss scaling with float16 or bf16; "
                "recalibrate the running statistics (PreciseBN) once the cause is fixed"
            )
        return HealthAlert("nonfinite", " and ".join(seen), advice)

    def _small_batch(self, batch: int, synchronised: bool, world_size: int) -> HealthAlert | None:
        if synchronised:
            samples = batch * max(world_size, 1)  # at least this many: `batch` is the smallest rank's
            if samples >= self.min_batch_size:
                return None
            return HealthAlert(
                "small_batch",
                f"the synchronised statistics come from {samples} samples ({batch} per device on {world_size} "
                f"ranks), below {self.min_batch_size}",
                "use larger per-device batches, more ranks, or BatchRenorm (`bn=renorm`)",
            )
        if batch >= self.min_batch_size:
            return None
        return HealthAlert(
            "small_batch",
            f"per-device batch of {batch} is below {self.min_batch_size}, so its statistics are noisy",
            "synchronise them across ranks (bn_lightning.SyncBatchNorm, `bn=sync`), use BatchRenorm (`bn=renorm`), "
            "or larger per-device batches",
        )
