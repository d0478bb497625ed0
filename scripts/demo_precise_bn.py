"""Demo: running statistics gone wrong, measured, then repaired with PreciseBN.

Trains a digits MLP (or CNN) with a deliberately poor BN setting (momentum 0.9: the running statistics are mostly the
LAST small batch) and a per-device batch of 2, with BatchNormGap and RunningStatDrift attached. Then it measures, on
the validation set, the loss and accuracy with running statistics (eval), the gap to batch statistics, and the drift;
recalibrates with ``bn_lightning.recalibrate_bn`` (population statistics over the training set) and measures again.

Run: python scripts/demo_precise_bn.py [--model mlp] [--epochs 2] [--batch-size 2] [--momentum 0.9] [--lr 0.02]
"""

from __future__ import annotations

import argparse
import functools
import tempfile

import lightning.pytorch as pl
import torch
from torch import nn

import bn_lightning as bnl
from bn_lightning.app.data import DigitsDataModule
from bn_lightning.app.models import MLP, SmallCNN
from bn_lightning.callbacks import BatchNormGap, RunningStatDrift
from bn_lightning.callbacks.drift import gaussian_kl
from bn_lightning.module import BatchNormModule


def drift_to_population(model: nn.Module, loader) -> float:
    """Mean over BN layers and channels of KL(population stats || running stats): how wrong eval's statistics are."""
    inputs: dict[nn.Module, list[torch.Tensor]] = {}
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    hooks = [m.register_forward_hook(lambda m, a, o: inputs.setdefault(m, []).append(a[0].detach())) for m in layers]
    mode = model.training
    model.eval()
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    model.train(mode)
    for h in hooks:
        h.remove()
    kls = []
    for m in layers:
        stats = bnl.functional.batch_stats(torch.cat(inputs[m]))
        kl = gaussian_kl(stats.mean, stats.var + m.eps, m.running_mean.float(), m.running_var.float() + m.eps)
        kls.append(kl.mean())
    return float(torch.stack(kls).mean())


def evaluate(module: BatchNormModule, loader, gap: BatchNormGap) -> dict[str, float]:
    """Eval-mode loss and accuracy (running statistics), and the gap to batch statistics."""
    values = gap.measure(module, list(loader))
    return {
        "val loss (running stats)": values["loss_running"],
        "val acc (running stats)": values["metric_running"],
        "gap loss (running - batch)": values["loss"],
        "gap acc (running - batch)": values["metric"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2, help="per-device training batch (small on purpose)")
    parser.add_argument("--momentum", type=float, default=0.9, help="BN momentum (large on purpose)")
    parser.add_argument("--model", choices=["cnn", "mlp"], default="mlp")
    parser.add_argument("--lr", type=float, default=0.02, help="SGD learning rate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    torch.set_num_threads(1)

    data = DigitsDataModule(batch_size=args.batch_size, seed=args.seed, drop_last=True)
    data.setup()
    net = SmallCNN(in_channels=1, num_classes=10) if args.model == "cnn" else MLP(in_features=64, num_classes=10)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = args.momentum
    module = BatchNormModule(
        net, num_classes=10, optimizer=functools.partial(torch.optim.SGD, lr=args.lr, momentum=0.9), scheduler=None
    )
    gap = BatchNormGap(num_batches=1000)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_epochs=args.epochs,
            accelerator="cpu",
            callbacks=[gap, RunningStatDrift(log_every_n_steps=50, drift_warmup_steps=0)],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp,
        )
        trainer.fit(module, data)

    val = DigitsDataModule(batch_size=64, seed=args.seed)
    val.setup()
    before = evaluate(module, val.val_dataloader(), gap)
    before["drift KL (population || running)"] = drift_to_population(module, val.train_dataloader())
    info = bnl.recalibrate_bn(module, val.train_dataloader(), num_batches=1000, progress=False)
    after = evaluate(module, val.val_dataloader(), gap)
    after["drift KL (population || running)"] = drift_to_population(module, val.train_dataloader())

    print(
        f"{type(net).__name__} on digits, BN momentum {args.momentum}, per-device batch {args.batch_size}, "
        f"{args.epochs} epochs"
    )
    print(
        f"PreciseBN: {info['num_samples']} training samples in {info['num_batches']} batches, {info['seconds']:.2f} s"
    )
    print(f"{'':36s} {'before PreciseBN':>16s} {'after PreciseBN':>16s}")
    for key in before:
        print(f"{key:36s} {before[key]:16.4f} {after[key]:16.4f}")
    print(
        "reproduce: python scripts/demo_precise_bn.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    )


if __name__ == "__main__":
    main()
