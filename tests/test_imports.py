"""Import weight: the library floors import no app dependency (Hydra, OmegaConf, loggers, scikit-learn)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# the app's dependencies, each with its submodules: `import bn_lightning` must not pull any of them in
APP_ONLY = ("hydra", "omegaconf", "wandb", "tensorboard", "tensorboardX", "sklearn")


def imported_after(statement: str) -> list[str]:
    """The modules in ``sys.modules`` after running ``statement`` in a fresh interpreter."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "statement",
    [
        "import bn_lightning, bn_lightning.callbacks",
        "import bn_lightning.module, bn_lightning.policy, bn_lightning.plugins",
    ],
)
def test_library_imports_no_app_dependency(statement: str) -> None:
    modules = imported_after(statement)
    assert "bn_lightning" in modules
    heavy = [name for name in modules if name.split(".")[0] in APP_ONLY]
    assert heavy == [], f"`{statement}` imports {heavy}"


def test_the_hydra_module_imports_hydra() -> None:
    # the check above would pass vacuously if the probe could not see Hydra at all
    modules = imported_after("import bn_lightning.hydra")
    assert "hydra.core.config_store" in modules and "omegaconf" in modules
