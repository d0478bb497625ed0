"""``bn-report``: an offline HTML report of a run's (or a sweep's) BatchNorm statistics.

:func:`write_report` reads what a run logged (CSVLogger's ``metrics.csv``; TensorBoard event files when that logger
ran) and writes ``<run dir>/report/``: PNG heatmaps of layers x steps, training curves with PreciseBN and freeze
events, ``x_hat`` histograms over time, and ``index.html`` with the plots, the health alerts, the most drifting
layers and the composed config. A multirun directory gets a comparison page that links to each job's page. The page
makes no network request. Command line: ``bn-report RUN_DIR`` or ``python -m bn_lightning.report RUN_DIR``.

Modules: :mod:`~bn_lightning.report.runs` (reading), :mod:`~bn_lightning.report.analysis` (alerts, drift ranking),
:mod:`~bn_lightning.report.plots`, :mod:`~bn_lightning.report.page` (HTML), :mod:`~bn_lightning.report.sweep`,
:mod:`~bn_lightning.report.cli`.
"""

from bn_lightning.report.runs import ReportError
from bn_lightning.report.write import Report, write_report

__all__ = ["Report", "ReportError", "write_report"]
