"""Helpers for the SQLite store tests (test_store_sqlite*.py): running a body
on an opened store, and process bodies that a ``multiprocessing`` spawn
context can import (so they live in a module)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from lapse.sessions.store import StoredSession
from lapse.sessions.stores.sqlite import SQLiteStore

T = TypeVar("T")


def with_store(
    db: str, clock: Callable[[], float], body: Callable[[SQLiteStore], Awaitable[T]], **kw: Any
) -> T:
    """Run ``body(store)`` on an opened store, closing it afterwards."""

    async def main() -> T:
        store = SQLiteStore(db, clock=clock, **kw)
        await store.open()
        try:
            return await body(store)
        finally:
            await store.aclose()

    return asyncio.run(main())


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def summary(stored: StoredSession | None) -> tuple[str, float, float, dict[str, Any]] | None:
    """A loaded session's uid, timeout, deadline and decoded data."""
    if stored is None:
        return None
    return (stored.uid, stored.timeout, stored.deadline, stored.decoded())


FAR_FUTURE = 10_000_000_000.0


def far_future() -> float:
    """A fixed clock, late enough that every session made at 1000 is due."""
    return FAR_FUTURE


def claim_in_rounds(path: str, owner: str, rounds: int, barrier: Any, results: Any) -> None:
    """A process that claims (three at a time) once per round, for a fixed
    number of rounds, every round starting in every process at once
    (``barrier``): each claim races the other processes' claims of its round,
    and no process can drain the file while the others wait. Puts (owner,
    the uids claimed in each round)."""

    async def main() -> list[list[str]]:
        store = SQLiteStore(path, clock=far_future, busy_timeout=30.0, timeout=30.0)
        await store.open()
        got: list[list[str]] = []
        try:
            for _ in range(rounds):
                barrier.wait(timeout=60)
                claims = await store.claim(owner, lease=3600.0, limit=3)
                got.append([claim.uid for claim in claims])
        finally:
            await store.aclose()
        return got

    results.put((owner, asyncio.run(main())))


def open_and_create(path: str, name: str, count: int, barrier: Any, results: Any) -> None:
    """A process that opens a (new) file at the same moment as others, then
    creates ``count`` sessions; puts (name, error or None)."""

    async def main() -> None:
        store = SQLiteStore(path, clock=lambda: 1000.0, busy_timeout=30.0, timeout=30.0)
        barrier.wait()
        try:
            await store.open()
            for i in range(count):
                await store.create(f"{name}-{i}", 60.0, {"by": name})
        finally:
            await store.aclose()

    try:
        asyncio.run(main())
    except Exception as exc:
        results.put((name, repr(exc)))
    else:
        results.put((name, None))


def bind_in_process(path: str, uids: list[str], limit: int, barrier: Any, results: Any) -> None:
    """A process that binds each of ``uids`` to "alice" with ``limit``, all
    at once, once every process is ready (``barrier``); puts the uids its
    calls superseded."""

    async def main() -> list[str]:
        store = SQLiteStore(path, clock=lambda: 1000.0, busy_timeout=30.0, timeout=30.0)
        await store.open()
        try:
            barrier.wait(timeout=60)
            done = await asyncio.gather(
                *(store.set_principal(uid, "alice", limit=limit) for uid in uids)
            )
        finally:
            await store.aclose()
        return [uid for superseded in done for uid in superseded or []]

    results.put(asyncio.run(main()))


class PollingSQLiteStore(SQLiteStore):
    """A SQLite store whose keepers cannot be woken (no ``wait_for_news``):
    a shared store that the keeper must poll."""

    wait_for_news = None  # type: ignore[assignment]
