"""The SQLite store wakes its keepers (``wait_for_news``) instead of being
polled: a look at the WAL index header, a question to the store only when a
commit changed it, and news only for what a keeper must act on.

Real files, real time (short waits: the point is what happens while a
process sleeps). Two store objects on one file stand for two processes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from _helpers import eventually

from lapse.internet.task import Clock
from lapse.sessions import SharedKeeper
from lapse.sessions.stores.sqlite import SQLiteStore, news
from lapse.sessions.stores.sqlite.news import FAILED_RETRY, LOOK_EVERY
from lapse.web.resource import Resource
from lapse.web.server import Site


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "sessions.db")


@asynccontextmanager
async def two(db: str) -> AsyncIterator[tuple[SQLiteStore, SQLiteStore]]:
    """Two stores on one file (two processes), opened; closed after."""
    one, other = SQLiteStore(db), SQLiteStore(db)
    await one.open()
    await other.open()
    try:
        yield one, other
    finally:
        await one.aclose()
        await other.aclose()


async def timed(store: SQLiteStore, seconds: float) -> tuple[bool, float, int]:
    """``wait_for_news(seconds)``: its answer, how long it took, and the
    transactions the store ran meanwhile."""
    before = store._runner.transactions
    started = time.monotonic()
    woken = await store.wait_for_news(seconds)
    return woken, time.monotonic() - started, store._runner.transactions - before


def test_a_wait_with_nothing_written_sleeps_its_time_asking_the_store_once(db: str) -> None:
    async def main() -> None:
        async with two(db) as (one, _):
            await one.events(None)
            woken, took, asked = await timed(one, 0.4)
            assert not woken and 0.39 < took < 0.6
            assert asked == 1  # (its start: what the last read missed)

    asyncio.run(main())


def test_touches_and_sessions_ending_later_are_not_news(db: str) -> None:
    """Another process touches a session every 20 ms and makes one that
    ends after the wait: no news; the store is asked at most once a look."""

    async def main() -> None:
        async with two(db) as (one, other):
            await other.create("live", 60.0, {})
            await one.events(None)

            async def busy() -> None:
                for _ in range(15):
                    await other.load("live")
                    await asyncio.sleep(0.02)
                await other.create("later", 60.0, {})

            writing = asyncio.ensure_future(busy())
            woken, took, asked = await timed(one, 0.5)
            await writing
            assert not woken and took >= 0.49
            assert 2 <= asked <= 0.5 / LOOK_EVERY + 2

    asyncio.run(main())


@pytest.mark.parametrize("news", ["an end announced", "a rotation", "an end by hand"])
def test_news_of_another_process_ends_the_wait_within_a_look_or_two(db: str, news: str) -> None:
    async def main() -> None:
        async with two(db) as (one, other):
            await other.create("u1", 60.0, {})
            await one.events(None)

            async def say() -> None:
                await asyncio.sleep(0.1)
                if news == "a rotation":
                    await other.rotate("u1", "u2", 0)
                else:
                    await other.expire("u1")
                    if news == "an end announced":
                        (expiry,) = await other.claim("other", 30.0, 10)
                        await other.ack(expiry)

            saying = asyncio.ensure_future(say())
            woken, took, _ = await timed(one, 5.0)
            await saying
            assert woken and took < 0.1 + 3 * LOOK_EVERY + 0.1

    asyncio.run(main())


def test_a_session_ending_before_the_wait_would_is_news(db: str) -> None:
    """Made by another process that then died: it ends in 0.3 s, the wait
    in 5 s, so the wait ends at once to have it delivered on time."""

    async def main() -> None:
        async with two(db) as (one, other):
            await other.create("long", 60.0, {})
            await one.events(None)
            asyncio.get_running_loop().call_later(
                0.1, lambda: asyncio.ensure_future(other.create("soon", 0.3, {}))
            )
            woken, took, _ = await timed(one, 5.0)
            assert woken and took < 0.1 + 3 * LOOK_EVERY + 0.1

    asyncio.run(main())


def test_an_end_written_after_the_last_read_but_before_the_wait_is_news(db: str) -> None:
    """No lost wake-up: the wait compares with what ``events()`` last
    handed out, not with the file when the wait began."""

    async def main() -> None:
        async with two(db) as (one, other):
            await other.create("u1", 60.0, {})
            await one.events(None)
            await other.expire("u1")
            (expiry,) = await other.claim("other", 30.0, 10)
            await other.ack(expiry)
            woken, took, _ = await timed(one, 5.0)
            assert woken and took < 0.1

    asyncio.run(main())


@pytest.mark.slow
def test_a_failing_store_ends_the_wait_without_raising(db: str) -> None:
    """The store closed under the wait (or failing): True within
    FAILED_RETRY, so the keeper's round meets the failure; never a raise."""

    async def main() -> None:
        store = SQLiteStore(db)
        await store.open()
        await store.aclose()
        started = time.monotonic()
        assert await store.wait_for_news(0.2) is True
        assert 0.19 < time.monotonic() - started < 0.4
        started = time.monotonic()
        assert await store.wait_for_news(30.0) is True
        assert time.monotonic() - started < FAILED_RETRY + 0.3

    asyncio.run(main())


