"""The SQLite store's operations: :class:`SQLiteStore`, each method one
transaction run by its :class:`~lapse.sessions.stores.sqlite.runner.Runner`,
its statements from ``queries.sql``."""

from __future__ import annotations

import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from lapse.sessions.store import Event, Expiry, StoreConfigError, StoredSession
from lapse.sessions.stores.sqlite.config import (
    DEFAULT_AUTOCHECKPOINT,
    DEFAULT_SYNCHRONOUS,
    URL_PREFIX,
    check_autocheckpoint,
    check_synchronous,
    checked_path,
    parse_url,
)
from lapse.sessions.stores.sqlite.inspection import Inspection
from lapse.sessions.stores.sqlite.news import news_marker, wait_for_news
from lapse.sessions.stores.sqlite.principals import Principals
from lapse.sessions.stores.sqlite.queries import (
    EPSILON,
    SQL,
    clamp,
    dumps,
    is_live,
    read_data,
    resolve,
)
from lapse.sessions.stores.sqlite.runner import Runner

if TYPE_CHECKING:
    from lapse.sessions.store import PrincipalIndex, SessionStore

__all__ = ["EVENTS_KEPT_FOR", "EVENTS_PER_CALL", "SQLiteStore"]

log = logging.getLogger("lapse.sessions")

EVENTS_KEPT_FOR = 600.0
"""Seconds an end-of-session event stays readable by ``events()``."""

EVENTS_PER_CALL = 1000
"""The most uids one ``events()`` call returns."""


