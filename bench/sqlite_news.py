"""What each way for an idle SQLite process to notice other processes' commits costs.

In process, on a real file in WAL mode (a store opened on it): CPU µs per check of

- ``pread`` of the WAL index header (48 bytes of the ``-shm``): what ``wait_for_news`` first did
  (no more: closing its own descriptor dropped SQLite's locks on the file; see news.py);
- ``os.stat`` of the ``-wal`` (size and mtime): what ``wait_for_news`` does without inotify;
- ``PRAGMA data_version`` on the store's connection, through its worker thread (a hop);
- the event loop's wake-up itself (``asyncio.sleep(0)`` / a 1 ms timer), for scale;

and the CPU one idle ``wait_for_news`` uses per second (uvloop, as the server runs), with
inotify and without it (a ``stat`` of the ``-wal`` every 50 ms).

Run: ``PYTHONPATH=src .venv/bin/python bench/sqlite_news.py [--checks N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

from lapse.sessions.stores.sqlite import SQLiteStore, news


def per_check(checks: int, check: Callable[[], object]) -> float:
    started = time.process_time()
    for _ in range(checks):
        check()
    return (time.process_time() - started) / checks * 1e6


async def per_async_check(checks: int, check: Callable[[], Awaitable[object]]) -> float:
    started = time.process_time()
    for _ in range(checks):
        await check()
    return (time.process_time() - started) / checks * 1e6


async def measure(checks: int, idle: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/s.db"
        store = SQLiteStore(path)
        await store.open()
        await store.create("u1", 600.0, {"k": 1})
        await store.events(None)
        fd = os.open(path + "-shm", os.O_RDONLY)
        try:
            rows = [
                ("pread of the WAL index header", per_check(checks, lambda: os.pread(fd, 48, 0))),
                ("os.stat of the -wal", per_check(checks, lambda: os.stat(path + "-wal"))),
            ]
        finally:
            os.close(fd)
        version = lambda: store._runner.call(  # noqa: E731
            lambda conn, now: conn.execute("PRAGMA data_version").fetchone(), False
        )
        hop = await per_async_check(checks // 10, version)
        rows.append(("PRAGMA data_version via the worker", hop))
        turn = await per_async_check(checks, lambda: asyncio.sleep(0))
        rows.append(("event loop: asyncio.sleep(0)", turn))
        timer = await per_async_check(checks // 10, lambda: asyncio.sleep(0.001))
        rows.append(("event loop: a 1 ms timer", timer))
        for how in ("inotify", "looks"):
            if how == "looks":
                news.watch_wal = lambda path: None  # type: ignore[assignment]
            started = time.process_time()
            woken = await store.wait_for_news(idle)
            spent = (time.process_time() - started) / idle * 1e6
            rows.append((f"idle wait_for_news({idle:g}), {how}, per s (woken: {woken})", spent))
        await store.aclose()
    print("| check | CPU µs |\n|---|---:|")
    for name, micros in rows:
        print(f"| {name} | {micros:,.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/sqlite_news.py", description=__doc__)
    parser.add_argument("--checks", type=int, default=20_000, help="checks per way (20000)")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle wait (5)")
    options = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.run(measure(options.checks, options.idle))
    except ImportError:
        asyncio.run(measure(options.checks, options.idle))
    return 0


if __name__ == "__main__":
    sys.exit(main())
