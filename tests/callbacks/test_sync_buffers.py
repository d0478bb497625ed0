"""SyncBatchNormBuffers in a 2-process CPU DDP fit: the mixture (float64 reference), rank zero's before a checkpoint,
and RunningStatDrift's ``rank_disagreement`` reading exactly 0 once the ranks agree.

Also the script of that run (Lightning's ddp launcher re-runs ``sys.argv``):
``python tests/callbacks/test_sync_buffers.py OUT_DIR [off]``; ``off`` leaves the two callbacks out (the control run
that shows the checks fail without them).
"""

from __future__ import annotations

import os
import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bn_lightning import BatchNorm1d  # noqa: E402
from bn_lightning.callbacks import RunningStatDrift, SyncBatchNormBuffers  # noqa: E402
from tests.helpers.lightning_ddp_callbacks import CapturingLogger  # noqa: E402

LAYERS = ("net.1", "net.5")  # torch's BatchNorm2d, bn_lightning's BatchNorm1d
KEYS = ("running_mean", "running_var", "num_batches_tracked")


def _buffers(module: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    layers = dict(module.named_modules())
    return {
        n: (layers[n].running_mean.clone(), layers[n].running_var.clone(), layers[n].num_batches_tracked.clone())
        for n in LAYERS
    }


class _Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=False),
            nn.BatchNorm2d(4),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            BatchNorm1d(4),
            nn.Linear(4, 3),
        )
        g = torch.Generator().manual_seed(5)
        self.same = (torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g))

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.current_epoch == 0:  # rank-dependent data: the ranks' running statistics diverge
            x = x * (1.0 + self.global_rank) + 2.0 * self.global_rank
        else:  # the same batch on every rank: ranks that agree before the step still agree after it
            x, y = self.same
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Probe(Callback):
    """Keeps the buffers around the moments the sync callbacks act (it runs before them, and before checkpoints)."""

    def __init__(self) -> None:
        self.seen: dict[str, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen[f"end{trainer.global_step}"] = _buffers(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen[f"start{trainer.global_step}"] = _buffers(pl_module)


def main() -> None:
    out_dir = sys.argv[1]
    on = len(sys.argv) < 3 or sys.argv[2] != "off"
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    data = DataLoader(
        TensorDataset(torch.randn(48, 3, 6, 6, generator=g), torch.randint(0, 3, (48,), generator=g)), batch_size=8
    )
    probe = _Probe()
    syncs = [SyncBatchNormBuffers("mean", "epoch_end"), SyncBatchNormBuffers("broadcast", "before_save")] if on else []
    # checkpoints at steps 2, 4, 6: the first while the ranks disagree (mid-epoch 0)
    checkpoint = ModelCheckpoint(dirpath=os.path.join(out_dir, "ckpt"), every_n_train_steps=2, save_top_k=-1)
    logger = CapturingLogger()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(broadcast_buffers=False),
        callbacks=[probe, RunningStatDrift(log_every_n_steps=1, min_batch_size=2), *syncs, checkpoint],
        max_epochs=2,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
    )
    module = _Module()
    trainer.fit(module, data)
    torch.save(
        {"rows": logger.rows, "seen": probe.seen, "final": _buffers(module), "syncs": [s.syncs for s in syncs]},
        os.path.join(out_dir, f"rank{trainer.global_rank}.pt"),
    )


def _run(tmp_path, *args: str) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": ROOT},
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _disagreement(rows, step: int) -> dict[str, float]:
    found = {k.split("/")[1]: v for s, m in rows if s == step for k, v in m.items() if k.endswith("rank_disagreement")}
    assert set(found) == set(LAYERS), (step, found)
    return found


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.is_floating_point() else t


@pytest.mark.ddp
@pytest.mark.slow
def test_ranks_agree_after_sync_and_checkpoints_hold_rank_zero(tmp_path) -> None:
    r0, r1 = _run(tmp_path)
    assert r0["syncs"] == r1["syncs"] == [2, 3]  # two epoch ends; three checkpoints
    # epoch 0, rank-dependent data: the ranks disagree at every record
    for step in (1, 2, 3):
        assert all(v > 1e-5 for v in _disagreement(r0["rows"], step).values())
    # before_save at step 2: the checkpoint holds rank zero's buffers as they were, bit for bit, and so does rank 1
    state = torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=False)["state_dict"]
    for layer in LAYERS:
        for i, key in enumerate(KEYS):
            source = r0["seen"]["end2"][layer][i]
            assert not torch.equal(source, r1["seen"]["end2"][layer][i]) or key == "num_batches_tracked"
            assert torch.equal(_bits(state[f"{layer}.{key}"]), _bits(source)), (layer, key)
            assert torch.equal(_bits(r1["seen"]["start2"][layer][i]), _bits(source)), (layer, key)
    # epoch_end after step 3: the mixture of the two ranks' statistics (float64 reference)
    for layer in LAYERS:
        means = torch.stack([r["seen"]["end3"][layer][0].double() for r in (r0, r1)])
        variances = torch.stack([r["seen"]["end3"][layer][1].double() for r in (r0, r1)])
        mean = means.mean(0)
        var = variances.mean(0) + (means - mean).square().mean(0)
        for r in (r0, r1):
            torch.testing.assert_close(r["seen"]["start3"][layer][0].double(), mean, rtol=1.2e-7, atol=1e-7)
            torch.testing.assert_close(r["seen"]["start3"][layer][1].double(), var, rtol=1.2e-7, atol=0)
    # epoch 1, the same batch on both ranks: rank_disagreement reads 0 at every record
    for step in (4, 5, 6):
        assert all(v == 0.0 for v in _disagreement(r0["rows"], step).values()), step
    for layer in LAYERS:
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(r0["final"][layer], r1["final"][layer], strict=True))


if __name__ == "__main__":
    main()
