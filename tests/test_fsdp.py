"""Sharded data parallelism (FSDP) with bn_lightning's layers: BN parameters kept in float32 under mixed precision.

- Lightning's ``Trainer(strategy="fsdp")`` (torch's ``FullyShardedDataParallel``) needs CUDA: Lightning refuses
  ``accelerator="cpu"`` ("The strategy `fsdp` requires a GPU accelerator") and torch's FSDP itself raises "FSDP needs
  a non-CPU accelerator device" on CPU. Its test is GPU-marked (2 CUDA devices), run as a script because Lightning's
  launcher re-runs ``sys.argv``.
- torch's ``fully_shard`` (FSDP2) runs on CPU over gloo: tested here with 2 processes.
- FSDP's ``MixedPrecision`` keeps modules of the classes in ``_module_classes_to_ignore`` (``(_BatchNorm,)``) in
  float32 when an auto-wrap policy is given; our trainable layers are ``_BatchNorm`` subclasses, so they qualify.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bn_lightning as B
from tests.helpers.ddp import run_distributed
from tests.helpers.runif import run_if

_TRAINABLE = [
    B.BatchNorm1d(4),
    B.BatchNorm2d(4),
    B.BatchNorm3d(4),
    B.SyncBatchNorm(4),
    B.GhostBatchNorm2d(4),
    B.BatchRenorm2d(4),
]


def test_fsdp_mixed_precision_keeps_every_trainable_layer_of_ours_in_float32():
    from torch.distributed.fsdp import MixedPrecision

    ignored = tuple(MixedPrecision(param_dtype=torch.bfloat16)._module_classes_to_ignore)
    assert ignored == (_BatchNorm,)
    assert all(isinstance(layer, ignored) for layer in _TRAINABLE)
    frozen = B.FrozenBatchNorm2d(4)  # no parameters to cast; its buffers follow FSDP's buffer_dtype
    assert not isinstance(frozen, ignored) and list(frozen.parameters()) == []


# ---------------------------------------------------------------- FSDP2 (fully_shard) on CPU, 2 gloo processes


def _fully_shard_worker(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    net = B.convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 4, 1), B.BatchNorm2d(4))
    )
    seen: dict[str, torch.dtype] = {}

    def record(module: nn.Module, args: tuple, name: str) -> None:
        seen[name] = module.weight.dtype if hasattr(module, "weight") else None

    for name, module in net.named_children():
        module.register_forward_pre_hook(lambda m, args, name=name: record(m, args, name))
    # torchtitan#674: BN layers sharded on their own with a float32 policy (outputs back in bf16 for the next layer)
    bn_policy = MixedPrecisionPolicy(param_dtype=torch.float32, output_dtype=torch.bfloat16)
    for module in net.modules():
        if isinstance(module, _BatchNorm):
            fully_shard(module, mp_policy=bn_policy)
    fully_shard(net, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 5, 5, generator=g) * 2 + 1
    mine = x[:2] if rank == 0 else x[2:]  # uneven: 2 and 4 samples
    net(mine).float().square().mean().backward()
    bn = net[1]
    return {
        "seen": seen,
        "sync": isinstance(bn, B.SyncBatchNorm),  # fully_shard swaps in a subclass, FSDPSyncBatchNorm
        "running": (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()),
        "x": x,
        "conv": (net[0].weight.full_tensor().detach(), net[0].bias.full_tensor().detach()),
        "grad_dtype": net[1].weight.grad.dtype,
    }


@pytest.mark.ddp
def test_fully_shard_with_sync_batchnorm_keeps_bn_float32_and_synchronises_statistics():
    results = run_distributed(_fully_shard_worker, 2)
    for r in results:
        assert r["sync"]
        assert r["seen"]["1"] == torch.float32 and r["seen"]["4"] == torch.float32  # BN: float32 parameters
        assert r["seen"]["0"] == torch.bfloat16 and r["seen"]["3"] == torch.bfloat16  # the convolutions: bf16
        assert r["grad_dtype"] == torch.float32
        assert all(t.dtype in (torch.float32, torch.int64) for t in r["running"])
    for a, b in zip(results[0]["running"], results[1]["running"], strict=True):
        assert torch.equal(a, b)  # synchronised: bit-identical on both ranks
    # the independent reference: the first BN's statistics over the WHOLE batch, from the bf16 convolution that
    # FSDP ran (input and parameters cast to bf16), in float64
    r = results[0]
    w, bias = (t.to(torch.bfloat16) for t in r["conv"])
    z = nn.functional.conv2d(r["x"].to(torch.bfloat16), w, bias, padding=1).double()
    mean, var = z.mean((0, 2, 3)), z.var((0, 2, 3), correction=1)
    # a bf16 convolution may round a value differently on another CPU (8 mantissa bits: ~4e-3 relative); such flips
    # are rare and average out over the 150 values per channel: 1e-4 covers them (measured here: 5e-8), while one
    # rank's local statistics would miss by ~1e-2
    torch.testing.assert_close(r["running"][0].double(), 0.1 * mean, rtol=0, atol=1e-4)
    torch.testing.assert_close(r["running"][1].double(), 0.9 + 0.1 * var, rtol=0, atol=1e-4)
    assert int(r["running"][2]) == 1


# ---------------------------------------------------------------- Lightning's FSDP strategy: CUDA only


@pytest.mark.gpu
@pytest.mark.slow
@run_if(min_cuda_gpus=2)
def test_lightning_fsdp_with_sync_plugin_and_callbacks_keeps_bn_float32(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, __file__, str(tmp_path)], check=True, timeout=600, env=env)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in ranks:
        assert set(r["bn_classes"]) == {"SyncBatchNorm"}
        assert set(r["bn_weight_dtypes"]) == {torch.float32}  # seen in the forward: not cast to bf16
        assert set(r["conv_weight_dtypes"]) == {torch.bfloat16}
        assert all(t.dtype == torch.float32 for t in r["running"].values())
        assert any(key.endswith("/batch_mean") for key in r["metrics"]) and "drift_kl" in str(r["metrics"])
    for key, value in ranks[0]["running"].items():
        assert torch.equal(value, ranks[1]["running"][key]), key


def _lightning_fsdp_main(out_dir: str) -> None:
    """The GPU test's script: ``Trainer(strategy=FSDPStrategy(auto_wrap_policy=...), precision="bf16-mixed")``."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from bn_lightning.callbacks import BatchNormMonitor, RunningStatDrift
    from bn_lightning.plugins import SyncBatchNormPlugin
    from tests.helpers.tiny import TinyBNNet

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = TinyBNNet(B.BatchNorm2d, B.BatchNorm1d)
            self.seen: dict[str, list[torch.dtype]] = {"bn": [], "conv": []}

        def configure_model(self) -> None:
            for m in self.net.modules():
                if isinstance(m, _BatchNorm):
                    m.register_forward_pre_hook(lambda mod, args: self.seen["bn"].append(mod.weight.dtype))
                elif isinstance(m, nn.Conv2d):
                    m.register_forward_pre_hook(lambda mod, args: self.seen["conv"].append(mod.weight.dtype))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x).float(), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(1)
    data = DataLoader(
        TensorDataset(torch.randn(64, 3, 6, 6, generator=g), torch.randint(0, 5, (64,), generator=g)), batch_size=8
    )
    # an auto-wrap policy: FSDP then wraps every _BatchNorm on its own, with mixed precision disabled
    strategy = FSDPStrategy(auto_wrap_policy={nn.Conv2d, nn.Linear})
    monitor = BatchNormMonitor(log_every_n_steps=1)
    trainer = pl.Trainer(
        accelerator="cuda",
        devices=2,
        strategy=strategy,
        precision="bf16-mixed",
        plugins=[SyncBatchNormPlugin()],
        callbacks=[monitor, RunningStatDrift(log_every_n_steps=1)],
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    module = Module()
    trainer.fit(module, data)
    bns = {n: m for n, m in module.net.named_modules() if isinstance(m, _BatchNorm)}
    names = ("running_mean", "running_var")
    running = {f"{n}.{b}": getattr(m, b).detach().cpu() for n, m in bns.items() for b in names}
    torch.save(
        {
            "bn_classes": [type(m).__name__ for m in bns.values()],
            "bn_weight_dtypes": module.seen["bn"],
            "conv_weight_dtypes": module.seen["conv"],
            "running": running,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        },
        os.path.join(out_dir, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    _lightning_fsdp_main(sys.argv[1])
