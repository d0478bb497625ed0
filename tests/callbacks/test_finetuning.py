"""BackboneFinetuning: a frozen backbone's BN layers stay in eval mode with bit-identical statistics until unfreezing
(train_bn=False), train with train_bn=True, compose with BatchNormFreeze, and leave frozen BN layers alone.

Run as a script (``python tests/callbacks/test_finetuning.py OUT_DIR``) it is the 2-process DDP run of
:func:`test_ddp_frozen_backbone_keeps_its_statistics_and_the_ranks_agree_after_unfreezing` (Lightning's launcher
re-runs argv).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning as LightningBackboneFinetuning
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import bn_lightning as B  # noqa: E402
from bn_lightning.callbacks import BackboneFinetuning, BatchNormFreeze  # noqa: E402
from bn_lightning.callbacks.finetuning import is_frozen_batchnorm  # noqa: E402

UNFREEZE = 2


class FrozenBatchNorm2d(nn.Module):
    """Stands for torchvision's ``FrozenBatchNorm2d`` (recognised by name), here with parameters Lightning unfreezes."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return x * scale + (self.bias - self.running_mean * scale)


class _Net(pl.LightningModule):
    """backbone: Linear-BN-ReLU x2 and two frozen BN layers; head: Linear-BN-ReLU-Linear. Puts itself in training mode
    at every epoch start and after validation, as user code does (Lightning#21531)."""

    def __init__(self, bn: type[nn.Module] = nn.BatchNorm1d) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(
            nn.Linear(4, 8), bn(8), nn.ReLU(), nn.Linear(8, 8), bn(8), nn.ReLU(), B.FrozenBatchNorm1d(8)
        )
        self.backbone.append(FrozenBatchNorm2d(8))
        with torch.no_grad():  # statistics a training step would visibly move
            for i in (1, 4, 6, 7):
                self.backbone[i].running_mean.uniform_(-1, 1)
                self.backbone[i].running_var.uniform_(0.5, 2)
        self.head = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
        self.seen: list[tuple[int, dict[str, bool]]] = []  # (epoch, layer -> training) at every training step

    def forward(self, x):
        return self.head(self.backbone(x))

    def on_train_epoch_start(self):
        self.train()  # runs after the callbacks' on_train_epoch_start

    def on_validation_model_train(self):
        self.trainer.model.train()

    def training_step(self, batch, batch_idx):
        modes = {f"backbone.{i}": self.backbone[i].training for i in (1, 4)} | {"head.1": self.head[1].training}
        self.seen.append((self.current_epoch, modes))
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.1)


