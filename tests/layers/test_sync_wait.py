"""How SyncBatchNorm waits for its collectives: poll on CPU (bounded), never on accelerators; the spin setting."""

from __future__ import annotations

import time

import pytest

from bn_lightning.layers import sync


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


@pytest.mark.parametrize("raw,seconds", [("", 2e-3), ("500", 5e-4), ("0", 0.0), ("12.5", 12.5e-6)])
def test_spin_budget_comes_from_the_environment_in_microseconds(monkeypatch, raw, seconds):
    monkeypatch.setenv("BN_LIGHTNING_SYNC_SPIN_US", raw)
    assert sync._spin_seconds_from_env() == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ["fast", "-1", "nan", "inf"])
def test_invalid_spin_budget_warns_and_uses_the_default(monkeypatch, raw):
    monkeypatch.setenv("BN_LIGHTNING_SYNC_SPIN_US", raw)
    with pytest.warns(RuntimeWarning, match=f"BN_LIGHTNING_SYNC_SPIN_US={raw!r}.*using 2000"):
        assert sync._spin_seconds_from_env() == pytest.approx(2e-3)