@pytest.mark.slow
def test_a_replaced_file_ends_the_wait(db: str, tmp_path: Path) -> None:
    """The file replaced at its path (its -shm with it): the wait ends
    within a second or so, and the keeper's round moves to the new file."""

    async def main() -> None:
        async with two(db) as (one, _):
            await one.events(None)

            def replace() -> None:
                for suffix in ("", "-wal", "-shm"):
                    path = Path(db + suffix)
                    if path.exists():
                        path.rename(tmp_path / f"old{suffix}")
                Path(db).write_bytes(b"")
                Path(db + "-shm").write_bytes(b"")

            asyncio.get_running_loop().call_later(0.1, replace)
            woken, took, _ = await timed(one, 5.0)
            assert woken and took < 1.6

    asyncio.run(main())


# -- keepers --------------------------------------------------------------------


def keeper(site: Site) -> SharedKeeper:
    found = site._keeper
    assert isinstance(found, SharedKeeper)
    return found


@asynccontextmanager
async def running(db: str, count: int, **site: Any) -> AsyncIterator[list[Site]]:
    """``count`` Sites on the file with their keepers running (real time)."""
    sites = [Site(Resource(), reactor=Clock(), store=SQLiteStore(db), **site) for _ in range(count)]
    try:
        for each in sites:
            keeper(each).start()
        yield sites
    finally:
        for each in sites:
            await keeper(each).aclose()


async def new_session(site: Site, timeout: float) -> str:
    session = site.makeSession()
    session.sessionTimeout = timeout
    await keeper(site).persist([session])
    return session.uid


@pytest.mark.slow
def test_an_idle_keeper_runs_no_transaction_until_its_next_deadline(db: str) -> None:
    """With three live sessions a minute from their end, a keeper runs no
    transaction at all for a second (a polling one ran ten rounds)."""

    async def main() -> None:
        async with running(db, 1) as (site,):
            for _ in range(3):
                await new_session(site, 60)
            await asyncio.sleep(0.4)  # (the round the creates' news asks for)
            store = site.store
            assert isinstance(store, SQLiteStore)
            before = store._runner.transactions
            await asyncio.sleep(1.0)
            assert store._runner.transactions == before

    asyncio.run(main())


@pytest.mark.slow
def test_an_end_in_one_process_reaches_an_idle_one_at_once(db: str) -> None:
    """B holds a copy of a session with a notifyOnExpire callback and sleeps
    until a deadline a minute away; A ends the session: A's hook runs, and
    B's callback within half a second, woken by the news."""
    hooked: list[str] = []

    async def main() -> None:
        async with running(db, 2, on_expire=lambda e: hooked.append(e.uid)) as (a, b):
            uid = await new_session(a, 60)
            assert await keeper(b).load(uid) is not None
            ended: list[float] = []
            b.sessions[uid].notifyOnExpire(lambda: ended.append(time.monotonic()))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            a.sessions[uid].expire()
            await eventually(lambda: bool(ended), 3.0)
            assert ended[0] - started < 0.5
            assert hooked == [uid]

    asyncio.run(main())


