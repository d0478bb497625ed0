"""bn-report's command line: a report from a good run, and one clear line (exit 2) for input it cannot use."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bn_lightning.report.cli import main


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report", "tensorboard"))
    return copy


def _one_error_line(capsys: pytest.CaptureFixture, code: int, expected: str) -> None:
    out, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("Error: ") and expected in err, err
    assert "Traceback" not in out + err


def test_module_command_writes_the_report(trained_run, tmp_path):
    copy = _copy(trained_run[0], tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "bn_lightning.report", str(copy)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"Report written to: {copy / 'report' / 'index.html'}"
    assert (copy / "report" / "curves.png").is_file()


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "bn-report"
    assert script.is_file(), "pip install -e . installs the bn-report console script"
    result = subprocess.run([str(script), "/no/such/run"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr == "Error: no such directory: /no/such/run\n"


def test_no_such_directory(capsys, tmp_path):
    _one_error_line(capsys, main([str(tmp_path / "missing")]), f"no such directory: {tmp_path / 'missing'}")


def test_a_file_is_not_a_run(capsys, tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step\n")
    _one_error_line(capsys, main([str(path)]), "not a directory")


def test_directory_without_metrics(capsys, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    _one_error_line(capsys, main([str(tmp_path)]), "no metrics.csv (CSVLogger) and no TensorBoard event files")


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00\x89PNG\xff\xfe garbage \x00", b"epoch,val/acc\n0,0.5\n", b"step,val/acc\n"],
    ids=["empty", "binary", "no-step-column", "header-only"],
)
def test_unusable_metrics_file(capsys, tmp_path, content):
    (tmp_path / "csv" / "version_0").mkdir(parents=True)
    (tmp_path / "csv" / "version_0" / "metrics.csv").write_bytes(content)
    _one_error_line(capsys, main([str(tmp_path)]), f"no metrics in {tmp_path}")


def test_killed_run_gives_a_partial_report_and_a_warning(trained_run, tmp_path, capsys):
    copy = _copy(trained_run[0], tmp_path)
    metrics = next(copy.glob("csv/*/metrics.csv"))
    text = metrics.read_text()
    cut = text[: len(text) * 2 // 3]
    cut = cut[: cut.rindex("\n") + 15]  # the process died in the middle of a row
    metrics.write_text(cut)
    rows_before = cut.count("\n") - 1
    assert main([str(copy)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"Report written to: {copy / 'report' / 'index.html'}"
    assert err.startswith("Warning: csv/version_0/metrics.csv: line ") and "incomplete" in err
    assert f"read the {rows_before} rows before it" in err
    page = (copy / "report" / "index.html").read_text()
    assert "was the run killed while writing?" in page
    assert (copy / "report" / "heatmap_drift_kl.png").is_file()
