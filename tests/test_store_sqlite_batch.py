"""The SQLite store batches the calls of one event-loop turn into one
transaction on its thread, and each call keeps its own outcome: a call that
raises fails alone, a file error fails each call with an error of its own, a
write is answered only once its transaction committed. Real files
throughout (a real tmpfs for the full disk, real processes killed)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from _sqlite_batch import BATCH, fill, rows, save_keys, small_disk, write_batches
from _store_sqlite import with_store
from conftest import FakeClock, SessionPage, call_async

from lapse.sessions.store import StoreConfigError, StoreUnavailable, TooManySessions
from lapse.sessions.stores.sqlite import SQLiteStore
from lapse.web.server import Site


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "sessions.db")


def transactions(store: SQLiteStore) -> int:
    return store._runner.transactions


# -- one transaction per turn ------------------------------------------------------


def test_the_calls_of_one_turn_run_as_one_transaction(db: str, clock: FakeClock) -> None:
    """50 creates and 50 loads asked in one turn: one transaction, and each
    call gets its own answer."""

    async def body(store: SQLiteStore) -> None:
        await store.create("old", 60.0, {"n": 0})
        before = transactions(store)
        made = asyncio.gather(*(store.create(f"u{i}", 60.0, {"i": i}) for i in range(50)))
        loaded = asyncio.gather(*(store.load("old") for _ in range(50)))
        assert await made == [1060.0] * 50
        assert [s.decoded() for s in await loaded if s is not None] == [{"n": 0}] * 50
        assert transactions(store) - before == 1
        assert rows(store.path, "SELECT count(*) FROM sessions") == [(51,)]

    with_store(db, clock, body)


def test_a_lone_call_is_one_transaction_of_its_own(db: str, clock: FakeClock) -> None:
    async def body(store: SQLiteStore) -> None:
        before = transactions(store)
        for i in range(3):
            await store.create(f"u{i}", 60.0, {})
        assert transactions(store) - before == 3

    with_store(db, clock, body)


def test_a_call_that_raises_fails_alone_and_the_rest_of_its_batch_commits(
    db: str, clock: FakeClock
) -> None:
    """In one turn: creates, a bind the principal limit refuses
    (TooManySessions) and a create of a uid SQLite cannot store (a lone
    surrogate). Each bad call raises its own error and writes nothing; the
    others all commit, in a transaction run again without the bad calls
    (three in all, not one per call)."""

    async def body(store: SQLiteStore) -> None:
        for uid in ("a1", "a2"):
            await store.create(uid, 60.0, {})
            await store.set_principal(uid, "alice")
        before = transactions(store)
        results = await asyncio.gather(
            store.create("n1", 60.0, {"k": 1}),
            store.set_principal("a1", "alice", limit=1, refuse=True),
            store.save("a2", {"kept": True}, []),
            store.create("\ud800", 60.0, {}),
            store.create("n2", 60.0, {"k": 2}),
            return_exceptions=True,
        )
        assert results[0] == 1060.0 and results[2] == 2 and results[4] == 1060.0
        assert isinstance(results[1], TooManySessions)
        assert isinstance(results[3], UnicodeEncodeError)
        assert transactions(store) - before == 3
        uids = rows(store.path, "SELECT uid FROM sessions ORDER BY uid")
        assert uids == [("a1",), ("a2",), ("n1",), ("n2",)]
        assert len(await store.sessions_of("alice")) == 2
        loaded = await store.load("a2")
        assert loaded is not None and loaded.decoded() == {"kept": True}

    with_store(db, clock, body)


@pytest.mark.slow
def test_a_caller_cancelled_while_its_batch_waits_is_left_out_the_rest_commit(
    db: str, clock: FakeClock
) -> None:
    """Two saves in one batch wait for the write lock another connection
    holds; one caller gives up meanwhile. When the lock comes free, the
    other's save commits and the abandoned one is not in the file."""

    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60.0, {})
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        asyncio.get_running_loop().call_later(0.3, holder.rollback)
        gone = asyncio.ensure_future(store.save("u1", {"gone": 1}, []))
        kept = asyncio.ensure_future(store.save("u1", {"kept": 1}, []))
        await asyncio.sleep(0.1)
        gone.cancel()
        assert await kept == 2
        holder.close()
        loaded = await store.load("u1")
        assert loaded is not None and loaded.decoded() == {"kept": 1}

    with_store(db, clock, body, timeout=5.0)


