"""Every code block of README.md runs as written.

- Each ```python block runs on its own, in a fresh namespace (`exec`, as a `__main__` script) with an empty
  temporary directory as the working directory, and must not raise.
- Each line of a ```bash block is one command (text after `  #` is a comment), and so is every inline code span of
  the prose that starts with `python scripts/`. Commands that install or that check
  the whole repository are not run here, by this rule: a line starting with `pip`, `pytest`, `python -m pytest`,
  `ruff` or `bash .ci/run` (the suite runs them itself, and CI runs the rest). Every other line must be a
  `python scripts/...` command; it runs from an empty temporary directory (the script path made absolute) and must
  exit with status 0. `scripts/train.py` commands get overrides appended that shrink the run to one epoch of two
  batches (Hydra's last override wins); commands that start several processes (`trainer=ddp`) are marked slow, and so
  is the one check that runs the main job exactly as written.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.app import QUICK_RUN

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_CHARS = 12_000
NOT_RUN = ("pip ", "pytest", "python -m pytest", "ruff ", "bash .ci/run")
SHRINK = QUICK_RUN
TIMEOUT_S = 600
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_INLINE = re.compile(r"`(python scripts/[^`]+)`")


def _blocks(language: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced block of `language` in the README."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in _FENCE.finditer(text) if m.group(1) == language]


def _commands() -> list[tuple[int, str]]:
    """(line number, command) of every bash line and inline `python scripts/...` span the rule says to run."""
    text = README.read_text()
    prose = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # fenced blocks blanked, line numbers kept
    found = [(prose.count("\n", 0, m.start()) + 1, m.group(1)) for m in _INLINE.finditer(prose)]
    for start, code in _blocks("bash"):
        for offset, line in enumerate(code.splitlines(), start=1):
            command = re.split(r"\s+#", line, maxsplit=1)[0].strip()
            if command and not command.startswith(NOT_RUN):
                found.append((start + offset, command))
    first = {}
    for line, command in sorted(found):
        first.setdefault(command, line)
    return sorted((line, command) for command, line in first.items())


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONWARNINGS="ignore")
    return env


def _run(args: list[str], cwd: Path) -> None:
    result = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"{shlex.join(args)} exited with {result.returncode}:\n{result.stderr[-6000:]}"


def _argv(command: str, shrink: bool) -> list[str]:
    argv = shlex.split(command)
    assert argv[0] == "python" and argv[1].startswith("scripts/"), f"not a `python scripts/...` command: {command}"
    argv[0], argv[1] = sys.executable, str(ROOT / argv[1])
    if shrink and argv[1].endswith("train.py"):
        argv += list(SHRINK)
    return argv


def _param(line: int, command: str):
    marks = [pytest.mark.slow, pytest.mark.ddp] if "trainer=ddp" in command else []
    if "compiled" in command:
        marks = [pytest.mark.slow]  # compiling the kernel takes longer than the shrunk run
    return pytest.param(command, id=f"line{line}", marks=marks)


def test_readme_is_a_short_guide():
    text = README.read_text()
    assert len(text) <= MAX_CHARS, f"README.md has {len(text)} characters; keep it under {MAX_CHARS}"
    assert _blocks("python"), "README.md has no python block"
    assert _commands(), "README.md has no command to run"


@pytest.mark.parametrize(("line", "code"), [pytest.param(n, c, id=f"line{n}") for n, c in _blocks("python")])
def test_python_block_runs(line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md, block at line {line}", "exec"), {"__name__": "__main__"})


@pytest.mark.parametrize("command", [_param(n, c) for n, c in _commands()])
def test_bash_command_runs(command: str, tmp_path: Path):
    _run(_argv(command, shrink=True), cwd=tmp_path)


@pytest.mark.slow
def test_main_job_runs_as_written(tmp_path: Path):
    command = next(c for _, c in _commands() if c == "python scripts/train.py")
    result = subprocess.run(
        _argv(command, shrink=False), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert result.returncode == 0, result.stderr[-6000:]
    assert "Final val/acc" in result.stdout + result.stderr
