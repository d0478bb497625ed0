"""A 2-process CPU DDP Lightning run, executed as a script (Lightning's ddp launcher re-runs ``sys.argv``).

Usage: python tests/helpers/lightning_ddp.py OUT_DIR {plugin,none} [group_size]
Each rank saves, at the end of fit, the class names of its BN layers and their running statistics to OUT_DIR, and the
scheduling policies of its gloo event-loop threads during training and after fit.
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bn_lightning.distributed import gloo_event_loop_threads  # noqa: E402
from bn_lightning.plugins import SyncBatchNormPlugin  # noqa: E402
from tests.helpers.tiny import TinyBNNet  # noqa: E402


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyBNNet(nn.BatchNorm2d, nn.BatchNorm1d)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def on_train_end(self) -> None:
        bns = {n: m for n, m in self.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        torch.save(
            {n: (type(m).__module__ + "." + type(m).__name__, m.running_mean.clone()) for n, m in bns.items()},
            os.path.join(sys.argv[1], f"rank{self.global_rank}.pt"),
        )
        torch.save(_loop_policies(), os.path.join(sys.argv[1], f"loops_training{self.global_rank}.pt"))


def _loop_policies() -> list[int]:
    return [os.sched_getscheduler(tid) for tid in gloo_event_loop_threads()]


def main() -> None:
    out_dir, mode = sys.argv[1], sys.argv[2]
    group_size = int(sys.argv[3]) if len(sys.argv) > 3 else None
    g = torch.Generator().manual_seed(1)
    # rank-dependent data: each rank's sampler shard has a different mean, so unsynced BN buffers diverge
    x = torch.randn(64, 3, 6, 6, generator=g) + torch.arange(64).view(-1, 1, 1, 1) % 2 * 3.0
    data = DataLoader(TensorDataset(x, torch.randint(0, 5, (64,), generator=g)), batch_size=8)
    plugins = [SyncBatchNormPlugin(group_size=group_size)] if mode == "plugin" else []
    module = _Module()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(broadcast_buffers=False),
        plugins=plugins,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    torch.save(_loop_policies(), os.path.join(out_dir, f"loops_after{trainer.global_rank}.pt"))
    if trainer.is_global_zero:
        after = {n: type(m).__name__ for n, m in module.named_modules() if "BatchNorm" in type(m).__name__}
        torch.save(after, os.path.join(out_dir, "after_fit.pt"))


if __name__ == "__main__":
    main()
