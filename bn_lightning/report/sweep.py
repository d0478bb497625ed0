"""A sweep's comparison page: every job's own report, a table of their final metrics, overlaid curves.

Provides :func:`is_sweep_dir` and :func:`write_sweep_report`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bn_lightning.report.page import sweep_page
from bn_lightning.report.plots import draw_sweep_curves
from bn_lightning.report.runs import ReportError, RunData, is_run_dir, natural_key

__all__ = ["is_sweep_dir", "sweep_jobs", "write_sweep_report"]

_HEADER = ["job", "overrides", "val/acc (final)", "val/acc (best)", "val/loss (final)", "train/loss (final)", "alerts"]


def sweep_jobs(path: Path) -> list[Path]:
    """The job directories of a Hydra multirun directory (``0``, ``1``, ...), in job order."""
    jobs = [p for p in path.iterdir() if p.is_dir() and p.name != "report" and not p.name.startswith(".")]
    return sorted((p for p in jobs if is_run_dir(p)), key=lambda p: natural_key(p.name))


def is_sweep_dir(path: Path) -> bool:
    """Whether ``path`` is a multirun directory: Hydra's ``multirun.yaml``, or job directories and no run of its own."""
    if not path.is_dir():
        return False
    if (path / "multirun.yaml").is_file():
        return True
    return not (path / ".hydra").is_dir() and any((job / ".hydra").is_dir() for job in sweep_jobs(path))


def _fmt(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.4g}"


def _best(data: RunData, key: str) -> float:
    series = data.scalars.get(key)
    if series is None:
        return math.nan
    finite = series.values[np.isfinite(series.values)]
    return float(finite.max()) if finite.size else math.nan


def _last(data: RunData, key: str) -> float:
    return data.scalars[key].last() if key in data.scalars else math.nan


def write_sweep_report(
    sweep_dir: Path, out_dir: Path, write_run: Callable[[Path], tuple[Path, RunData, int]]
) -> tuple[Path, list[str]]:
    """Write each job's report (with ``write_run``) and the comparison page into ``out_dir``.

    Args:
        sweep_dir: the multirun directory.
        out_dir: where the comparison page and its PNGs go.
        write_run: writes one job's report; returns its page, the job's data and its number of alerts.

    Returns:
        The comparison page's path and the warnings (jobs that could not be read).

    Raises:
        ReportError: no job of the sweep could be read.
    """
    jobs = sweep_jobs(sweep_dir)
    if not jobs:
        raise ReportError(f"no job directories with logs in the sweep directory {sweep_dir}")
    warnings: list[str] = []
    rows, runs = [], []
    for job in jobs:
        try:
            page, data, alerts = write_run(job)
        except ReportError as error:
            warnings.append(f"job {job.name}: {error}")
            rows.append([html.escape(job.name), "", "–", "–", "–", "–", "–"])
            continue
        warnings += [f"job {job.name}: {w}" for w in data.warnings]
        link = Path("..") / page.relative_to(sweep_dir)
        runs.append((job.name, data))
        rows.append(
            [
                f'<a href="{html.escape(link.as_posix(), quote=True)}">{html.escape(job.name)}</a>',
                f"<code>{html.escape(' '.join(data.overrides))}</code>",
                _fmt(_last(data, "val/acc")),
                _fmt(_best(data, "val/acc")),
                _fmt(_last(data, "val/loss")),
                _fmt(_last(data, "train/loss_epoch")),
                str(alerts),
            ]
        )
    if not runs:
        raise ReportError(f"no job of the sweep {sweep_dir} has metrics: " + "; ".join(warnings))
    out_dir.mkdir(parents=True, exist_ok=True)
    common = set.intersection(*(set(data.overrides) for _, data in runs))
    labelled = [(f"{name}: {' '.join(o for o in data.overrides if o not in common)}", data) for name, data in runs]
    plots = draw_sweep_curves(labelled, out_dir)
    page = out_dir / "index.html"
    page.write_text(sweep_page(sweep_dir.name, rows, _HEADER, plots, warnings), encoding="utf-8")
    return page, warnings
