"""The SQLite store shared: several stores and processes on one file, the
event loop never waiting on SQLite, and the bound on stalls (nothing
committed after a call failed).

Time is a fake clock moved by assignment, except where real concurrency is
the point.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import time
from collections.abc import Awaitable
from pathlib import Path

import pytest
from _store_sqlite import (
    FAR_FUTURE,
    T,
    claim_in_rounds,
    open_and_create,
    run,
    with_store,
)
from conftest import FakeClock

from lapse.sessions.store import (
    Expiry,
    StoreConfigError,
    StoreUnavailable,
)
from lapse.sessions.stores.sqlite import SQLiteStore


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "sessions.db")


# -- several stores, several processes --------------------------------------------


def test_two_stores_on_one_file_see_each_others_sessions(db: str, clock: FakeClock) -> None:
    """As two processes would: each has its own connection and thread."""

    async def main() -> None:
        one = SQLiteStore(db, clock=clock)
        two = SQLiteStore(db, clock=clock)
        await asyncio.gather(one.open(), two.open())
        _, cursor = await two.events(None)
        await one.create("u1", 60.0, {"from": "one"})
        assert await two.save("u1", {"also": "two"}, [])
        clock.now = 1030.0
        session = await two.load("u1")
        assert session is not None and session.decoded() == {"from": "one", "also": "two"}
        assert await one.next_deadline() == 1090.0  # two's touch moved it
        assert await one.expire("u1")
        assert await two.load("u1") is None
        [expiry] = await two.claim("two", 30.0, 10)
        assert await one.claim("one", 30.0, 10) == []
        await one.ack(expiry)  # any process may ack
        assert await two.events(cursor) == (["u1"], str(int(cursor) + 1))
        await one.aclose()
        await two.aclose()

    run(main())


def test_concurrent_claims_by_two_stores_in_one_process_never_share_a_session(
    db: str, clock: FakeClock
) -> None:
    async def main() -> None:
        stores = [SQLiteStore(db, clock=clock) for _ in range(3)]
        for i in range(100):
            await stores[0].create(f"u{i:03}", 10.0, {"i": i})
        clock.now = 1100.0

        async def drain(store: SQLiteStore, owner: str) -> list[str]:
            uids: list[str] = []
            while claims := await store.claim(owner, 60.0, 4):
                uids.extend(e.uid for e in claims)
            return uids

        got = await asyncio.gather(*(drain(s, f"o{n}") for n, s in enumerate(stores)))
        everything = [uid for uids in got for uid in uids]
        assert sorted(everything) == [f"u{i:03}" for i in range(100)]
        for store in stores:
            await store.aclose()

    run(main())


@pytest.mark.slow
def test_processes_claiming_concurrently_claim_each_session_exactly_once(
    db: str, clock: FakeClock
) -> None:
    """Four real processes claim, three at a time, from one file holding 200
    due sessions, in lockstep rounds (each round starts in all four at once):
    each session is claimed exactly once, and none is left. The race is
    built in, not hoped for: in every round while at least 12 sessions are
    left, each process takes 3 from the same pool as the others, so their
    claims interleave from the first round to the last."""

    async def fill(store: SQLiteStore) -> None:
        for i in range(200):
            await store.create(f"u{i:03}", 60.0, {"i": i})

    with_store(db, clock, fill)
    ctx = multiprocessing.get_context("spawn")
    workers, limit = 4, 3
    full_rounds = 200 // (workers * limit)  # 16 rounds of 12, then 8 left
    barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=claim_in_rounds, args=(db, f"p{n}", full_rounds + 2, barrier, results))
        for n in range(workers)
    ]
    for proc in procs:
        proc.start()
    got: dict[str, list[list[str]]] = dict(results.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    # Exactly once: every session claimed, none twice, none left.
    everything = [uid for rounds in got.values() for uids in rounds for uid in uids]
    assert sorted(everything) == [f"u{i:03}" for i in range(200)]

    async def left(store: SQLiteStore) -> list[Expiry]:
        return await store.claim("after", lease=3600.0, limit=1000)

    assert with_store(db, FakeClock(FAR_FUTURE), left) == []
    # They raced: all four claimed 3 in each full round, from one pool.
    for rounds in got.values():
        assert [len(uids) for uids in rounds[:full_rounds]] == [limit] * full_rounds
    assert sum(len(rounds[full_rounds]) for rounds in got.values()) == 200 % (workers * limit)
    assert all(rounds[full_rounds + 1] == [] for rounds in got.values())


def test_processes_opening_a_new_file_at_once_all_succeed(tmp_path: Path) -> None:
    """Schema creation is safe when several processes open one new file at
    the same moment."""
    db = str(tmp_path / "fresh.db")
    ctx = multiprocessing.get_context("spawn")
    workers = 4
    barrier = ctx.Barrier(workers)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=open_and_create, args=(db, f"p{n}", 10, barrier, results))
        for n in range(workers)
    ]
    for proc in procs:
        proc.start()
    errors = dict(results.get(timeout=60) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
    assert errors == {f"p{n}": None for n in range(workers)}

    async def count(store: SQLiteStore) -> int:
        return sum([await store.exists(f"p{n}-{i}") for n in range(workers) for i in range(10)])

    assert with_store(db, FakeClock(1000.0), count) == 40


# -- the event loop is never stalled -----------------------------------------------


async def max_tick_gap_during(work: Awaitable[T]) -> tuple[T, float]:
    """Run ``work`` while a loop of ``asyncio.sleep(0.001)`` ticks; the result
    and the longest gap between ticks, in seconds."""
    done = False
    gap = 0.0

    async def ticker() -> None:
        nonlocal gap
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gap = max(gap, now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    try:
        result = await work
    finally:
        done = True
        await task
    return result, gap


def test_the_event_loop_keeps_ticking_during_200_creates(db: str, clock: FakeClock) -> None:
    async def body(store: SQLiteStore) -> float:
        async def creates() -> None:
            for i in range(200):
                await store.create(f"u{i}", 60.0, {"payload": "x" * 1000, "i": i})

        _, gap = await max_tick_gap_during(creates())
        return gap

    assert with_store(db, clock, body) < 0.05


def test_the_event_loop_keeps_ticking_while_a_call_waits_for_a_lock(
    db: str, clock: FakeClock
) -> None:
    """Another connection holds the write lock for 0.3 s: the store's call
    waits that long, and the loop runs meanwhile."""

    async def body(store: SQLiteStore) -> None:
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        asyncio.get_running_loop().call_later(0.3, holder.rollback)
        start = time.perf_counter()
        deadline, gap = await max_tick_gap_during(store.create("u1", 60.0, {}))
        holder.close()
        assert deadline == 1060.0
        assert time.perf_counter() - start >= 0.29
        assert gap < 0.05

    with_store(db, clock, body)


# -- stalls: a bound on progress, and nothing committed after a failure -----------


def hold_write_lock(db: str, seconds: float) -> sqlite3.Connection:
    """Another connection takes the file's write lock, released after
    ``seconds`` by the running event loop."""
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    asyncio.get_running_loop().call_later(seconds, holder.rollback)
    return holder


@pytest.mark.slow
def test_calls_stuck_behind_a_lock_fail_after_the_timeout_and_never_commit_later(
    db: str, clock: FakeClock
) -> None:
    """With the write lock held elsewhere for 0.6 s and a timeout of 0.2 s, a
    save waiting for the lock and another queued behind it both fail after
    about 0.2 s, though busy_timeout is 5 s; once the lock is free, neither
    is applied: the worker rolls back what its caller gave up on."""

    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60.0, {"kept": 1})
        holder = hold_write_lock(db, 0.6)
        started = time.monotonic()
        results = await asyncio.gather(
            store.save("u1", {"late": 1}, []),
            store.save("u1", {"later": 2}, ["kept"]),
            return_exceptions=True,
        )
        elapsed = time.monotonic() - started
        for result in results:
            assert isinstance(result, StoreUnavailable), result
            assert db in str(result) and "no progress for 0.2s" in str(result)
        assert 0.19 < elapsed < 0.45, elapsed
        await asyncio.sleep(0.7)  # the lock is free; the worker has run on
        holder.close()
        loaded = await store.load("u1")
        assert loaded is not None and loaded.decoded() == {"kept": 1}
        assert await store.save("u1", {"now": 3}, [])

    with_store(db, clock, body, timeout=0.2)


def test_a_call_whose_caller_gave_up_is_never_committed_later(db: str, clock: FakeClock) -> None:
    """A caller cancelled while its save waits for a lock (wait_for's own
    timeout) leaves nothing behind: the save is rolled back, not applied
    when the lock comes free."""

    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60.0, {})
        holder = hold_write_lock(db, 0.3)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(store.save("u1", {"late": 1}, []), 0.1)
        await asyncio.sleep(0.4)
        holder.close()
        loaded = await store.load("u1")
        assert loaded is not None and loaded.decoded() == {}

    with_store(db, clock, body)


@pytest.mark.slow
def test_a_long_queue_that_keeps_moving_fails_no_call(db: str, clock: FakeClock) -> None:
    """Enough creates at once to keep the worker busy about twice the timeout
    (1 s) in all, sized from this machine's own pace, but it finishes one
    after another: none fails."""

    async def body(store: SQLiteStore) -> float:
        paced = time.monotonic()
        await asyncio.gather(*(store.create(f"p{i}", 60.0, {}) for i in range(200)))
        each = max((time.monotonic() - paced) / 200, 1e-5)
        count = min(100_000, int(2.0 / each) + 1)
        started = time.monotonic()
        deadlines = await asyncio.gather(
            *(store.create(f"u{i}", 60.0, {"payload": "x" * 200}) for i in range(count))
        )
        assert deadlines == [1060.0] * count
        return time.monotonic() - started

    assert with_store(db, clock, body, timeout=1.0) > 1.0


def test_the_timeout_is_an_option_and_must_be_positive(db: str) -> None:
    store = SQLiteStore.from_url(f"sqlite:///{db}?timeout=0.25")
    assert store.timeout == 0.25 and store.enforces_timeout
    for bad in ("0", "-1", "inf", "soon"):
        with pytest.raises(StoreConfigError, match="timeout is seconds > 0"):
            SQLiteStore.from_url(f"sqlite:///{db}?timeout={bad}")
    with pytest.raises(StoreConfigError):
        SQLiteStore(db, timeout=0)
