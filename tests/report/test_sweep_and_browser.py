"""A sweep's comparison page, and both pages rendered by a real browser (headless Chromium) on a phone and a laptop."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.report.conftest import run_train
from tests.report.helpers import check_page, check_png, references

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# appended to a copy of the page: after every image settled, what loaded and whether the page scrolls sideways
PROBE = """
<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const result = {
    images: images.length,
    loaded: images.filter((i) => i.complete && i.naturalWidth > 0).length,
    pageWidth: document.documentElement.scrollWidth,
    viewWidth: window.innerWidth,
  };
  const out = document.createElement("pre");
  out.textContent = "PROBE:" + JSON.stringify(result) + ":END";
  document.body.appendChild(out);
});
</script>
"""


def _browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def render(page: Path, width: int) -> dict:
    """Load ``page`` in headless Chromium at ``width`` CSS pixels; the probe's result."""
    browser = _browser()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have a browser: .ci/run installs Debian's chromium")
        pytest.skip("no Chromium/Chrome on this machine")
    probe = page.with_name("_probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    try:
        result = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-extensions",
                "--no-first-run",
                f"--window-size={width},900",
                "--virtual-time-budget=10000",
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        probe.unlink()
    found = re.findall(r"PROBE:(\{.*?\}):END", result.stdout)
    assert found, f"the page's probe did not run (exit {result.returncode}): {result.stderr[-2000:]}"
    return json.loads(found[-1])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    base = tmp_path_factory.mktemp("sweep")
    sweep_dir = base / "sweep"
    result = run_train(
        base,
        "-m",
        "bn=torch,scratch",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "report=true",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir, result.stdout


@pytest.mark.slow
def test_sweep_page_compares_and_links_every_job(sweep):
    sweep_dir, stdout = sweep
    page = sweep_dir / "report" / "index.html"
    assert f"Sweep report written to: {page}" in stdout
    images = check_page(page)
    assert {p.name for p in images} == {"sweep_val_acc.png", "sweep_val_loss.png"}
    for image in images:
        check_png(image)
    links = [ref for ref in references(page) if ref.endswith("index.html")]
    assert links == ["../0/report/index.html", "../1/report/index.html"]
    for link in links:
        for image in check_page((page.parent / link).resolve()):
            check_png(image)
    text = page.read_text()
    assert text.count("<tr>") == 3  # header + one row per job
    assert "bn=torch" in text and "bn=scratch" in text


@pytest.mark.slow
@pytest.mark.parametrize("width", [390, 1280], ids=["phone", "laptop"])
def test_browser_shows_every_image_without_sideways_scrolling(trained_run, sweep, width):
    pages = [trained_run[0] / "report" / "index.html", sweep[0] / "report" / "index.html"]
    for page in pages:
        shown = render(page, width)
        assert shown["images"] == len(check_page(page)) > 0, shown
        assert shown["loaded"] == shown["images"], f"{page}: images that did not load: {shown}"
        assert shown["pageWidth"] <= shown["viewWidth"], f"{page} scrolls sideways at {width}px: {shown}"