@pytest.mark.slow
def test_a_session_that_ends_first_is_ended_though_its_maker_is_gone(db: str) -> None:
    """A process made a session ending before any other, and died: the idle
    keeper (asleep until a minute away) is woken and delivers it on time."""
    hooked: list[tuple[str, float]] = []

    async def main() -> None:
        hook = lambda e: hooked.append((e.uid, time.monotonic()))  # noqa: E731
        async with running(db, 1, on_expire=hook) as (site,):
            await new_session(site, 60)
            await asyncio.sleep(0.3)
            maker = SQLiteStore(db)  # no keeper: it "died"
            try:
                made = time.monotonic()
                await maker.create("gone-maker-session-uid-00", 0.5, {})
            finally:
                await maker.aclose()
            await eventually(lambda: bool(hooked), 3.0)
            assert hooked[0][0] == "gone-maker-session-uid-00"
            assert 0.4 < hooked[0][1] - made < 0.8

    asyncio.run(main())


def test_without_inotify_the_wait_looks_at_the_wal_index(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where inotify cannot be had, the wait reads the WAL index header at
    each look instead: quiet, it sleeps its time; an end announced by
    another process ends it within a few looks."""
    monkeypatch.setattr(news, "watch_wal", lambda path: None)

    async def main() -> None:
        async with two(db) as (one, other):
            await other.create("u1", 60.0, {})
            await one.events(None)
            woken, took, asked = await timed(one, 0.3)
            assert not woken and took >= 0.29 and asked == 1

            async def say() -> None:
                await asyncio.sleep(0.1)
                await other.expire("u1")

            saying = asyncio.ensure_future(say())
            woken, took, _ = await timed(one, 5.0)
            await saying
            assert woken and took < 0.1 + 3 * LOOK_EVERY + 0.1

    asyncio.run(main())


DMS_BYTE = 128
"""Where SQLite's unix VFS keeps the -shm's "in use" lock (its dead-man
switch: every process with the -shm open holds a read lock on this byte; a
process that can take a write lock on it thinks nobody uses the -shm and
truncates it, and the mapping of a process still using it dies of SIGBUS)."""

_HOLDER_PROBE = """
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
lock = struct.pack("hhxxxxqqixxxx", fcntl.F_WRLCK, os.SEEK_SET, int(sys.argv[2]), 1, 0)
got = fcntl.fcntl(fd, fcntl.F_GETLK, lock)
print(struct.unpack("hhxxxxqqixxxx", got)[0] != fcntl.F_UNLCK)
"""


def test_a_wait_keeps_sqlite_s_locks_on_the_shm(db: str) -> None:
    """A wait never opens and closes SQLite's files itself: closing a file
    descriptor drops every POSIX lock the process holds on that file, SQLite's
    too. Then another process opening the file finds the -shm's "in use" lock
    free and truncates the -shm under this one (a test run crashed so, with
    SIGBUS in the SQLite thread)."""
    import subprocess
    import sys

    def shm_in_use() -> bool:
        probe = [sys.executable, "-c", _HOLDER_PROBE, db + "-shm", str(DMS_BYTE)]
        done = subprocess.run(probe, check=True, capture_output=True, text=True, timeout=30)
        return done.stdout.strip() == "True"

    async def scenario() -> None:
        store = SQLiteStore(db)
        await store.open()
        try:
            await store.create("u" * 24, 600, {"a": 1})
            assert shm_in_use()  # (the probe sees SQLite's own lock)
            for _ in range(3):
                await store.wait_for_news(0.06)
            assert shm_in_use()
        finally:
            await store.aclose()

    asyncio.run(scenario())
