"""Train from the Hydra config in conf/: `python scripts/train.py [group=option ...] [key=value ...]`.

The same as the `bn-train` console script and `python -m bn_lightning.app.train` (bn_lightning.app.train.main).

Examples:
    python scripts/train.py                                   # SmallCNN on digits, torch BN
    python scripts/train.py model=mlp bn=scratch trainer.max_epochs=2
    python scripts/train.py experiment=resnet20_synthetic logger=many
    python scripts/train.py trainer=ddp bn=sync               # 2 CPU processes, synchronised BN
    python scripts/train.py ckpt_path=outputs/train/runs/<timestamp>/checkpoints/last.ckpt
"""

from __future__ import annotations

from bn_lightning.app.train import main

if __name__ == "__main__":
    main()