def test_reads_batched_before_a_write_do_not_wait_for_another_process_lock(
    db: str, clock: FakeClock
) -> None:
    """Another connection holds the write lock for 0.5 s; a read and then a
    write asked in one turn: the read (its own read transaction, as a WAL
    file allows) is answered at once, the write when the lock is free."""

    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60.0, {})
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        asyncio.get_running_loop().call_later(0.5, holder.rollback)
        started = time.monotonic()
        read = asyncio.ensure_future(store.exists("u1"))
        write = asyncio.ensure_future(store.save("u1", {"k": 1}, []))
        assert await read is True
        assert time.monotonic() - started < 0.3
        assert await write == 2
        assert time.monotonic() - started >= 0.45
        holder.close()

    with_store(db, clock, body, timeout=5.0)


@pytest.mark.slow
def test_a_call_made_while_the_worker_is_stuck_gets_its_own_timeout(
    db: str, clock: FakeClock
) -> None:
    """The write lock is held elsewhere for 0.7 s and the timeout is 0.5 s:
    a save fails at 0.5 s (the worker still waits for the lock for it); a
    load made at 0.45 s is not failed with it for the stall before it was
    made, and is answered once the lock is free."""

    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60.0, {})
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        asyncio.get_running_loop().call_later(0.7, holder.rollback)
        save = asyncio.ensure_future(store.save("u1", {"late": 1}, []))
        await asyncio.sleep(0.45)
        loaded = await store.load("u1")
        assert loaded is not None and loaded.decoded() == {}
        with pytest.raises(StoreUnavailable, match=r"no progress for 0\.5s"):
            await save
        holder.close()

    with_store(db, clock, body, timeout=0.5)


# -- errors of the file fail the whole batch ----------------------------------------


def test_a_read_only_file_fails_every_call_of_the_batch_with_its_own_error(
    db: str, clock: FakeClock
) -> None:
    """The connection turned read-only (SQLite's query_only): every write of
    the batch fails with a StoreUnavailable of its own naming the file, none
    is in the file, and the store works again once writable."""

    async def body(store: SQLiteStore) -> None:
        await store._runner.call(lambda c, now: c.execute("PRAGMA query_only = 1"), False)
        results = await asyncio.gather(
            *(store.create(f"u{i}", 60.0, {}) for i in range(10)), return_exceptions=True
        )
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        assert len({id(r) for r in results}) == 10
        assert all(db in str(r) and "readonly" in str(r) for r in results)
        assert rows(db, "SELECT count(*) FROM sessions") == [(0,)]
        await store._runner.call(lambda c, now: c.execute("PRAGMA query_only = 0"), False)
        assert await store.create("u1", 60.0, {}) == 1060.0

    with_store(db, clock, body)


def test_a_full_disk_fails_every_call_of_the_batch_and_none_is_in_the_file(
    clock: FakeClock,
) -> None:
    """A real tmpfs, filled up: a batch of creates too large for the room
    left fails, each call with a StoreUnavailable saying the disk is full;
    once room is made, the file holds none of them and the store works."""
    with small_disk("2m") as disk:
        path = str(disk / "sessions.db")

        async def body(store: SQLiteStore) -> None:
            await store.create("before", 60.0, {})
            filler = fill(disk)
            big = {"blob": "x" * 20_000}
            results = await asyncio.gather(
                *(store.create(f"u{i}", 60.0, big) for i in range(BATCH)),
                return_exceptions=True,
            )
            assert all(isinstance(r, StoreUnavailable) for r in results), results
            assert all("full" in str(r) for r in results), results[0]
            filler.unlink()
            assert rows(path, "SELECT uid FROM sessions") == [("before",)]
            assert await store.create("after", 60.0, big) == 1060.0

        with_store(path, clock, body)
        assert rows(path, "PRAGMA integrity_check") == [("ok",)]


def test_requests_of_a_batch_on_a_full_disk_all_get_a_503(clock: FakeClock) -> None:
    """Through a Site: twenty new visitors at once on a full disk each get a
    503 (none a 200 whose session is not in the file)."""
    with small_disk("2m") as disk:
        path = str(disk / "sessions.db")

        async def main() -> None:
            site = Site(SessionPage(), store=SQLiteStore(path))
            try:
                await site.store.open()
                assert (await call_async(site)).status == 200
                filler = fill(disk)
                responses = await asyncio.gather(*(call_async(site) for _ in range(20)))
                assert [r.status for r in responses] == [503] * 20
                filler.unlink()
                assert rows(path, "SELECT count(*) FROM sessions") == [(1,)]
            finally:
                await site._keeper.aclose()

        asyncio.run(main())


# -- processes --------------------------------------------------------------------


