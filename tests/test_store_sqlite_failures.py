"""The SQLite store's errors: locks held too long, files that cannot be
opened or are not databases, newer schemas, and the file deleted or replaced
while in use.

Time is a fake clock moved by assignment, except where real concurrency is
the point.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from _store_sqlite import (
    run,
    with_store,
)
from conftest import FakeClock

from lapse.sessions.store import (
    StoreUnavailable,
)
from lapse.sessions.stores.sqlite import SQLiteStore


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "sessions.db")


# -- errors ------------------------------------------------------------------------


def test_a_lock_held_past_busy_timeout_is_unavailable_and_the_next_call_works(
    db: str, clock: FakeClock
) -> None:
    async def body(store: SQLiteStore) -> None:
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreUnavailable) as info:
                await store.create("u1", 60.0, {})
        finally:
            holder.rollback()
            holder.close()
        assert db in str(info.value) and "locked" in str(info.value)
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        assert await store.create("u1", 60.0, {}) == 1060.0

    with_store(db, clock, body, busy_timeout=0.1)


def test_a_file_in_a_missing_directory_is_unavailable_at_open(
    tmp_path: Path, clock: FakeClock
) -> None:
    db = str(tmp_path / "missing" / "sessions.db")

    async def main() -> None:
        store = SQLiteStore(db, clock=clock)
        with pytest.raises(StoreUnavailable) as info:
            await store.open()
        assert db in str(info.value)
        assert isinstance(info.value.__cause__, sqlite3.Error)
        # the directory appears: the next call opens the file
        (tmp_path / "missing").mkdir()
        assert await store.create("u1", 60.0, {}) == 1060.0
        await store.aclose()

    run(main())


def test_a_file_that_is_not_a_database_is_unavailable_at_open(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are not the sessions you are looking for\n" * 100)

    async def main() -> None:
        store = SQLiteStore(str(path), clock=clock)
        with pytest.raises(StoreUnavailable) as info:
            await store.open()
        assert str(path) in str(info.value)
        assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
        await store.aclose()

    run(main())


def test_a_file_from_a_newer_schema_is_unavailable(db: str, clock: FakeClock) -> None:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()

    async def main() -> None:
        store = SQLiteStore(db, clock=clock)
        with pytest.raises(StoreUnavailable, match="schema version 99"):
            await store.open()
        await store.aclose()

    run(main())


def test_the_worker_thread_stops_at_aclose(db: str, clock: FakeClock) -> None:
    def workers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("lapse-sqlite")}

    before = workers()
    started: set[threading.Thread] = set()

    async def main() -> None:
        store = SQLiteStore(db, clock=clock)
        await store.open()
        started.update(workers() - before)
        await store.aclose()

    run(main())
    assert len(started) == 1
    for thread in started:
        thread.join(timeout=5)
        assert not thread.is_alive()


# -- the file deleted or replaced while in use --------------------------------------


def test_a_deleted_file_fails_the_call_that_wrote_into_it_then_a_new_file_is_made(
    db: str, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The file is deleted under a running store: the next call (a save,
    which went into the unlinked file) fails naming the file, with one error
    logged; the call after it makes a new, empty file at the path, which
    then works and survives a restart (no WAL of the old file is replayed)."""

    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60.0, {"a": 1})
        os.unlink(db)
        with pytest.raises(StoreUnavailable, match="deleted") as info:
            await store.save("u1", {"b": 2}, [])
        assert db in str(info.value)
        assert await store.load("u1") is None
        await store.create("u2", 60.0, {"c": 3})

    with caplog.at_level(logging.WARNING, logger="lapse.sessions"):
        with_store(db, clock, body)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and db in errors[0] and "deleted" in errors[0], errors
    assert any("created anew" in r.getMessage() for r in caplog.records)

    async def restarted(store: SQLiteStore) -> list[Any]:
        loaded = await store.load("u2")
        return [await store.exists("u1"), None if loaded is None else loaded.decoded()]

    assert with_store(db, clock, restarted) == [False, {"c": 3}]


def test_a_replaced_file_is_not_written_and_is_used_from_the_next_call(
    db: str, tmp_path: Path, clock: FakeClock
) -> None:
    """Another database moved over the path (``mv``) while the store runs:
    the next call fails ("replaced"); the one after uses the new file, which
    keeps its own sessions and gets none of the old file's (its WAL is not
    replayed into it), then or after a restart."""
    other = str(tmp_path / "other.db")
    with_store(other, clock, lambda store: store.create("theirs", 60.0, {}))

    async def body(store: SQLiteStore) -> list[bool]:
        await store.create("ours", 60.0, {})
        os.replace(other, db)
        with pytest.raises(StoreUnavailable, match="replaced"):
            await store.create("lost", 60.0, {})
        return [await store.exists(uid) for uid in ("theirs", "ours", "lost")]

    assert with_store(db, clock, body) == [True, False, False]

    async def restarted(store: SQLiteStore) -> list[bool]:
        return [await store.exists(uid) for uid in ("theirs", "ours", "lost")]

    assert with_store(db, clock, restarted) == [True, False, False]


def test_two_stores_on_a_replaced_file_both_move_to_the_new_one(
    db: str, tmp_path: Path, clock: FakeClock
) -> None:
    """Two stores (as two processes) on one file that is replaced: each
    fails the call that finds it and then uses the new file; what either
    writes afterwards the other sees, and a restart still has it."""
    other = str(tmp_path / "other.db")
    with_store(other, clock, lambda store: store.create("theirs", 60.0, {}))

    async def main() -> None:
        a = SQLiteStore(db, clock=clock)
        b = SQLiteStore(db, clock=clock)
        try:
            await a.create("ours", 60.0, {})
            assert await b.exists("ours")
            os.replace(other, db)
            with pytest.raises(StoreUnavailable, match="replaced"):
                await a.exists("ours")
            await a.create("after-a", 60.0, {})  # a is on the new file; b is not yet
            with pytest.raises(StoreUnavailable, match="replaced"):
                await b.create("lost", 60.0, {})
            await b.create("after-b", 60.0, {})
            for store in (a, b):
                found = [await store.exists(u) for u in ("theirs", "after-a", "after-b", "lost")]
                assert found == [True, True, True, False]
        finally:
            await a.aclose()
            await b.aclose()

    run(main())

    async def restarted(store: SQLiteStore) -> list[bool]:
        return [await store.exists(u) for u in ("theirs", "ours", "after-a", "after-b", "lost")]

    assert with_store(db, clock, restarted) == [True, False, True, True, False]
