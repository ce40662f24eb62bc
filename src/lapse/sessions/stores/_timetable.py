"""The memory store's timetable: which live record ends next, without a
timer or a heap entry per session (see :mod:`lapse.sessions.stores.memory`).

A record ends at ``lastModified + sessionTimeout`` (store time), or at its
absolute end (``_ends_at``: start + ``absolute_timeout``) if that comes
first. Due records are found so:

- Records are queued, one FIFO per timeout, when they begin to be checked.
  Each begins at "now", so a queue is in deadline order: only its front is
  ever looked at. A touch only sets ``lastModified`` and marks the record
  touched; it allocates nothing and moves nothing.
- A touched record reaching the front of its queue moves to a heap, keyed by
  its deadline then; so does a record whose timeout changed, and one whose
  absolute end comes before its first idle deadline. A heap entry that is
  not its record's current one is dropped when it surfaces.

A record's ``_state`` says where it is: None (not checked by this store),
its ``_Queue`` (queued, untouched: its deadline is exact), that queue's
``_Touched`` marker, a float (the key of its heap entry, the very object in
the entry), or ``_GONE`` (ended). A record ended before its queue entry
reaches the front (a logout) stays referenced by that entry until then, at
most one timeout.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any, Protocol

__all__ = ["Record", "RecordFactory", "Timetable"]


# Slack when comparing a deadline with the clock, so that a timer that fires
# at its deadline rounded down by one ulp still finds the session due.
_EPSILON = 1e-6

# Distinct timeouts get a queue each, up to this many; sessions of further
# timeouts go to the heap (still correct, a little more memory).
_MAX_QUEUES = 16

_GONE = object()
"""The state of an ended record."""


class Record(Protocol):
    """What the memory store keeps of a live session (a ``Session`` is one)."""

    uid: str
    sessionTimeout: float
    absolute_timeout: float | None
    _lastModified: float
    _created: float
    _state: object
    _ends_at: float | None
    _principal: str | None

    def _store_values(self) -> dict[str, Any]:
        """The session's data dict (made empty if it has none yet)."""
        ...

    def _peek_values(self) -> dict[str, Any] | None:
        """The session's data dict, or None if it has none yet."""
        ...


RecordFactory = Callable[[str, float, Mapping[str, Any]], Record]
"""Makes the record of a session created through the store API: uid,
timeout, data."""


class _Live:
    """A record of the store's own, when it is used without a site."""

    __slots__ = (
        "_created",
        "_ends_at",
        "_lastModified",
        "_principal",
        "_state",
        "_values",
        "sessionTimeout",
        "uid",
    )

    absolute_timeout: float | None = None

    def __init__(self, uid: str, timeout: float, values: dict[str, Any] | None) -> None:
        self.uid = uid
        self.sessionTimeout = timeout
        self._lastModified = self._created = 0.0
        self._state: object = None
        self._ends_at: float | None = None
        self._principal: str | None = None
        self._values = values

    def _store_values(self) -> dict[str, Any]:
        values = self._values
        if values is None:
            values = self._values = {}
        return values

    def _peek_values(self) -> dict[str, Any] | None:
        return self._values


def _make_live(uid: str, timeout: float, data: Mapping[str, Any]) -> Record:
    return _Live(uid, timeout, dict(data) if data else None)


def _deadline(record: Record) -> float:
    """When ``record`` ends: its idle deadline, or its absolute end if earlier."""
    deadline = record._lastModified + record.sessionTimeout
    ends = record._ends_at
    return deadline if ends is None or deadline <= ends else ends


def _cause(record: Record) -> str:
    """Why ``record``, now past its deadline, ended."""
    ends = record._ends_at
    if ends is not None and ends <= record._lastModified + record.sessionTimeout:
        return "lifetime"
    return "timeout"


class _Queue:
    """The records of one timeout, in the order they began to be checked."""

    __slots__ = ("entries", "last", "timeout", "touched")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.entries: deque[Record] = deque()
        self.last = -math.inf
        """The deadline of the last record queued."""
        self.touched = _Touched(self)


class _Touched:
    """The state of a queued record touched since it was queued."""

    __slots__ = ("queue",)

    def __init__(self, queue: _Queue) -> None:
        self.queue = queue


class _Ended:
    __slots__ = ("attempt", "cause", "delivery_id", "lease_until", "owner", "record")

    def __init__(self, record: Record, cause: str) -> None:
        self.record = record
        self.cause = cause
        self.delivery_id = ""
        self.attempt = 0
        self.lease_until = 0.0
        self.owner = ""


