"""The PostgreSQL store's operations: :class:`PostgresStore`, each method one
statement (or one transaction) on a pooled asyncpg connection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from lapse.sessions.store import (
    AlreadyDelivered,
    Event,
    Expiry,
    SessionInfo,
    StoredSession,
    _bucket_bounds,
)
from lapse.sessions.stores.postgres.batch import TickBatch, load_answers
from lapse.sessions.stores.postgres.config import PostgresConfig, parse_url
from lapse.sessions.stores.postgres.listener import Listener
from lapse.sessions.stores.postgres.pool import Pool
from lapse.sessions.stores.postgres.principals import PrincipalIndexOnPostgres, session_info
from lapse.sessions.stores.postgres.queries import Queries, channel_name
from lapse.sessions.stores.postgres.values import (
    dump_data,
    dump_keys,
    load_data,
    storable,
)

if TYPE_CHECKING:
    from lapse.sessions.store import PrincipalIndex, SessionStore

__all__ = ["EVENTS_KEPT_FOR", "EVENTS_PER_CALL", "PostgresStore"]

log = logging.getLogger("lapse.sessions")

EVENTS_KEPT_FOR = 600.0
"""Seconds an announcement stays readable by ``events()``."""

EVENTS_PER_CALL = 1000
"""The most announcements one ``events()`` call returns."""


def _check_uid(uid: str) -> None:
    if not storable(uid):
        raise ValueError(f"a session uid PostgreSQL can hold has no NUL and is UTF-8: {uid!r}")


class PostgresStore(PrincipalIndexOnPostgres):
    """Sessions in PostgreSQL tables (``schema.prefix*``), shared by every
    process of every machine that uses the same database."""

    shared = True
    enforces_timeout = True
    """The server's statement_timeout and a client-side bound (the store's
    ``timeout`` and a half) end every call."""
    holds_sessions = False

    def __init__(self, config: PostgresConfig, *, clock: Callable[[], float] | None = None) -> None:
        self.config = config
        self.url = config.safe_url
        self.timeout = config.timeout
        self.clock = clock
        self.sql = Queries.for_tables(config.schema, config.table_prefix)
        self._pool = Pool(config, self.url)
        self.listener = Listener(self._pool, channel_name(config.schema, config.table_prefix))
        self._loads: TickBatch[tuple[str, int | None], StoredSession | None]
        self._loads = TickBatch(self._send_loads)
        self._creates: TickBatch[tuple[str, float, float | None, str], float]
        self._creates = TickBatch(self._send_creates)
        self._acks: TickBatch[tuple[str, str], None] = TickBatch(self._send_acks)

    @classmethod
    def from_url(cls, url: str, clock: Callable[[], float] | None = None) -> PostgresStore:
        """The store a ``postgresql://`` (or ``postgres://``) URL names."""
        return cls(parse_url(url), clock=clock)

    def __repr__(self) -> str:
        return f"<PostgresStore {self.url}>"

    def _now(self) -> float | None:
        """The clock argument of every statement: None is the database's."""
        return None if self.clock is None else self.clock()

    async def _fetch(self, query: str, *args: Any) -> list[Any]:
        now = self._now()
        rows: list[Any] = await self._pool.run(lambda conn: conn.fetch(query, now, *args))
        return rows

    async def _fetchrow(self, query: str, *args: Any) -> Any:
        now = self._now()
        return await self._pool.run(lambda conn: conn.fetchrow(query, now, *args))

    # -- the protocol -----------------------------------------------------------

    async def open(self) -> None:
        """Connect, and make the tables (or check or upgrade them): within
        SCHEMA_TIMEOUT, not the store's timeout (a large upgrade)."""
        log.info("PostgreSQL session store: %s", self.url)
        pool = self._pool
        try:
            await pool.pool()
        except pool.failures as exc:
            raise pool.translate(exc) from exc
        # (and it answers now: the keeper opens the store again after an
        # outage, when the pool itself was made long ago)
        await pool.run(lambda conn: conn.fetchval("SELECT 1"))

    async def schema_version(self) -> int:
        """The version of the tables as they are (0: none), read on a
        connection of its own: nothing is made or upgraded."""
        pool = self._pool
        conn = await pool.connect()
        try:
            async with asyncio.timeout(self.timeout * 1.5):
                return await pool.found_version(conn)
        except pool.failures as exc:
            raise pool.translate(exc) from exc
        finally:
            conn.terminate()

    async def aclose(self) -> None:
        for batch in (self._loads, self._creates, self._acks):
            await batch.aclose()
        await self.listener.aclose()
        await self._pool.aclose()

    async def wait_for_news(self, seconds: float) -> bool:
        """Sleep at most ``seconds`` (a process with nothing to do until its
        next deadline); True if woken sooner by another process's news (a
        NOTIFY: an end announced, a rotation, a session ended by hand, or
        one made that ends before every other), or by the listening
        connection made again (what was said meanwhile is lost, so the
        caller reads the store)."""
        return await self.listener.wait(seconds)

    async def now(self) -> float:
        """The store's clock: ``clock()`` if given, else the database's."""
        row = await self._fetchrow(self.sql.now)
        return float(row[0])

    async def load(self, uid: str, version: int | None = None) -> StoredSession | None:
        """Touch and return the live session ``uid`` (or the one an old uid
        was rotated to, within its grace): ONE statement, an UPDATE ...
        RETURNING (shared with the other loads of this event-loop tick: see
        batch.py); no data if its version is still ``version``, else each
        key's JSON text (decoded only when read). A uid PostgreSQL cannot
        hold (a NUL) names no session: None, the database not asked."""
        if not storable(uid):
            return None
        return await self._loads.ask((uid, version))

    async def _send_loads(self, asked: list[tuple[str, int | None]]) -> list[StoredSession | None]:
        now, query, run = self._now(), self.sql.load, self._pool.run
        return await load_answers(
            asked, lambda uids, versions: run(lambda conn: conn.fetch(query, now, uids, versions))
        )

    async def create(
        self, uid: str, timeout: float, data: Mapping[str, Any], lifetime: float | None = None
    ) -> float:
        """Store the live session ``uid`` (replacing any row of that uid);
        shared with the other creates of this event-loop tick (batch.py)."""
        _check_uid(uid)
        lifetime = None if lifetime is None else float(lifetime)
        return await self._creates.ask((uid, float(timeout), lifetime, dump_data(data)))

    async def _send_creates(self, made: list[tuple[str, float, float | None, str]]) -> list[float]:
        if len({uid for uid, *_ in made}) < len(made):
            # (a uid twice: a statement cannot write a row twice)
            return [(await self._send_creates([each]))[0] for each in made]
        now, query = self._now(), self.sql.create
        columns = [list(column) for column in zip(*made, strict=True)]
        rows = await self._pool.run(lambda conn: conn.fetch(query, now, *columns))
        deadlines = {uid: float(deadline) for uid, deadline, _ in rows}
        return [deadlines[uid] for uid, *_ in made]

    async def rotate(self, uid: str, new_uid: str, grace: float) -> bool:
        """Move the live session to ``new_uid``, alias ``uid`` to it for
        ``grace`` seconds and announce ``(uid, new_uid)``: one transaction."""
        sql, now = self.sql, self._now()
        _check_uid(new_uid)
        if not storable(uid):
            return False

        async def rotate(conn: Any) -> bool:
            async with conn.transaction():
                if await conn.fetchrow(sql.lock_live, now, uid) is None:
                    return False
                await conn.execute(sql.rotate_session, now, uid, new_uid)
                await conn.execute(sql.prune_aliases, now, uid)
                await conn.execute(sql.follow_aliases, new_uid, uid)
                await conn.execute(sql.add_alias, now, uid, new_uid, float(grace))
                await conn.execute(sql.add_rotation, now, uid, new_uid)
                return True

        return await self._pool.run(rotate)

    async def save(
        self, uid: str, changed: Mapping[str, Any], removed: Iterable[str]
    ) -> bool | int:
        """Write the changed keys, then remove the removed ones, in ONE
        statement (``data || changes - removed``, under the row's lock: a
        concurrent save of other keys keeps its own); the new version, or
        False if no live session has that uid."""
        if not storable(uid):
            return False
        changes = dump_data(changed)
        row = await self._fetchrow(self.sql.save, uid, changes, dump_keys(removed))
        return False if row is None else int(row[0])

    async def exists(self, uid: str) -> bool:
        return storable(uid) and await self._fetchrow(self.sql.exists, uid) is not None

    async def expire(self, uid: str) -> bool:
        return storable(uid) and await self._fetchrow(self.sql.expire, uid) is not None

    async def claim(self, owner: str, lease: float, limit: int) -> list[Expiry]:
        """Take up to ``limit`` due sessions (earliest deadline first) by
        ``FOR UPDATE SKIP LOCKED``: concurrent claimers never take the same
        one; a lease run out is handed out again with ``attempt`` + 1."""
        if limit <= 0:
            return []
        rows = await self._fetch(self.sql.claim, owner, float(lease), limit)
        rows = sorted(rows, key=lambda row: (row[5], row[0]))
        return [
            Expiry(uid, load_data(data), delivery_id, attempt, cause)
            for uid, data, delivery_id, attempt, cause, _ in rows
        ]

    async def renew(self, expiry: Expiry, owner: str, lease: float) -> bool:
        row = await self._fetchrow(
            self.sql.renew, float(lease), expiry.uid, expiry.delivery_id, expiry.attempt, owner
        )
        return row is not None

    async def ack(self, expiry: Expiry) -> None:
        """Forget the claimed session and announce its end, in one statement
        (shared with the other acknowledgements of this event-loop tick:
        batch.py) that also trims announcements older than
        ``EVENTS_KEPT_FOR``."""
        await self._acks.ask((expiry.uid, expiry.delivery_id))

    async def _send_acks(self, acked: list[tuple[str, str]]) -> list[None]:
        uids, delivery_ids = (list(column) for column in zip(*acked, strict=True))
        args = (self._now(), uids, delivery_ids, EVENTS_KEPT_FOR, [None] * len(acked))
        query = self.sql.ack
        await self._pool.run(lambda conn: conn.execute(query, *args))
        return [None] * len(acked)

    async def acknowledge(self, conn: Any, expiry: Expiry) -> None:
        """Acknowledge ``expiry`` on ``conn``, an asyncpg connection of the
        application's to the same database, inside its open transaction: the
        session is forgotten and its end announced when (and only if) that
        transaction commits, so the hook's own writes in it and the delivery
        are one. Raises :class:`AlreadyDelivered` (roll the transaction back)
        if this claim no longer holds the delivery: its lease ran out and
        another process took it, or it was acknowledged already. Errors of
        ``conn`` are the driver's own."""
        args = (
            self._now(),
            [expiry.uid],
            [expiry.delivery_id],
            EVENTS_KEPT_FOR,
            [expiry.attempt],
        )
        if not conn.is_in_transaction():
            raise RuntimeError("acknowledge() belongs inside the application's transaction")
        if not await conn.fetchval(self.sql.ack, *args):
            raise AlreadyDelivered(
                f"session {expiry.uid[:8]}'s expiry (delivery {expiry.delivery_id}, attempt "
                f"{expiry.attempt}) is no longer this claim's to acknowledge"
            )

    async def events(self, cursor: str | None) -> tuple[list[Event], str]:
        """Announcements after ``cursor`` (an events id), oldest first."""
        after = -1
        if cursor is not None:
            try:
                after = int(cursor)
            except ValueError:
                raise ValueError(f"not an events cursor of this store: {cursor!r}") from None
        sql = self.sql

        async def events(conn: Any) -> tuple[list[Event], str]:
            last = int(await conn.fetchval(sql.last_event_id))
            if cursor is None or after > last:
                return [], str(last)
            rows = await conn.fetch(sql.events_after, after, EVENTS_PER_CALL)
            if not rows:
                return [], str(after)
            found: list[Event] = [uid if to is None else (uid, to) for _, uid, to in rows]
            return found, str(rows[-1][0])

        return await self._pool.run(events)

    async def next_deadline(self) -> float | None:
        row = await self._fetchrow(self.sql.next_deadline)
        times = [float(t) for t in row if t is not None]
        return min(times) if times else None

    # -- inspection: read only ----------------------------------------------------

    async def scan(self, cursor: str | None, limit: int) -> tuple[list[SessionInfo], str | None]:
        """Live sessions, latest deadline first, then by uid descending, with
        the (deadline, uid) cursor of the SQLite store: a full scan returns
        no session twice."""
        if limit < 1:
            raise ValueError(f"a scan limit is at least 1, not {limit!r}")
        if cursor is None:
            rows = await self._fetch(self.sql.scan_first, limit + 1)
        else:
            mark, sep, last_uid = cursor.partition(":")
            try:
                deadline = float(mark)
            except ValueError:
                sep = ""
            if not sep:
                raise ValueError(f"not a scan cursor of this store: {cursor!r}")
            rows = await self._fetch(self.sql.scan_after, limit + 1, deadline, last_uid)
        infos = [session_info(row) for row in rows[:limit]]
        if len(rows) <= limit:
            return infos, None
        last = rows[limit - 1]
        return infos, f"{last[3]!r}:{last[0]}"

    async def info(self, uid: str) -> SessionInfo | None:
        if not storable(uid):
            return None
        row = await self._fetchrow(self.sql.info, uid)
        return None if row is None else session_info(row)

    async def count(self) -> int:
        row = await self._fetchrow(self.sql.count)
        return int(row[0])

    async def deadlines(self, now: float, horizon: float, buckets: int) -> list[int]:
        width = _bucket_bounds(now, horizon, buckets)
        query, args = self.sql.by_deadline, (float(now), width, float(now + horizon))
        rows = await self._pool.run(lambda conn: conn.fetch(query, *args))
        counts = [0] * buckets
        for bucket, n in rows:
            counts[min(buckets - 1, max(0, int(bucket)))] += int(n)
        return counts


if TYPE_CHECKING:

    def _is_a_session_store(store: PostgresStore) -> SessionStore:
        return store

    def _is_a_principal_index(store: PostgresStore) -> PrincipalIndex:
        return store
