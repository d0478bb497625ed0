"""AccumulateBatchNormStats: one update per optimizer step, equal to one update from the window's concatenated batch.

The reference is computed in float64 by hand from the raw inputs (the layer under test normalises the raw input, so
its batch statistics do not depend on the weights): per window, the mean and unbiased variance of the concatenated
micro-batches, folded in with torch's update rule. The 2-process gloo run covering the guard and accumulation under
DDP is at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import bn_lightning
from bn_lightning import no_stat_update
from bn_lightning.callbacks import AccumulateBatchNormStats, BatchNormGuard, BatchNormMonitor
from tests.callbacks.test_guard import GuardedModule, amp, batches, fit
from tests.helpers.lightning_ddp_callbacks import CapturingLogger

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def windows_reference(windows: list[list[torch.Tensor]], momentum: float | None) -> tuple[torch.Tensor, ...]:
    """float64 running mean, running variance and count after one torch-rule update per window."""
    mean, var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    for n, window in enumerate(windows, start=1):
        x = torch.cat(window).double()
        f = 1.0 / n if momentum is None else momentum
        mean = (1 - f) * mean + f * x.mean(0)
        var = (1 - f) * var + f * x.var(0, correction=1)
    return mean, var, torch.tensor(len(windows))


def assert_windows(layer: nn.Module, windows: list[list[int]], momentum: float | None) -> None:
    xs = batches()
    mean, var, count = windows_reference([[xs[i] for i in w] for w in windows], momentum)
    assert int(layer.num_batches_tracked) == int(count)
    # float32 statistics of 8-24 values of O(1), merged in float64: a few float32 ulps
    torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-5, atol=2e-6)


class Recording(GuardedModule):
    """Records ``num_batches_tracked`` of ``bn_in`` after every batch; runs a guarded extra forward (SAM-like)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        with no_stat_update(self):
            self.bn_in(batch[0] * 5.0 + 3.0)  # must not reach the running statistics, accumulated or not
        return super().training_step(batch, batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.seen.append(int(self.bn_in.num_batches_tracked))


KINDS = {
    "torch": (nn.BatchNorm1d, 0.1),
    "torch_cumulative": (nn.BatchNorm1d, None),
    "ours": (bn_lightning.BatchNorm1d, 0.1),
    "sync_local": (bn_lightning.SyncBatchNorm, None),
    "renorm": (lambda c, momentum: bn_lightning.BatchRenorm1d(c, momentum=momentum, warmup_steps=2), 0.1),
    "ghost": (lambda c, momentum: bn_lightning.GhostBatchNorm1d(c, virtual_batch_size=4, momentum=momentum), 0.1),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_one_update_per_step_equals_one_large_batch(kind):
    bn_cls, momentum = KINDS[kind]
    module = Recording(bn_cls, momentum)
    cb = AccumulateBatchNormStats()
    fit(module, [cb], accumulate_grad_batches=2)  # 5 batches: windows (0, 1), (2, 3) and the partial (4,)
    assert_windows(module.bn_in, [[0, 1], [2, 3], [4]], momentum)
    assert_windows(module.aux, [[0, 1], [2, 3], [4]], 0.1)
    assert module.seen == [0, 1, 1, 2, 3]  # unchanged within a window
    assert cb.updates == 3


def test_without_the_callback_every_micro_batch_updates():
    module = Recording()
    fit(module, [], accumulate_grad_batches=2)
    assert module.seen == [1, 2, 3, 4, 5]
    assert not torch.allclose(module.aux.running_mean.double(), windows_reference([batches()[:2]], 0.1)[0])


def test_skipped_step_and_none_micro_batch_are_left_out():
    # batch 0 returns None (no backward: left out of window (0, 1)); batch 3's infinite loss makes the scaler skip the
    # step of window (2, 3): nothing of it reaches the running statistics
    module = GuardedModule(none_at=(0,), inf_loss_at=(3,))
    cb = AccumulateBatchNormStats()
    fit(module, [cb], accumulate_grad_batches=2, plugins=[amp()])
    assert_windows(module.aux, [[1], [4]], 0.1)
    assert cb.updates == 2


@pytest.mark.parametrize("order", ["guard_first", "guard_last"])
def test_with_the_guard_a_non_finite_micro_batch_drops_its_window(order):
    module = GuardedModule(nan_at=(2,), inf_loss_at=())
    guard, acc = BatchNormGuard(), AccumulateBatchNormStats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fit(module, [guard, acc] if order == "guard_first" else [acc, guard], accumulate_grad_batches=2)
    assert_windows(module.aux, [[0, 1], [4]], 0.1)
    assert_windows(module.bn_in, [[0, 1], [4]], 0.1)
    assert guard.skipped_batches == 1


def test_monitor_sees_the_true_batch_statistics_of_torch_layers():
    # the monitor recovers a torch layer's batch statistics from its running-stat update, which this callback keeps
    # out of the buffers: it must read them from the input instead
    module = GuardedModule()
    logger = CapturingLogger()
    fit(
        module,
        [BatchNormMonitor(log_every_n_steps=1), AccumulateBatchNormStats()],
        accumulate_grad_batches=2,
        logger=logger,
        log_every_n_steps=1,
    )
    logged = [m["bn/bn_in/batch_mean"] for _, m in logger.bn_rows() if "bn/bn_in/batch_mean" in m]
    truth = torch.tensor([float(x.mean(0).mean()) for x in batches()])
    assert logged and all(float((truth - v).abs().min()) < 1e-5 for v in logged), (logged, truth)
    assert_windows(module.bn_in, [[0, 1], [2, 3], [4]], 0.1)


def test_accumulate_one_does_nothing_and_state():
    module, plain = GuardedModule(), GuardedModule()
    fit(module, [AccumulateBatchNormStats()])
    fit(plain, [])
    assert torch.equal(module.bn_in.running_var, plain.bn_in.running_var)
    assert module.bn_in.momentum == 0.1  # the momentum swap never leaks out of a forward
    cb = AccumulateBatchNormStats()
    cb.load_state_dict({"updates": 4})
    assert cb.state_dict() == {"updates": 4}


@pytest.mark.ddp
def test_guard_and_accumulation_under_ddp(tmp_path):
    """2 gloo ranks, k=2, 6 batches per rank: window (2, 3) holds a non-finite micro-batch on rank 1 only."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    script = os.path.join(ROOT, "tests", "helpers", "lightning_ddp_guards.py")
    subprocess.run([sys.executable, script, str(tmp_path)], check=True, cwd=ROOT, env=env, timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    kept = [[0, 1], [4, 5]]  # the window with rank 1's NaN is skipped on BOTH ranks
    for out in ranks:
        inputs = out["inputs"]
        # SyncBatchNorm: one update per step from both ranks' micro-batches (one process on the concatenation)
        synced = [[r["inputs"][i] for r in ranks for i in w] for w in kept]
        mean, var, count = windows_reference(synced, 0.1)
        state = out["state"]
        assert int(state["sync.num_batches_tracked"]) == 2
        torch.testing.assert_close(state["sync.running_mean"].double(), mean, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(state["sync.running_var"].double(), var, rtol=1e-5, atol=2e-6)
        # local torch BN, momentum=None: this rank's own micro-batches, one cumulative update per step
        mean, var, count = windows_reference([[inputs[i] for i in w] for w in kept], None)
        assert int(state["local.num_batches_tracked"]) == 2
        torch.testing.assert_close(state["local.running_mean"].double(), mean, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(state["local.running_var"].double(), var, rtol=1e-5, atol=2e-6)
        assert int(state["aux.num_batches_tracked"]) == 2 and state["aux.running_mean"].isfinite().all()
        assert out["skipped_batches"] == 1 and out["updates"] == 3
        assert out["guarded_unchanged"]  # no_stat_update around SyncBatchNorm's collectives on both ranks
    assert torch.equal(ranks[0]["state"]["sync.running_var"], ranks[1]["state"]["sync.running_var"])
    assert not torch.equal(ranks[0]["state"]["local.running_mean"], ranks[1]["state"]["local.running_mean"])
