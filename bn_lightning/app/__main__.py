"""``python -m bn_lightning.app [overrides]``: the same command line as ``bn-train`` and ``scripts/train.py``."""

from bn_lightning.app.train import main

if __name__ == "__main__":
    main()
