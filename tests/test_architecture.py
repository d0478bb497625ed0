"""The floors of the package (docs/architecture.md), checked on the source: who may import what.

- core (torch only): functional/, layers/, convert.py, precise_bn.py, distributed.py, validation.py, health.py,
  guards.py, sync_stats.py, monitoring/;
- Lightning: callbacks/, plugins.py, module.py, policy.py, fabric.py;
- app: hydra.py, app/, report/.

A floor imports only floors below it, and no module imports an underscore name (or an underscore module) from
another subpackage or top-level module of bn_lightning. Import-time environment reads are checked in a fresh
interpreter.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bn_lightning"
CORE = {
    "functional",
    "layers",
    "convert",
    "precise_bn",
    "distributed",
    "validation",
    "health",
    "guards",
    "sync_stats",
    "monitoring",
}
LIGHTNING = {"callbacks", "plugins", "module", "policy", "fabric"}
APP = {"hydra", "app", "report"}
FLOOR = {**{name: 0 for name in CORE}, **{name: 1 for name in LIGHTNING}, **{name: 2 for name in APP}}
# third-party packages each floor may not import anywhere (function-level imports included) ...
FORBIDDEN = {
    0: {
        "lightning",
        "pytorch_lightning",
        "lightning_utilities",
        "hydra",
        "omegaconf",
        "wandb",
        "tensorboard",
        "sklearn",
    },
    1: {"hydra", "omegaconf", "sklearn"},
    2: set(),
}
# ... and at module level: a logger's package imported inside the function that talks to that logger is fine
FORBIDDEN_AT_IMPORT = {0: set(), 1: {"wandb", "tensorboard", "tensorboardX"}, 2: set()}


def _modules() -> list[tuple[str, Path]]:
    """(home, path) of every module: home is the subpackage or top-level module it belongs to."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        found.append((rel.parts[0] if len(rel.parts) > 1 else rel.stem, path))
    return found


def _imports(path: Path, module_level: bool = False) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every import in ``path`` (or only those run at import), resolved."""
    out = []
    tree = ast.parse(path.read_text(), str(path))
    lazy = set()
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            lazy |= {id(node) for node in ast.walk(fn)}
    for node in ast.walk(tree):
        if module_level and id(node) in lazy:
            continue
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = list(path.relative_to(PACKAGE.parent).with_suffix("").parts[: -node.level])
                module = ".".join(base + ([module] if module else []))
            out.append((node.lineno, module, [alias.name for alias in node.names]))
    return out


def test_every_module_belongs_to_a_floor():
    homes = {home for home, _ in _modules()} - {"__init__", "py"}
    assert homes <= set(FLOOR), f"modules outside the floors of docs/architecture.md: {sorted(homes - set(FLOOR))}"


def test_no_private_names_cross_subpackages():
    offenders = []
    for home, path in _modules():
        for line, module, names in _imports(path):
            parts = module.split(".")
            if parts[0] != "bn_lightning" or len(parts) < 2:
                continue
            if parts[1] == home:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private or any(p.startswith("_") and not p.startswith("__") for p in parts[1:]):
                offenders.append(f"{path.relative_to(PACKAGE)}:{line}: from {module} import {', '.join(names)}")
    assert not offenders, "private names imported across subpackages:\n" + "\n".join(offenders)


def test_floors_depend_only_downward():
    offenders = []
    for home, path in _modules():
        if home == "__init__":
            continue
        floor = FLOOR[home]
        for line, module, names in _imports(path):
            parts = module.split(".")
            if parts[0] in FORBIDDEN[floor]:
                offenders.append(f"{path.relative_to(PACKAGE)}:{line}: imports {module} (floor {floor})")
            if parts[0] == "bn_lightning":
                targets = [parts[1]] if len(parts) > 1 else names
                for target in targets:
                    if FLOOR.get(target, 0) > floor:
                        offenders.append(f"{path.relative_to(PACKAGE)}:{line}: imports bn_lightning.{target} (up)")
        for line, module, _ in _imports(path, module_level=True):
            if module.split(".")[0] in FORBIDDEN_AT_IMPORT[floor]:
                offenders.append(f"{path.relative_to(PACKAGE)}:{line}: imports {module} at import (floor {floor})")
    assert not offenders, "imports against the floors:\n" + "\n".join(offenders)


def test_the_architecture_checks_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from bn_lightning.layers.sync import _secret\nimport hydra\n")
    (line, module, names), (_, hydra, _) = _imports(bad)
    assert module == "bn_lightning.layers.sync" and names == ["_secret"] and hydra == "hydra"


def test_importing_the_package_reads_no_bn_lightning_environment_variable():
    probe = textwrap.dedent(
        """
        import os

        reads = []
        original = os.environ

        class Spy(dict):
            def get(self, key, default=None):
                reads.append(key)
                return original.get(key, default)

            def __getitem__(self, key):
                reads.append(key)
                return original[key]

            def __contains__(self, key):
                reads.append(key)
                return key in original

        os.environ = Spy(original)
        os.getenv = lambda key, default=None: os.environ.get(key, default)
        import bn_lightning, bn_lightning.callbacks, bn_lightning.plugins  # noqa: E401,F401

        print(sorted({k for k in reads if str(k).startswith("BN_LIGHTNING")}))
        """
    )
    env = {**os.environ, "BN_LIGHTNING_KERNEL": "compiled", "BN_LIGHTNING_SYNC_SPIN_US": "7"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_every_environment_knob_is_documented_in_one_table():
    knobs = set()
    for _, path in _modules():
        knobs |= set(re.findall(r"\bBN_LIGHTNING_[A-Z0-9_]+", path.read_text()))
    assert knobs, "no BN_LIGHTNING_* knob found: the search is broken"
    docs = {p.name: p.read_text() for p in (PACKAGE.parent / "docs").glob("*.md")}
    tables = [name for name, text in docs.items() if all(f"| `{knob}`" in text for knob in knobs)]
    assert len(tables) == 1, f"knobs {sorted(knobs)} must all be rows of one table in docs/; found in {tables}"


def test_importing_the_package_loads_the_core_only():
    code = (
        "import sys, bn_lightning, bn_lightning.precise_bn, bn_lightning.distributed\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'hydra'}))\n"
        "bn_lightning.BatchNormModule  # the Lightning names load on first use\n"
        "print('lightning' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["[]", "True"], out.stdout
