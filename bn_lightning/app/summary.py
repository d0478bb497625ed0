"""A Hydra callback that summarises a multirun, and refuses multirun jobs that would start their own DDP ranks.

Provides :class:`MultirunSummary` (registered under ``hydra.callbacks`` in ``conf/hydra/default.yaml``),
:func:`summarize_run` (one job's row, from the CSV logger's ``metrics.csv`` in its run directory),
:func:`write_summary`, :func:`format_table`, :func:`trainer_processes` and the columns :data:`COLUMNS`.

At the end of ``python scripts/train.py -m ...`` the callback writes ``<sweep dir>/summary.csv``, one row per job,
and prints the same rows as a table. The values are read from each job's run directory rather than from the job's
return value, so that they are the logged ones, whichever launcher ran the job and in whichever process.

A multirun with Hydra's in-process launchers cannot run DDP jobs: Lightning starts the ranks > 0 by re-running the
command line, ``-m`` and the whole sweep included, and the next job would reuse the first job's process group
(lightning-hydra-template#226). Such a multirun stops before any job trains, with a message naming the alternative.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "COLUMNS",
    "MultirunDDPError",
    "MultirunSummary",
    "format_table",
    "summarize_run",
    "trainer_processes",
    "write_summary",
]

log = logging.getLogger(__name__)

#: The columns of ``summary.csv``, in order.
COLUMNS = ("overrides", "val/acc", "val/loss", "bn/gap/loss", "drift_kl_max", "run_dir")

#: Launchers whose jobs are cluster jobs: Lightning finds the ranks in the cluster environment (SLURM) and starts none.
EXTERNAL_LAUNCHERS = ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",)

_DISTRIBUTED_STRATEGIES = ("ddp", "fsdp", "deepspeed")


class MultirunDDPError(SystemExit):
    """A multirun job asks for several training processes under a launcher that runs jobs in its own process.

    A :class:`SystemExit` (exit status 1, the message on stderr, no traceback) because Hydra turns any ``Exception``
    raised by a callback into a warning and carries on.

    Example::

        >>> err = MultirunDDPError("Multirun (-m) cannot run DDP jobs")
        >>> err.code, isinstance(err, Exception)
        ('Multirun (-m) cannot run DDP jobs', False)
    """


def _last(rows: Sequence[Mapping[str, str]], key: str) -> float | None:
    for row in reversed(rows):
        value = row.get(key)
        if value not in (None, ""):
            return float(value)
    return None


def _latest_metrics_csv(run_dir: Path) -> Path | None:
    files = [p for p in run_dir.rglob("metrics.csv") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def summarize_run(run_dir: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    r"""One job's row of ``summary.csv``, read from the newest ``metrics.csv`` under ``run_dir`` (the CSV logger's).

    ``val/acc``, ``val/loss`` and ``bn/gap/loss`` are the last logged values; ``drift_kl_max`` is the largest
    ``bn/<layer>/drift_kl_max`` (RunningStatDrift's per-layer maximum over channels) over all layers and steps. A
    value that was never logged (no CSV logger, no gap or drift callback) is ``None``.

    Args:
        run_dir: the job's run directory (``hydra.runtime.output_dir``).
        overrides: the job's command-line overrides, joined with spaces into the ``overrides`` column.

    Returns:
        A dict with the keys :data:`COLUMNS`.

    Example::

        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp())
        >>> (run / "csv").mkdir()
        >>> _ = (run / "csv" / "metrics.csv").write_text(
        ...     "step,val/acc,val/loss,bn/a/drift_kl_max,bn/b/drift_kl_max\n"
        ...     "1,,,0.5,2.0\n1,0.9,0.3,,\n3,,,1.5,0.25\n3,0.95,0.2,,\n")
        >>> row = summarize_run(run, ["bn=torch"])
        >>> row["overrides"], row["val/acc"], row["val/loss"], row["bn/gap/loss"], row["drift_kl_max"]
        ('bn=torch', 0.95, 0.2, None, 2.0)
    """
    run_dir = Path(run_dir)
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row["overrides"] = " ".join(overrides)
    row["run_dir"] = str(run_dir)
    path = _latest_metrics_csv(run_dir) if run_dir.is_dir() else None
    if path is None:
        return row
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for key in ("val/acc", "val/loss", "bn/gap/loss"):
        row[key] = _last(rows, key)
    drift = [
        float(value)
        for r in rows
        for key, value in r.items()
        if key and key.startswith("bn/") and key.endswith("/drift_kl_max") and value not in (None, "")
    ]
    drift = [v for v in drift if not math.isnan(v)]
    row["drift_kl_max"] = max(drift) if drift else None
    return row


def write_summary(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write ``rows`` (dicts with the keys :data:`COLUMNS`) to the CSV file ``path``; ``None`` becomes an empty cell.

    Args:
        rows: one dict per job.
        path: the file to write (its directory must exist).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if row.get(key) is None else row[key] for key in COLUMNS})
    return path


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as an aligned text table (numbers with 4 decimals, ``-`` for a missing value).

    Example::

        >>> print(format_table([{"overrides": "bn=torch", "val/acc": 0.95, "val/loss": 0.2, "run_dir": "m/0"}]))
        overrides  val/acc  val/loss  bn/gap/loss  drift_kl_max  run_dir
        bn=torch    0.9500    0.2000            -             -  m/0
    """

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    table = [list(COLUMNS)] + [[cell(row.get(key)) for key in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = []
    for line in table:
        text = [line[0].ljust(widths[0])]
        text += [value.rjust(width) for value, width in zip(line[1:-1], widths[1:-1], strict=True)]
        text.append(line[-1])
        lines.append("  ".join(text))
    return "\n".join(lines)


def _device_count(devices: Any) -> int | None:
    """Processes per node that ``Trainer(devices=...)`` asks for; ``None`` when it depends on the machine."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return None if devices < 0 else devices
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if text.lstrip("-").isdigit():
            return _device_count(int(text))
        if "," in text:
            return len([part for part in text.split(",") if part.strip()])
    return None


def trainer_processes(trainer: Mapping[str, Any] | None) -> tuple[int | None, str]:
    """How many training processes a ``trainer`` config starts, and the strategy's name.

    Args:
        trainer: the ``trainer`` node (``lightning.pytorch.Trainer`` arguments), or ``None``.

    Returns:
        ``(processes, strategy)``: ``devices * num_nodes``, or ``None`` when the count depends on the machine
        (``devices: auto`` or ``-1``); ``strategy`` is the strategy's name or ``_target_`` (``"auto"`` if unset).

    Example::

        >>> trainer_processes({"strategy": "ddp", "devices": 2, "num_nodes": 1})
        (2, 'ddp')
        >>> trainer_processes({"devices": "0,1", "num_nodes": 2})
        (4, 'auto')
        >>> trainer_processes({"devices": "auto"})
        (None, 'auto')
    """
    trainer = trainer or {}
    strategy = trainer.get("strategy", "auto")
    if isinstance(strategy, Mapping) or OmegaConf.is_dict(strategy):
        strategy = str(strategy.get("_target_", "custom"))
    strategy = "auto" if strategy is None else str(strategy)
    count = _device_count(trainer.get("devices", "auto"))
    nodes = trainer.get("num_nodes", 1)
    if count is not None and isinstance(nodes, int):
        count *= nodes
    return count, strategy


def _check_single_process(config: DictConfig, where: str) -> None:
    """Raise :class:`MultirunDDPError` if the job's trainer starts several processes under an in-process launcher."""
    launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    if launcher in EXTERNAL_LAUNCHERS:
        return
    processes, strategy = trainer_processes(OmegaConf.select(config, "trainer", default=None))
    distributed = any(name in strategy.lower() for name in _DISTRIBUTED_STRATEGIES)
    if not (distributed or (processes is not None and processes > 1)):
        return
    overrides = " ".join(OmegaConf.select(config, "hydra.overrides.task", default=[]) or [])
    raise MultirunDDPError(
        f"Multirun (-m) cannot run DDP jobs ({where}: trainer.strategy={strategy}, "
        f"{'an unknown number of' if processes is None else processes} processes; overrides: {overrides}). "
        "Lightning starts ranks > 0 by re-running the command line, -m and the whole sweep included, and a second "
        "job would reuse the first job's process group (lightning-hydra-template#226). "
        "Run each configuration as a single run instead, one run directory each, e.g.\n"
        "  for bn in torch sync; do python scripts/train.py trainer=ddp bn=$bn; done\n"
        "or sweep on a SLURM cluster with hydra/launcher=slurm (each job a SLURM job whose ranks srun starts); "
        "single-process multiruns (trainer=default) work as they are. See docs/experiments.md."
    )


def _is_multirun(config: DictConfig) -> bool:
    mode = OmegaConf.select(config, "hydra.mode")
    return mode == RunMode.MULTIRUN or mode == RunMode.MULTIRUN.name


class MultirunSummary(Callback):
    """Hydra callback: ``<sweep dir>/summary.csv`` and a printed table at the end of a multirun; DDP jobs refused.

    With ``report=true`` it also writes the sweep's comparison page, ``<sweep dir>/report/index.html``.

    Registered in ``conf/hydra/default.yaml``::

        hydra:
          callbacks:
            multirun_summary:
              _target_: bn_lightning.app.summary.MultirunSummary

    Each job's row comes from :func:`summarize_run` over the run directory the job reported in ``on_job_end``; when
    no job reported to this process (a launcher that runs ``on_job_end`` elsewhere), the run directories are found
    under the sweep directory (every ``.hydra/overrides.yaml``). A job without a CSV logger gets empty metric cells.

    Before the first job (``on_multirun_start``, the config without the sweep's values) and before each job
    (``on_job_start``, the job's own config) a trainer that starts several processes raises
    :class:`MultirunDDPError`, unless the launcher is one of :data:`EXTERNAL_LAUNCHERS`.

    Args:
        filename: name of the summary file in the sweep directory.
        print_table: print the table to stdout at the end.

    Example::

        >>> MultirunSummary().filename
        'summary.csv'
    """

    def __init__(self, filename: str = "summary.csv", print_table: bool = True) -> None:
        if not isinstance(filename, str) or not filename or Path(filename).name != filename:
            raise ValueError(f"MultirunSummary.filename must be a plain file name, got {filename!r}")
        if not isinstance(print_table, bool):
            raise TypeError(f"MultirunSummary.print_table must be a bool, got {print_table!r}")
        self.filename = filename
        self.print_table = print_table
        self.jobs: list[tuple[int, list[str], str]] = []
        self.sweep_dir: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Forget earlier jobs; stop (:class:`MultirunDDPError`) if the config without the sweep starts DDP ranks."""
        self.jobs, self.sweep_dir = [], None
        _check_single_process(config, "the multirun's config")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Stop (:class:`MultirunDDPError`) before a multirun job whose trainer starts DDP ranks."""
        if _is_multirun(config):
            _check_single_process(config, f"job {OmegaConf.select(config, 'hydra.job.num')}")

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Remember a multirun job's number, overrides and run directory."""
        if not _is_multirun(config):
            return
        num = OmegaConf.select(config, "hydra.job.num", default=len(self.jobs))
        run_dir = str(OmegaConf.select(config, "hydra.runtime.output_dir"))
        self.jobs.append((int(num), [str(o) for o in job_return.overrides or []], run_dir))
        self.sweep_dir = str(OmegaConf.select(config, "hydra.sweep.dir"))

    def _discover(self, sweep_dir: Path) -> list[tuple[int, list[str], str]]:
        jobs = []
        for path in sweep_dir.rglob("overrides.yaml"):
            if path.parent.name != ".hydra":
                continue
            run_dir = path.parent.parent
            hydra_yaml = path.parent / "hydra.yaml"
            num = OmegaConf.select(OmegaConf.load(hydra_yaml), "hydra.job.num") if hydra_yaml.is_file() else None
            overrides = OmegaConf.to_container(OmegaConf.load(path))
            jobs.append((len(jobs) if num is None else int(num), [str(o) for o in overrides], str(run_dir)))
        return jobs

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write ``<sweep dir>/<filename>`` with one row per job and print the table."""
        # the directory the jobs were written under: `now` in hydra.sweep.dir resolves again in a later second
        sweep_dir = Path(self.sweep_dir or str(OmegaConf.select(config, "hydra.sweep.dir"))).absolute()
        jobs = sorted(self.jobs or (self._discover(sweep_dir) if sweep_dir.is_dir() else []))
        if not jobs:
            log.warning(f"MultirunSummary: no jobs found under {sweep_dir}; no {self.filename} written")
            return
        rows = [summarize_run(run_dir, overrides) for _, overrides, run_dir in jobs]
        sweep_dir.mkdir(parents=True, exist_ok=True)
        path = write_summary(rows, sweep_dir / self.filename)
        log.info(f"Multirun summary written to {path}")
        if self.print_table:
            print(f"Multirun summary ({len(rows)} jobs): {path}")
            # the table names only the overrides that differ between jobs; the CSV file has them all
            lists = [overrides for _, overrides, _ in jobs]
            common = [o for o in lists[0] if len(lists) > 1 and all(o in other for other in lists[1:])]
            if common:
                print(f"Overrides of every job: {' '.join(common)}")
            shown = [
                {**row, "overrides": " ".join(o for o in job[1] if o not in common)}
                for row, job in zip(rows, jobs, strict=True)
            ]
            print(format_table(shown))
        if OmegaConf.select(config, "report", default=False) is True:
            self._report(sweep_dir)

    @staticmethod
    def _report(sweep_dir: Path) -> None:
        """The sweep's comparison page (``report=true``), beside each job's own report."""
        from bn_lightning.report import ReportError, write_report  # matplotlib loads only when a report is asked for

        try:
            report = write_report(sweep_dir)
        except ReportError as error:
            log.warning(f"No sweep report: {error}")
            return
        print(f"Sweep report written to: {report.page}")
