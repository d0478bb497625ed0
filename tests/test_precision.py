"""Mixed and half precision: our layers side by side with torch's (same parameters, same inputs).

Layers built with ``dtype=bfloat16/float16`` behave as torch's (outputs, gradients, buffers and their dtypes);
under autocast (``Trainer(precision="bf16-mixed")`` on CPU, ``"16-mixed"`` on CUDA) the statistics and running
buffers stay float32, outputs come in the autocast dtype, and the numbers match torch's BN under the same autocast.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

import bn_lightning as bl
from bn_lightning.callbacks import (
    AccumulateBatchNormStats,
    BatchNormFreeze,
    BatchNormGap,
    BatchNormGuard,
    BatchNormMonitor,
    PreciseBN,
    RunningStatDrift,
    SyncBatchNormBuffers,
)
from tests.helpers.runif import run_if
from tests.helpers.tiny import TinyBNNet, quiet_trainer

ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def _assert_close_in(dtype: torch.dtype, ours: torch.Tensor, ref: torch.Tensor, ulps: float = 4) -> None:
    """Equal dtype, and within a few units of ``dtype``'s rounding at the tensor's scale (two roundings apart)."""
    assert ours.dtype == ref.dtype
    scale = ref.detach().float().abs().max().clamp(min=1e-3)
    torch.testing.assert_close(ours.float(), ref.float(), rtol=ulps * ULP[dtype], atol=ulps * ULP[dtype] * scale)


def _init(bn: nn.Module) -> nn.Module:
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        bn.weight.copy_(torch.rand(bn.weight.shape, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(bn.bias.shape, generator=gen))
        bn.running_var.fill_(2.0)
    return bn


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    ("ours_cls", "torch_cls"), [(bl.BatchNorm2d, nn.BatchNorm2d), (bl.SyncBatchNorm, nn.BatchNorm2d)]
)
def test_half_precision_parameters_behave_as_torch(dtype, training, ours_cls, torch_cls):
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.randn(8, 4, 5, 5, generator=gen) * 2 + 1).to(dtype)
    dy = torch.randn(8, 4, 5, 5, generator=gen).to(dtype)
    results = []
    for cls in (ours_cls, torch_cls):
        bn = _init(cls(4, dtype=dtype)).train(training)
        x = x0.clone().requires_grad_()
        y = bn(x)
        y.backward(dy)
        results.append((y, x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var))
    for ours, ref in zip(*results, strict=True):
        _assert_close_in(dtype, ours, ref)


@pytest.mark.parametrize("bn_cls", [bl.BatchNorm2d, bl.SyncBatchNorm])
def test_cpu_autocast_bf16_matches_torch(bn_cls):
    """conv -> BN under CPU autocast: bf16 activations in and out, float32 buffers, the same numbers as torch's."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 3, 6, 6, generator=gen)
    results = []
    for cls in (bn_cls, nn.BatchNorm2d):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), _init(cls(4)))
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        assert y.dtype == torch.bfloat16
        y.float().square().mean().backward()
        bn = model[1]
        assert bn.running_mean.dtype == bn.running_var.dtype == torch.float32
        assert bn.weight.grad.dtype == torch.float32
        results.append((y, x.grad, bn.weight.grad, bn.bias.grad, model[0].weight.grad, bn.running_mean, bn.running_var))
    for ours, ref in zip(*results, strict=True):
        _assert_close_in(torch.bfloat16, ours, ref)


class _Classifier(pl.LightningModule):
    def __init__(self, bn2d: type[nn.Module], bn1d: type[nn.Module], lr: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = TinyBNNet(bn2d, bn1d, activation=nn.SiLU)
        self.lr = lr
        self.out_dtypes: set[torch.dtype] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.out_dtypes.add(logits.dtype)
        return nn.functional.cross_entropy(logits.float(), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x).float(), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _loader() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(48, 3, 8, 8, generator=gen), torch.randint(0, 5, (48,), generator=gen)
    )
    return torch.utils.data.DataLoader(data, batch_size=16)


def _fit(bn2d: type[nn.Module], bn1d: type[nn.Module], precision: str, callbacks: list, accelerator: str = "cpu"):
    # lr = 0: the weights stay put, so the running statistics of ours and torch's see the same activations
    model = _Classifier(bn2d, bn1d, lr=0.0)
    trainer = quiet_trainer(
        max_epochs=1, precision=precision, callbacks=callbacks, accelerator=accelerator, limit_val_batches=1
    )
    trainer.fit(model, _loader(), _loader())
    return model


