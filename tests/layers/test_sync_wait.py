"""How SyncBatchNorm waits for its collectives: poll on CPU (bounded), never on accelerators; the spin setting;
gloo's event loop run at SCHED_IDLE (once per group, switchable)."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch
import torch.distributed as dist

import bn_lightning as B
from bn_lightning.layers import sync
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


def test_cpu_collective_is_polled_until_complete_then_waited(monkeypatch):
    monkeypatch.setattr(sync, "_spin_seconds", 1.0)
    work = FakeWork(polls=5)
    sync._wait(work, on_cpu=True)
    assert work.polled == 6 and work.waited == 1


def test_polling_stops_at_the_spin_budget_and_falls_back_to_a_blocking_wait(monkeypatch):
    monkeypatch.setattr(sync, "_spin_seconds", 0.005)
    work = FakeWork(polls=None)
    start = time.perf_counter()
    sync._wait(work, on_cpu=True)
    assert 0.005 <= time.perf_counter() - start < 0.5
    assert work.polled > 1 and work.waited == 1


@pytest.mark.parametrize("on_cpu,spin", [(False, 1.0), (True, 0.0)])
def test_accelerator_collectives_and_a_zero_budget_are_never_polled(monkeypatch, on_cpu, spin):
    monkeypatch.setattr(sync, "_spin_seconds", spin)
    work = FakeWork(polls=0)
    sync._wait(work, on_cpu=on_cpu)
    assert work.polled == 0 and work.waited == 1


def test_waited_handles_are_kept_so_the_backend_thread_never_frees_them(monkeypatch):
    monkeypatch.setattr(sync, "_spin_seconds", 0.0)
    works = [FakeWork(polls=0) for _ in range(sync._KEPT_WORKS + 3)]
    for work in works:
        sync._wait(work, on_cpu=True)
    assert list(sync._kept_works) == works[-sync._KEPT_WORKS :]  # the newest, bounded


@pytest.mark.parametrize("raw,seconds", [("", 2e-3), ("500", 5e-4), ("0", 0.0), ("12.5", 12.5e-6)])
def test_spin_budget_comes_from_the_environment_in_microseconds(monkeypatch, raw, seconds):
    monkeypatch.setenv("BN_LIGHTNING_SYNC_SPIN_US", raw)
    assert sync._spin_seconds_from_env() == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ["fast", "-1", "nan", "inf"])
def test_invalid_spin_budget_warns_and_uses_the_default(monkeypatch, raw):
    monkeypatch.setenv("BN_LIGHTNING_SYNC_SPIN_US", raw)
    with pytest.warns(RuntimeWarning, match=f"BN_LIGHTNING_SYNC_SPIN_US={raw!r}.*using 2000"):
        assert sync._spin_seconds_from_env() == pytest.approx(2e-3)


# ---------------------------------------------------------------- gloo's event loop at SCHED_IDLE


@pytest.mark.parametrize("raw,enabled", [("", True), ("1", True), (" 1 ", True), ("0", False)])
def test_idle_loop_setting_comes_from_the_environment(monkeypatch, raw, enabled):
    monkeypatch.setenv("BN_LIGHTNING_GLOO_IDLE_LOOP", raw)
    assert sync._idle_loop_from_env() is enabled


def test_invalid_idle_loop_setting_warns_and_keeps_it_on(monkeypatch):
    monkeypatch.setenv("BN_LIGHTNING_GLOO_IDLE_LOOP", "yes")
    with pytest.warns(RuntimeWarning, match="BN_LIGHTNING_GLOO_IDLE_LOOP='yes' is not 0 or 1; using 1"):
        assert sync._idle_loop_from_env() is True


def test_unknown_policy_is_a_value_error_naming_the_choices():
    with pytest.raises(ValueError, match=r"policy must be one of \('idle', 'normal'\), got 'low'"):
        sync.set_gloo_event_loop_policy("low")


def _loop_policies() -> list[int]:
    policies = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            if f.read().strip() == "gloo_tcp_loop":
                policies.append(os.sched_getscheduler(int(tid)))
    return policies


def _sync_forward(group=None) -> None:
    B.SyncBatchNorm(3, process_group=group).train()(torch.randn(4, 3, 2, 2))


def _idle_loop_worker(rank, world):
    before = _loop_policies()
    _sync_forward()
    after_first = _loop_policies()
    restored = sync.set_gloo_event_loop_policy("normal")
    again = sync.set_gloo_event_loop_policy("normal")
    _sync_forward()  # once per group: a later step leaves the user's choice alone
    after_restore = _loop_policies()
    # a group created later starts a loop of its own, idled on the first collective over that group
    sync.set_gloo_event_loop_policy("idle")
    group = dist.new_group([0, 1])
    with_new_group = _loop_policies()
    _sync_forward(group)
    return before, after_first, restored, again, after_restore, with_new_group, _loop_policies()


@linux_only
@pytest.mark.ddp
def test_first_sync_collective_over_a_group_idles_its_gloo_event_loop():
    for before, after_first, restored, again, after_restore, with_new_group, last in run_distributed(
        _idle_loop_worker, 2
    ):
        assert before, "no thread named gloo_tcp_loop: this torch's gloo names its event loop differently"
        assert set(before) == {os.SCHED_OTHER}  # it starts at gloo's default policy
        assert set(after_first) == {os.SCHED_IDLE}
        assert restored == len(after_first) and again == 0
        assert set(after_restore) == {os.SCHED_OTHER}
        assert len(with_new_group) > len(after_first) and os.SCHED_OTHER in with_new_group
        assert len(last) == len(with_new_group) and set(last) == {os.SCHED_IDLE}


def _policies_after_sync(rank, world):
    _sync_forward()
    return _loop_policies()


@linux_only
@pytest.mark.ddp
def test_idle_loop_off_leaves_gloo_alone(monkeypatch):
    monkeypatch.setenv("BN_LIGHTNING_GLOO_IDLE_LOOP", "0")  # the spawned ranks inherit it
    for policies in run_distributed(_policies_after_sync, 2):
        assert policies and set(policies) == {os.SCHED_OTHER}
