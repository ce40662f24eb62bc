"""Helpers for the SQLite store tests: process bodies that a
``multiprocessing`` spawn context can import (so they live in a module)."""

from __future__ import annotations

import asyncio
from typing import Any

from lapse.sessions.stores.sqlite import SQLiteStore

FAR_FUTURE = 10_000_000_000.0


def far_future() -> float:
    """A fixed clock, late enough that every session made at 1000 is due."""
    return FAR_FUTURE


def claim_all(path: str, owner: str, barrier: Any, results: Any, after_first: Any) -> None:
    """A process that claims until nothing is left; puts (owner, uids). All
    start together (``barrier``), and each waits for the others' first claim
    (``after_first``) before going on, so that they really race: no process
    can drain the file before the others have claimed."""

    async def main() -> list[str]:
        store = SQLiteStore(path, clock=far_future, busy_timeout=30.0, timeout=30.0)
        await store.open()
        barrier.wait()
        uids: list[str] = []
        first = True
        try:
            while True:
                claims = await store.claim(owner, lease=3600.0, limit=3)
                if first:
                    first = False
                    await asyncio.to_thread(after_first.wait)
                if not claims:
                    return uids
                uids.extend(claim.uid for claim in claims)
        finally:
            await store.aclose()

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
