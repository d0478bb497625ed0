"""BatchNormGuard + AccumulateBatchNormStats in a 2-process CPU DDP Lightning run (Lightning's launcher re-runs argv).

Usage: python tests/helpers/lightning_ddp_guards.py OUT_DIR
``accumulate_grad_batches=2``, 6 batches of 4 per rank, each rank's input shifted by its rank. Layers on the raw input
(their statistics do not depend on the weights): ``sync`` (bn_lightning.SyncBatchNorm), ``local`` (torch BN,
``momentum=None``) and ``aux`` (torch BN outside the loss, fed a NaN on rank 1 at batch 2 only). Every batch also
runs ``sync`` once more inside ``no_stat_update``. Each rank saves ``OUT_DIR/rank<r>.pt``: the inputs it saw, the
final BN buffers, the callbacks' counters and whether the guarded passes left ``sync`` unchanged (and gave the
outputs of the same pass outside the guard).
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

from bn_lightning import SyncBatchNorm, no_stat_update  # noqa: E402
from bn_lightning.callbacks import AccumulateBatchNormStats, BatchNormGuard  # noqa: E402


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.sync = SyncBatchNorm(4)
        self.local = nn.BatchNorm1d(4, momentum=None)
        self.aux = nn.BatchNorm1d(4, affine=False)
        self.head = nn.Linear(8, 3)
        self.inputs: list[torch.Tensor] = []
        self.guarded_unchanged = True

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x + 2.0 * self.global_rank
        self.inputs.append(x.clone())
        before = [t.clone() for t in self.sync.buffers()]
        outside = SyncBatchNorm(4)
        outside.load_state_dict(self.sync.state_dict())
        with no_stat_update(self.sync):
            extra = self.sync(x * 3.0)  # a SAM-like extra pass: SyncBatchNorm's collective runs on both ranks
        self.guarded_unchanged &= all(torch.equal(a, b) for a, b in zip(before, self.sync.buffers(), strict=True))
        self.guarded_unchanged &= torch.equal(extra, outside(x * 3.0))  # the same pass outside the guard
        aux_in = x.clone()
        if self.global_rank == 1 and batch_idx == 2:
            aux_in[0, 0] = float("nan")
        self.aux(aux_in)
        return nn.functional.cross_entropy(self.head(torch.cat([self.sync(x), self.local(x)], 1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main() -> None:
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(48, 4, generator=g), torch.randint(0, 3, (48,), generator=g)), 4)
    module = _Module()
    guard, accumulate = BatchNormGuard(), AccumulateBatchNormStats()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(broadcast_buffers=False),
        callbacks=[guard, accumulate],
        accumulate_grad_batches=2,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
    )
    trainer.fit(module, data)
    state = {k: v.clone() for k, v in module.state_dict().items() if "running" in k or "num_batches" in k}
    torch.save(
        {
            "inputs": module.inputs,
            "state": state,
            "skipped_batches": guard.skipped_batches,
            "updates": accumulate.updates,
            "guarded_unchanged": module.guarded_unchanged,
        },
        os.path.join(out_dir, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main()
