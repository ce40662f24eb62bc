"""The SQLite store's index of sessions by principal (``set_principal``,
``sessions_of``, ``expire_principal``; see "Principals" in
:mod:`lapse.sessions.store`).

The principal is a column of the session's row (NULL when unbound) with a
partial index over the bound rows (``sessions_principal``, on the principal
alone: a touch never writes to it). The index is the row's: a rotation
moves the row, so it keeps its principal; a row that ends (``expire``, the
cap, a deadline passing) keeps it until the row is forgotten at ``ack``,
and every read filters by ``ended = 0 AND deadline > now``, so a session is
neither listed nor counted from the moment its deadline passes. A lookup
costs the rows bound to that principal (live, or ended and not yet
acknowledged), whatever the number of sessions in the file.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from lapse.sessions.store import SessionInfo, TooManySessions, check_principal
from lapse.sessions.stores.sqlite.queries import EPSILON, SQL, last_access, resolve, session_info
from lapse.sessions.stores.sqlite.runner import Runner

__all__ = ["Principals"]


def _live_rows(conn: sqlite3.Connection, principal: str, now: float) -> list[Any]:
    """The live sessions bound to ``principal``, as ``sessions_of`` rows,
    least recently used first (then by uid)."""
    rows = conn.execute(SQL.sessions_of, (principal, now + EPSILON)).fetchall()
    rows.sort(key=lambda row: (last_access(row[1], row[2], row[3]), row[0]))
    return rows


class Principals:
    """The principal methods of :class:`SQLiteStore
    <lapse.sessions.stores.sqlite.SQLiteStore>`, run by its runner."""

    _runner: Runner

    async def set_principal(
        self, uid: str, principal: str | None, limit: int | None = None, refuse: bool = False
    ) -> list[str] | None:
        """Bind the live session ``uid`` (or the one an old ``uid`` was
        rotated to, within its grace) to ``principal``, or unbind it (None);
        None if there is no such session.

        With ``limit``: one ``BEGIN IMMEDIATE`` transaction counts the
        principal's other live sessions and, if binding this one would make
        more than ``limit``, raises :class:`TooManySessions` writing nothing
        (``refuse``), or ends the least recently used of them (by last
        access, then uid) as ``expire`` does, with cause ``"superseded"``;
        the uids so ended. A session already bound to ``principal`` counts as
        one of the ``limit`` (so binding it again is refused only if the
        principal has more live sessions than ``limit``, a limit lowered
        since, as the memory store does). Two calls in any processes are
        serialized by the file's write lock, so they never leave more than
        ``limit`` live sessions bound.
        """
        if principal is not None:
            check_principal(principal)
        if limit is not None and (type(limit) is not int or limit < 1):
            raise ValueError(f"a limit of sessions per principal is at least 1, not {limit!r}")

        def bind(conn: sqlite3.Connection, now: float) -> list[str] | None:
            live = resolve(conn, uid, now)
            if live is None:
                return None
            superseded: list[str] = []
            if principal is not None and limit is not None:
                others = [row[0] for row in _live_rows(conn, principal, now) if row[0] != live]
                excess = len(others) + 1 - limit
                if excess > 0:
                    if refuse:
                        raise TooManySessions(principal, limit)
                    superseded = others[:excess]
                    conn.executemany(
                        SQL.end_session, [("superseded", now, now, other) for other in superseded]
                    )
            conn.execute(SQL.bind_principal, (principal, live))
            return superseded

        return await self._runner.call(bind, write=True)

    async def sessions_of(self, principal: str) -> list[SessionInfo]:
        """The live sessions bound to ``principal`` (deadline ahead), most
        recently used first (then by uid), touching none; found through the
        index, so the cost is that principal's rows alone."""
        check_principal(principal)

        def sessions_of(conn: sqlite3.Connection, now: float) -> list[SessionInfo]:
            infos = [session_info(conn, row) for row in _live_rows(conn, principal, now)]
            infos.sort(key=lambda info: (-info.last_access, info.uid))
            return infos

        return await self._runner.call(sessions_of, write=False)

    async def expire_principal(self, principal: str, except_uid: str | None = None) -> list[str]:
        """End every live session bound to ``principal`` but ``except_uid``
        (or the session it names, if it is an old uid within its grace) now,
        as ``expire`` does (cause ``"expired"``, claimable at once), in one
        transaction; the uids ended, least recently used first."""
        check_principal(principal)

        def expire_principal(conn: sqlite3.Connection, now: float) -> list[str]:
            kept = except_uid if except_uid is None else resolve(conn, except_uid, now)
            uids = [row[0] for row in _live_rows(conn, principal, now) if row[0] != kept]
            conn.executemany(SQL.end_session, [("expired", now, now, uid) for uid in uids])
            return uids

        return await self._runner.call(expire_principal, write=True)
