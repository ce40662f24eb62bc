"""The loads of one event-loop tick, as one statement.

A busy server starts many requests in one turn of its event loop, and each
begins with a load (touch) of its session. Sent one by one, every load pays
the driver's whole cost of a statement, which is most of a request's CPU on
this store; :class:`LoadBatcher` gathers the loads asked in one turn and
sends them together (``load_many``: the same touch, for an array of uids),
as the Redis client writes one turn's commands at once. A lone load is sent
as the single statement ``load``. Each load is answered when its statement
has committed; a failure fails every load of that statement.

Several loads of one uid in a turn (concurrent requests of one session) are
asked once: with the version they all hold, or with none if they differ (so
the data comes back, and each decides for itself whether it is unchanged).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from lapse.sessions.store import StoredSession, StoreUnavailable
from lapse.sessions.stores.postgres.pool import Pool
from lapse.sessions.stores.postgres.queries import Queries
from lapse.sessions.stores.postgres.values import load_encoded

__all__ = ["LoadBatcher", "stored"]

_Waiter = tuple[str, int | None, "asyncio.Future[StoredSession | None]"]


def stored(row: Any, version: int | None) -> StoredSession:
    """A load's answer from its row (uid, timeout, deadline, version, keys,
    texts): no data if the version is still ``version``."""
    live, timeout, deadline, current, keys, texts = row
    if keys is None or current == version:
        return StoredSession(live, timeout, deadline, version=current, unchanged=True)
    encoded = load_encoded(keys, texts)
    return StoredSession(live, timeout, deadline, encoded=encoded, version=current)


class LoadBatcher:
    """Gathers one tick's loads into one statement (see the module)."""

    def __init__(self, pool: Pool, sql: Queries, now: Callable[[], float | None]) -> None:
        self.pool = pool
        self.sql = sql
        self.now = now
        self._waiting: list[_Waiter] = []
        self._running: set[asyncio.Task[None]] = set()
        self.statements = 0
        """Statements sent (tests compare it with the loads asked)."""

    def load(self, uid: str, version: int | None) -> asyncio.Future[StoredSession | None]:
        """The answer of ``load(uid, version)``, sent at the end of this tick."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[StoredSession | None] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._send)
        self._waiting.append((uid, version, answer))
        return answer

    def _send(self) -> None:
        batch, self._waiting = self._waiting, []
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[_Waiter]) -> None:
        asked: dict[str, int | None] = {}
        for uid, version, _ in batch:
            if uid in asked and asked[uid] != version:
                asked[uid] = None
            else:
                asked.setdefault(uid, version)
        now, sql = self.now(), self.sql
        self.statements += 1
        try:
            if len(asked) == 1:
                ((uid, version),) = asked.items()
                row = await self.pool.run(lambda conn: conn.fetchrow(sql.load, now, uid, version))
                rows = {uid: tuple(row)} if row is not None else {}
            else:
                uids, versions = list(asked), list(asked.values())
                found = await self.pool.run(
                    lambda conn: conn.fetch(sql.load_many, now, uids, versions)
                )
                rows = {row[0]: tuple(row)[1:] for row in found}
        except StoreUnavailable as exc:
            for _, _, answer in batch:
                if not answer.done():
                    error = StoreUnavailable(str(exc), permanent=exc.permanent)
                    error.__cause__ = exc.__cause__
                    answer.set_exception(error)
            return
        except BaseException as exc:
            for _, _, answer in batch:
                if not answer.done():
                    answer.set_exception(RuntimeError(f"session load failed: {exc!r}"))
            raise
        for uid, version, answer in batch:
            if not answer.done():
                row = rows.get(uid)
                answer.set_result(None if row is None else stored(row, version))

    async def aclose(self) -> None:
        """Wait for the statements in flight."""
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
