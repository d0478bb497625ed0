import pytest
import torch
from torch.utils.data import RandomSampler

from bn_lightning.app.data import DigitsDataModule, EpochRandomSampler, SyntheticImageDataModule


def _first_batch(dm):
    dm.setup()
    return next(iter(dm.train_dataloader()))


def test_digits_sizes_and_split():
    dm = DigitsDataModule(val_fraction=0.2)
    dm.setup()
    n_train, n_val = len(dm.train_set), len(dm.val_set)
    assert n_train + n_val == 1797
    assert n_val == 360  # ceil(0.2 * 1797), as sklearn rounds the test size up
    assert dm.num_classes == 10
    assert dm.input_shape == (1, 8, 8)
    # stratified: every class in both splits, in nearly the same proportions
    train_counts = torch.bincount(dm.train_set.tensors[1], minlength=10).float()
    val_counts = torch.bincount(dm.val_set.tensors[1], minlength=10).float()
    assert (val_counts > 0).all()
    torch.testing.assert_close(val_counts / n_val, train_counts / n_train, atol=0.01, rtol=0)


def test_digits_dtypes_and_batches():
    dm = DigitsDataModule(batch_size=32)
    x, y = _first_batch(dm)
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < 10
    assert len(dm.val_dataloader()) == -(-len(dm.val_set) // 32)


def test_digits_standardised_with_train_stats():
    dm = DigitsDataModule()
    dm.setup()
    x_train = dm.train_set.tensors[0]
    assert abs(float(x_train.mean())) < 1e-4
    assert abs(float(x_train.std(unbiased=False)) - 1) < 1e-4
    x_val = dm.val_set.tensors[0]
    assert abs(float(x_val.mean())) < 0.1  # same statistics, not its own
    assert 0 < dm.std and 0 < dm.mean < 1


def test_digits_flatten():
    dm = DigitsDataModule(batch_size=16, flatten=True)
    x, _ = _first_batch(dm)
    assert x.shape == (16, 64)
    assert dm.input_shape == (64,)
    image = DigitsDataModule(batch_size=16)
    image.setup()
    torch.testing.assert_close(dm.train_set.tensors[0], image.train_set.tensors[0].flatten(1))


def test_digits_determinism():
    x1, y1 = _first_batch(DigitsDataModule(seed=3))
    x2, y2 = _first_batch(DigitsDataModule(seed=3))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = _first_batch(DigitsDataModule(seed=4))
    assert not torch.equal(x1, x3)
    a, b = DigitsDataModule(seed=3), DigitsDataModule(seed=4)
    a.setup()
    b.setup()
    assert not torch.equal(a.val_set.tensors[1], b.val_set.tensors[1])


def test_digits_loaders():
    dm = DigitsDataModule(batch_size=100, drop_last=True)
    dm.setup()
    assert len(dm.train_dataloader()) == len(dm.train_set) // 100
    val_y = torch.cat([y for _, y in dm.val_dataloader()])
    assert torch.equal(val_y, dm.val_set.tensors[1])  # not shuffled, nothing dropped
    # each epoch of one loader reshuffles
    loader = dm.train_dataloader()
    first = [y for _, y in loader][0]
    second = [y for _, y in loader][0]
    assert not torch.equal(first, second)


def test_digits_setup_is_idempotent():
    dm = DigitsDataModule()
    dm.setup("fit")
    train_set = dm.train_set
    dm.setup("validate")
    assert dm.train_set is train_set


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"num_workers": -1}, "num_workers"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_digits_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_synthetic_shapes_and_labels():
    dm = SyntheticImageDataModule(shape=(3, 16, 16), num_classes=5, num_samples=100, val_samples=30, batch_size=32)
    dm.setup()
    assert dm.input_shape == (3, 16, 16) and dm.num_classes == 5
    x, y = dm.train_set.tensors
    assert x.shape == (100, 3, 16, 16) and x.dtype == torch.float32
    assert y.shape == (100,) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < 5
    assert dm.val_set.tensors[0].shape == (30, 3, 16, 16)
    assert len(dm.train_dataloader()) == 3  # drop_last by default
    assert len(dm.val_dataloader()) == 1
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (32, 3, 16, 16) and yb.shape == (32,)


def test_synthetic_default_shape():
    dm = SyntheticImageDataModule(num_samples=64, val_samples=8)
    x, _ = _first_batch(dm)
    assert x.shape == (64, 3, 32, 32)


def test_synthetic_vector_shape():
    dm = SyntheticImageDataModule(shape=(20,), num_samples=16, val_samples=4, batch_size=8)
    x, _ = _first_batch(dm)
    assert x.shape == (8, 20)


