"""The PostgreSQL store's index of sessions by principal (the store
protocol's "Principals"): the ``principal`` column of the sessions table
(NULL: bound to no one) and its partial index ``sessions_principal``.

The cap per principal holds across processes: ``set_principal`` takes the
principal's turn (a transaction-scoped advisory lock of the principal's
hash) and, in that transaction, locks the session and the principal's live
others, counts them, then refuses or ends the least recently used and binds
the session. Another binding of that principal waits for the commit, so it
counts what this one left. ``expire_principal`` takes the same turn, so it
also ends a session whose binding was being committed while it asked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lapse.sessions.store import SessionInfo, TooManySessions, check_principal
from lapse.sessions.stores.postgres.pool import Pool
from lapse.sessions.stores.postgres.queries import Queries
from lapse.sessions.stores.postgres.values import load_data, storable

__all__ = ["PrincipalIndexOnPostgres", "session_info"]


def session_info(row: Any) -> SessionInfo:
    """A SessionInfo from a row (uid, created, timeout, deadline, data
    text, principal)."""
    uid, created, timeout, deadline, data, principal = row
    last = deadline - timeout
    if created is not None and last < created:
        last = created
    return SessionInfo(uid, created, last, deadline, load_data(data), principal)


class PrincipalIndexOnPostgres:
    """``set_principal``, ``sessions_of``, ``expire_principal`` of
    :class:`~lapse.sessions.stores.postgres.PostgresStore`."""

    sql: Queries
    _pool: Pool
    _now: Callable[[], float | None]
    _fetch: Callable[..., Any]

    async def set_principal(
        self, uid: str, principal: str | None, limit: int | None = None, refuse: bool = False
    ) -> list[str] | None:
        """Bind the live session ``uid`` (or, in its grace, the one an old
        uid was rotated to) to ``principal`` (None: unbind), with at most
        ``limit`` live sessions bound to it once done: one transaction in
        the principal's turn (see the module). None if no live session has
        that uid; the uids superseded (ended, cause "superseded", the other
        processes woken); :class:`TooManySessions` (nothing written) if
        ``refuse``."""
        if principal is not None:
            check_principal(principal)
        if limit is not None and limit < 1:
            raise ValueError(f"a limit of sessions per principal is at least 1, not {limit!r}")
        if not storable(uid):
            return None
        sql, now = self.sql, self._now()

        async def bind(conn: Any) -> list[str] | TooManySessions | None:
            async with conn.transaction():
                if principal is not None:
                    await conn.execute(sql.principal_turn, principal)
                rows = await conn.fetch(sql.principal_rows, now, uid, principal)
                found = [row for row in rows if row[3]]
                if not found:
                    return None
                target = found[0]
                others = [row for row in rows if not row[3]]
                superseded: list[str] = []
                if principal is not None and limit is not None and len(others) >= limit:
                    if refuse:
                        if target[1] == principal:
                            return []  # (bound already: not a new login)
                        return TooManySessions(principal, limit)
                    by_use = sorted(others, key=lambda row: (row[2], row[0]))
                    superseded = [row[0] for row in by_use[: len(others) + 1 - limit]]
                await conn.execute(sql.bind_principal, now, superseded, target[0], principal)
                return superseded

        done = await self._pool.run(bind)
        if isinstance(done, TooManySessions):
            raise done
        return done

    async def sessions_of(self, principal: str) -> list[SessionInfo]:
        """The principal's live sessions, most recently used first, touching
        none (one statement on the partial index ``sessions_principal``)."""
        check_principal(principal)
        rows = await self._fetch(self.sql.sessions_of, principal)
        return [session_info(row) for row in rows]

    async def expire_principal(self, principal: str, except_uid: str | None = None) -> list[str]:
        """End each live session of ``principal`` but the one ``except_uid``
        names (cause "expired", the other processes woken), in the
        principal's turn: the uids ended."""
        check_principal(principal)
        if except_uid is not None and not storable(except_uid):
            except_uid = None  # (it names no session)
        sql, now = self.sql, self._now()

        async def expire(conn: Any) -> list[str]:
            async with conn.transaction():
                await conn.execute(sql.principal_turn, principal)
                rows = await conn.fetch(sql.expire_principal, now, except_uid, principal)
            return sorted(row[0] for row in rows)

        return await self._pool.run(expire)
