"""Helpers for the SQLite batching tests (test_store_sqlite_batch*.py): process
bodies a ``multiprocessing`` spawn context can import, a small real file
system to fill up, and what a file holds, read by a connection of its own."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lapse.sessions.stores.sqlite import SQLiteStore

BATCH = 50
"""Calls each writer process makes at once (one event-loop turn)."""


def write_batches(path: str, acked: str, tag: str) -> None:
    """A process that creates sessions ``BATCH`` at a time, forever (until
    killed), appending to ``acked`` the number of each batch once every call
    of it has returned: what was acknowledged to its callers."""

    async def main() -> None:
        store = SQLiteStore(path, busy_timeout=30.0, timeout=30.0)
        await store.open()
        with open(acked, "a", encoding="ascii") as out:
            n = 0
            while True:
                await asyncio.gather(
                    *(
                        store.create(f"{tag}-{n}-{i}", 600.0, {"batch": n, "i": i})
                        for i in range(BATCH)
                    )
                )
                out.write(f"{n}\n")
                out.flush()
                n += 1

    asyncio.run(main())


def save_keys(path: str, uid: str, tag: str, count: int, barrier: Any) -> None:
    """A process that writes ``count`` keys of its own to the session ``uid``,
    ten saves at once, starting with the other processes (``barrier``)."""

    async def main() -> None:
        store = SQLiteStore(path, busy_timeout=30.0, timeout=30.0)
        await store.open()
        barrier.wait()
        for start in range(0, count, 10):
            results = await asyncio.gather(
                *(store.save(uid, {f"{tag}{i}": i}, []) for i in range(start, start + 10))
            )
            assert all(results), results
        await store.aclose()

    asyncio.run(main())


def rows(path: str, query: str, *args: Any) -> list[Any]:
    """What another connection reads from the file."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(query, args).fetchall()
    finally:
        conn.close()


@contextlib.contextmanager
def small_disk(size: str = "1m") -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted for the test (skipped where this user
    cannot mount one), unmounted after."""
    import pytest

    where = Path(tempfile.mkdtemp(prefix="lapse-small-disk-"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace')}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        with contextlib.suppress(OSError):
            where.rmdir()


def fill(directory: Path) -> Path:
    """A file taking all the room left in ``directory``'s file system."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:
        for size in (65536, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * size)
    return filler