class _Snapshots(Callback):
    """The module's state at the end of every training epoch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def _data(n: int = 64, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g) * 2 + 1
    return DataLoader(TensorDataset(x, (x[:, 0] > 1).long()), batch_size=16)


def _fit(callbacks, module=None, max_epochs=UNFREEZE + 1):
    module = module or _Net()
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()}
    snaps = _Snapshots()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=[*callbacks, snaps],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _data(), _data(16, seed=1))
    return module, [initial, *snaps.states]


def _layer(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix + ".")}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bn", [nn.BatchNorm1d, B.BatchNorm1d], ids=["torch", "ours"])
def test_train_bn_false_holds_the_backbone_bn_until_unfreezing(bn):
    cb = BackboneFinetuning(unfreeze_backbone_at_epoch=UNFREEZE, train_bn=False)
    module, states = _fit([cb], _Net(bn))
    assert cb.bn_layers == ["backbone.1", "backbone.4"] and cb.frozen_bn_layers == ["backbone.6", "backbone.7"]
    initial = states[0]
    for epoch, modes in module.seen:  # every training step: held in eval mode until the unfreeze epoch, then trained
        frozen = epoch < UNFREEZE
        assert modes == {"backbone.1": not frozen, "backbone.4": not frozen, "head.1": True}, (epoch, modes)
    for epoch in range(UNFREEZE):  # statistics, weights and bias, track_running_stats: all bit-identical
        for name in ("backbone.0", "backbone.1", "backbone.3", "backbone.4"):
            assert _same(_layer(states[epoch + 1], name), _layer(initial, name)), (epoch, name)
        assert not torch.equal(states[epoch + 1]["head.1.running_mean"], initial["head.1.running_mean"])
    assert module.backbone[1].track_running_stats and module.backbone[4].track_running_stats
    # after unfreezing: the statistics update again; the backbone's Linear layers train
    final = states[-1]
    assert not torch.equal(final["backbone.1.running_mean"], initial["backbone.1.running_mean"])
    assert not torch.equal(final["backbone.0.weight"], initial["backbone.0.weight"])
    # frozen BN layers, ours and torchvision-like, never change, and their parameters stay frozen after unfreezing
    for name in ("backbone.6", "backbone.7"):
        assert _same(_layer(final, name), _layer(initial, name)), name
    assert not any(p.requires_grad for p in module.backbone[7].parameters())


def test_lightning_own_callback_lets_the_frozen_backbone_bn_move():
    # the reference the test above would catch: Lightning's BackboneFinetuning(train_bn=False) before unfreezing
    module, states = _fit([LightningBackboneFinetuning(unfreeze_backbone_at_epoch=UNFREEZE, train_bn=False)])
    assert all(modes["backbone.1"] for _, modes in module.seen)
    assert not torch.equal(states[1]["backbone.1.running_mean"], states[0]["backbone.1.running_mean"])


def test_train_bn_true_trains_the_backbone_bn_only():
    cb = BackboneFinetuning(unfreeze_backbone_at_epoch=UNFREEZE, train_bn=True)
    module, states = _fit([cb], max_epochs=UNFREEZE)
    assert cb.bn_layers == [] and all(modes["backbone.1"] and modes["backbone.4"] for _, modes in module.seen)
    initial, final = states[0], states[-1]
    for key in ("running_mean", "running_var", "weight", "bias"):  # statistics and affine parameters train
        assert not torch.equal(final[f"backbone.4.{key}"], initial[f"backbone.4.{key}"]), key
    for name in ("backbone.0", "backbone.3", "backbone.6", "backbone.7"):  # the rest of the backbone is frozen
        assert _same(_layer(final, name), _layer(initial, name)), name


@pytest.mark.parametrize("order", ["finetuning_first", "freeze_first"])
def test_composes_with_batchnorm_freeze_in_either_order(order):
    # BatchNormFreeze holds backbone.4 and head.1 until epoch 1; BackboneFinetuning holds backbone.1/.4 until epoch 2
    def callbacks():
        cbs = [
            BackboneFinetuning(unfreeze_backbone_at_epoch=UNFREEZE, train_bn=False),
            BatchNormFreeze(include=["backbone.4", "head.1"], unfreeze_at_epoch=1),
        ]
        return cbs if order == "finetuning_first" else cbs[::-1]

    module, states = _fit(callbacks())
    for epoch, modes in module.seen:
        expected = {"backbone.1": epoch >= UNFREEZE, "backbone.4": epoch >= UNFREEZE, "head.1": epoch >= 1}
        assert modes == expected, (epoch, modes)
    for key in ("head.1.running_mean", "head.1.running_var"):  # held by BatchNormFreeze in epoch 0 only
        assert torch.equal(states[1][key], states[0][key]) and not torch.equal(states[2][key], states[0][key])
    assert _same(_layer(states[2], "backbone.4"), _layer(states[0], "backbone.4"))  # by ours through epoch 1
    other, other_states = _fit(callbacks()[::-1])
    assert other.seen == module.seen and _same(other_states[-1], states[-1])


def test_is_frozen_batchnorm_and_arguments():
    assert is_frozen_batchnorm(B.FrozenBatchNorm3d(2)) and is_frozen_batchnorm(FrozenBatchNorm2d(2))
    assert not is_frozen_batchnorm(nn.BatchNorm1d(2)) and not is_frozen_batchnorm(B.SyncBatchNorm(2))
    with pytest.raises(TypeError, match="BackboneFinetuning: train_bn must be True or False, got 'no'"):
        BackboneFinetuning(train_bn="no")
    with pytest.raises(ValueError, match="BackboneFinetuning: unfreeze_backbone_at_epoch"):
        BackboneFinetuning(unfreeze_backbone_at_epoch=-1)
    with pytest.raises(MisconfigurationException, match="backbone"):
        BackboneFinetuning().freeze_before_training(pl.LightningModule())
    assert isinstance(BackboneFinetuning(), LightningBackboneFinetuning)


# --------------------------------------------------------------------------------------------------- DDP


def _ddp_main(out_dir: str) -> None:
    """Both ranks: train_bn=False, unfreezing at epoch 1, a torch BN and one of our SyncBatchNorm layers in the
    backbone; each rank trains on its own shard."""
    from lightning.pytorch.strategies import DDPStrategy

    torch.set_num_threads(1)
    module = _Net()
    module.backbone[4] = B.SyncBatchNorm(8)
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    snaps = _Snapshots()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(broadcast_buffers=False),
        max_epochs=2,
        callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1, train_bn=False), snaps],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        default_root_dir=out_dir,
    )
    trainer.fit(module, _data(), _data(16, seed=1))
    torch.save(
        {"states": [initial, *snaps.states], "seen": module.seen},
        os.path.join(out_dir, f"rank{trainer.global_rank}.pt"),
    )


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_frozen_backbone_keeps_its_statistics_and_the_ranks_agree_after_unfreezing(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": ROOT},
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    for r in ranks:
        assert [(epoch, m["backbone.1"], m["backbone.4"]) for epoch, m in r["seen"]] == [
            (0, False, False),
            (0, False, False),
            (1, True, True),
            (1, True, True),
        ]
        initial, after_frozen_epoch, final = r["states"]
        for name in ("backbone.0", "backbone.1", "backbone.3", "backbone.4", "backbone.6", "backbone.7"):
            assert _same(_layer(after_frozen_epoch, name), _layer(initial, name)), name
        assert not torch.equal(final["backbone.0.weight"], initial["backbone.0.weight"])
        assert not torch.equal(final["backbone.4.running_mean"], initial["backbone.4.running_mean"])
    # DDP did not reduce the backbone's gradients after unfreezing (frozen when it wrapped the model): the callback
    # did, so every parameter (and the synchronised layer's statistics) is the same on both ranks
    final0, final1 = ranks[0]["states"][-1], ranks[1]["states"][-1]
    for k in final0:
        if "running" not in k or k.startswith("backbone.4."):
            assert torch.equal(final0[k], final1[k]), k


if __name__ == "__main__":
    _ddp_main(sys.argv[1])
