"""bn_lightning.distributed: the one-process identities, waiting for collectives (poll on CPU, bounded; never on
accelerators; the spin setting read when used), and gloo's event-loop policy (changed only when asked)."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch
import torch.distributed as dist

import bn_lightning as B
from bn_lightning import distributed
from tests.helpers.ddp import run_distributed

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="scheduling policies: Linux only")


class FakeWork:
    """A collective handle that completes after ``polls`` calls of ``is_completed`` (never, if ``None``)."""

    def __init__(self, polls: int | None) -> None:
        self.polls_left = polls
        self.polled = 0
        self.waited = 0

    def is_completed(self) -> bool:
        self.polled += 1
        if self.polls_left is None:
            return False
        self.polls_left -= 1
        return self.polls_left < 0

    def wait(self) -> bool:
        self.waited += 1
        return True


def _spin(monkeypatch, seconds: float) -> None:
    monkeypatch.setenv("BN_LIGHTNING_SYNC_SPIN_US", repr(seconds * 1e6))


def test_without_a_process_group_collectives_are_identities():
    x = torch.arange(6.0).view(2, 3)
    assert not distributed.is_distributed() and distributed.world_size() == 1
    assert torch.equal(distributed.all_gather(x), x.unsqueeze(0))
    assert distributed.all_reduce_sum(x) is x and torch.equal(x, torch.arange(6.0).view(2, 3))
    assert distributed.all_reduce_sum(x, async_op=True) is None


def _collectives_worker(rank, world):
    x = torch.tensor([float(rank), 10.0 + rank])
    gathered = distributed.all_gather(x)
    matrix = distributed.all_gather(torch.full((2, 3), float(rank)))
    scalar = distributed.all_gather(torch.tensor(rank + 0.5))
    summed = distributed.all_reduce_sum(x.clone())
    work = distributed.all_reduce_sum(y := x.clone() * 2, async_op=True)
    distributed.wait(work, on_cpu=True)
    return distributed.is_distributed(), distributed.world_size(), gathered, summed, y, matrix, scalar


@pytest.mark.ddp
def test_collectives_over_gloo_match_the_reference():
    for is_dist, world, gathered, summed, doubled, matrix, scalar in run_distributed(_collectives_worker, 2):
        assert is_dist and world == 2
        assert torch.equal(gathered, torch.tensor([[0.0, 10.0], [1.0, 11.0]]))
        assert torch.equal(summed, torch.tensor([1.0, 21.0]))
        assert torch.equal(doubled, torch.tensor([2.0, 42.0]))
        assert torch.equal(matrix, torch.stack([torch.zeros(2, 3), torch.ones(2, 3)]))
        assert torch.equal(scalar, torch.tensor([0.5, 1.5]))


def test_cpu_collective_is_polled_until_complete_then_waited(monkeypatch):
    _spin(monkeypatch, 1.0)
    work = FakeWork(polls=5)
    distributed.wait(work, on_cpu=True)
    assert work.polled == 6 and work.waited == 1


def test_polling_stops_at_the_spin_budget_and_falls_back_to_a_blocking_wait(monkeypatch):
    _spin(monkeypatch, 0.005)
    work = FakeWork(polls=None)
    start = time.perf_counter()
    distributed.wait(work, on_cpu=True)
    assert 0.005 <= time.perf_counter() - start < 5.0  # a generous bound: only a stalled machine takes seconds
    assert work.polled > 1 and work.waited == 1


@pytest.mark.parametrize("on_cpu,spin", [(False, 1.0), (True, 0.0)])
def test_accelerator_collectives_and_a_zero_budget_are_never_polled(monkeypatch, on_cpu, spin):
    _spin(monkeypatch, spin)
    work = FakeWork(polls=0)
    distributed.wait(work, on_cpu=on_cpu)
    assert work.polled == 0 and work.waited == 1


def test_waited_handles_are_kept_so_the_backend_thread_never_frees_them(monkeypatch):
    _spin(monkeypatch, 0.0)
    works = [FakeWork(polls=0) for _ in range(distributed._KEPT_WORKS + 3)]
    for work in works:
        distributed.wait(work, on_cpu=True)
    assert list(distributed._kept_works) == works[-distributed._KEPT_WORKS :]  # the newest, bounded


@pytest.mark.parametrize("raw,seconds", [("", 2e-3), ("500", 5e-4), ("0", 0.0), ("12.5", 12.5e-6)])
def test_spin_budget_comes_from_the_environment_in_microseconds(monkeypatch, raw, seconds):
    monkeypatch.setenv("BN_LIGHTNING_SYNC_SPIN_US", raw)
    assert distributed._spin_seconds() == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ["fast", "-1", "nan", "inf"])
def test_invalid_spin_budget_warns_and_uses_the_default(monkeypatch, raw):
    monkeypatch.setenv("BN_LIGHTNING_SYNC_SPIN_US", raw)
    with pytest.warns(RuntimeWarning, match=f"BN_LIGHTNING_SYNC_SPIN_US={raw!r}.*using 2000"):
        assert distributed._spin_seconds() == pytest.approx(2e-3)


# ---------------------------------------------------------------- gloo's event loop at SCHED_IDLE


def test_unknown_policy_is_a_value_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"policy must be one of \('idle', 'normal'\), got 'low'"):
        distributed.set_gloo_event_loop_policy("low")


def _loop_policies() -> list[int]:
    policies = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            if f.read().strip() == "gloo_tcp_loop":
                policies.append(os.sched_getscheduler(int(tid)))
    return policies


def _sync_forward(group=None) -> None:
    B.SyncBatchNorm(3, process_group=group).train()(torch.randn(4, 3, 2, 2))


def _loop_policy_worker(rank, world):
    before = _loop_policies()
    _sync_forward()
    after_sync = _loop_policies()  # the layer changes nothing outside itself
    idled = distributed.set_gloo_event_loop_policy("idle")
    idled_again = distributed.set_gloo_event_loop_policy("idle")
    after_idle = _loop_policies()
    _sync_forward()
    still_idle = _loop_policies()
    restored = distributed.set_gloo_event_loop_policy("normal")
    after_restore = _loop_policies()
    group = dist.new_group([0, 1])  # a group created later starts a loop of its own, at gloo's default
    with_new_group = _loop_policies()
    _sync_forward(group)
    return before, after_sync, idled, idled_again, after_idle, still_idle, restored, after_restore, with_new_group


@linux_only
@pytest.mark.ddp
def test_gloo_event_loop_policy_changes_only_when_asked():
    for result in run_distributed(_loop_policy_worker, 2):
        before, after_sync, idled, idled_again, after_idle, still_idle, restored, after_restore, with_new_group = result
        assert before, "no thread named gloo_tcp_loop: this torch's gloo names its event loop differently"
        assert set(before) == {os.SCHED_OTHER} and set(after_sync) == {os.SCHED_OTHER}
        assert idled == len(before) and idled_again == 0
        assert set(after_idle) == {os.SCHED_IDLE} and set(still_idle) == {os.SCHED_IDLE}
        assert restored == len(before) and set(after_restore) == {os.SCHED_OTHER}
        assert len(with_new_group) > len(before) and set(with_new_group) == {os.SCHED_OTHER}