class Timetable:
    """Live records in a dict, and the queues and heap that say which ends
    next (the scheduling half of :class:`~lapse.sessions.stores.memory.MemoryStore`)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._live: MutableMapping[str, Record] = {}
        self._make: RecordFactory = _make_live
        self._wake: Callable[[float], None] | None = None
        self._queues: dict[float, _Queue] = {}
        self._heap: list[tuple[float, str]] = []
        self._ended: dict[str, _Ended] = {}
        # Old uid -> (the rotated record, end of grace), oldest first.
        self._aliases: dict[str, tuple[Record, float]] = {}
        self.evicted = False
        """Whether records were evicted since the last claim (the site's
        keeper then claims them at once)."""
        self._budget = math.inf
        """Records :meth:`_collect_due` may still look at in this call (an
        end, or a touched record moved to the heap, is one each)."""
        self._more_due = False
        """Whether :meth:`_collect_due` stopped on its budget: there may be
        more to do now."""

    # -- scheduling ----------------------------------------------------------

    def _schedule(self, record: Record, now: float, lifetime: float | None) -> float:
        """Begin checking ``record`` from ``now`` (ending ``lifetime`` from
        now at the latest, if given); its deadline."""
        record._lastModified = record._created = now
        timeout = record.sessionTimeout
        deadline = now + timeout
        if lifetime is not None:
            ends = record._ends_at = now + lifetime
            if ends < deadline:
                deadline = ends
        queues = self._queues
        queue = queues.get(timeout)
        if queue is None and len(queues) < _MAX_QUEUES:
            queue = queues[timeout] = _Queue(timeout)
        if queue is None or deadline < queue.last or deadline < now + timeout:
            # (or the clock went back, or the absolute end comes first)
            self._push(record, deadline)
        else:
            queue.last = deadline
            queue.entries.append(record)
            record._state = queue
        if self._wake is not None:
            self._wake(deadline)
        return deadline

    def _push(self, record: Record, when: float) -> None:
        record._state = when
        heapq.heappush(self._heap, (when, record.uid))

    def _touch(self, record: Record) -> None:
        """``record._lastModified`` was just set: note it, in O(1).

        A queued record is only marked; a timeout that changed (or a heap
        entry later than the new deadline) gets a heap entry now.
        """
        state = record._state
        if type(state) is _Queue:
            if record.sessionTimeout == state.timeout:
                record._state = state.touched
                return
        elif type(state) is _Touched:
            if record.sessionTimeout == state.queue.timeout:
                return
        elif type(state) is not float:
            return  # not checked here, or ended
        deadline = _deadline(record)
        if type(state) is not float or deadline < state:
            self._push(record, deadline)
            if self._wake is not None:
                self._wake(deadline)

    def _front(self, queue: _Queue) -> Record | None:
        """The first record of ``queue`` whose deadline is exact; touched
        records before it move to the heap, stale entries are dropped."""
        entries = queue.entries
        live = self._live
        while entries:
            record = entries[0]
            state = record._state
            if state is queue or state is queue.touched:
                if live.get(record.uid) is not record:
                    record._state = None  # taken out of the live dict by hand
                elif state is queue and record.sessionTimeout == queue.timeout:
                    return record
                elif self._budget <= 0:
                    return None  # (entries left: the caller stops, see _collect_due)
                else:
                    self._budget -= 1
                    self._push(record, _deadline(record))
            entries.popleft()
        return None

    def _heap_front(self) -> tuple[float, Record] | None:
        heap = self._heap
        live = self._live
        while heap:
            when, uid = heap[0]
            record = live.get(uid)
            if record is not None and record._state is when:
                return when, record
            heapq.heappop(heap)
        return None

    def _earliest(self) -> tuple[float, Record, _Queue | None] | None:
        """The record to look at next, with its key and its queue (None: the
        heap's). Nothing live ends before that key."""
        best: tuple[float, Record, _Queue | None] | None = None
        queues = self._queues
        for timeout, queue in list(queues.items()):
            record = self._front(queue)
            if record is None:
                if not queue.entries:
                    del queues[timeout]
                continue
            key = record._lastModified + queue.timeout
            if best is None or key < best[0]:
                best = (key, record, queue)
        top = self._heap_front()
        if top is not None and (best is None or top[0] < best[0]):
            best = (top[0], top[1], None)
        return best

    def _collect_due(self, now: float, limit: int) -> None:
        """End the records due by ``now``, in deadline order, looking at
        ``limit`` records at most (an end, or a touched record moved to its
        later deadline, is one each). If it stops on that budget, the rest
        stay due (:meth:`_get` no longer serves them; the next call ends them
        first) and :attr:`_more_due` says so."""
        self._budget = limit
        self._more_due = False
        try:
            while True:
                earliest = self._earliest()
                if self._budget <= 0:
                    self._more_due = True
                    return
                if earliest is None or earliest[0] > now:
                    return
                _, record, queue = earliest
                if queue is None:
                    heapq.heappop(self._heap)
                else:
                    queue.entries.popleft()
                self._budget -= 1
                deadline = _deadline(record)
                if deadline <= now:
                    self._end(record, _cause(record))
                else:
                    self._push(record, deadline)  # touched since its entry
                if queue is not None and len(self._queues) == 1 and not self._heap:
                    self._end_run(queue, now)
        finally:
            self._budget = math.inf

    def _end_run(self, queue: _Queue, now: float) -> None:
        """End the due records at the front of ``queue``, the only place
        records wait (one timeout, nothing in the heap), so its order is the
        deadline order: without looking for the earliest again for each.
        It stops at the first record that is not plainly due there (touched,
        stale, of another timeout, not due yet) or on the budget, and leaves
        that record to :meth:`_earliest`."""
        entries = queue.entries
        live = self._live
        timeout = queue.timeout
        budget = self._budget
        while entries and budget > 0:
            record = entries[0]
            if (
                record._state is not queue
                or record.sessionTimeout != timeout
                or live.get(record.uid) is not record
            ):
                break
            deadline = _deadline(record)
            if deadline > now:
                break
            entries.popleft()
            budget -= 1
            self._end(record, _cause(record))
        self._budget = budget

    def _evict(self, count: int) -> None:
        """End the ``count`` live records with the earliest deadlines."""
        while count > 0:
            earliest = self._earliest()
            if earliest is None:
                return
            key, record, queue = earliest
            if queue is None:
                heapq.heappop(self._heap)
                deadline = _deadline(record)
                if deadline > key:
                    self._push(record, deadline)  # touched since its entry
                    continue
            else:
                queue.entries.popleft()
            self._end(record, "evicted")
            self.evicted = True
            count -= 1

    def _prune_aliases(self, now: float) -> None:
        aliases = self._aliases
        while aliases:
            first = next(iter(aliases))
            if aliases[first][1] > now:
                return
            del aliases[first]

    def _end(self, record: Record, cause: str) -> None:
        uid = record.uid
        live = self._live
        if live.get(uid) is record:
            del live[uid]
        record._state = _GONE
        self._ended[uid] = _Ended(record, cause)

    def _get(self, uid: str, now: float) -> Record | None:
        """The record of the live session ``uid``, if its deadline is ahead."""
        record: Record | None = self._live.get(uid)
        if record is None:
            return None
        state = record._state
        if state is None or state is _GONE:
            return None
        if record._lastModified + record.sessionTimeout <= now + _EPSILON:
            return None
        ends = record._ends_at
        if ends is not None and ends <= now + _EPSILON:
            return None
        return record

    def _alias(self, uid: str, now: float) -> Record | None:
        """The live record ``uid`` was rotated away from, within its grace."""
        entry = self._aliases.get(uid)
        if entry is None:
            return None
        record, until = entry
        if until <= now:
            del self._aliases[uid]
            return None
        if self._get(record.uid, now) is not record:
            return None
        return record

    def _ending_by(self, limit: float) -> Iterable[tuple[float, Record]]:
        """Each live record whose deadline is at most ``limit``, once, with
        that deadline, in no order; without touching any.

        Only what can end by then is looked at: the front of each queue (up
        to its first exact entry past ``limit``) and the heap entries keyed
        at most ``limit`` (a record's deadline is never before its key).
        """
        live = self._live
        for queue in self._queues.values():
            touched = queue.touched
            for record in queue.entries:
                state = record._state
                if state is queue:
                    if record._lastModified + queue.timeout > limit:
                        break
                elif state is not touched:
                    continue
                deadline = _deadline(record)
                if deadline <= limit and live.get(record.uid) is record:
                    yield deadline, record
        heap = self._heap
        stack = [0] if heap else []
        while stack:
            i = stack.pop()
            when, uid = heap[i]
            if when > limit:
                continue  # (and so are its children's keys)
            entry = live.get(uid)
            if entry is not None and entry._state is when:
                deadline = _deadline(entry)
                if deadline <= limit:
                    yield deadline, entry
            stack.extend(child for child in (2 * i + 1, 2 * i + 2) if child < len(heap))
