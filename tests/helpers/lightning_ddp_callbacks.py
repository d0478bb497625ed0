"""The BN callbacks in a 2-process CPU DDP Lightning run, executed as a script (Lightning's ddp launcher re-runs argv).

Also provides :class:`CapturingLogger`, the in-memory logger the callback tests read logged values from.

Usage: python tests/helpers/lightning_ddp_callbacks.py OUT_DIR {sync,none}
Every rank saves to ``OUT_DIR/rank<r>.pt``: what its logger received, the callbacks' record counts and alerts, and
the final running statistics of every BN layer. Each rank feeds differently shifted data, so without ``sync`` (the
:class:`~bn_lightning.plugins.SyncBatchNormPlugin`) the ranks' running statistics disagree.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bn_lightning.callbacks import BatchNormMonitor, RunningStatDrift  # noqa: E402
from bn_lightning.plugins import SyncBatchNormPlugin  # noqa: E402

STEPS = 3


class CapturingLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)`` in :attr:`rows`."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self) -> Any:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def bn_rows(self, prefix: str = "bn/") -> list[tuple[int | None, dict[str, float]]]:
        """The calls that carried ``prefix`` keys, restricted to those keys."""
        out = []
        for step, metrics in self.rows:
            bn = {k: v for k, v in metrics.items() if k.startswith(prefix)}
            if bn:
                out.append((step, bn))
        return out


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
            nn.BatchNorm1d(3),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        # rank-dependent data: unsynchronised BN buffers diverge
        x = x * (1.0 + self.global_rank) + 2.0 * self.global_rank
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main() -> None:
    out_dir, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    data = DataLoader(
        TensorDataset(torch.randn(64, 3, 6, 6, generator=g), torch.randint(0, 3, (64,), generator=g)), batch_size=8
    )
    module = _Module()
    monitor = BatchNormMonitor(log_every_n_steps=1)
    drift = RunningStatDrift(log_every_n_steps=1, min_batch_size=4)
    logger = CapturingLogger()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(broadcast_buffers=False),
        plugins=[SyncBatchNormPlugin()] if mode == "sync" else [],
        callbacks=[monitor, drift],
        max_steps=STEPS,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
    )
    trainer.fit(module, data)
    bns = {n: m for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    torch.save(
        {
            "rows": logger.rows,
            "records": (monitor.records, drift.records),
            "alerts": drift.alerts,
            "running": {n: (m.running_mean.clone(), m.running_var.clone(), m.eps) for n, m in bns.items()},
        },
        os.path.join(out_dir, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main()
