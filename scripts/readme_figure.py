"""Regenerate the README's picture: the drift heatmap of a real run, as bn-report draws it.

Trains ``experiment=resnet20_synthetic`` (21 BN layers, recording every step) with the TensorBoard and CSV loggers
and ``report=true`` in a temporary directory, then copies ``report/heatmap_drift_kl.png`` to ``docs/images/`` (or
``--out``).

Run: python scripts/readme_figure.py [--out docs/images/heatmap_drift_kl.png] [--keep DIR] [overrides ...]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = (
    "experiment=resnet20_synthetic",
    "logger=many",
    "report=true",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "heatmap_drift_kl.png")
    parser.add_argument("--keep", type=Path, default=None, help="write the run here and keep it (default: a tmp dir)")
    parser.add_argument("overrides", nargs="*", help="more overrides for scripts/train.py, e.g. trainer.max_epochs=1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.keep or Path(tmp) / "run"
        command = [
            sys.executable,
            str(ROOT / "scripts" / "train.py"),
            *RUN,
            *args.overrides,
            f"hydra.run.dir={run_dir}",
        ]
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
        figure = run_dir / "report" / "heatmap_drift_kl.png"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(figure, args.out)
    print(f"Figure written to: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
