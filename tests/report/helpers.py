"""Checks every report test makes on a page: its PNGs decode and are not blank, it references only files beside it."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.image
import numpy as np

from bn_lightning.report.plots import WIDTH_PX

_REFERENCE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")


def references(page: Path) -> list[str]:
    """Every src/href of the page."""
    return _REFERENCE.findall(page.read_text(encoding="utf-8"))


def check_page(page: Path) -> list[Path]:
    """The page references only existing files and no network address; returns the images it shows."""
    text = page.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text and "//" not in "".join(references(page))
    images = []
    for ref in references(page):
        target = (page.parent / ref).resolve()
        assert target.is_file(), f"{page} references {ref}, which does not exist"
        if ref.endswith(".png"):
            images.append(target)
    return images


def check_png(path: Path) -> np.ndarray:
    """The PNG decodes, is WIDTH_PX wide and at least 250 px high, and is not one flat colour."""
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert width == WIDTH_PX and height >= 250, (path.name, pixels.shape)
    rgb = pixels[..., :3]
    assert float(rgb.std()) > 0.05, f"{path.name} looks blank (pixel std {float(rgb.std()):.4f})"
    return pixels
