"""A time bound on a store call that does not count time the event loop
itself was held.

``asyncio.timeout`` measures the loop's clock, so a page that blocks the loop
for two seconds makes every store call in flight "time out", although the
store answered in a millisecond: the reply sits in the socket while nothing
reads it, and when the loop runs again the timer is handled in the same
turn, before the task that would take the reply. Such a request would get a
503 for the application's own stall.

:func:`bounded` is the same bound with two differences:

- when its timer rings late (the loop was held past the deadline by more
  than :data:`HELD`), the call is given the time the loop was held back, up
  to the whole bound again, and the timer set anew;
- when it rings on time, the call is cancelled one turn later
  (``call_soon``), so a reply that arrived in the same turn is taken first.

A store that is really stuck still fails within the bound (plus the loop's
own holds): the server is not answering, whatever the loop does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["HELD", "bounded"]

HELD = 0.05
"""Seconds late a timer may ring before the loop counts as held."""


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
    __slots__ = ("cancelling", "deadline", "done", "fired", "handle", "loop", "seconds", "task")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[object], seconds: float):
        self.loop = loop
        self.task = task
        self.seconds = seconds
        self.cancelling = task.cancelling()
        self.deadline = loop.time() + seconds
        self.done = False
        self.fired = False
        self.handle: asyncio.Handle = loop.call_at(self.deadline, self._ring)

    def _ring(self) -> None:
        now = self.loop.time()
        late = now - self.deadline
        if late > HELD:
            # The loop was held: give the call back the time it lost.
            self.deadline = now + min(late, self.seconds)
            self.handle = self.loop.call_at(self.deadline, self._ring)
            return
        self.handle = self.loop.call_soon(self._fire)

    def _fire(self) -> None:
        if not self.done:
            self.fired = True
            self.task.cancel()

    def close(self) -> None:
        self.done = True
        self.handle.cancel()