def test_synthetic_determinism():
    kwargs = {"shape": (3, 8, 8), "num_samples": 64, "val_samples": 16, "batch_size": 16}
    x1, y1 = _first_batch(SyntheticImageDataModule(seed=1, **kwargs))
    x2, y2 = _first_batch(SyntheticImageDataModule(seed=1, **kwargs))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = _first_batch(SyntheticImageDataModule(seed=2, **kwargs))
    assert not torch.equal(x1, x3)


def test_synthetic_labels_are_learnable():
    # the per-channel class offset makes the channel means predictive: nearest class centroid beats chance by far
    dm = SyntheticImageDataModule(shape=(3, 8, 8), num_classes=4, num_samples=400, val_samples=200, batch_size=50)
    dm.setup()
    x, y = dm.train_set.tensors
    feats = x.mean(dim=(2, 3))
    centroids = torch.stack([feats[y == k].mean(0) for k in range(4)])
    xv, yv = dm.val_set.tensors
    pred = torch.cdist(xv.mean(dim=(2, 3)), centroids).argmin(1)
    assert (pred == yv).float().mean() > 0.6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": ()}, "shape"),
        ({"shape": (3, 0, 8)}, "shape"),
        ({"num_classes": 0}, "num_classes"),
        ({"num_samples": 0}, "num_samples"),
        ({"val_samples": 0}, "val_samples"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"num_samples": 10, "batch_size": 64}, "num_samples"),
        ({"seed": -1}, "seed"),
    ],
)
def test_synthetic_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticImageDataModule(**kwargs)


def test_synthetic_small_without_drop_last():
    dm = SyntheticImageDataModule(num_samples=10, val_samples=4, batch_size=64, drop_last=False, shape=(1, 4, 4))
    dm.setup()
    assert len(dm.train_dataloader()) == 1


def test_epoch_sampler_order_depends_on_seed_and_epoch():
    def order(seed, epoch):
        sampler = EpochRandomSampler(range(50), seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert sorted(order(0, 0)) == list(range(50))
    assert order(0, 3) == order(0, 3)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert order(0, 1) != order(1, 0)  # the pair is mixed, not summed
    assert len(EpochRandomSampler(range(50))) == 50


def test_epoch_sampler_advances_one_epoch_per_pass():
    sampler = EpochRandomSampler(range(20), seed=5)
    passes = [list(sampler) for _ in range(3)]
    assert sampler.epoch == 3
    sampler.set_epoch(1)
    assert list(sampler) == passes[1]


@pytest.mark.parametrize("dm_class", [DigitsDataModule, SyntheticImageDataModule])
def test_train_loader_of_a_resumed_fit_continues_the_order(dm_class):
    # Lightning calls set_epoch(epoch) on the sampler before every epoch, the restored epoch after a resume
    kwargs = {"batch_size": 16} if dm_class is DigitsDataModule else {"num_samples": 64, "val_samples": 8}
    loader = dm_class(seed=2, **kwargs).train_dataloader()
    epochs = [torch.cat([y for _, y in loader]) for _ in range(3)]
    resumed = dm_class(seed=2, **kwargs).train_dataloader()
    resumed.sampler.set_epoch(2)
    assert torch.equal(torch.cat([y for _, y in resumed]), epochs[2])
    assert not torch.equal(epochs[0], epochs[2])
    # a RandomSampler: under DDP Lightning swaps it for its epoch-aware DistributedSampler, as any shuffling sampler
    assert isinstance(loader.sampler, RandomSampler) and isinstance(loader.sampler, EpochRandomSampler)


def test_epoch_sampler_bad_arguments():
    with pytest.raises(ValueError, match="seed"):
        EpochRandomSampler(range(4), seed=-1)
    with pytest.raises(ValueError, match="epoch"):
        EpochRandomSampler(range(4)).set_epoch(-1)


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: DigitsDataModule(batch_size=2, drop_last=True, **kw),
        lambda **kw: SyntheticImageDataModule(shape=(3, 4, 4), num_samples=8, val_samples=20, batch_size=2, **kw),
    ],
)
def test_validation_batch_size_is_separate_from_training(make):
    dm = make(val_batch_size=16)
    assert next(iter(dm.train_dataloader()))[0].shape[0] == 2
    assert next(iter(dm.val_dataloader()))[0].shape[0] == 16
    assert next(iter(make().val_dataloader()))[0].shape[0] == 2  # None: the training batch size
    with pytest.raises(ValueError, match="val_batch_size must be None or an int >= 1, got 0"):
        make(val_batch_size=0)
