"""The report's HTML: one self-contained page per run or sweep (inline CSS, images beside it, no network).

Provides :func:`run_page` and :func:`sweep_page`, which return the page's text. Everything from the run (layer
names, config, messages) is escaped. The layout fits a laptop and a phone: images and the page never need
horizontal scrolling; wide tables scroll inside their own box.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import datetime

from bn_lightning.report.analysis import AlertRow, DriftRow
from bn_lightning.report.plots import Figure, NotDrawn
from bn_lightning.report.runs import RunData

__all__ = ["run_page", "sweep_page"]

_CSS = """
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 0 14px 40px; color: #1d1d1f; line-height: 1.45; overflow-wrap: anywhere; }
h1 { font-size: 1.5em; margin-top: 1em; }
h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
figure { margin: 1em 0; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #f8f8f8; padding: 10px; font-size: 0.85em; }
.warn { background: #fff4e5; border-left: 4px solid #f0a020; padding: 6px 10px; }
.muted { color: #666; font-size: 0.9em; }
code { overflow-wrap: anywhere; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _num(value: float, digits: int = 4) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _page(title: str, body: Sequence[str]) -> str:
    head = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
    )
    return head + "\n".join(body) + "\n</body>\n</html>\n"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(header)
    lines = ['<div class="scroll"><table>', "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = "".join(
            f'<td class="num">{cell}</td>' if num else f"<td>{cell}</td>"
            for cell, num in zip(row, numeric, strict=True)
        )
        lines.append(f"<tr>{cells}</tr>")
    lines.append("</table></div>")
    return "\n".join(lines)


def _plots(plots: Sequence[Figure | NotDrawn]) -> list[str]:
    out = []
    missing = [p for p in plots if isinstance(p, NotDrawn)]
    for plot in plots:
        if isinstance(plot, Figure):
            out.append(
                f'<figure><img src="{_e(plot.filename)}" alt="{_e(plot.title)}" loading="lazy">'
                f"<figcaption><b>{_e(plot.title)}.</b> {_e(plot.caption)}</figcaption></figure>"
            )
    if missing:
        out.append('<h2 id="not-drawn">Plots not drawn</h2><ul>')
        out += [f"<li><b>{_e(p.title)}</b>: {_e(p.reason)}</li>" for p in missing]
        out.append("</ul>")
    return out


def _warnings(warnings: Sequence[str]) -> list[str]:
    return [f'<p class="warn">Warning: {_e(w)}</p>' for w in warnings]


def run_page(
    data: RunData, plots: Sequence[Figure | NotDrawn], alerts: Sequence[AlertRow], drift: Sequence[DriftRow]
) -> str:
    """The page of one run: plots, health alerts, the most drifting layers, the config.

    Args:
        data: the run.
        plots: its plots (PNGs beside the page) and the ones that could not be drawn.
        alerts: failed health checks.
        drift: layers ranked by drift.

    Returns:
        The HTML text.
    """
    final = [(k, data.scalars[k].last()) for k in ("val/acc", "val/loss", "train/loss_epoch") if k in data.scalars]
    body = [
        f"<h1>BatchNorm report: {_e(data.run_dir.name)}</h1>",
        f'<p class="muted">Run directory <code>{_e(data.run_dir.resolve())}</code>; written '
        f"{datetime.now():%Y-%m-%d %H:%M}; read {_e(', '.join(data.sources) or 'nothing')}.</p>",
    ]
    if data.overrides:
        body.append(f"<p>Overrides: <code>{_e(' '.join(data.overrides))}</code></p>")
    if final:
        body.append("<p>Final: " + ", ".join(f"<b>{_e(k)}</b> {_num(v)}" for k, v in final) + "</p>")
    body += _warnings(data.warnings)
    body.append('<h2 id="alerts">Health alerts</h2>')
    if alerts:
        rows = [[_e(a.layer), str(a.first_step), _e(a.check), str(a.records), _e(a.seen), _e(a.advice)] for a in alerts]
        body.append(
            _table(
                ["layer", "first step", "check", "records", "message", "what to do"],
                rows,
                [False, True, False, True, False, False],
            )
        )
        body.append(
            '<p class="muted">Recomputed from the logged metrics with the run\'s thresholds '
            "(<code>callbacks.bn_drift</code>); records: how many recorded steps failed.</p>"
        )
    elif any(data.layer_series(layer, "batch_size") is not None for layer in data.layers):
        body.append("<p>None: every recorded step passed every check.</p>")
    else:
        body.append("<p>Not checked: RunningStatDrift's metrics were not logged.</p>")
    body.append('<h2 id="drift">Largest drift</h2>')
    if drift:
        rows = [[_e(d.layer), _num(d.recent_mean), _num(d.last), _num(d.peak)] for d in drift]
        body.append(
            _table(
                ["layer", "drift_kl, last quarter mean", "drift_kl, last", "drift_kl_max, peak"],
                rows,
                [False, True, True, True],
            )
        )
    else:
        body.append("<p>No <code>drift_kl</code> was logged.</p>")
    body.append('<h2 id="plots">Plots</h2>')
    body += _plots(plots)
    body.append('<h2 id="config">Config</h2>')
    if data.config_text is not None:
        body.append(
            f"<details><summary>The composed config (.hydra/config.yaml)</summary><pre>{_e(data.config_text)}"
            "</pre></details>"
        )
    else:
        body.append("<p>No <code>.hydra/config.yaml</code> in the run directory.</p>")
    return _page(f"BatchNorm report: {data.run_dir.name}", body)


def sweep_page(
    sweep_name: str,
    rows: Sequence[Sequence[str]],
    header: Sequence[str],
    plots: Sequence[Figure | NotDrawn],
    warnings: Sequence[str],
) -> str:
    """The comparison page of a sweep: a table of each job's final metrics (with links) and overlaid curves.

    Args:
        sweep_name: the sweep directory's name.
        rows: one row per job, cells already HTML (the first one links to the job's page).
        header: the column names.
        plots: the overlaid curves.
        warnings: jobs that could not be read, and why.

    Returns:
        The HTML text.
    """
    numeric = [False, False] + [True] * (len(header) - 2)
    body = [
        f"<h1>Sweep report: {_e(sweep_name)}</h1>",
        f'<p class="muted">Written {datetime.now():%Y-%m-%d %H:%M}; each job\'s name links to its own report.</p>',
    ]
    body += _warnings(warnings)
    body.append('<h2 id="jobs">Jobs</h2>')
    body.append(_table(header, rows, numeric))
    body.append('<h2 id="plots">Curves</h2>')
    body += _plots(plots)
    return _page(f"Sweep report: {sweep_name}", body)
