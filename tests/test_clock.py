"""The test Clock: deterministic time and delayed calls."""

from __future__ import annotations

import pytest

from lapse.internet.interfaces import AlreadyCalled, AlreadyCancelled
from lapse.internet.task import Clock


def test_seconds_moves_only_on_advance() -> None:
    """A new Clock reads 0 and moves exactly by advance()."""
    clock = Clock()
    assert clock.seconds() == 0
    clock.advance(2.5)
    assert clock.seconds() == 2.5


def test_calls_run_in_time_order_when_due() -> None:
    """Calls run when the clock passes their time, earliest first, with arguments."""
    clock = Clock()
    runs: list[str] = []
    clock.callLater(2, runs.append, "two")
    clock.callLater(1, runs.append, "one")
    clock.advance(0.5)
    assert runs == []
    clock.advance(1.5)
    assert runs == ["one", "two"]
    assert not clock.calls


def test_call_scheduled_by_call_runs_in_same_advance_if_due() -> None:
    """A call scheduled by a running call for an already-passed time runs in that advance."""
    clock = Clock()
    runs: list[int] = []
    clock.callLater(1, lambda: clock.callLater(0, runs.append, 1))
    clock.advance(1)
    assert runs == [1]


def test_delayed_call_handle() -> None:
    """getTime, reset, delay, cancel and active behave as Twisted's IDelayedCall."""
    clock = Clock()
    runs: list[int] = []
    call = clock.callLater(5, runs.append, 1)
    assert call.getTime() == 5 and call.active()
    call.delay(2)
    assert call.getTime() == 7
    clock.advance(1)
    call.reset(1)
    assert call.getTime() == 2
    clock.advance(1)
    assert runs == [1] and not call.active()
    with pytest.raises(AlreadyCalled):
        call.cancel()
    other = clock.callLater(1, runs.append, 2)
    other.cancel()
    assert not clock.calls
    with pytest.raises(AlreadyCancelled):
        other.reset(1)
    clock.advance(5)
    assert runs == [1]


def test_pump_advances_step_by_step() -> None:
    """pump() advances by each amount in turn."""
    clock = Clock()
    seen: list[float] = []
    clock.callLater(1, lambda: seen.append(clock.seconds()))
    clock.callLater(3, lambda: seen.append(clock.seconds()))
    clock.pump([1, 1, 1])
    assert seen == [1, 3]
