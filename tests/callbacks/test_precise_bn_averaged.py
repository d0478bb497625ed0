"""PreciseBN(target="averaged"): the averaged copy of (EMA)WeightAveraging / StochasticWeightAveraging gets the BN
statistics of the averaged weights, the training model is left alone, and the callback order does not matter.

Run as a script (``python tests/callbacks/test_precise_bn_averaged.py OUT_DIR``) it is the 2-process DDP run of
:func:`test_ddp_averaged_copy_is_exact_and_identical_on_every_rank` (Lightning's launcher re-runs argv).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, StochasticWeightAveraging
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import bn_lightning as B  # noqa: E402
from bn_lightning.callbacks import PreciseBN  # noqa: E402
from bn_lightning.precise_bn import recalibrate_bn  # noqa: E402

NUM_BATCHES = 3
BATCH = 16


class _Net(pl.LightningModule):
    """Linear-BN-ReLU x2 and a head; inputs far from zero, so BN statistics that belong to other weights hurt."""

    def __init__(self, bn1: type[nn.Module] = nn.BatchNorm1d, bn2: type[nn.Module] = nn.BatchNorm1d) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), bn1(16), nn.ReLU(), nn.Linear(16, 16), bn2(16), nn.ReLU())
        self.head = nn.Linear(16, 2)
        self.val_acc: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def on_validation_epoch_start(self) -> None:
        self._correct = []

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self._correct.append(self(x).argmax(1) == y)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.val_acc.append(float(torch.cat(self._correct).float().mean()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _data(n: int = 96, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] - x[:, 1] > 0).long()
    return DataLoader(TensorDataset(3.0 * x + 20.0, y), batch_size=BATCH)  # not shuffled: hand references see the same


class _Probe(Callback):
    """Keeps the LightningModule's state as each validation of fit sees it, and as each epoch ends (trained)."""

    def __init__(self) -> None:
        self.validated: list[dict[str, torch.Tensor]] = []
        self.trained: list[dict[str, torch.Tensor]] = []

    def on_validation_epoch_start(self, trainer, pl_module):  # last in the list: after WeightAveraging's swap
        if not trainer.sanity_checking:
            self.validated.append(copy.deepcopy(pl_module.state_dict()))

    def on_train_epoch_end(self, trainer, pl_module):  # after validation swapped the training weights back
        self.trained.append(copy.deepcopy(pl_module.state_dict()))


def _fit(callbacks: list[Callback], module: pl.LightningModule | None = None, **kwargs) -> tuple[_Net, _Probe]:
    module = module or _Net()
    probe = _Probe()
    kwargs.setdefault("max_epochs", 3)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=[*callbacks, probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        **kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _data(), _data(64, seed=1))
    return module, probe


def _by_hand(state: dict[str, torch.Tensor], bn1=nn.BatchNorm1d, bn2=nn.BatchNorm1d) -> _Net:
    """A fresh net holding ``state``, recalibrated by hand on the first NUM_BATCHES training batches."""
    net = _Net(bn1, bn2)
    net.load_state_dict(state)
    net.train()
    recalibrate_bn(net, _data(), num_batches=NUM_BATCHES, progress=False)
    return net


def _assert_bn_buffers_close(actual: dict[str, torch.Tensor], expected: nn.Module) -> None:
    for k, v in expected.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(actual[k], v, rtol=1e-6, atol=1e-6, msg=k)


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _ema() -> EMAWeightAveraging:
    # use_buffers=False: the averaged copy keeps the BN statistics of the initial weights, the worst case
    return EMAWeightAveraging(decay=0.7, use_buffers=False)