class SQLiteStore(Inspection, Principals):
    """Sessions in an SQLite file (see :mod:`lapse.sessions.stores.sqlite`
    for the guarantees).

    ``path`` is made absolute at construction (so a later ``chdir`` cannot
    change the file); ``url`` is ``"sqlite:///" + path``. The file and its
    tables are created by :meth:`open` (or by the first call, if ``open`` was
    not awaited); the directory must exist.
    """

    shared = True
    enforces_timeout = True
    """Every call fails once the worker has made no progress for ``timeout``
    seconds (one watchdog timer per store, not one per call)."""
    holds_sessions = False
    """It keeps records, not this process's ``Session`` objects."""

    def __init__(
        self,
        path: str,
        *,
        clock: Callable[[], float] | None = None,
        busy_timeout: float = 5.0,
        timeout: float = 1.0,
        synchronous: str = DEFAULT_SYNCHRONOUS,
        wal_autocheckpoint: int = DEFAULT_AUTOCHECKPOINT,
    ) -> None:
        if not isinstance(path, str) or not path:
            raise StoreConfigError(f"the SQLite store needs a file path, not {path!r}")
        if path == ":memory:" or path.startswith("file::memory:"):
            raise StoreConfigError(
                "the SQLite store needs a file: an in-memory database cannot be "
                "shared by processes nor survive a restart (use memory: instead)"
            )
        if not busy_timeout >= 0:
            raise StoreConfigError(f"busy_timeout is seconds >= 0, not {busy_timeout!r}")
        if not 0 < timeout < float("inf"):
            raise StoreConfigError(f"timeout is seconds > 0, not {timeout!r}")
        self.path = checked_path(path)
        self.url = URL_PREFIX + self.path
        self.busy_timeout = float(busy_timeout)
        self.timeout = float(timeout)
        self.synchronous = check_synchronous(synchronous)
        self.wal_autocheckpoint = check_autocheckpoint(wal_autocheckpoint)
        self.clock: Callable[[], float] = clock or time.time
        self._read_up_to: int | None = None  # the last cursor events() gave
        self._runner = Runner(
            self.path,
            self.busy_timeout,
            self.timeout,
            self.clock,
            synchronous=self.synchronous,
            autocheckpoint=self.wal_autocheckpoint,
        )

    @classmethod
    def from_url(cls, url: str, clock: Callable[[], float] | None = None) -> SQLiteStore:
        """The store a ``sqlite:///`` URL names.

        ``sqlite:///sessions.db`` is relative to the current directory,
        ``sqlite:////var/lib/app/sessions.db`` is absolute. The options are
        ``?busy_timeout=SECONDS`` (default 5), ``?timeout=SECONDS`` (default
        1), ``?synchronous=off|normal|full|extra`` (default normal) and
        ``?wal_autocheckpoint=PAGES`` (default 1000, at least 1); see
        :mod:`lapse.sessions.stores.sqlite`.
        Anything else, an empty path or ``:memory:`` is a
        :class:`StoreConfigError`.
        """
        options = parse_url(url)
        return cls(
            options.path,
            clock=clock,
            busy_timeout=options.busy_timeout,
            timeout=options.timeout,
            synchronous=options.synchronous,
            wal_autocheckpoint=options.wal_autocheckpoint,
        )

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path!r} {self._runner.state}>"

    # -- the protocol -----------------------------------------------------------

    async def open(self) -> None:
        """Create the file and its tables if need be. Idempotent; safe when
        several processes open the same new file at once."""
        # The resolved path: a URL such as sqlite:///tmp/x.db is relative.
        log.info("SQLite session store: %s", self.path)
        await self._runner.call(lambda conn, now: None, write=False)

    async def aclose(self) -> None:
        """Let the calls already made finish, close the connection, stop the
        worker thread. Idempotent; any later call raises StoreUnavailable."""
        await self._runner.aclose()

    async def wait_for_news(self, seconds: float) -> bool:
        """Sleep at most ``seconds`` (a process with nothing to do until its
        next deadline); True if woken sooner by news: an end or a rotation
        announced after the last ``events()`` read, a session ended by
        hand, or one that ends before the wait would (by any process, this
        one's included), or the file replaced at its path. No polling of
        the store: a look at the WAL index 20 times a second, and a
        question to the store only when a commit changed it (see
        :mod:`.news`)."""
        return await wait_for_news(
            self.path,
            seconds,
            lambda: self._runner.call(news_marker, write=False),
            lambda: self._read_up_to,
        )

    async def now(self) -> float:
        """The store's clock."""
        if self._runner.closed:
            raise self._runner.unavailable("the store is closed")
        return self.clock()

    async def load(self, uid: str, version: int | None = None) -> StoredSession | None:
        """The live session ``uid``, its deadline moved to now + timeout; its
        data as JSON texts, or none (``unchanged``) if its version is still
        ``version``.

        None for an unknown session, an ended one, or one whose deadline has
        passed (even if no one has claimed it yet: a load does not revive it).
        """

        def load(conn: sqlite3.Connection, now: float) -> StoredSession | None:
            live = resolve(conn, uid, now)
            if live is None:
                return None
            row = conn.execute(SQL.load_session, (live,)).fetchone()
            timeout, ends_at, current, principal = row
            deadline = clamp(now + timeout, ends_at)
            conn.execute(SQL.touch, (deadline, live))
            if version is not None and current == version:
                return StoredSession(
                    live, timeout, deadline, version=current, unchanged=True, principal=principal
                )
            rows = conn.execute(SQL.read_data, (live,))
            return StoredSession(
                live, timeout, deadline, encoded=dict(rows), version=current, principal=principal
            )

        return await self._runner.call(load, write=True)

    async def create(
        self, uid: str, timeout: float, data: Mapping[str, Any], lifetime: float | None = None
    ) -> float:
        """Store the live session ``uid``; its deadline, now + ``timeout``
        (or now + ``lifetime``, its absolute end, if that is earlier).

        A row already under ``uid`` (live or ended) is replaced, data and all.
        """
        items = [(uid, key, dumps(value)) for key, value in data.items()]

        def create(conn: sqlite3.Connection, now: float) -> float:
            ends_at = None if lifetime is None else now + lifetime
            deadline = clamp(now + timeout, ends_at)
            conn.execute(SQL.delete_data, (uid,))
            conn.execute(SQL.create_session, (uid, timeout, deadline, now, ends_at))
            conn.executemany(SQL.insert_data, items)
            return deadline

        return await self._runner.call(create, write=True)

    async def rotate(self, uid: str, new_uid: str, grace: float) -> bool:
        """Move the live session ``uid`` (row and data) to ``new_uid`` and
        touch it, in one transaction; ``uid`` becomes an alias of it until
        ``grace`` seconds from now, aliases of ``uid`` follow it, and the
        rotation is announced as an event ``(uid, new_uid)``. False if
        ``uid`` was not live."""

        def rotate(conn: sqlite3.Connection, now: float) -> bool:
            row = conn.execute(SQL.select_live, (uid, now + EPSILON)).fetchone()
            if row is None:
                return False
            timeout, ends_at = row
            deadline = clamp(now + timeout, ends_at)
            conn.execute(SQL.rotate_session, (new_uid, deadline, uid))
            conn.execute(SQL.rotate_data, (new_uid, uid))
            conn.execute(SQL.prune_aliases, (now,))
            conn.execute(SQL.follow_aliases, (new_uid, uid))
            if grace > 0:
                conn.execute(SQL.add_alias, (uid, new_uid, now + grace))
            conn.execute(SQL.add_rotation_event, (uid, now, new_uid))
            return True

        return await self._runner.call(rotate, write=True)

    async def save(
        self, uid: str, changed: Mapping[str, Any], removed: Iterable[str]
    ) -> bool | int:
        """Write the ``changed`` keys, then delete the ``removed`` ones (a key
        in both ends up deleted), in the live session ``uid`` (or the one an
        old ``uid`` was rotated to, within its grace); the data's new version.
        False, writing nothing, if there is none. Keys not named are left as
        they are in the file; the deadline does not move."""
        items = [(key, dumps(value)) for key, value in changed.items()]
        gone = list(removed)

        def save(conn: sqlite3.Connection, now: float) -> bool | int:
            live = resolve(conn, uid, now)
            if live is None:
                return False
            conn.executemany(SQL.write_data, [(live, key, value) for key, value in items])
            conn.executemany(SQL.delete_key, [(live, key) for key in gone])
            conn.execute(SQL.bump_version, (live,))
            (version,) = conn.execute(SQL.select_version, (live,)).fetchone()
            return int(version)

        return await self._runner.call(save, write=True)

    async def exists(self, uid: str) -> bool:
        """Whether ``uid`` is live (deadline still ahead), without touching it."""
        return await self._runner.call(lambda conn, now: is_live(conn, uid, now), write=False)

    async def expire(self, uid: str) -> bool:
        """End the live session ``uid`` now, with cause ``"expired"``; it can
        be claimed at once. False if it was not live (unknown, ended, or past
        its deadline, in which case it ends with cause ``"timeout"``)."""

        def expire(conn: sqlite3.Connection, now: float) -> bool:
            if not is_live(conn, uid, now):
                return False
            conn.execute(SQL.end_session, ("expired", now, now, uid))
            return True

        return await self._runner.call(expire, write=True)

    async def claim(self, owner: str, lease: float, limit: int) -> list[Expiry]:
        """Take up to ``limit`` ended sessions for ``lease`` seconds.

        Claimable: a live session whose deadline has passed (it ends now, with
        cause ``"timeout"``, or ``"lifetime"`` if that deadline was its
        absolute end), a session ended by ``expire()`` and not claimed
        yet, and a claimed one whose lease has run out (redelivered with the
        same ``delivery_id`` and ``attempt`` + 1). Earliest deadlines first.
        One ``BEGIN IMMEDIATE`` transaction, so concurrent claims in any
        processes never take the same session while its lease holds.
        """
        if limit <= 0:
            return []

        def claim(conn: sqlite3.Connection, now: float) -> list[Expiry]:
            due = now + EPSILON
            rows = conn.execute(SQL.due_live, (due, limit)).fetchall()
            rows += conn.execute(SQL.due_ended, (due, limit)).fetchall()
            rows.sort(key=lambda row: (row[1], row[0]))
            conn.execute(SQL.prune_aliases, (now,))
            claims: list[Expiry] = []
            for uid, deadline, ended, cause, delivery_id, attempt, ends_at in rows[:limit]:
                if not ended:
                    cause = "lifetime" if ends_at is not None and deadline >= ends_at else "timeout"
                if delivery_id is None:
                    delivery_id = f"{uid}:{secrets.token_hex(8)}"
                attempt += 1
                conn.execute(
                    SQL.lease_session, (cause, delivery_id, attempt, owner, now + lease, uid)
                )
                claims.append(Expiry(uid, read_data(conn, uid), delivery_id, attempt, cause))
            return claims

        return await self._runner.call(claim, write=True)

    async def renew(self, expiry: Expiry, owner: str, lease: float) -> bool:
        """Move the lease end of the claimed session to now + ``lease``, if
        ``owner`` still holds this delivery of it (same ``delivery_id`` and
        ``attempt``); False, changing nothing, if not."""

        def renew(conn: sqlite3.Connection, now: float) -> bool:
            updated = conn.execute(
                SQL.renew_lease,
                (now + lease, expiry.uid, expiry.delivery_id, expiry.attempt, owner),
            ).rowcount
            return bool(updated)

        return await self._runner.call(renew, write=True)

    async def ack(self, expiry: Expiry) -> None:
        """Forget the claimed session and announce its end (one event), if it
        is still there under ``expiry.delivery_id``; else nothing (it was
        acknowledged already, e.g. after a redelivery). Prunes events older
        than ``EVENTS_KEPT_FOR``."""

        def ack(conn: sqlite3.Connection, now: float) -> None:
            deleted = conn.execute(SQL.forget_session, (expiry.uid, expiry.delivery_id)).rowcount
            if deleted:
                conn.execute(SQL.delete_data, (expiry.uid,))
                conn.execute(SQL.add_end_event, (expiry.uid, now))
            conn.execute(SQL.prune_events, (now - EVENTS_KEPT_FOR,))

        await self._runner.call(ack, write=True)

    async def events(self, cursor: str | None) -> tuple[list[Event], str]:
        """Uids whose end was announced after ``cursor`` (and ``(old, new)``
        pairs for rotations), oldest first, at most
        ``EVENTS_PER_CALL`` of them, and the cursor to pass next.

        ``None`` starts from now: no uids, and the current cursor. A cursor
        ahead of the file (the file was replaced) restarts from now. Events
        pruned before they were read are lost to that reader.
        """
        after = -1
        if cursor is not None:
            try:
                after = int(cursor)
            except ValueError:
                raise ValueError(f"not an events cursor of this store: {cursor!r}") from None

        def events(conn: sqlite3.Connection, now: float) -> tuple[list[Event], str]:
            row = conn.execute(SQL.last_event_id).fetchone()
            last = row[0] if row is not None else 0
            if cursor is None or after > last:
                return [], str(last)
            rows = conn.execute(SQL.events_after, (after, EVENTS_PER_CALL)).fetchall()
            if not rows:
                return [], str(after)
            found: list[Event] = [uid if to is None else (uid, to) for _, uid, to in rows]
            return found, str(rows[-1][0])

        found, cursor_after = await self._runner.call(events, write=False)
        self._read_up_to = int(cursor_after)
        return found, cursor_after

    async def next_deadline(self) -> float | None:
        """The earliest of: live sessions' deadlines (past ones included: they
        are due), claimed sessions' lease ends, and now if a session ended by
        ``expire()`` waits to be claimed. None if there is no session."""

        def next_deadline(conn: sqlite3.Connection, now: float) -> float | None:
            (live,) = conn.execute(SQL.first_deadline).fetchone()
            (leased,) = conn.execute(SQL.first_lease_end).fetchone()
            unclaimed = conn.execute(SQL.any_unclaimed).fetchone()
            times = [t for t in (live, leased) if t is not None]
            if unclaimed is not None:
                times.append(now)
            return min(times) if times else None

        return await self._runner.call(next_deadline, write=False)


if TYPE_CHECKING:

    def _is_a_session_store(store: SQLiteStore) -> SessionStore:
        return store

    def _is_a_principal_index(store: SQLiteStore) -> PrincipalIndex:
        return store
