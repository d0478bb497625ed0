"""The ``bn-report`` command line (also ``python -m bn_lightning.report``).

Unusable input (no such directory, nothing logged) ends in one line ``Error: ...`` and exit code 2, never a
traceback; a partly readable run gives a report and ``Warning: ...`` lines.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bn_lightning.report.runs import ReportError
from bn_lightning.report.write import write_report

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bn-report",
        description="Write an offline HTML report (plots, health alerts, config) of a bn_lightning run or sweep.",
    )
    parser.add_argument("run_dir", help="a run directory (outputs/<task>/runs/<time>) or a sweep (multiruns/<time>)")
    parser.add_argument("--out", default=None, help="where to write the report (default: RUN_DIR/report)")
    parser.add_argument(
        "--layers",
        nargs="+",
        default=None,
        metavar="LAYER",
        help="BN layers whose x_hat histograms to draw (default: the first, the last and the most drifting)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bn-report``; returns the exit code (0, or 2 for unusable input).

    Example::

        >>> main(["/no/such/run"])  # prints "Error: no such directory: /no/such/run" to stderr
        2
    """
    args = _parser().parse_args(argv)
    try:
        report = write_report(args.run_dir, args.out, args.layers)
    except ReportError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 2
    for warning in report.warnings:
        print(f"Warning: {warning}", file=sys.stderr)
    print(f"Report written to: {report.page}")
    return 0


def entry_point() -> None:
    """The console script: :func:`main` with ``sys.argv``, its result as the exit code."""
    sys.exit(main())
