"""BatchNormGuard: non-finite batches skipped or raised, skipped steps rolled back; against torch's own layers."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bn_lightning
from bn_lightning.callbacks import BatchNormGuard, BatchNormNonFiniteError
from bn_lightning.callbacks.guard import StepWatcher
from tests.helpers.tiny import quiet_trainer

BATCHES, BATCH = 5, 8


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCHES * BATCH, 4, generator=g) * 2 + 1
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (BATCHES * BATCH,), generator=g)), batch_size=BATCH)


def batches() -> list[torch.Tensor]:
    return [x for x, _ in data()]


class GuardedModule(pl.LightningModule):
    """``bn_in`` normalises the raw input (its statistics do not depend on the weights); ``aux`` is a side branch
    outside the loss whose input turns non-finite at the batches in ``nan_at``; ``inf_loss_at`` makes the loss (and
    so the gradients) infinite; ``none_at`` makes ``training_step`` return ``None``."""

    def __init__(self, bn_cls=nn.BatchNorm1d, momentum=0.1, nan_at=(), inf_loss_at=(), none_at=()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bn_in = bn_cls(4, momentum=momentum)
        self.aux = nn.BatchNorm1d(4, affine=False)
        self.head = nn.Linear(4, 3)
        self.nan_at, self.inf_loss_at, self.none_at = set(nan_at), set(inf_loss_at), set(none_at)

    def training_step(self, batch, batch_idx):
        x, y = batch
        aux_in = x.clone()
        if batch_idx in self.nan_at:
            aux_in[0, 1] = float("nan")
        self.aux(aux_in)
        loss = nn.functional.cross_entropy(self.head(self.bn_in(x)), y)
        if batch_idx in self.inf_loss_at:
            loss = loss * float("inf")
        return None if batch_idx in self.none_at else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def reference(kept: list[int], momentum=0.1) -> nn.BatchNorm1d:
    """torch's own layer, updated by the batches in ``kept`` only."""
    bn = nn.BatchNorm1d(4, momentum=momentum, affine=False)
    xs = batches()
    for i in kept:
        bn(xs[i])
    return bn


def fit(module: GuardedModule, callbacks, **kwargs) -> pl.Trainer:
    trainer = quiet_trainer(max_epochs=1, callbacks=callbacks, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(training_step. returned .None|does not have many workers).*")
        trainer.fit(module, data())
    return trainer


def assert_layer(layer: nn.Module, ref: nn.BatchNorm1d, exact: bool) -> None:
    assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked)
    for name in ("running_mean", "running_var"):
        got, want = getattr(layer, name), getattr(ref, name)
        if exact:
            assert torch.equal(got, want), name
        else:  # our kernels against torch's: float32 rounding of a few ops on O(1) values
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


KINDS = [
    (nn.BatchNorm1d, 0.1, True),
    (nn.BatchNorm1d, None, True),
    (bn_lightning.BatchNorm1d, 0.1, False),
    (bn_lightning.SyncBatchNorm, None, False),
]


@pytest.mark.parametrize(("bn_cls", "momentum", "exact"), KINDS)
def test_nonfinite_batch_is_skipped_and_warned_once(bn_cls, momentum, exact):
    module = GuardedModule(bn_cls, momentum, nan_at=(2, 3))
    guard = BatchNormGuard()
    with pytest.warns(RuntimeWarning, match=r"in layer\(s\) \['aux'\] at global step 2 \(epoch 0, batch 2\)") as rec:
        fit(module, [guard])
    assert len([w for w in rec if "BatchNormGuard" in str(w.message)]) == 1  # once per layer, batch 3 is silent
    kept = [0, 1, 4]  # every layer skips the bad batches, not only the non-finite one
    assert_layer(module.bn_in, reference(kept, momentum), exact)
    assert_layer(module.aux, reference(kept), True)
    assert guard.skipped_batches == 2 and guard.rolled_back_steps == 0


def test_without_guard_the_statistics_are_poisoned():
    module = GuardedModule(nan_at=(2,))
    fit(module, [])
    assert module.aux.running_mean.isnan().any() and int(module.aux.num_batches_tracked) == BATCHES


def test_raise_names_layer_and_step_after_restoring():
    module = GuardedModule(nan_at=(3,))
    with pytest.raises(BatchNormNonFiniteError, match=r"\['aux'\] at global step 3") as err:
        fit(module, [BatchNormGuard(nonfinite="raise")])
    assert err.value.layers == ["aux"] and err.value.step == 3
    assert_layer(module.aux, reference([0, 1, 2]), True)
    assert_layer(module.bn_in, reference([0, 1, 2]), True)


def amp() -> MixedPrecision:
    """float16 AMP with a GradScaler on CPU: the scaler skips the optimizer step when it finds inf gradients."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_step_skipped_by_grad_scaler_is_rolled_back(accumulate):
    # batch 3 has an infinite loss: with accumulate=2 the window (2, 3) steps at batch 3, and the scaler skips it
    module = GuardedModule(inf_loss_at=(3,))
    guard = BatchNormGuard()
    trainer = fit(module, [guard], plugins=[amp()], accumulate_grad_batches=accumulate)
    assert trainer.precision_plugin.scaler.get_scale() < 65536.0  # the scaler did skip a step
    kept = [0, 1, 2, 4] if accumulate == 1 else [0, 1, 4]
    assert_layer(module.aux, reference(kept), True)
    assert guard.rolled_back_steps == 1 and guard.skipped_batches == 0
    control = GuardedModule(inf_loss_at=(3,))
    fit(control, [BatchNormGuard(rollback_skipped_steps=False)], plugins=[amp()], accumulate_grad_batches=accumulate)
    assert int(control.aux.num_batches_tracked) == BATCHES


def test_training_step_none_is_rolled_back():
    module = GuardedModule(none_at=(1,))
    guard = BatchNormGuard()
    fit(module, [guard])
    assert_layer(module.aux, reference([0, 2, 3, 4]), True)
    assert_layer(module.bn_in, reference([0, 2, 3, 4]), True)
    assert guard.rolled_back_steps == 1


def test_layers_non_finite_from_the_start_are_reported_and_ignored():
    module = GuardedModule()
    module.aux.running_var[0] = float("inf")
    guard = BatchNormGuard()
    with pytest.warns(UserWarning, match=r"\['aux'\] are already non-finite"):
        fit(module, [guard])
    assert guard.skipped_batches == 0 and int(module.bn_in.num_batches_tracked) == BATCHES


def test_arguments_state_and_watcher():
    with pytest.raises(ValueError, match=r"BatchNormGuard: nonfinite must be one of \('skip', 'raise'\), got 'drop'"):
        BatchNormGuard(nonfinite="drop")
    with pytest.raises(TypeError, match="BatchNormGuard: rollback_skipped_steps must be True or False"):
        BatchNormGuard(rollback_skipped_steps=1)
    guard = BatchNormGuard(nonfinite="raise")
    guard.skipped_batches, guard.rolled_back_steps = 2, 3
    other = BatchNormGuard()
    other.load_state_dict(guard.state_dict())
    assert (other.skipped_batches, other.rolled_back_steps) == (2, 3)
    assert guard.state_key != other.state_key
    BatchNormGuard().load_state_dict({})  # an older checkpoint without the keys
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    watcher = StepWatcher()
    watcher.attach([opt])
    watcher.detach()
    watcher.begin_batch()
    opt.step()
    assert watcher.steps == 0  # hooks removed
