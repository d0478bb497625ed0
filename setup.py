"""Build hook: the wheel carries a copy of the top-level ``conf/`` as ``bn_lightning/conf``.

``conf/`` stays the one source of the app's configs; ``bn_lightning.app.train.config_dir`` reads the copy in an
installed wheel and the checkout's ``conf/`` in an editable install. Everything else is declared in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONF = Path(__file__).resolve().parent / "conf"


class BuildPyWithConf(build_py):
    """``build_py`` that also copies ``conf/**/*.yaml`` to ``<build>/bn_lightning/conf``."""

    def run(self) -> None:
        """Build the package, then add the configs (not for an editable install, which reads ``conf/`` itself)."""
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "bn_lightning" / "conf"
        for path in sorted(CONF.rglob("*.yaml")):
            destination = target / path.relative_to(CONF)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)


setup(cmdclass={"build_py": BuildPyWithConf})
