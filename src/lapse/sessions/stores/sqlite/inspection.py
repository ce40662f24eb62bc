"""The SQLite store's inspection (``lapse sessions``, the live view): read-only
transactions that touch no session."""

from __future__ import annotations

import sqlite3
from typing import Any

from lapse.sessions.store import SessionInfo, _bucket_bounds
from lapse.sessions.stores.sqlite.queries import EPSILON, SQL, session_info
from lapse.sessions.stores.sqlite.runner import Runner

__all__ = ["Inspection"]


class Inspection:
    """The inspection methods of :class:`SQLiteStore
    <lapse.sessions.stores.sqlite.SQLiteStore>`, run by its runner."""

    _runner: Runner

    async def scan(self, cursor: str | None, limit: int) -> tuple[list[SessionInfo], str | None]:
        """Live sessions, latest deadline first (for sessions of one timeout:
        the most recently active first), then by uid, ``limit`` at a time.

        The cursor is the (deadline, uid) of the last session returned, and a
        page holds those strictly after it in that order. So a full scan
        returns no session twice: a session touched during the scan moves to
        a later deadline, behind the cursor (it is left out if it had not
        been returned yet, as are sessions created during the scan).
        Sessions live throughout the scan and not touched are all returned.
        """
        if limit < 1:
            raise ValueError(f"a scan limit is at least 1, not {limit!r}")
        after: tuple[float, str] | None = None
        if cursor is not None:
            mark, sep, last_uid = cursor.partition(":")
            try:
                after = (float(mark), last_uid)
            except ValueError:
                after = None
            if not sep or after is None:
                raise ValueError(f"not a scan cursor of this store: {cursor!r}")

        def scan(conn: sqlite3.Connection, now: float) -> tuple[list[SessionInfo], str | None]:
            if after is None:
                rows = conn.execute(SQL.scan_first, (now + EPSILON, limit + 1)).fetchall()
            else:
                params = (now + EPSILON, after[0], after[0], after[1], limit + 1)
                rows = conn.execute(SQL.scan_after, params).fetchall()
            infos = [session_info(conn, row) for row in rows[:limit]]
            if len(rows) <= limit:
                return infos, None
            last = rows[limit - 1]
            return infos, f"{last[3]!r}:{last[0]}"

        return await self._runner.call(scan, write=False)

    async def info(self, uid: str) -> SessionInfo | None:
        """The live session ``uid`` (not an alias), or None. ``last_access``
        is ``deadline - timeout``, or the creation if later: exact, except
        that a session whose deadline is its absolute end records no later
        touch (it is then the earliest time that touch can have been)."""

        def info(conn: sqlite3.Connection, now: float) -> SessionInfo | None:
            row = conn.execute(SQL.info, (uid, now + EPSILON)).fetchone()
            return None if row is None else session_info(conn, row)

        return await self._runner.call(info, write=False)

    async def count(self) -> int:
        """Live sessions now (a count over the index of live deadlines)."""

        def count(conn: sqlite3.Connection, now: float) -> int:
            (n,) = conn.execute(SQL.count_live, (now + EPSILON,)).fetchone()
            return int(n)

        return await self._runner.call(count, write=False)

    async def deadlines(self, now: float, horizon: float, buckets: int) -> list[int]:
        """Live sessions ending in each slice of ``(now, now + horizon]``
        (one grouped query over the index of live deadlines)."""
        width = _bucket_bounds(now, horizon, buckets)

        def deadlines(conn: sqlite3.Connection, _now: float) -> list[int]:
            counts = [0] * buckets
            params: tuple[Any, ...] = (now, width, now, now + horizon)
            for bucket, n in conn.execute(SQL.count_by_deadline, params):
                counts[min(buckets - 1, max(0, int(bucket)))] += int(n)
            return counts

        return await self._runner.call(deadlines, write=False)