@pytest.mark.parametrize("bn", [nn.BatchNorm1d, B.BatchNorm1d], ids=["torch", "ours"])
def test_ema_validation_and_end_use_statistics_of_the_averaged_weights(bn):
    plain, plain_probe = _fit([_ema()], _Net(bn, bn))
    first, first_probe = _fit([PreciseBN(NUM_BATCHES, target="averaged"), _ema()], _Net(bn, bn))
    second, second_probe = _fit([_ema(), PreciseBN(NUM_BATCHES, target="averaged")], _Net(bn, bn))

    # validation with the averaged weights: hopeless with the initial statistics, good with recalibrated ones
    assert sum(first.val_acc) > sum(plain.val_acc) + 0.3 and first.val_acc[0] > plain.val_acc[0] + 0.2, (
        plain.val_acc,
        first.val_acc,
    )
    # what each validation saw: the averaged weights (as without PreciseBN) with statistics recalibrated by hand
    assert len(first_probe.validated) == 3
    for seen, unaided in zip(first_probe.validated, plain_probe.validated, strict=True):
        for k, v in seen.items():
            if "running" not in k:
                assert torch.equal(v, unaided[k]), k
        _assert_bn_buffers_close(seen, _by_hand(seen, bn, bn))
    # the training model: bit-for-bit what it is without PreciseBN, buffers included, after every epoch
    for with_cb, without in zip(first_probe.trained, plain_probe.trained, strict=True):
        _assert_equal(with_cb, without)
    # end of fit: the averaged weights, with their own population statistics
    final = first.state_dict()
    for k, v in plain.state_dict().items():
        if "running" not in k:
            assert torch.equal(final[k], v), k
    _assert_bn_buffers_close(final, _by_hand(final, bn, bn))
    # an independent reference for the first layer: float64 mean and unbiased variance of its input, by hand
    x = torch.cat([x for x, _ in list(_data())[:NUM_BATCHES]]).double()
    h = x @ final["net.0.weight"].double().T + final["net.0.bias"].double()
    torch.testing.assert_close(final["net.1.running_mean"].double(), h.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final["net.1.running_var"].double(), h.var(0), rtol=1e-5, atol=1e-4)
    # the callback order does not matter
    _assert_equal(final, second.state_dict())
    assert first.val_acc == second.val_acc
    for a, b in zip(first_probe.validated, second_probe.validated, strict=True):
        _assert_equal(a, b)


def _swa() -> StochasticWeightAveraging:
    return StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2, annealing_epochs=1)


def test_swa_bn_epoch_and_end_use_statistics_of_the_averaged_weights():
    plain, plain_probe = _fit([_swa()])
    first, first_probe = _fit([PreciseBN(NUM_BATCHES, target="averaged"), _swa()])
    second, _ = _fit([_swa(), PreciseBN(NUM_BATCHES, target="averaged")])
    # 3 epochs and SWA's BN-update epoch, in which the LightningModule holds the averaged weights
    assert len(plain_probe.validated) == len(first_probe.validated) == 4
    # before it, validation uses the training weights: untouched, buffers included
    for with_cb, without in zip(first_probe.validated[:3], plain_probe.validated[:3], strict=True):
        _assert_equal(with_cb, without)
    # the BN-update epoch's validation: the same averaged weights, statistics recalibrated instead of SWA's estimate
    seen, unaided = first_probe.validated[3], plain_probe.validated[3]
    for k, v in seen.items():
        if "running" not in k:
            assert torch.equal(v, unaided[k]), k
    _assert_bn_buffers_close(seen, _by_hand(seen))
    assert not torch.equal(seen["net.1.running_var"], unaided["net.1.running_var"])  # SWA's own estimate differs
    # end of fit: the averaged weights (SWA's own), their population statistics, in either callback order
    final = first.state_dict()
    for k, v in plain.state_dict().items():
        if "running" not in k:
            assert torch.equal(final[k], v), k
    _assert_bn_buffers_close(final, _by_hand(final))
    _assert_equal(final, second.state_dict())


@pytest.mark.parametrize("order", ["precise_bn_first", "swa_first"])
def test_swa_without_max_epochs_gets_statistics_at_the_end(order):
    # max_epochs=-1: SWA copies the averaged weights into the model at its on_train_end, without any BN update
    callbacks = [PreciseBN(NUM_BATCHES, target="averaged", when="fit_end"), _swa()]
    module, probe = _fit(callbacks[:: 1 if order == "precise_bn_first" else -1], max_epochs=-1, max_steps=6 * 4)
    final = module.state_dict()
    _assert_bn_buffers_close(final, _by_hand(final))
    trained = probe.trained[-1]  # the training weights at the last epoch end: their statistics were left alone
    assert not torch.equal(trained["net.1.running_mean"], final["net.1.running_mean"])
    plain, plain_probe = _fit([_swa()], max_epochs=-1, max_steps=6 * 4)
    _assert_equal(trained, plain_probe.trained[-1])


