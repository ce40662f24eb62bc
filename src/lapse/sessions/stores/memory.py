"""The memory store: sessions in this process's memory (the default).

It keeps Twisted's semantics: nothing survives a restart and no other process
sees the sessions. It implements the whole store protocol, and also offers
the same operations synchronously (``*_now``, the
:class:`~lapse.sessions.store.LocalSessionStore` interface, declared by
``holds_sessions = True``), which the site's keeper uses so that expiry on a
fake ``Clock`` happens inside ``clock.advance()``.

A live session is one record, and nothing else. Used by a site, the store is
*bound* to it (:meth:`MemoryStore.bind`): its records are the site's
``Session`` objects and its dict of live sessions is ``site.sessions``, so a
session costs one dict entry, one object and its ``lastModified``. Used
alone (tests, tools), its records are small objects of its own. Which record
ends next is the timetable's business (:mod:`._timetable`: per-timeout
queues and a heap, O(1) per touch).

Rotation (:meth:`MemoryStore.rotate_record_now`) re-keys a record in the
live dict (and its heap entry, if it has one; queue entries are the records
themselves) and keeps its old uid as an alias, for ``load`` only, until the
grace ends. With ``max_live`` set, starting a record beyond that many live
ones first ends the live record with the earliest deadline (cause
``"evicted"``), found as expiry finds due records: amortised O(log n).

Principals are indexed by :class:`~._principal_table.PrincipalTable`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from typing import Any

from lapse.sessions.store import (
    Expiry,
    SessionInfo,
    StoreConfigError,
    StoredSession,
    _histogram,
)
from lapse.sessions.stores._principal_table import PrincipalTable
from lapse.sessions.stores._timetable import (
    _EPSILON,
    _GONE,
    Record,
    RecordFactory,
    _cause,
    _deadline,
    _Ended,
)

__all__ = ["MemoryStore", "Record"]

_MAX_SCANS = 4
"""Scans (snapshots of the live uids) kept open at once."""


class MemoryStore(PrincipalTable):
    """Live sessions in a dict; due ones found through per-timeout queues."""

    url = "memory:"
    shared = False
    enforces_timeout = True
    """Every call answers at once: nothing to wait on."""
    holds_sessions = True
    """It offers :class:`~lapse.sessions.store.LocalSessionStore`."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        super().__init__(clock or time.time)
        self._bound = False
        self._events: list[str | tuple[str, str]] = []
        self._events_base = 0
        self._deliveries = itertools.count(1)
        self.max_live: int | None = None
        """At most this many live records: starting one more first ends the
        one with the earliest deadline, with cause ``"evicted"``."""
        # Open scans: token -> the uids live when the scan began (a few at
        # most; the oldest is dropped first).
        self._scans: dict[str, list[str]] = {}
        self._scan_ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._live)

    def bind(
        self,
        live: MutableMapping[str, Any],
        make: RecordFactory,
        wake: Callable[[float], None] | None = None,
    ) -> None:
        """Serve one site: ``live`` (its ``sessions``) is the dict of live
        records, ``make`` makes those created through the store API, and
        ``wake(when)`` hears of every deadline set by a start or a touch
        (for the site's one timer).

        Records of ``live`` the store never started (put there by hand) are
        not the store's: it neither loads nor ends them. A record taken out
        of ``live`` by hand is forgotten, without an expiry.
        """
        if live is not self._live and (self._bound or self._live or self._ended):
            raise StoreConfigError(
                "this memory store already keeps other sessions; give each site its own"
            )
        self._live = live
        self._make = make
        self._wake = wake
        self._bound = True

    # -- synchronous operations ------------------------------------------

    def start_now(self, record: Record) -> float | None:
        """Begin checking ``record`` (a session of the bound site) from now:
        put it in the live dict if it is not there, and queue it. Its deadline;
        None if it was already started (or has ended)."""
        if record._state is not None:
            return None
        live = self._live
        if live.get(record.uid) is not record:
            live[record.uid] = record
        cap = self.max_live
        if cap is not None and len(live) > cap:
            self._evict(len(live) - cap)
        return self._schedule(record, self.clock(), record.absolute_timeout)

    def touched_now(self, record: Record) -> None:
        """``record`` was touched (its ``_lastModified`` just set)."""
        self._touch(record)

    def load_now(self, uid: str) -> Record | None:
        """Touch and return the live record ``uid``."""
        now = self.clock()
        record = self._get(uid, now)
        if record is None:
            if not self._aliases:
                return None
            record = self._alias(uid, now)
            if record is None:
                return None
        record._lastModified = now
        self._touch(record)
        return record

    def create_now(
        self, uid: str, timeout: float, data: Mapping[str, Any], lifetime: float | None = None
    ) -> float:
        """Store a new live session; its deadline."""
        record = self._make(uid, timeout, data)
        live = self._live
        live[uid] = record
        cap = self.max_live
        if cap is not None and len(live) > cap:
            self._evict(len(live) - cap)
        return self._schedule(record, self.clock(), lifetime)

    def rotate_now(self, uid: str, new_uid: str, grace: float) -> bool:
        """Move the live session ``uid`` to ``new_uid``; see :meth:`rotate_record_now`."""
        record = self._get(uid, self.clock())
        return record is not None and self.rotate_record_now(record, new_uid, grace)

    def rotate_record_now(self, record: Record, new_uid: str, grace: float) -> bool:
        """Give the live ``record`` the uid ``new_uid`` and touch it; its old
        uid loads it for ``grace`` more seconds. False if the store was not
        checking it; ValueError if ``new_uid`` is taken."""
        state = record._state
        if state is None or state is _GONE:
            return False
        live = self._live
        if new_uid in live:
            raise ValueError("the new uid of a rotated session is in use")
        now = self.clock()
        old = record.uid
        if live.get(old) is record:
            del live[old]
        record.uid = new_uid
        live[new_uid] = record
        if type(state) is float:
            self._push(record, state)  # its heap entry, under the new uid
        self._prune_aliases(now)
        if grace > 0:
            self._aliases[old] = (record, now + grace)
        record._lastModified = now
        self._touch(record)
        self._announce((old, new_uid))
        return True

    def save_now(self, uid: str, changed: Mapping[str, Any], removed: Iterable[str]) -> bool:
        now = self.clock()
        record = self._get(uid, now)
        if record is None:
            record = self._alias(uid, now) if self._aliases else None
        if record is None:
            return False
        values = record._store_values()
        values.update(changed)
        for key in removed:
            values.pop(key, None)
        return True

    def exists_now(self, uid: str) -> bool:
        return self._get(uid, self.clock()) is not None

    def expire_now(self, uid: str) -> bool:
        record = self._get(uid, self.clock())
        if record is None:
            return False
        self._end(record, "expired")
        return True

    def expire_record_now(self, record: Record) -> bool:
        """End ``record`` now, whether or not it is still in the live dict
        (a session leaves ``site.sessions`` before the store hears of its
        end); False if the store was not checking it. One already past its
        deadline ends as a timeout."""
        state = record._state
        if state is None or state is _GONE:
            return False
        overdue = _deadline(record) <= self.clock() + _EPSILON
        self._end(record, _cause(record) if overdue else "expired")
        return True

    def ended_record(self, uid: str) -> Record | None:
        """The record of an ended session not yet acknowledged."""
        ended = self._ended.get(uid)
        return None if ended is None else ended.record

    def _claimable(self, limit: int) -> tuple[float, list[tuple[str, _Ended]]]:
        """End the due sessions (looking at ``limit`` records at most) and
        forget lapsed aliases; then up to ``limit`` ended sessions that no
        lease holds, oldest first, and the time they were ended by."""
        now = self.clock() + _EPSILON
        self._collect_due(now, limit)
        self.evicted = False
        if self._aliases:
            self._prune_aliases(now)
        found: list[tuple[str, _Ended]] = []
        for uid, ended in self._ended.items():
            if len(found) >= limit:
                break
            if ended.attempt and ended.lease_until > now:
                continue  # (claimed, and its lease still runs)
            found.append((uid, ended))
        return now, found

    def claim_now(self, owner: str, lease: float, limit: int) -> list[Expiry]:
        """Claim up to ``limit`` ended sessions, first ending due ones, in
        deadline order, looking at ``limit`` records at most (ends, and
        touched records moved to their later deadline): a call's work is
        bounded by ``limit``, however many sessions came due at once."""
        now, claimable = self._claimable(limit)
        claims: list[Expiry] = []
        for uid, ended in claimable:
            if not ended.delivery_id:
                ended.delivery_id = f"{uid}:{next(self._deliveries)}"
            ended.attempt += 1
            ended.lease_until = now + lease
            ended.owner = owner
            data = ended.record._peek_values()
            if data is None:
                data = {}
            claims.append(Expiry(uid, data, ended.delivery_id, ended.attempt, ended.cause))
        return claims

    def end_due_now(self, limit: int) -> list[tuple[str, Record, str, bool]]:
        """:meth:`claim_now` then :meth:`ack_now` of each claim, for a keeper
        with no durable hook: up to ``limit`` ended sessions (due ones ended
        first, the work bounded as there), forgotten at once, with no delivery
        id, lease or :class:`Expiry`. Each as (uid, record, cause, whether it
        was claimed before: a hook's delivery, not a first end)."""
        _, claimable = self._claimable(limit)
        ended_map = self._ended
        done: list[tuple[str, Record, str, bool]] = []
        for uid, ended in claimable:
            done.append((uid, ended.record, ended.cause, ended.attempt > 0))
            del ended_map[uid]
            self._announce(uid)
        return done

    def renew_now(self, expiry: Expiry, owner: str, lease: float) -> bool:
        ended = self._ended.get(expiry.uid)
        if (
            ended is None
            or ended.delivery_id != expiry.delivery_id
            or ended.attempt != expiry.attempt
            or ended.owner != owner
        ):
            return False
        ended.lease_until = self.clock() + lease
        return True

    def ack_now(self, expiry: Expiry) -> None:
        ended = self._ended.get(expiry.uid)
        if ended is None or ended.delivery_id != expiry.delivery_id:
            return
        del self._ended[expiry.uid]
        self._announce(expiry.uid)

    def _announce(self, event: str | tuple[str, str]) -> None:
        self._events.append(event)
        if len(self._events) > 100_000:
            drop = len(self._events) // 2
            del self._events[:drop]
            self._events_base += drop

    def events_now(self, cursor: str | None) -> tuple[list[str | tuple[str, str]], str]:
        end = self._events_base + len(self._events)
        if cursor is None:
            return [], str(end)
        start = max(int(cursor), self._events_base)
        return self._events[start - self._events_base :], str(end)

    def next_deadline_now(self) -> float | None:
        if self._more_due:  # the last claim stopped on its budget: now
            self._more_due = False
            return self.clock()
        earliest = self._earliest()
        candidates = [earliest[0]] if earliest is not None else []
        for ended in self._ended.values():
            candidates.append(ended.lease_until if ended.attempt else self.clock())
        return min(candidates) if candidates else None

    # -- inspection ------------------------------------------------------

    def scan_now(self, cursor: str | None, limit: int) -> tuple[list[SessionInfo], str | None]:
        """A page of live sessions; see :meth:`scan`."""
        if limit < 1:
            raise ValueError(f"a scan limit is at least 1, not {limit!r}")
        scans = self._scans
        if cursor is None:
            token = str(next(self._scan_ids))
            uids = list(self._live)
            pos = 0
            scans[token] = uids
            while len(scans) > _MAX_SCANS:
                del scans[next(iter(scans))]
        else:
            token, _, rest = cursor.partition(":")
            found = scans.get(token)
            if found is None or not rest.isdigit():
                raise ValueError(
                    f"not a scan cursor of this memory store, or one too old: {cursor!r}"
                )
            uids, pos = found, int(rest)
        now = self.clock()
        infos: list[SessionInfo] = []
        while pos < len(uids) and len(infos) < limit:
            record = self._get(uids[pos], now)
            pos += 1
            if record is not None:
                infos.append(self._info(record))
        if pos >= len(uids):
            scans.pop(token, None)
            return infos, None
        return infos, f"{token}:{pos}"

    def info_now(self, uid: str) -> SessionInfo | None:
        record = self._get(uid, self.clock())
        return None if record is None else self._info(record)

    def count_now(self) -> int:
        """Live records now: the live dict less those past their deadline
        (found as expiry finds them, without a pass over every record)."""
        due = sum(1 for _ in self._ending_by(self.clock() + _EPSILON))
        return len(self._live) - due

    def deadlines_now(self, now: float, horizon: float, buckets: int) -> list[int]:
        return _histogram(
            (deadline for deadline, _ in self._ending_by(now + horizon)), now, horizon, buckets
        )

    async def scan(self, cursor: str | None, limit: int) -> tuple[list[SessionInfo], str | None]:
        """Live sessions in the order of the live dict (the order they were
        started; a rotated one moves to the end), ``limit`` at a time.

        The first call (``cursor`` None) snapshots the uids live then (one
        list of references, 8 bytes per session); later pages read those
        records as they are then, skipping the ones that ended. So a full
        scan returns no session twice, and leaves out sessions created, or
        rotated to a new uid, during it. Only the last few scans stay open:
        an older cursor is a ValueError (scan again). Data are copies.
        """
        return self.scan_now(cursor, limit)

    async def info(self, uid: str) -> SessionInfo | None:
        return self.info_now(uid)

    async def count(self) -> int:
        return self.count_now()

    async def deadlines(self, now: float, horizon: float, buckets: int) -> list[int]:
        return self.deadlines_now(now, horizon, buckets)

    # -- the async protocol -----------------------------------------------

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def now(self) -> float:
        return self.clock()

    async def load(self, uid: str, version: int | None = None) -> StoredSession | None:
        record = self.load_now(uid)
        if record is None:
            return None
        values = record._peek_values()
        data = {} if values is None else values
        return StoredSession(
            record.uid, record.sessionTimeout, _deadline(record), data, principal=record._principal
        )

    async def create(
        self, uid: str, timeout: float, data: Mapping[str, Any], lifetime: float | None = None
    ) -> float:
        return self.create_now(uid, timeout, data, lifetime)

    async def rotate(self, uid: str, new_uid: str, grace: float) -> bool:
        return self.rotate_now(uid, new_uid, grace)

    async def save(self, uid: str, changed: Mapping[str, Any], removed: Iterable[str]) -> bool:
        return self.save_now(uid, changed, removed)

    async def exists(self, uid: str) -> bool:
        return self.exists_now(uid)

    async def expire(self, uid: str) -> bool:
        return self.expire_now(uid)

    async def claim(self, owner: str, lease: float, limit: int) -> list[Expiry]:
        return self.claim_now(owner, lease, limit)

    async def renew(self, expiry: Expiry, owner: str, lease: float) -> bool:
        return self.renew_now(expiry, owner, lease)

    async def ack(self, expiry: Expiry) -> None:
        self.ack_now(expiry)

    async def events(self, cursor: str | None) -> tuple[list[str | tuple[str, str]], str]:
        return self.events_now(cursor)

    async def next_deadline(self) -> float | None:
        return self.next_deadline_now()

    async def set_principal(
        self, uid: str, principal: str | None, limit: int | None = None, refuse: bool = False
    ) -> list[str] | None:
        return self.set_principal_now(uid, principal, limit, refuse)

    async def sessions_of(self, principal: str) -> list[SessionInfo]:
        return self.sessions_of_now(principal)

    async def expire_principal(self, principal: str, except_uid: str | None = None) -> list[str]:
        return self.expire_principal_now(principal, except_uid)

    def __repr__(self) -> str:
        return f"<MemoryStore {len(self._live)} live, {len(self._ended)} ended>"
