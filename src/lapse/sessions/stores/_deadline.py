"""A time bound on a store call that does not count time the event loop
itself was held.

``asyncio.timeout`` measures the loop's clock, so a page that blocks the loop
for two seconds makes every store call in flight "time out", although the
store answered in a millisecond: the reply sits in the socket while nothing
reads it, and when the loop runs again the timer is handled in the same
turn, before the task that would take the reply. Such a request would get a
503 for the application's own stall.

:func:`bounded` is the same bound with two differences:

- it counts only the time the loop was free to run the call. The bound is
  measured in :data:`STEPS` steps, each a timer: a step whose timer rings
  more than :data:`HELD` late saw the loop held, and none of it is counted
  (whenever the hold began, also just before the deadline: a timer's
  lateness alone would give back only the part of a hold past it);
- when the last step rings on time, the call is cancelled one turn later
  (``call_soon``), so a reply that arrived in the same turn is taken first.

A call that ends early (nearly all of them) sets one timer and cancels it,
as ``asyncio.timeout`` does.

A store that is really stuck still fails within the bound (plus the loop's
own holds): the server is not answering, whatever the loop does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["HELD", "STEPS", "bounded"]

HELD = 0.05
"""Seconds late a timer may ring before the loop counts as held."""

STEPS = 4
"""Steps the bound is counted in (a step the loop was held in counts nothing)."""


@asynccontextmanager
async def bounded(seconds: float) -> AsyncIterator[None]:
    """Raise TimeoutError in the body if it runs past ``seconds`` of time the
    loop was free to run it (see the module's docstring)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None, "bounded() runs inside a task"
    state = _Bound(loop, task, seconds)
    try:
        yield
    except BaseException as exc:
        state.close()
        if state.fired and task.uncancel() == state.cancelling:
            # Our cancel (not someone else's) ended the body, whatever the
            # driver made of it.
            raise TimeoutError(f"no answer within {seconds:g} s") from exc
        raise
    else:
        state.close()
        if state.fired:  # (the body swallowed our cancel: take it back)
            task.uncancel()


class _Bound:
    __slots__ = ("cancelling", "done", "fired", "handle", "left", "loop", "since", "step", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[object], seconds: float):
        self.loop = loop
        self.task = task
        self.cancelling = task.cancelling()
        self.done = False
        self.fired = False
        self.left = seconds  # free time the call may still run
        self.step = seconds / STEPS
        self.since = loop.time()
        self.handle: asyncio.Handle = loop.call_at(self.since + self.step, self._ring)

    def _ring(self) -> None:
        now = self.loop.time()
        ran, self.since = now - self.since, now
        step = min(self.step, self.left)
        if ran - step <= HELD:
            self.left -= ran
        # (else the loop was held in this step: none of it counts)
        if self.left > 0:
            self.handle = self.loop.call_at(now + min(self.step, self.left), self._ring)
        else:
            self.handle = self.loop.call_soon(self._fire)

    def _fire(self) -> None:
        if not self.done:
            self.fired = True
            self.task.cancel()

    def close(self) -> None:
        self.done = True
        self.handle.cancel()