def test_fit_end_only_and_the_log_keys():
    from tests.helpers.lightning_ddp_callbacks import CapturingLogger

    logger = CapturingLogger()
    cb = PreciseBN(NUM_BATCHES, target="averaged", when="fit_end")
    module = _Net()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        callbacks=[_ema(), cb],
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _data(), _data(64, seed=1))
    assert cb.runs == 1 and cb.batches_run == NUM_BATCHES
    # WeightAveraging, first in the list, already copied the averaged copy into the model: its statistics follow
    final = module.state_dict()
    _assert_bn_buffers_close(final, _by_hand(final))
    keys = [k for _, metrics in logger.rows for k in metrics if "precise_bn" in k]
    assert keys == ["bn/precise_bn/averaged/seconds", "bn/precise_bn/averaged/num_samples"]
    assert [m for _, m in logger.rows if "bn/precise_bn/averaged/num_samples" in m][0][
        "bn/precise_bn/averaged/num_samples"
    ] == float(NUM_BATCHES * BATCH)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target="swa"), r"PreciseBN: target must be one of \('model', 'averaged'\), got 'swa'"),
        (dict(target="averaged", when="epoch_end"), "when must be 'before_validation' or 'fit_end'"),
    ],
)
def test_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreciseBN(**kwargs)


@pytest.mark.parametrize("averagers", [0, 2])
def test_needs_exactly_one_averaging_callback(averagers):
    callbacks = [PreciseBN(target="averaged"), *([_ema()] if averagers else []), *([_swa()] if averagers > 1 else [])]
    with pytest.raises(ValueError, match="one weight-averaging callback"):
        _fit(callbacks)


def test_state_keys_let_both_targets_coexist():
    model, averaged = PreciseBN(), PreciseBN(target="averaged")
    assert model.state_key == "PreciseBN{'when': 'before_validation', 'num_batches': 200, 'prefix': 'bn'}"
    assert averaged.state_key != model.state_key


# --------------------------------------------------------------------------------------------------- DDP


_FED: list[torch.Tensor] = []


def _recording_forward(model: nn.Module, batch) -> None:
    _FED.append(batch[0].detach().clone())
    model(batch[0])


def _ddp_main(out_dir: str) -> None:
    """Both ranks: EMA + PreciseBN(target="averaged") on a torch BN and one of our SyncBatchNorm layers."""
    from lightning.pytorch.strategies import DDPStrategy

    torch.set_num_threads(1)
    module = _Net(nn.BatchNorm1d, B.SyncBatchNorm)
    probe = _Probe()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(broadcast_buffers=False),
        max_epochs=2,
        callbacks=[PreciseBN(NUM_BATCHES, forward_fn=_recording_forward, target="averaged"), _ema(), probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=out_dir,
    )
    trainer.fit(module, _data(), _data(64, seed=1))
    torch.save(
        {"validated": probe.validated, "final": module.state_dict(), "fed": _FED},
        os.path.join(out_dir, f"rank{trainer.global_rank}.pt"),
    )


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_averaged_copy_is_exact_and_identical_on_every_rank(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": ROOT},
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert len(r0["validated"]) == len(r1["validated"]) == 2  # and the end of fit: 3 recalibrations
    assert len(r0["fed"]) == len(r1["fed"]) == 3 * NUM_BATCHES
    states = [*zip(r0["validated"], r1["validated"], strict=True), (r0["final"], r1["final"])]
    for i, (state, other) in enumerate(states):
        _assert_equal(state, other)  # identical on every rank, weights and statistics
        fed = [(r0["fed"][j], r1["fed"][j]) for j in range(i * NUM_BATCHES, (i + 1) * NUM_BATCHES)]
        for k, v in _ddp_population_by_hand(state, fed).items():
            torch.testing.assert_close(state[k].double(), v, rtol=1e-4, atol=1e-4, msg=k)


def _ddp_population_by_hand(
    state: dict[str, torch.Tensor], fed: list[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """float64: the mean and unbiased variance of what the two BN layers see over both ranks' batches ``fed``.

    The torch layer normalises each rank's batch with that batch's statistics; the SyncBatchNorm's input does not
    depend on how it normalises.
    """
    w = {k: v.double() for k, v in state.items()}
    into_bn1, into_bn2 = [], []
    for step in fed:
        for xb in step:
            a = xb.double() @ w["net.0.weight"].T + w["net.0.bias"]
            n = (a - a.mean(0)) / (a.var(0, unbiased=False) + 1e-5).sqrt() * w["net.1.weight"] + w["net.1.bias"]
            into_bn1.append(a)
            into_bn2.append(n.relu() @ w["net.3.weight"].T + w["net.3.bias"])
    a, c = torch.cat(into_bn1), torch.cat(into_bn2)
    return {
        "net.1.running_mean": a.mean(0),
        "net.1.running_var": a.var(0),
        "net.4.running_mean": c.mean(0),
        "net.4.running_var": c.var(0),
    }


if __name__ == "__main__":
    _ddp_main(sys.argv[1])
