"""Deterministic time for tests: :class:`Clock`.

A ``Clock`` starts at 0 and moves only when :meth:`Clock.advance` is called;
calls scheduled with :meth:`Clock.callLater` run, in order of their time, as
the clock passes them. Session logic takes its reactor as a parameter, so
tests drive expiry with a ``Clock`` and never sleep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from lapse.internet.interfaces import BaseDelayedCall

__all__ = ["Clock", "DelayedCall"]


class DelayedCall(BaseDelayedCall):
    """A call scheduled on a :class:`Clock`."""

    def __init__(
        self,
        clock: Clock,
        time: float,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kw: dict[str, Any],
    ) -> None:
        super().__init__(time, func, args, kw)
        self._clock = clock

    def cancel(self) -> None:
        """Unschedule the call; an error if it already ran or was cancelled."""
        self._check_active()
        self.cancelled = True
        self._clock.calls.remove(self)

    def reset(self, secondsFromNow: float) -> None:
        """Reschedule the call to run ``secondsFromNow`` after the clock's now."""
        self._check_active()
        self.time = self._clock.seconds() + secondsFromNow
        self._clock._sort()

    def delay(self, secondsLater: float) -> None:
        """Push the call ``secondsLater`` further into the future."""
        self._check_active()
        self.time += secondsLater
        self._clock._sort()


class Clock:
    """A fake reactor clock: ``seconds()`` moves only by :meth:`advance`."""

    def __init__(self) -> None:
        self.rightNow = 0.0
        self.calls: list[DelayedCall] = []

    def seconds(self) -> float:
        """The clock's current time."""
        return self.rightNow

    def _sort(self) -> None:
        self.calls.sort(key=lambda call: call.time)

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> DelayedCall:
        """Schedule ``callable(*args, **kw)`` to run ``delay`` seconds from now."""
        call = DelayedCall(self, self.rightNow + delay, callable, args, kw)
        self.calls.append(call)
        self._sort()
        return call

    def advance(self, amount: float) -> None:
        """Move time forward by ``amount`` and run every call that is now due.

        Calls run in time order; a call scheduled by a running call for a time
        that has also passed runs in the same advance.
        """
        self.rightNow += amount
        while self.calls and self.calls[0].time <= self.rightNow:
            call = self.calls.pop(0)
            call.called = True
            call.func(*call.args, **call.kw)

    def pump(self, timings: Iterable[float]) -> None:
        """Advance by each amount in ``timings`` in turn."""
        for amount in timings:
            self.advance(amount)

    def __repr__(self) -> str:
        return f"<Clock at {self.rightNow} with {len(self.calls)} pending calls>"
