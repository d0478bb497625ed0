"""Bundled datamodules that need no download, for tests, examples and quick experiments.

Provides :class:`DigitsDataModule` (scikit-learn's 1,797 8x8 handwritten digits, standardised, stratified split) and
:class:`SyntheticImageDataModule` (seeded Gaussian images whose class shifts the per-channel mean, so a model can
learn them). Both expose ``num_classes`` and ``input_shape`` so a model can be sized from the datamodule, and shuffle
with :class:`EpochRandomSampler`, whose order depends only on ``(seed, epoch)``: a fit resumed from a checkpoint sees
the batches the uninterrupted fit would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from typing_extensions import override

from bn_lightning.validation import check_int

__all__ = ["DigitsDataModule", "EpochRandomSampler", "SyntheticImageDataModule"]


class EpochRandomSampler(RandomSampler):
    """A random permutation of the indices per epoch that depends only on ``(seed, epoch)``.

    Lightning calls :meth:`set_epoch` at the start of every training epoch with the number of the epoch it runs,
    restored from the checkpoint when a fit resumes, so a resumed fit draws the permutations the uninterrupted one would
    have drawn (a generator seeded once per ``DataLoader`` would replay epoch 0's order instead). Without
    :meth:`set_epoch` calls, as in a plain loop, each pass advances the epoch by one, so every pass reshuffles.

    It is a :class:`~torch.utils.data.RandomSampler`, so under DDP Lightning replaces it, as any shuffling sampler, by
    its :class:`~torch.utils.data.distributed.DistributedSampler`, which is seeded by the global seed and the epoch.

    Args:
        data_source: the dataset (only its length is used).
        seed: seed of the permutations, at least 0.

    Raises:
        ValueError: ``seed`` or the epoch is not an integer ``>= 0``.

    Example::

        >>> from bn_lightning.app.data import EpochRandomSampler
        >>> sampler = EpochRandomSampler(range(6), seed=0)
        >>> first, second = list(sampler), list(sampler)  # each pass is a new epoch
        >>> sorted(first) == sorted(second) == list(range(6)), first != second
        (True, True)
        >>> sampler.set_epoch(1)  # what a resumed fit does before epoch 1
        >>> list(sampler) == second
        True
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = check_int(type(self).__name__, "seed", seed, 0)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass yield the permutation of ``epoch`` (Lightning calls this before every epoch)."""
        self.epoch = check_int(type(self).__name__, "epoch", epoch, 0)

    @override
    def __iter__(self) -> Iterator[int]:
        # SeedSequence mixes the pair, so (seed, epoch + 1) and (seed + 1, epoch) give unrelated permutations
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, dtype=np.uint64)[0]
        order = torch.randperm(len(self.data_source), generator=torch.Generator().manual_seed(int(state))).tolist()
        self.epoch += 1
        return iter(order)


class _TensorDataModule(LightningDataModule):
    """Shared loaders of the bundled datamodules: ``setup()`` fills ``train_set`` and ``val_set``."""

    train_set: TensorDataset
    val_set: TensorDataset
    batch_size: int
    val_batch_size: int | None
    seed: int
    num_workers: int
    drop_last: bool

    @override
    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the order of each epoch is fixed by ``seed`` and the epoch."""
        self.setup()
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=EpochRandomSampler(self.train_set, seed=self.seed),
            # the workers' base seed comes from this generator, not from (and advancing) torch's global one
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order, of ``val_batch_size`` samples (``None``: ``batch_size``)."""
        self.setup()
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size if self.val_batch_size is None else self.val_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


class DigitsDataModule(_TensorDataModule):
    """scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes), bundled with sklearn: no download.

    In :meth:`setup`, pixels are scaled to ``[0, 1]`` and then standardised with the mean and standard deviation (one
    scalar each) of the training split, so the training images have mean 0 and std 1. The train/val split is
    stratified by label and fixed by ``seed``; the training loader shuffles with an :class:`EpochRandomSampler` seeded
    with ``seed``, so two datamodules with the same arguments yield the same batches in every epoch.

    Args:
        batch_size: samples per batch, at least 1.
        val_batch_size: samples per validation batch (``None``: ``batch_size``), e.g. large batches for a run that
            trains on tiny ones, so that validation-time batch statistics (``BatchNormGap``) are not tiny too.
        val_fraction: fraction of the samples held out for validation, in ``(0, 1)``.
        seed: seed of the split and of the training shuffle, at least 0.
        num_workers: ``DataLoader`` worker processes (0 loads in the main process).
        flatten: yield ``(N, 64)`` vectors (for :class:`~bn_lightning.app.models.MLP`) instead of ``(N, 1, 8, 8)``
            images.
        drop_last: drop the last incomplete training batch (validation keeps every sample).

    Raises:
        ValueError: ``batch_size < 1``, ``val_fraction`` outside ``(0, 1)``, ``seed < 0`` or ``num_workers < 0``.

    Attributes:
        num_classes: 10.
        input_shape: shape of one sample, ``(1, 8, 8)`` or ``(64,)`` if ``flatten``.
        mean: training-split pixel mean used for standardisation (after :meth:`setup`).
        std: training-split pixel std used for standardisation (after :meth:`setup`).

    Example::

        >>> from bn_lightning.app.data import DigitsDataModule
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, x.dtype, y.dtype
        (torch.Size([32, 1, 8, 8]), torch.float32, torch.int64)
        >>> len(dm.train_set) + len(dm.val_set)
        1797
    """

    num_classes: int = 10

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
        flatten: bool = False,
        drop_last: bool = False,
        val_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        check_int(type(self).__name__, "batch_size", batch_size, 1)
        self.val_batch_size = check_int(type(self).__name__, "val_batch_size", val_batch_size, 1, optional=True)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction!r}")
        check_int(type(self).__name__, "seed", seed, 0)
        check_int(type(self).__name__, "num_workers", num_workers, 0)
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.flatten = flatten
        self.drop_last = drop_last
        self.input_shape: tuple[int, ...] = (64,) if flatten else (1, 8, 8)
        self.mean: float | None = None
        self.std: float | None = None
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    @override
    def setup(self, stage: str | None = None) -> None:
        """Load, split and standardise the digits; a no-op once done."""
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = digits.data.astype(np.float32) / 16.0  # pixel values are integers 0..16
        y = digits.target.astype(np.int64)
        x_train, x_val, y_train, y_val = train_test_split(
            x, y, test_size=self.val_fraction, random_state=self.seed, stratify=y
        )
        self.mean = float(x_train.mean())
        self.std = float(x_train.std())
        self.train_set = TensorDataset(self._to_tensor(x_train), torch.from_numpy(y_train))
        self.val_set = TensorDataset(self._to_tensor(x_val), torch.from_numpy(y_val))

    def _to_tensor(self, x: np.ndarray) -> torch.Tensor:
        t = (torch.from_numpy(x) - self.mean) / self.std
        return t.reshape(-1, *self.input_shape).contiguous()


class SyntheticImageDataModule(_TensorDataModule):
    """Seeded random images whose label shifts each channel's mean: a learnable stand-in for CIFAR-sized data.

    Each class ``k`` gets a fixed random per-channel offset ``mu_k`` (drawn once from ``N(0, 1)``); a sample of class
    ``k`` is ``mu_k + N(0, 1)`` noise, broadcast over the spatial dimensions. Train and validation sets come from the
    same offsets, and everything is drawn from a generator seeded with ``seed``, so the data are reproducible.

    Args:
        shape: shape of one sample, ``(C, H, W)`` (or ``(C,)`` for vectors); the offset is per entry of dim 0.
        num_classes: number of labels, drawn uniformly from ``[0, num_classes)``.
        num_samples: training samples.
        val_samples: validation samples.
        batch_size: samples per batch.
        val_batch_size: samples per validation batch (``None``: ``batch_size``).
        seed: seed of the data and of the training shuffle (an :class:`EpochRandomSampler`), at least 0.
        num_workers: ``DataLoader`` worker processes.
        drop_last: drop the last incomplete training batch (keeps every BN batch full-size).

    Raises:
        ValueError: a non-positive ``shape`` entry, size or count, ``seed < 0``, ``num_workers < 0``, or ``drop_last``
            with fewer ``num_samples`` than ``batch_size`` (the training loader would be empty).

    Attributes:
        num_classes: number of labels.
        input_shape: shape of one sample (``tuple(shape)``).

    Example::

        >>> from bn_lightning.app.data import SyntheticImageDataModule
        >>> dm = SyntheticImageDataModule(shape=(3, 8, 8), num_samples=64, val_samples=16, batch_size=16)
        >>> dm.setup()
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, y.shape
        (torch.Size([16, 3, 8, 8]), torch.Size([16]))
        >>> len(dm.train_dataloader()), len(dm.val_dataloader())
        (4, 1)
    """

    def __init__(
        self,
        shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        num_samples: int = 512,
        val_samples: int = 128,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = True,
        val_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.val_batch_size = check_int(type(self).__name__, "val_batch_size", val_batch_size, 1, optional=True)
        shape = tuple(shape)
        if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"`shape` must be a non-empty sequence of positive integers, got {shape!r}")
        check_int(type(self).__name__, "num_classes", num_classes, 1)
        check_int(type(self).__name__, "num_samples", num_samples, 1)
        check_int(type(self).__name__, "val_samples", val_samples, 1)
        check_int(type(self).__name__, "batch_size", batch_size, 1)
        check_int(type(self).__name__, "seed", seed, 0)
        check_int(type(self).__name__, "num_workers", num_workers, 0)
        if drop_last and num_samples < batch_size:
            raise ValueError(
                f"`num_samples` ({num_samples}) must be >= `batch_size` ({batch_size}) when `drop_last=True`, "
                "otherwise the training loader is empty"
            )
        self.save_hyperparameters()
        self.input_shape: tuple[int, ...] = shape
        self.num_classes = num_classes
        self.num_samples = num_samples
        self.val_samples = val_samples
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    @override
    def setup(self, stage: str | None = None) -> None:
        """Generate the training and validation sets; a no-op once done."""
        if self.train_set is not None:
            return
        g = torch.Generator().manual_seed(self.seed)
        channels, spatial = self.input_shape[0], self.input_shape[1:]
        offsets = torch.randn(self.num_classes, channels, *([1] * len(spatial)), generator=g)

        def make(n: int) -> TensorDataset:
            y = torch.randint(self.num_classes, (n,), generator=g)
            x = torch.randn(n, *self.input_shape, generator=g) + offsets[y]
            return TensorDataset(x, y)

        self.train_set = make(self.num_samples)
        self.val_set = make(self.val_samples)
