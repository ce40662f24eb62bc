"""The Redis store's keeper questions, asked of every shard: ``claim``,
``events`` and ``next_deadline``.

On a sharded deployment each is one script or command per shard, gathered
(one round trip per node). A shard that is unavailable (its primary down,
until a replica takes over) does not stop the others: its part of the
answer is left out (what is due there waits, its announcements are read
later from where its cursor stood) and the outage is logged once, when it
starts and when it ends. Only when every shard fails does the call fail.
Inspection, by contrast, stays all or nothing (:mod:`.inspection`): an
operator's count must not silently leave a shard out.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from lapse.sessions.store import Event, Expiry, StoreUnavailable
from lapse.sessions.stores.redis.layout import Shard
from lapse.sessions.stores.redis.news import News
from lapse.sessions.stores.redis.values import US, decoded, field, us

__all__ = ["Rounds"]

log = logging.getLogger("lapse.sessions")

T = TypeVar("T")

_EVENTS_BATCH = 1000
_CURSOR = re.compile(r"\d+(-\d+)?")


def _garbled(exc: StoreUnavailable) -> bool:
    """Whether a read failed on a reply that is not UTF-8 (the connection is fine)."""
    return str(exc.__cause__).startswith("reply is not UTF-8")


class Rounds:
    """The keeper's questions of :class:`RedisStore
    <lapse.sessions.stores.redis.RedisStore>`, over its plumbing."""

    _shards: tuple[Shard, ...]
    _where: str
    _down: set[str]
    _news: News

    if TYPE_CHECKING:

        def _now_arg(self) -> str: ...

        async def _call(self, op: str, keys: list[str], args: list[str | int]) -> Any: ...

        async def _command_on(self, op: str, key: str, *args: str | int) -> Any: ...

    async def _each(
        self, shards: Sequence[Shard], work: Callable[[Shard], Awaitable[T]]
    ) -> list[T | None]:
        """``work`` on each shard, together: each result, or None for a
        shard that was unavailable (unless all were: then the first failure
        is raised)."""
        results = await asyncio.gather(*map(work, shards), return_exceptions=True)
        failures = [r for r in results if isinstance(r, StoreUnavailable)]
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, StoreUnavailable):
                raise result
        if len(failures) == len(results) and failures:
            raise failures[0]  # the store is down: the keeper reports that, once
        out: list[T | None] = []
        for shard, result in zip(shards, results, strict=True):
            if isinstance(result, StoreUnavailable):
                if shard.base not in self._down:
                    self._down.add(shard.base)
                    log.warning(
                        "Redis shard %s of %s unavailable, the other shards still served: %s",
                        shard.base,
                        self._where,
                        result,
                    )
                out.append(None)
            else:
                if shard.base in self._down:
                    self._down.discard(shard.base)
                    log.warning("Redis shard %s of %s is reachable again", shard.base, self._where)
                out.append(cast(T, result))
        return out

    async def claim(self, owner: str, lease: float, limit: int) -> list[Expiry]:
        """Atomically lease up to ``limit`` ended sessions, oldest first (by
        when each became claimable): live ones past their deadline (cause
        ``"timeout"``), ones ended by :meth:`expire` (``"expired"``), and
        leased ones whose lease ran out (same delivery id, attempt + 1).
        Each comes with its final data."""
        if limit <= 0:
            return []
        shards = self._shards
        if len(shards) == 1:
            return await self._claim_in(shards[0], owner, lease, limit)
        # Oldest first across the shards: when each shard's oldest claimable
        # entries became claimable (one read-only script per shard, all in
        # one round trip per node), then each shard claims its part of the
        # oldest ``limit`` overall. Nothing due (an idle poll): one round.
        now = self._now_arg()

        async def due(shard: Shard) -> list[int]:
            keys = [shard.deadlines, shard.ended, shard.leases]
            return [int(score) for score in await self._call("due", keys, [now, int(limit)])]

        found = await self._each(shards, due)
        oldest = sorted((score, i) for i, scores in enumerate(found) for score in scores or ())
        quotas = [0] * len(shards)
        for _, i in oldest[:limit]:
            quotas[i] += 1
        asked = [i for i, quota in enumerate(quotas) if quota]
        if not asked:
            return []
        share = {shards[i]: quotas[i] for i in asked}
        claimed = await self._each(
            list(share), lambda shard: self._claim_in(shard, owner, lease, share[shard])
        )
        # In the order of the oldest overall (each batch is oldest first).
        queues = {i: iter(batch or ()) for i, batch in zip(asked, claimed, strict=True)}
        merged = [next(queues[i], None) for _, i in oldest[:limit]]
        return [expiry for expiry in merged if expiry is not None]

    async def _claim_in(self, shard: Shard, owner: str, lease: float, limit: int) -> list[Expiry]:
        keys = [shard.deadlines, shard.ended, shard.leases, shard.seq]
        args: list[str | int] = [
            self._now_arg(),
            shard.base,
            owner,
            us(lease, "lease"),
            int(limit),
        ]
        reply = await self._call("claim", keys, args)
        return [
            Expiry(uid, decoded(flat), delivery_id, int(attempt), cause)
            for uid, delivery_id, attempt, cause, flat in reply
        ]

    async def events(self, cursor: str | None) -> tuple[list[Event], str]:
        """Uids acked after ``cursor`` (a stream id per shard, joined by
        commas; at most 1000 a shard a call; ``(old, new)`` pairs for
        rotations), and the new cursor. ``None``: no uids, and the streams'
        last ids (or ``"0-0"``), to read from now on. A shard that is
        unavailable keeps its place in the cursor."""
        shards = self._shards
        marks: list[str] | None = None
        if cursor is not None:
            marks = cursor.split(",")
            if len(marks) != len(shards) or not all(_CURSOR.fullmatch(m) for m in marks):
                raise ValueError(f"not a Redis events cursor of this store: {cursor!r}")
        if marks is None:
            lasts = await asyncio.gather(*(self._last_event(shard) for shard in shards))
            self._news.marks = lasts  # (wait_for_news wakes for what comes after)
            return [], ",".join(lasts)
        where = dict(zip(shards, marks, strict=True))
        batches = await self._each(shards, lambda shard: self._events_after(shard, where[shard]))
        found: list[Event] = []
        after = []
        for mark, batch in zip(marks, batches, strict=True):
            if batch is None:
                after.append(mark)
            else:
                found += batch[0]
                after.append(batch[1])
        self._news.marks = after
        return found, ",".join(after)

    async def _last_event(self, shard: Shard) -> str:
        last = await self._command_on(
            "events", shard.events, "XREVRANGE", shard.events, "+", "-", "COUNT", 1
        )
        return str(last[0][0]) if last else "0-0"

    async def _events_after(self, shard: Shard, mark: str) -> tuple[list[Event], str]:
        events = shard.events
        try:
            entries = await self._command_on(
                "events", events, "XRANGE", events, "(" + mark, "+", "COUNT", _EVENTS_BATCH
            )
            entries = entries or []
            last = str(entries[-1][0]) if entries else mark
        except StoreUnavailable as exc:
            if not _garbled(exc):
                raise
            entries, last = await self._readable_events(shard, mark)
        found: list[Event] = []
        for _, flat in entries:
            uid = field(flat, "uid") if flat else None
            if uid is not None:
                to = field(flat, "to")
                found.append(uid if to is None else (uid, to))
        return found, last

    async def _readable_events(self, shard: Shard, mark: str) -> tuple[list[Any], str]:
        """The entries after ``mark`` one by one, skipping those that are not
        UTF-8 (another program's: they would fail every read, for ever); and
        the last id, skipped or not."""
        ids = await self._call("event_ids", [shard.events], ["(" + mark, _EVENTS_BATCH])
        entries: list[Any] = []
        for entry_id in ids:
            try:
                entries += await self._command_on(
                    "events", shard.events, "XRANGE", shard.events, entry_id, entry_id
                )
            except StoreUnavailable as exc:
                if not _garbled(exc):
                    raise
                log.warning("skipped entry %s of %s: it is not UTF-8", entry_id, shard.events)
        return entries, str(ids[-1]) if ids else mark

    async def next_deadline(self) -> float | None:
        """The earliest of: the live sessions' deadlines (possibly past, if
        due but unclaimed), the leases' ends, and now if a session ended by
        :meth:`expire` awaits a claim; over the shards that answer. None if
        there is nothing."""
        now = self._now_arg()

        async def earliest(shard: Shard) -> float | None:
            keys = [shard.deadlines, shard.leases, shard.ended]
            reply = await self._call("next_deadline", keys, [now])
            return None if reply is None else int(reply) / US

        found = [t for t in await self._each(self._shards, earliest) if t is not None]
        return min(found) if found else None
