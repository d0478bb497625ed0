"""A tiny BN network whose BN classes are chosen by the test, and a quiet CPU Trainer for tiny fits."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn


class TinyBNNet(nn.Module):
    """conv-BN2d-act x2, pooled, then Linear-BN1d-act-Linear: every BN kind a test needs, small and fast.

    ``activation=nn.SiLU`` makes the whole training step a smooth function of the weights: tests that compare long
    float32 runs with a reference use it, so that no ReLU gate within rounding of zero flips between CPUs.
    """

    def __init__(
        self,
        bn2d: type[nn.Module],
        bn1d: type[nn.Module],
        in_channels: int = 3,
        num_classes: int = 5,
        activation: type[nn.Module] = nn.ReLU,
        **bn_kwargs,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1, bias=False),
            bn2d(8, **bn_kwargs),
            activation(),
            nn.Conv2d(8, 16, 3, padding=1, bias=False),
            bn2d(16, **bn_kwargs),
            activation(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(64, 32), bn1d(32, **bn_kwargs), activation(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A one-device CPU Trainer with no logger, progress bar, summary, checkpoints or sanity check; ``kwargs`` win."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**{**defaults, **kwargs})
