"""The Redis store's inspection (``lapse sessions``, the live view): scripts
and commands that touch no session, never ``KEYS`` nor ``SCAN``."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from lapse.sessions.store import SessionInfo, _bucket_bounds
from lapse.sessions.stores.redis.layout import Shard
from lapse.sessions.stores.redis.values import session_info, us

__all__ = ["Inspection"]


class Inspection:
    """The inspection methods of :class:`RedisStore
    <lapse.sessions.stores.redis.RedisStore>`, over its plumbing; across
    every shard (one script or command per shard, gathered)."""

    prefix: str
    _shards: tuple[Shard, ...]

    if TYPE_CHECKING:

        def _now_arg(self) -> str: ...

        def _shard(self, uid: str) -> Shard: ...

        async def _call(self, op: str, keys: list[str], args: list[str | int]) -> Any: ...

        async def _command_on(self, op: str, key: str, *args: str | int) -> Any: ...

    async def scan(self, cursor: str | None, limit: int) -> tuple[list[SessionInfo], str | None]:
        """Live sessions from the deadlines sorted sets, latest deadline first
        (for sessions of one timeout: the most recently active first), ties
        by uid descending, ``limit`` at a time: one script per shard per page
        (the range, then each session's hash), never ``KEYS`` or ``SCAN``;
        the shards' pages merged.

        The cursor is the (deadline, uid) of the last session returned; the
        next page starts right after it. So a full scan returns no session
        twice: a session touched during the scan moves to a later deadline,
        behind the cursor (left out if not returned yet, as are sessions
        created during the scan). Sessions live throughout the scan and not
        touched are all returned.
        """
        if limit < 1:
            raise ValueError(f"a scan limit is at least 1, not {limit!r}")
        mark, after = "", ""
        if cursor is not None:
            mark, sep, after = cursor.partition(":")
            if not sep or not mark.isdigit():
                raise ValueError(f"not a scan cursor of this store: {cursor!r}")
        now = self._now_arg()

        async def page(shard: Shard) -> list[tuple[str, str, Any]]:
            args: list[str | int] = [now, shard.base, mark, after, int(limit) + 1]
            flat = await self._call("scan", [shard.deadlines], args)
            return [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)]

        pages = await asyncio.gather(*map(page, self._shards))
        rows = [row for rows in pages for row in rows]
        if len(pages) > 1:  # merged: one order across the shards
            rows.sort(key=lambda row: (int(row[1]), row[0]), reverse=True)
        infos = [session_info(uid, score, data) for uid, score, data in rows[:limit]]
        if len(rows) <= limit:
            return infos, None
        uid, score, _ = rows[limit - 1]
        return infos, f"{score}:{uid}"

    async def info(self, uid: str) -> SessionInfo | None:
        """The live session ``uid`` (not an alias), or None; one script.
        ``last_access`` is ``deadline - timeout``, or the creation if later:
        exact, except that a session whose deadline is its absolute end
        records no later touch (it is then the earliest that touch can be)."""
        shard = self._shard(uid)
        keys = [shard.deadlines, f"{shard.base}:s:{uid}"]
        reply = await self._call("info", keys, [self._now_arg(), uid])
        return None if not reply else session_info(uid, reply[0], reply[1])

    async def count(self) -> int:
        """Live sessions now: ``ZCOUNT`` of each shard's deadlines after now."""
        now = self._now_arg()

        async def live(shard: Shard) -> int:
            return int(await self._call("count", [shard.deadlines], [now]))

        return sum(await asyncio.gather(*map(live, self._shards)))

    async def deadlines(self, now: float, horizon: float, buckets: int) -> list[int]:
        """One ``ZCOUNT`` of each shard's deadlines per slice, all pipelined
        (one round trip per node); the shards' counts added."""
        _bucket_bounds(now, horizon, buckets)
        start = us(now, "now")
        span = us(horizon, "horizon")
        bounds = [start + span * i // buckets for i in range(buckets + 1)]
        calls = []
        for shard in self._shards:
            for i in range(buckets):
                low = f"({start}" if i == 0 else str(bounds[i])
                high = str(bounds[i + 1]) if i == buckets - 1 else f"({bounds[i + 1]}"
                key = shard.deadlines
                calls.append(self._command_on("deadlines", key, "ZCOUNT", key, low, high))
        counts = [int(n) for n in await asyncio.gather(*calls)]
        return [sum(counts[i::buckets]) for i in range(buckets)]
