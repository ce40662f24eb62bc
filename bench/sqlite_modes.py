"""The SQLite store's cost per request, in process: touch and create through a ``Site``,
one at a time and ``--concurrency`` at once (as wrk -c50 gives a server), per
``synchronous`` mode and ``wal_autocheckpoint``.

For each case: wall µs per request and CPU µs per request (``time.process_time``: every
thread of this process, the store's worker included), the median of ``--rounds`` rounds,
and the store's transactions per request (from the runner's counter, where it has one).
A mode is a store URL option (``?synchronous=off|normal|full|extra``,
``?wal_autocheckpoint=PAGES``); a URL this lapse refuses is reported as such.

Run: ``PYTHONPATH=src .venv/bin/python bench/sqlite_modes.py [--requests N] [--rounds R]
[--concurrency C] [--modes normal,full] [--checkpoints 1000,10000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make the bench package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.micro import App, ReadOne, request, serving
from lapse.sessions.store import StoreConfigError
from lapse.web.server import Site


async def rounds_of(
    app: App, cookie: bytes | None, requests: int, rounds: int, together: int
) -> tuple[float, float]:
    """Median wall and CPU µs per request over ``rounds`` rounds of ``requests``
    requests, ``together`` at once."""
    walls, cpus = [], []
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(requests // together):
            await asyncio.gather(*(request(app, cookie) for _ in range(together)))
        done = requests // together * together
        walls.append((time.perf_counter() - wall) / done * 1e6)
        cpus.append((time.process_time() - cpu) / done * 1e6)
    return statistics.median(walls), statistics.median(cpus)


def transactions(site: Site) -> int | None:
    runner: Any = getattr(site.store, "_runner", None)
    count = getattr(runner, "transactions", None)
    return count if isinstance(count, int) else None


async def case(url: str, requests: int, rounds: int, together: int) -> list[str]:
    try:
        site = Site(ReadOne(), store=url)
    except StoreConfigError as exc:
        return [f"| {url.partition('?')[2]} | refused: {exc} |"]
    lines = []
    label = url.partition("?")[2] or "default"
    async with serving(site):
        cookie = await request(site, None)
        await site.store.save(cookie.decode() if cookie else "", {"key0": 1}, [])
        for what, given in (("touch", cookie), ("create", None)):
            for n in (1, together):
                before = transactions(site)
                wall, cpu = await rounds_of(site, given, requests, rounds, n)
                after = transactions(site)
                per = "—"
                if before is not None and after is not None:
                    per = f"{(after - before) / (requests // n * n * rounds):.2f}"
                lines.append(f"| {label} | {what} | {n} | {wall:,.0f} | {cpu:,.0f} | {per} |")
    return lines


def raw(batches: int, together: int, queries: list[str]) -> None:
    """SQLite alone, on this thread: ``batches`` transactions of ``together``
    touches (the store's load statements), per mode: wall and CPU µs per
    touch, and checkpoints' share (the WAL's pages when done)."""
    from lapse.sessions.stores.sqlite.store import SQLiteStore

    print("| options | touches per transaction | wall µs/touch | CPU µs/touch | WAL pages at end |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, query in enumerate(queries):
            url = f"sqlite:///{tmp}/raw-{i}.db" + (f"?{query}" if query else "")
            try:
                store = SQLiteStore.from_url(url)
            except StoreConfigError as exc:
                print(f"| {query} | refused: {exc} |")
                continue

            async def touches(
                store: SQLiteStore = store, query: str = query
            ) -> tuple[float, float, int]:
                await store.create("u1", 600.0, {"key0": 1})  # (the file and its schema)
                await store.aclose()
                conn = sqlite3.connect(store.path, isolation_level=None)
                mode = query.partition("=")[2] if query.startswith("synchronous") else "normal"
                conn.execute(f"PRAGMA synchronous = {mode}")
                pages = query.partition("=")[2] if query.startswith("wal_") else "1000"
                conn.execute(f"PRAGMA wal_autocheckpoint = {pages}")
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(batches):
                    conn.execute("BEGIN IMMEDIATE")
                    for _ in range(together):
                        touch(conn, "u1", time.time())
                    conn.execute("COMMIT")
                n = batches * together
                wal = os.path.getsize(store.path + "-wal") // 4096
                conn.close()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                return wall / n * 1e6, cpu / n * 1e6, wal

            wall, cpu, wal = asyncio.run(touches())
            print(f"| {query or 'default'} | {together} | {wall:,.1f} | {cpu:,.1f} | {wal:,} |")


def touch(conn: sqlite3.Connection, uid: str, now: float) -> None:
    """The statements of the store's load (touch) of a live session."""
    from lapse.sessions.stores.sqlite.queries import SQL, clamp, resolve

    live = resolve(conn, uid, now)
    timeout, ends_at, _, _ = conn.execute(SQL.load_session, (live,)).fetchone()
    conn.execute(SQL.touch, (clamp(now + timeout, ends_at), live))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/sqlite_modes.py", description=__doc__)
    parser.add_argument("--requests", type=int, default=1000, help="per round (1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per case (3)")
    parser.add_argument("--concurrency", type=int, default=50, help="requests at once (50)")
    parser.add_argument("--modes", default="", help="synchronous modes, comma-separated")
    parser.add_argument("--checkpoints", default="", help="wal_autocheckpoint values")
    parser.add_argument("--raw", type=int, default=0,
                        help="instead: SQLite alone, this many transactions per mode")  # fmt: skip
    options = parser.parse_args(argv)
    queries = [""]
    queries += [f"synchronous={m}" for m in options.modes.split(",") if m]
    queries += [f"wal_autocheckpoint={p}" for p in options.checkpoints.split(",") if p]
    if options.raw:
        for together in (1, options.concurrency):
            raw(options.raw, together, queries)
        return 0
    print("| options | call | at once | wall µs/request | CPU µs/request | transactions/request |")
    print("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, query in enumerate(queries):
            url = f"sqlite:///{tmp}/modes-{i}.db" + (f"?{query}" if query else "")
            lines = asyncio.run(case(url, options.requests, options.rounds, options.concurrency))
            print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
