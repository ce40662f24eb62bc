"""The expiry engine: one timer per owner and reactor, however many sessions.

Invariants, which the tests hold it to:

1. A touch only sets ``session.lastModified``: it is O(1) and arms no timer.
   (A touch that would move a deadline *earlier* than the session's heap
   entry, possible only when ``sessionTimeout`` shrinks on a live session,
   adds a new entry; the old one is recognised as stale and dropped.)
2. Every checked session has exactly one current entry ``(when, uid)`` in the
   heap, with ``when == session._scheduled`` and ``when`` no later than its
   deadline. Entries that do not match their session are stale.
3. At most one timer is armed, for the earliest entry. When it fires, due
   entries are popped: a session whose deadline has passed expires; one that
   was touched meanwhile gets a new entry at its current deadline.
4. When the last checked session leaves, the heap is emptied and the timer
   cancelled: no call is left behind on the reactor.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from lapse.internet.interfaces import IDelayedCall, IReactorTime

if TYPE_CHECKING:
    from lapse.sessions._session import Session

__all__ = ["ExpiryEngine"]

# Floating-point slack when comparing a deadline with the clock, so that a
# timer that fires at its deadline rounded down by one ulp still expires.
_EPSILON = 1e-6


class ExpiryEngine:
    """Expires the sessions of one owner on one reactor, on time."""

    def __init__(self, sessions: Mapping[str, Session], reactor: IReactorTime) -> None:
        self._sessions = sessions
        self._reactor = reactor
        self._heap: list[tuple[float, str]] = []
        self._timer: IDelayedCall | None = None
        self._timer_when = math.inf
        self._count = 0

    def __len__(self) -> int:
        """How many sessions this engine is checking."""
        return self._count

    def add(self, session: Session) -> None:
        """Start checking ``session`` (idempotent)."""
        if session._engine is self:
            return
        session._engine = self
        self._count += 1
        self._push(session, session.lastModified + session.sessionTimeout)

    def reschedule(self, session: Session, when: float) -> None:
        """Check ``session`` at ``when``, earlier than its current entry."""
        self._push(session, when)

    def discard(self, session: Session) -> None:
        """Stop checking ``session``; the last one out cancels the timer."""
        if session._engine is not self:
            return
        session._engine = None
        self._count -= 1
        if self._count == 0:
            self._heap.clear()
            self._disarm()

    def _push(self, session: Session, when: float) -> None:
        session._scheduled = when
        heapq.heappush(self._heap, (when, session.uid))
        if when < self._timer_when:
            self._arm(when)

    def _arm(self, when: float) -> None:
        delay = max(0.0, when - self._reactor.seconds())
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(delay)
        else:
            self._timer = self._reactor.callLater(delay, self._fire)
        self._timer_when = when

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._timer_when = math.inf

    def _fire(self) -> None:
        self._timer = None
        self._timer_when = math.inf
        heap = self._heap
        now = self._reactor.seconds() + _EPSILON
        while heap and heap[0][0] <= now:
            when, uid = heapq.heappop(heap)
            session = self._sessions.get(uid)
            if session is None or session._engine is not self or session._scheduled != when:
                continue  # stale: expired, or rescheduled earlier
            deadline = session.lastModified + session.sessionTimeout
            if deadline <= now:
                session.expire()
            else:
                session._scheduled = deadline
                heapq.heappush(heap, (deadline, uid))
        if heap and heap[0][0] < self._timer_when:
            self._arm(heap[0][0])

    def __repr__(self) -> str:
        return f"<ExpiryEngine checking {self._count} sessions, {len(self._heap)} entries>"
