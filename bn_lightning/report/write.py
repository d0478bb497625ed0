"""Write a report: one run's page and plots, or a sweep's comparison page with every job's own report.

Provides :func:`write_report` and :class:`Report`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bn_lightning.report.analysis import drift_ranking, health_alerts
from bn_lightning.report.page import run_page
from bn_lightning.report.plots import Figure, NotDrawn, draw_run
from bn_lightning.report.runs import RunData, load_run
from bn_lightning.report.sweep import is_sweep_dir, write_sweep_report

__all__ = ["REPORT_DIR", "Report", "write_report"]

#: the report's directory inside the run (or sweep) directory
REPORT_DIR = "report"


@dataclass
class Report:
    """What :func:`write_report` wrote.

    Attributes:
        page: the ``index.html``.
        kind: ``"run"`` or ``"sweep"``.
        plots: the run's plots and the ones not drawn (a sweep: the comparison's).
        warnings: what could be read only in part.
    """

    page: Path
    kind: str
    plots: list[Figure | NotDrawn] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _write_run(run_dir: Path, out_dir: Path, layers: Sequence[str] | None) -> tuple[Report, RunData, int]:
    data = load_run(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):  # a plot that cannot be drawn this time must not show an old picture
        old.unlink()
    alerts = health_alerts(data)
    ranking = drift_ranking(data)
    plots = draw_run(data, out_dir, layers, [row.layer for row in ranking])
    page = out_dir / "index.html"
    page.write_text(run_page(data, plots, alerts, ranking), encoding="utf-8")
    return Report(page, "run", plots, list(data.warnings)), data, len(alerts)


def write_report(path: str | Path, out_dir: str | Path | None = None, layers: Sequence[str] | None = None) -> Report:
    """Write the report of a run directory or of a multirun (sweep) directory.

    Args:
        path: a run directory (``outputs/<task>/runs/<time>``) or a sweep directory (``outputs/<task>/multiruns/
            <time>``, whose jobs each get their own report in ``<job>/report/``).
        out_dir: where the page and its PNGs go; ``None``: ``<path>/report``.
        layers: BN layers whose ``x_hat`` histograms to draw; ``None``: the first, the last and the most drifting.

    Returns:
        The page written, the plots, and the warnings (a ``metrics.csv`` cut short, jobs without logs).

    Raises:
        ReportError: nothing to report from (no such directory, no metrics).

    Example::

        >>> write_report("/no/such/run")
        Traceback (most recent call last):
        ...
        bn_lightning.report.runs.ReportError: no such directory: /no/such/run
    """
    path = Path(path)
    out = Path(out_dir) if out_dir is not None else path / REPORT_DIR
    if is_sweep_dir(path):

        def write_job(job: Path) -> tuple[Path, RunData, int]:
            report, data, alerts = _write_run(job, job / REPORT_DIR, layers)
            return report.page, data, alerts

        page, warnings = write_sweep_report(path, out, write_job)
        return Report(page, "sweep", [], warnings)
    report, _, _ = _write_run(path, out, layers)
    return report
