"""Train from the Hydra config in conf/: `python scripts/train.py [group=option ...] [key=value ...]`.

Examples:
    python scripts/train.py                                   # SmallCNN on digits, torch BN
    python scripts/train.py model=mlp bn=scratch trainer.max_epochs=2
    python scripts/train.py experiment=resnet20_synthetic logger=many
    python scripts/train.py ckpt_path=outputs/train/runs/<timestamp>/checkpoints/last.ckpt
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from bn_lightning.app.train import train_and_report


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # the return value is what a Hydra sweeper optimises
    return train_and_report(cfg)


if __name__ == "__main__":
    main()
