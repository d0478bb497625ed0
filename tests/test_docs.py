"""Every ```python block of docs/*.md runs as written, like the README's (tests/test_readme.py).

Each block runs on its own, in a fresh namespace (as a ``__main__`` script), with an empty temporary directory as
the working directory, and must not raise.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _python_blocks() -> list[tuple[str, int, str]]:
    found = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        for match in _FENCE.finditer(text):
            if match.group(1) == "python":
                found.append((page.name, text.count("\n", 0, match.start()) + 1, match.group(2)))
    return found


def test_the_docs_have_python_examples():
    assert any(page == "hydra.md" for page, _, _ in _python_blocks())


@pytest.mark.parametrize(("page", "line", "code"), [pytest.param(*b, id=f"{b[0]}:{b[1]}") for b in _python_blocks()])
def test_python_block_runs(page: str, line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"docs/{page}, block at line {line}", "exec"), {"__name__": "__main__"})