@pytest.mark.parametrize("bn2d", [bl.BatchNorm2d, bl.SyncBatchNorm])
def test_trainer_bf16_mixed_with_callbacks_matches_torch(bn2d, tmp_path):
    callbacks = [BatchNormMonitor(log_every_n_steps=1), RunningStatDrift(log_every_n_steps=1), BatchNormGap(1)]
    ours = _fit(bn2d, bl.BatchNorm1d, "bf16-mixed", callbacks)
    ref = _fit(nn.BatchNorm2d, nn.BatchNorm1d, "bf16-mixed", [])
    assert ours.out_dtypes == ref.out_dtypes == {torch.bfloat16}
    for (name, a), (_, b) in zip(ours.net.named_buffers(), ref.net.named_buffers(), strict=True):
        assert a.dtype == b.dtype, name
        if a.is_floating_point():
            assert a.dtype == torch.float32
            _assert_close_in(torch.bfloat16, a, b)
        else:
            assert torch.equal(a, b), name
    assert BatchNormGap in {type(c) for c in callbacks} and callbacks[2].last  # the gap was measured under autocast


def test_trainer_bf16_mixed_precise_bn():
    """PreciseBN recalibrates under bf16 autocast: float32 buffers, the population statistics of torch's layers."""
    ours = _fit(bl.BatchNorm2d, bl.BatchNorm1d, "bf16-mixed", [PreciseBN(num_batches=3, when="fit_end")])
    ref = _fit(nn.BatchNorm2d, nn.BatchNorm1d, "bf16-mixed", [PreciseBN(num_batches=3, when="fit_end")])
    for (name, a), (_, b) in zip(ours.net.named_buffers(), ref.net.named_buffers(), strict=True):
        if a.is_floating_point():
            assert a.dtype == torch.float32, name
            _assert_close_in(torch.bfloat16, a, b)


@run_if(min_cuda_gpus=1)
@pytest.mark.gpu
def test_trainer_16_mixed_cuda_matches_torch():
    callbacks = [BatchNormMonitor(log_every_n_steps=1), RunningStatDrift(log_every_n_steps=1)]
    ours = _fit(bl.BatchNorm2d, bl.BatchNorm1d, "16-mixed", callbacks, accelerator="cuda")
    ref = _fit(nn.BatchNorm2d, nn.BatchNorm1d, "16-mixed", [], accelerator="cuda")
    assert ours.out_dtypes == ref.out_dtypes == {torch.float16}
    for (name, a), (_, b) in zip(ours.net.named_buffers(), ref.net.named_buffers(), strict=True):
        if a.is_floating_point():
            assert a.dtype == torch.float32, name
            _assert_close_in(torch.float16, a.cpu(), b.cpu())


def test_trainer_bf16_mixed_with_the_statistics_callbacks_matches_torch():
    """Guard, accumulation, freeze and rank sync under bf16 autocast: float32 buffers equal to torch's layers'."""

    def fit(bn2d: type[nn.Module], bn1d: type[nn.Module]) -> _Classifier:
        model = _Classifier(bn2d, bn1d, lr=0.0)
        callbacks = [
            BatchNormGuard(),
            AccumulateBatchNormStats(),
            BatchNormFreeze(freeze_at_step=1),
            SyncBatchNormBuffers(),
        ]
        trainer = quiet_trainer(
            max_epochs=2, precision="bf16-mixed", callbacks=callbacks, limit_val_batches=1, accumulate_grad_batches=2
        )
        trainer.fit(model, _loader(), _loader())
        return model

    ours, ref = fit(bl.BatchNorm2d, bl.BatchNorm1d), fit(nn.BatchNorm2d, nn.BatchNorm1d)
    assert ours.out_dtypes == ref.out_dtypes == {torch.bfloat16}
    for (name, a), (_, b) in zip(ours.net.named_buffers(), ref.net.named_buffers(), strict=True):
        if a.is_floating_point():
            assert a.dtype == torch.float32, name
            _assert_close_in(torch.bfloat16, a, b)
        else:
            assert torch.equal(a, b) and int(a) == 1, name  # one accumulated update (2 micro-batches), then frozen
