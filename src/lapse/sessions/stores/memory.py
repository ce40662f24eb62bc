"""The memory store: sessions in this process's memory (the default).

It keeps Twisted's semantics: nothing survives a restart and no other process
sees the sessions. It implements the whole store protocol, and also offers
the same operations synchronously (``*_now``), which the site uses so that
expiry on a fake ``Clock`` happens inside ``clock.advance()``.

Due sessions are found with a lazy heap: an entry ``(deadline, uid)`` is
pushed when a session is created and when a session found due at its entry
turns out to have been touched meanwhile; a touch itself only writes the
deadline. An entry that no longer matches its session is dropped when popped.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lapse.sessions.store import Expiry, StoredSession

__all__ = ["MemoryStore"]

# Slack when comparing a deadline with the clock, so that a timer that fires
# at its deadline rounded down by one ulp still finds the session due.
_EPSILON = 1e-6


@dataclass(slots=True)
class _Live(StoredSession):
    scheduled: float = 0.0
    """The time of this session's current heap entry."""


@dataclass(slots=True)
class _Ended:
    data: dict[str, Any]
    cause: str
    delivery_id: str = ""
    attempt: int = 0
    lease_until: float = 0.0


class MemoryStore:
    """Live sessions in a dict, due ones found through a heap."""

    url = "memory:"
    shared = False

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.clock: Callable[[], float] = clock or time.time
        self._live: dict[str, _Live] = {}
        self._heap: list[tuple[float, str]] = []
        self._ended: dict[str, _Ended] = {}
        self._events: list[str] = []
        self._events_base = 0
        self._deliveries = itertools.count(1)

    def __len__(self) -> int:
        return len(self._live)

    # -- synchronous operations ------------------------------------------

    def _push(self, session: _Live, when: float) -> None:
        session.scheduled = when
        heapq.heappush(self._heap, (when, session.uid))

    def load_now(self, uid: str) -> _Live | None:
        session = self._live.get(uid)
        if session is None:
            return None
        now = self.clock()
        if session.deadline <= now + _EPSILON:
            return None
        session.deadline = now + session.timeout
        return session

    def touch_now(self, uid: str, timeout: float | None = None) -> float | None:
        """Move a live session's deadline to now + timeout (its own, or
        ``timeout`` from now on); the new deadline.

        A deadline that moves earlier than the session's heap entry (its
        timeout shrank) gets a new entry.
        """
        if timeout is not None:
            live = self._live.get(uid)
            if live is not None:
                live.timeout = timeout
        session = self.load_now(uid)
        if session is None:
            return None
        if session.deadline < session.scheduled:
            self._push(session, session.deadline)
        return session.deadline

    def create_now(self, uid: str, timeout: float, data: Mapping[str, Any]) -> StoredSession:
        deadline = self.clock() + timeout
        session = self._live[uid] = _Live(uid, timeout, deadline, dict(data))
        self._push(session, deadline)
        return session

    def save_now(self, uid: str, changed: Mapping[str, Any], removed: Iterable[str]) -> bool:
        session = self._live.get(uid)
        if session is None or session.deadline <= self.clock() + _EPSILON:
            return False
        data = session.data
        data.update(changed)
        for key in removed:
            data.pop(key, None)
        return True

    def knows(self, uid: str) -> bool:
        """Whether ``uid`` is here at all, live or ended but not yet claimed."""
        return uid in self._live or uid in self._ended

    def exists_now(self, uid: str) -> bool:
        session = self._live.get(uid)
        return session is not None and session.deadline > self.clock() + _EPSILON

    def _end(self, uid: str, cause: str) -> None:
        session = self._live.pop(uid)
        self._ended[uid] = _Ended(session.data, cause)

    def expire_now(self, uid: str) -> bool:
        if not self.exists_now(uid):
            return False
        self._end(uid, "expired")
        return True

    def _collect_due(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, uid = heapq.heappop(heap)
            session = self._live.get(uid)
            if session is None or session.scheduled != when:
                continue  # stale: ended, or rescheduled earlier
            if session.deadline <= now:
                self._end(uid, "timeout")
            else:
                self._push(session, session.deadline)

    def claim_now(self, owner: str, lease: float, limit: int) -> list[Expiry]:
        now = self.clock() + _EPSILON
        self._collect_due(now)
        claims: list[Expiry] = []
        for uid, ended in self._ended.items():
            if len(claims) >= limit:
                break
            if ended.attempt and ended.lease_until > now:
                continue
            if not ended.delivery_id:
                ended.delivery_id = f"{uid}:{next(self._deliveries)}"
            ended.attempt += 1
            ended.lease_until = now + lease
            claims.append(Expiry(uid, ended.data, ended.delivery_id, ended.attempt, ended.cause))
        return claims

    def ack_now(self, expiry: Expiry) -> None:
        ended = self._ended.get(expiry.uid)
        if ended is None or ended.delivery_id != expiry.delivery_id:
            return
        del self._ended[expiry.uid]
        self._events.append(expiry.uid)
        if len(self._events) > 100_000:
            drop = len(self._events) // 2
            del self._events[:drop]
            self._events_base += drop

    def events_now(self, cursor: str | None) -> tuple[list[str], str]:
        end = self._events_base + len(self._events)
        if cursor is None:
            return [], str(end)
        start = max(int(cursor), self._events_base)
        return self._events[start - self._events_base :], str(end)

    def next_deadline_now(self) -> float | None:
        heap = self._heap
        while heap:
            when, uid = heap[0]
            live = self._live.get(uid)
            if live is not None and live.scheduled == when:
                break
            heapq.heappop(heap)
        candidates = [heap[0][0]] if heap else []
        for ended in self._ended.values():
            candidates.append(ended.lease_until if ended.attempt else self.clock())
        return min(candidates) if candidates else None

    # -- the async protocol -----------------------------------------------

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def now(self) -> float:
        return self.clock()

    async def load(self, uid: str) -> StoredSession | None:
        return self.load_now(uid)

    async def create(self, uid: str, timeout: float, data: Mapping[str, Any]) -> float:
        return self.create_now(uid, timeout, data).deadline

    async def save(self, uid: str, changed: Mapping[str, Any], removed: Iterable[str]) -> bool:
        return self.save_now(uid, changed, removed)

    async def exists(self, uid: str) -> bool:
        return self.exists_now(uid)

    async def expire(self, uid: str) -> bool:
        return self.expire_now(uid)

    async def claim(self, owner: str, lease: float, limit: int) -> list[Expiry]:
        return self.claim_now(owner, lease, limit)

    async def ack(self, expiry: Expiry) -> None:
        self.ack_now(expiry)

    async def events(self, cursor: str | None) -> tuple[list[str], str]:
        return self.events_now(cursor)

    async def next_deadline(self) -> float | None:
        return self.next_deadline_now()

    def __repr__(self) -> str:
        return f"<MemoryStore {len(self._live)} live, {len(self._ended)} ended>"
