"""The calls of one event-loop tick, as one statement.

A busy server starts many requests in one turn of its event loop: each
begins with a load (touch) of its session, a new visitor's ends with a
create, and a round of expiry acknowledges many sessions at once. Sent one
by one, every call pays the driver's whole cost of a statement, which is
most of a request's CPU on this store. A :class:`TickBatch` gathers the
calls of one kind asked in one turn and sends them together, as the Redis
client writes one turn's commands at once: the store's ``load``, ``create``
and ``ack`` statements take arrays (a lone call is an array of one). Each
call is answered once its statement has committed; a failure fails every
call of that statement, each with an error of its own.

Several loads of one uid in a turn (concurrent requests of one session) are
asked once: with the version they all hold, or with none if they differ (so
the data comes back, and each decides for itself whether it is unchanged).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from lapse.sessions.store import StoredSession, StoreUnavailable
from lapse.sessions.stores.postgres.values import load_encoded

__all__ = ["TickBatch", "load_answers", "stored"]

Item = TypeVar("Item")
Answer = TypeVar("Answer")


class TickBatch(Generic[Item, Answer]):
    """Gathers the calls made in one event-loop turn; ``send(items)`` runs
    them as one statement and returns one answer per item, in order."""

    def __init__(self, send: Callable[[list[Item]], Awaitable[Sequence[Answer]]]) -> None:
        self._send = send
        self._waiting: list[tuple[Item, asyncio.Future[Answer]]] = []
        self._running: set[asyncio.Task[None]] = set()
        self.statements = 0
        """Statements sent (tests compare it with the calls made)."""

    def ask(self, item: Item) -> asyncio.Future[Answer]:
        """The answer to ``item``, sent at the end of this turn."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Answer] = loop.create_future()
        if not self._waiting:
            loop.call_soon(self._flush)
        self._waiting.append((item, answer))
        return answer

    def _flush(self) -> None:
        batch, self._waiting = self._waiting, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[tuple[Item, asyncio.Future[Answer]]]) -> None:
        self.statements += 1
        try:
            answers = await self._send([item for item, _ in batch])
        except StoreUnavailable as exc:
            for _, answer in batch:
                if not answer.done():
                    error = StoreUnavailable(str(exc), permanent=exc.permanent)
                    error.__cause__ = exc.__cause__
                    answer.set_exception(error)
            return
        except BaseException as exc:
            for _, answer in batch:
                if not answer.done():
                    answer.set_exception(RuntimeError(f"session store call failed: {exc!r}"))
            if not isinstance(exc, Exception):
                raise  # (cancelled: the store is closing)
            return
        for (_, answer), result in zip(batch, answers, strict=True):
            if not answer.done():
                answer.set_result(result)

    async def aclose(self) -> None:
        """Wait for the statements in flight."""
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)


def stored(row: Sequence[Any], version: int | None) -> StoredSession:
    """A load's answer from its row (uid, timeout, deadline, version,
    principal, keys, texts): no data if the version is still ``version``."""
    live, timeout, deadline, current, principal, keys, texts = row
    if keys is None or current == version:
        return StoredSession(
            live, timeout, deadline, version=current, unchanged=True, principal=principal
        )
    encoded = load_encoded(keys, texts)
    return StoredSession(
        live, timeout, deadline, encoded=encoded, version=current, principal=principal
    )


def load_answers(
    asked: list[tuple[str, int | None]],
    fetch: Callable[[list[str], list[int | None]], Awaitable[list[Any]]],
) -> Awaitable[list[StoredSession | None]]:
    """The answers to loads ``(uid, version)``: each uid asked once (see the
    module) through ``fetch(uids, versions)``, the ``load`` statement."""

    async def answer() -> list[StoredSession | None]:
        versions: dict[str, int | None] = {}
        for uid, version in asked:
            if uid in versions and versions[uid] != version:
                versions[uid] = None
            else:
                versions.setdefault(uid, version)
        found = await fetch(list(versions), list(versions.values()))
        rows = {row[0]: tuple(row)[1:] for row in found}
        return [
            None if (row := rows.get(uid)) is None else stored(row, version)
            for uid, version in asked
        ]

    return answer()
