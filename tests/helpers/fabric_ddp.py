"""The documented Fabric loop on 2 CPU processes (gloo), executed as a script (Fabric's ddp launcher re-runs argv).

Usage: python tests/helpers/fabric_ddp.py OUT_DIR
Each rank trains ``convert_sync_batchnorm(TinyBNNet)`` on its half of every global batch with
:class:`~bn_lightning.fabric.BatchNormRecorderCallback`, recalibrates with :func:`bn_lightning.recalibrate_bn`,
synchronises a plain BN layer fed rank-dependent data with :class:`~bn_lightning.fabric.SyncRunningStatsCallback`,
and saves to ``OUT_DIR/rank<r>.pt`` what its logger received, its records and the BN buffers at each stage.
:func:`global_batches` gives the test the same data, for the one-process reference on the concatenated batches.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers.logger import Logger
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import bn_lightning  # noqa: E402
from bn_lightning.fabric import BatchNormRecorderCallback, SyncRunningStatsCallback, unwrap_model  # noqa: E402
from tests.helpers.tiny import TinyBNNet  # noqa: E402

STEPS, PER_RANK, EVERY, LR, RECAL_BATCHES = 4, 6, 2, 0.1, 2


class CapturingFabricLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)`` in :attr:`rows` (on every rank: no rank filter)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return TinyBNNet(nn.BatchNorm2d, nn.BatchNorm1d, activation=nn.SiLU)


def global_batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of ``2 * PER_RANK`` samples; rank ``r`` takes rows ``[r * PER_RANK, (r + 1) * PER_RANK)``."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(2 * PER_RANK, 3, 6, 6, generator=g) * 2 + 0.5, torch.randint(0, 5, (2 * PER_RANK,), generator=g))
        for _ in range(n)
    ]


def buffers(model: nn.Module) -> dict[str, tuple[torch.Tensor, ...]]:
    return {
        name: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for name, m in unwrap_model(model).named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


def main() -> None:
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    logger = CapturingFabricLogger()
    recorder_cb = BatchNormRecorderCallback(every_n_steps=EVERY)
    sync_cb = SyncRunningStatsCallback(when=("on_train_epoch_end",))
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp", callbacks=[recorder_cb, sync_cb], loggers=logger)
    fabric.launch()
    rank = fabric.global_rank
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)

    # the documented loop
    model = bn_lightning.convert_sync_batchnorm(make_net())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    model, optimizer = fabric.setup(model, optimizer)
    fabric.call("on_train_start", fabric=fabric, model=model)
    records = []
    for i, (x, y) in enumerate(global_batches(STEPS, seed=1)):
        loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        fabric.call("on_train_batch_end", fabric=fabric, loss=loss)  # `loss`: filtered out by fabric.call
        last = recorder_cb.recorder.last
        if last is not None and last.step == i + 1:
            records.append((last.step, dict(last.metrics)))
    trained = buffers(model)
    recal = [(x[rows],) for x, _ in global_batches(RECAL_BATCHES, seed=2)]
    bn_lightning.recalibrate_bn(model, recal, num_batches=RECAL_BATCHES, progress=False)
    recalibrated = buffers(model)
    fabric.call("on_train_end")
    hooks_left = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unwrap_model(model).modules())

    # a BN layer whose ranks disagree, seen by a plain recorder, then synchronised by the Fabric callback
    plain = nn.Sequential(nn.BatchNorm1d(4))
    g = torch.Generator().manual_seed(10 + rank)
    with bn_lightning.BatchNormRecorder(plain, every_n_steps=1, monitor=False) as rec:
        for _ in range(2):
            plain(torch.randn(16, 4, generator=g) * (rank + 1) + rank)
            disagreement = rec.step()
    before_sync = buffers(plain)
    fabric.call("on_train_epoch_end", fabric=fabric, model=plain)
    torch.save(
        {
            "rows": logger.rows,
            "records": records,
            "trained": trained,
            "recalibrated": recalibrated,
            "hooks_left": hooks_left,
            "disagreement": disagreement,
            "before_sync": before_sync,
            "after_sync": buffers(plain),
            "syncs": sync_cb.syncs,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main()