@pytest.mark.slow
def test_a_writer_killed_mid_batch_leaves_exactly_whole_committed_batches(
    tmp_path: Path,
) -> None:
    """A process creating sessions 50 at a time is killed (SIGKILL) while
    writing: the file opens, passes integrity_check, and holds whole
    batches only (a multiple of 50), every batch acknowledged included."""
    path, acked = str(tmp_path / "s.db"), str(tmp_path / "acked")
    ctx = multiprocessing.get_context("spawn")
    writer = ctx.Process(target=write_batches, args=(path, acked, "w"))
    writer.start()
    try:
        give_up = time.monotonic() + 30
        while time.monotonic() < give_up:
            if os.path.exists(acked) and len(Path(acked).read_text().split()) >= 5:
                break
            time.sleep(0.01)
        time.sleep(0.013)  # (somewhere in a batch)
    finally:
        assert writer.pid is not None
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(10)
    done = [int(n) for n in Path(acked).read_text().split()]
    assert len(done) >= 5
    assert rows(path, "PRAGMA integrity_check") == [("ok",)]
    batches = rows(path, "SELECT json_extract(value, '$') FROM session_data WHERE key = 'batch'")
    counts: dict[int, int] = {}
    for (n,) in batches:
        counts[int(n)] = counts.get(int(n), 0) + 1
    assert set(counts.values()) == {BATCH}, counts
    assert set(done) <= set(counts)
    assert max(counts) <= max(done) + 1


@pytest.mark.slow
def test_two_processes_saving_one_session_at_once_lose_no_write(tmp_path: Path) -> None:
    """Two processes each save 100 keys of their own to one session, ten
    saves per turn, at once: every key is there and the version counts
    every save."""
    path = str(tmp_path / "s.db")

    async def make() -> None:
        store = SQLiteStore(path)
        await store.create("shared", 600.0, {})
        await store.aclose()

    asyncio.run(make())
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    writers = [
        ctx.Process(target=save_keys, args=(path, "shared", tag, 100, barrier)) for tag in "ab"
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    keys = {key for (key,) in rows(path, "SELECT key FROM session_data WHERE uid = 'shared'")}
    assert keys == {f"{tag}{i}" for tag in "ab" for i in range(100)}
    assert rows(path, "SELECT version FROM sessions WHERE uid = 'shared'") == [(201,)]


# -- the durability options --------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "synchronous", "autocheckpoint"),
    [
        ("", 1, 1000),
        ("?synchronous=off", 0, 1000),
        ("?synchronous=FULL", 2, 1000),
        ("?synchronous=extra&wal_autocheckpoint=1", 3, 1),
        ("?wal_autocheckpoint=10000", 1, 10000),
    ],
)
def test_synchronous_and_wal_autocheckpoint_are_url_options_applied_to_the_connection(
    db: str, clock: FakeClock, query: str, synchronous: int, autocheckpoint: int
) -> None:
    store = SQLiteStore.from_url(f"sqlite:///{db}{query}", clock)

    async def main() -> tuple[int, int, str]:
        try:
            return await store._runner.call(
                lambda c, now: (
                    c.execute("PRAGMA synchronous").fetchone()[0],
                    c.execute("PRAGMA wal_autocheckpoint").fetchone()[0],
                    c.execute("PRAGMA journal_mode").fetchone()[0],
                ),
                False,
            )
        finally:
            await store.aclose()

    assert asyncio.run(main()) == (synchronous, autocheckpoint, "wal")


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("synchronous=sometimes", "synchronous is one of off, normal, full, extra"),
        ("synchronous=", "synchronous is one of"),
        ("synchronous=2", "synchronous is one of"),
        ("wal_autocheckpoint=-1", "wal_autocheckpoint is a number of pages"),
        ("wal_autocheckpoint=0", "wal_autocheckpoint is a number of pages from 1"),
        ("wal_autocheckpoint=lots", "wal_autocheckpoint is a number of pages"),
        ("wal_autocheckpoint=99999999", "wal_autocheckpoint is a number of pages"),
        ("wal_autocheckpoint=\u0661", "wal_autocheckpoint is a number of pages"),
    ],
)
def test_a_bad_durability_option_is_a_config_error_naming_it(query: str, says: str) -> None:
    url = f"sqlite:///a.db?{query}"
    with pytest.raises(StoreConfigError) as info:
        SQLiteStore.from_url(url)
    assert says in str(info.value) and url in str(info.value)
    with pytest.raises(StoreConfigError, match="synchronous is one of"):
        SQLiteStore("a.db", synchronous="never")
    with pytest.raises(StoreConfigError, match="wal_autocheckpoint is a number"):
        SQLiteStore("a.db", wal_autocheckpoint=True)
