"""The SQLite session store: the protocol's semantics, restarts, several
stores and processes on one file, the event loop never waiting on SQLite,
and its errors.

Time is a fake clock moved by assignment, except where real concurrency is
the point.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from _store_sqlite import FAR_FUTURE, claim_in_rounds, open_and_create
from conftest import FakeClock

from lapse.sessions.store import (
    Expiry,
    SessionStore,
    StoreConfigError,
    StoredSession,
    StoreUnavailable,
)
from lapse.sessions.stores.sqlite import EVENTS_KEPT_FOR, EVENTS_PER_CALL, SQLiteStore

T = TypeVar("T")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "sessions.db")


def with_store(
    db: str, clock: FakeClock, body: Callable[[SQLiteStore], Awaitable[T]], **kw: Any
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


# -- construction and URLs -----------------------------------------------------


def test_the_store_is_a_shared_session_store_with_an_absolute_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = SQLiteStore("rel.db")
    assert isinstance(store, SessionStore)
    assert store.shared is True
    assert store.path == str(tmp_path / "rel.db")
    assert store.url == "sqlite:///" + str(tmp_path / "rel.db")
    assert store.url.startswith("sqlite:////")


def test_from_url_three_slashes_is_relative_four_is_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert SQLiteStore.from_url("sqlite:///data/s.db").path == str(tmp_path / "data" / "s.db")
    assert SQLiteStore.from_url("sqlite:////srv/app/s.db").path == "/srv/app/s.db"
    assert SQLiteStore.from_url("sqlite:////srv/app/s.db").url == "sqlite:////srv/app/s.db"


def test_from_url_accepts_busy_timeout_and_passes_the_clock(clock: FakeClock) -> None:
    store = SQLiteStore.from_url("sqlite:////tmp/x.db?busy_timeout=0.25", clock)
    assert store.busy_timeout == 0.25
    assert store.clock is clock


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sqlite://", "three slashes"),
        ("sqlite:///", "no file path"),
        ("sqlite:///:memory:", "in-memory"),
        ("postgres://x", "not a SQLite store URL"),
        ("sqlite:///a.db?foo=1", "unknown option 'foo'"),
        ("sqlite://host/a.db", "three slashes"),
        ("sqlite:///a.db?busy_timeout=soon", "busy_timeout is seconds"),
        ("sqlite:///a.db?busy_timeout=-1", "busy_timeout is seconds"),
        ("sqlite:///a.db?busy_timeout", "needs one value"),
        ("sqlite:///?busy_timeout=1", "no file path"),
        ("sqlite:///a.db#frag", "fragment"),
    ],
)
def test_a_bad_url_is_a_config_error_that_says_what_is_wrong(url: str, says: str) -> None:
    with pytest.raises(StoreConfigError) as info:
        SQLiteStore.from_url(url)
    assert says in str(info.value)
    assert url in str(info.value)


@pytest.mark.parametrize("path", ["", ":memory:"])
def test_the_constructor_refuses_no_file_and_memory(path: str) -> None:
    with pytest.raises(StoreConfigError):
        SQLiteStore(path)


def test_the_constructor_refuses_a_negative_busy_timeout(db: str) -> None:
    with pytest.raises(StoreConfigError, match="busy_timeout"):
        SQLiteStore(db, busy_timeout=-1)


# -- load, create, save, exists ----------------------------------------------


def test_create_returns_now_plus_timeout_and_load_returns_the_data(
    db: str, clock: FakeClock
) -> None:
    async def body(store: SQLiteStore) -> None:
        assert await store.create("u1", 60.0, {"a": 1, "b": [1, "x"], "c": None}) == 1060.0
        clock.now = 1010.0
        assert summary(await store.load("u1")) == (
            "u1",
            60.0,
            1070.0,
            {"a": 1, "b": [1, "x"], "c": None},
        )

    with_store(db, clock, body)


def test_load_touches_so_the_deadline_slides(db: str, clock: FakeClock) -> None:
    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60.0, {})
        for t in (1050.0, 1100.0, 1150.0):  # each load within 60 s of the last
            clock.now = t
            session = await store.load("u1")
            assert session is not None and session.deadline == t + 60.0
        assert await store.next_deadline() == 1210.0
        assert await store.claim("o", 10.0, 10) == []

    with_store(db, clock, body)


def test_load_of_a_session_past_its_deadline_is_none_and_does_not_revive_it(
    db: str, clock: FakeClock
) -> None:
    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60.0, {"k": "v"})
        clock.now = 1060.0  # exactly the deadline: ended
        assert await store.load("u1") is None
        assert await store.exists("u1") is False
        clock.now = 1061.0
        assert await store.load("u1") is None
        [expiry] = await store.claim("o", 10.0, 10)
        assert (expiry.uid, expiry.cause, dict(expiry.data)) == ("u1", "timeout", {"k": "v"})

    with_store(db, clock, body)


def test_load_of_an_unknown_uid_is_none(db: str, clock: FakeClock) -> None:
    assert with_store(db, clock, lambda store: store.load("nope")) is None


def test_exists_does_not_touch(db: str, clock: FakeClock) -> None:
    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60.0, {})
        clock.now = 1059.0
        assert await store.exists("u1") is True
        clock.now = 1060.0
        assert await store.exists("u1") is False
        assert await store.exists("unknown") is False

    with_store(db, clock, body)


def test_saves_of_different_keys_on_one_session_both_persist(db: str, clock: FakeClock) -> None:
    """Two requests that each loaded the session and changed a different key:
    both writes survive, because save writes only the changed keys."""

    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60.0, {"cart": [], "user": None})
        first = await store.load("u1")
        second = await store.load("u1")
        assert first is not None and second is not None
        assert await store.save("u1", {"cart": ["book"]}, [])
        assert await store.save("u1", {"user": "alice"}, [])
        session = await store.load("u1")
        assert session is not None
        assert session.decoded() == {"cart": ["book"], "user": "alice"}

    with_store(db, clock, body)


def test_save_deletes_removed_keys_and_removed_wins_over_changed(db: str, clock: FakeClock) -> None:
    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60.0, {"a": 1, "b": 2, "c": 3})
        assert await store.save("u1", {"a": 10, "c": 30}, ["b", "c", "never-there"])
        session = await store.load("u1")
        assert session is not None and session.decoded() == {"a": 10}

    with_store(db, clock, body)


def test_save_does_not_move_the_deadline(db: str, clock: FakeClock) -> None:
    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60.0, {})
        clock.now = 1050.0
        assert await store.save("u1", {"a": 1}, [])
        assert await store.next_deadline() == 1060.0

    with_store(db, clock, body)


def test_save_on_a_session_not_live_is_false_and_writes_nothing(db: str, clock: FakeClock) -> None:
    async def body(store: SQLiteStore) -> None:
        assert await store.save("unknown", {"a": 1}, []) is False
        await store.create("due", 60.0, {"a": 1})
        await store.create("gone", 600.0, {"a": 1})
        await store.expire("gone")
        clock.now = 1060.0
        assert await store.save("due", {"a": 2}, ["a"]) is False
        assert await store.save("gone", {"a": 2}, ["a"]) is False
        claims = await store.claim("o", 10.0, 10)
        assert {e.uid: dict(e.data) for e in claims} == {"due": {"a": 1}, "gone": {"a": 1}}

    with_store(db, clock, body)


def test_create_over_an_existing_uid_replaces_it_data_and_all(db: str, clock: FakeClock) -> None:
    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60.0, {"old": 1})
        assert await store.create("u1", 30.0, {"new": 2}) == 1030.0
        assert summary(await store.load("u1")) == ("u1", 30.0, 1030.0, {"new": 2})

    with_store(db, clock, body)


# -- expire, claim, ack ----------------------------------------------------------


def test_expire_ends_a_live_session_at_once_with_cause_expired(db: str, clock: FakeClock) -> None:
    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60.0, {"who": "alice"})
        assert await store.expire("u1") is True
        assert await store.load("u1") is None
        assert await store.exists("u1") is False
        assert await store.expire("u1") is False  # no longer live
        assert await store.next_deadline() == 1000.0  # claimable now
        [expiry] = await store.claim("o", 10.0, 10)
        assert expiry.uid == "u1"
        assert expiry.cause == "expired"
        assert expiry.attempt == 1
        assert dict(expiry.data) == {"who": "alice"}
        assert expiry.delivery_id.startswith("u1:")

    with_store(db, clock, body)


def test_expire_of_an_unknown_or_overdue_session_is_false(db: str, clock: FakeClock) -> None:
    async def body(store: SQLiteStore) -> None:
        assert await store.expire("unknown") is False
        await store.create("u1", 60.0, {})
        clock.now = 1070.0
        assert await store.expire("u1") is False
        [expiry] = await store.claim("o", 10.0, 10)
        assert expiry.cause == "timeout"  # it ended by its deadline, not by expire

    with_store(db, clock, body)


def test_timeout_claim_gives_cause_timeout_and_the_final_data(db: str, clock: FakeClock) -> None:
    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60.0, {"n": 0})
        await store.save("u1", {"n": 1, "last": "page"}, [])
        clock.now = 1059.0
        assert await store.claim("o", 10.0, 10) == []
        clock.now = 1060.0
        [expiry] = await store.claim("o", 10.0, 10)
        assert expiry == Expiry("u1", {"n": 1, "last": "page"}, expiry.delivery_id, 1, "timeout")

    with_store(db, clock, body)


def test_a_claim_is_not_handed_out_again_while_its_lease_holds(db: str, clock: FakeClock) -> None:
    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60.0, {})
        clock.now = 1100.0
        assert len(await store.claim("a", 30.0, 10)) == 1
        assert await store.claim("b", 30.0, 10) == []
        clock.now = 1129.0
        assert await store.claim("b", 30.0, 10) == []
        assert await store.next_deadline() == 1130.0  # the lease's end

    with_store(db, clock, body)


def test_after_the_lease_it_is_redelivered_with_the_same_delivery_id_and_attempt_2(
    db: str, clock: FakeClock
) -> None:
    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60.0, {"k": 1})
        await store.expire("u1")
        [first] = await store.claim("a", 30.0, 10)
        clock.now = 1030.0  # the lease ran out: "a" died mid-hook
        [second] = await store.claim("b", 30.0, 10)
        assert second.delivery_id == first.delivery_id
        assert (second.attempt, second.cause, dict(second.data)) == (2, "expired", {"k": 1})
        clock.now = 1060.0
        [third] = await store.claim("c", 30.0, 10)
        assert (third.delivery_id, third.attempt) == (first.delivery_id, 3)

    with_store(db, clock, body)


def test_ack_forgets_the_session_and_announces_one_event(db: str, clock: FakeClock) -> None:
    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60.0, {"k": 1})
        _, cursor = await store.events(None)
        await store.expire("u1")
        [expiry] = await store.claim("a", 30.0, 10)
        await store.ack(expiry)
        assert await store.events(cursor) == (["u1"], str(int(cursor) + 1))
        await store.ack(expiry)  # a second ack changes nothing
        assert (await store.events(cursor))[0] == ["u1"]
        clock.now = 2000.0
        assert await store.claim("a", 30.0, 10) == []
        assert await store.next_deadline() is None
        # its data is gone too: a new session under the same uid starts empty
        await store.create("u1", 60.0, {})
        session = await store.load("u1")
        assert session is not None and session.decoded() == {}

    with_store(db, clock, body)


def test_a_late_ack_of_a_redelivered_expiry_still_acks_it_once(db: str, clock: FakeClock) -> None:
    async def body(store: SQLiteStore) -> None:
        _, cursor = await store.events(None)
        await store.create("u1", 60.0, {})
        await store.expire("u1")
        [first] = await store.claim("a", 30.0, 10)
        clock.now = 1030.0
        [second] = await store.claim("b", 30.0, 10)
        await store.ack(first)
        await store.ack(second)
        assert (await store.events(cursor))[0] == ["u1"]

    with_store(db, clock, body)


def test_ack_of_a_stale_delivery_id_does_nothing(db: str, clock: FakeClock) -> None:
    async def body(store: SQLiteStore) -> None:
        _, cursor = await store.events(None)
        await store.create("u1", 60.0, {})
        await store.expire("u1")
        [expiry] = await store.claim("a", 30.0, 10)
        await store.ack(Expiry("u1", {}, "u1:other", 1, "expired"))
        assert await store.events(cursor) == ([], cursor)
        clock.now = 1030.0
        assert [e.delivery_id for e in await store.claim("b", 30.0, 10)] == [expiry.delivery_id]

    with_store(db, clock, body)


def test_claim_takes_at_most_limit_earliest_deadlines_first(db: str, clock: FakeClock) -> None:
    async def body(store: SQLiteStore) -> None:
        for i, timeout in enumerate([50.0, 10.0, 40.0, 20.0, 30.0]):
            await store.create(f"u{i}", timeout, {})
        clock.now = 1100.0
        assert [e.uid for e in await store.claim("o", 30.0, 2)] == ["u1", "u3"]
        assert [e.uid for e in await store.claim("o", 30.0, 2)] == ["u4", "u2"]
        assert [e.uid for e in await store.claim("o", 30.0, 2)] == ["u0"]
        assert await store.claim("o", 30.0, 0) == []

    with_store(db, clock, body)


def test_claim_mixes_timeouts_expiries_and_redeliveries(db: str, clock: FakeClock) -> None:
    async def body(store: SQLiteStore) -> None:
        await store.create("leased", 10.0, {})
        clock.now = 1010.0
        [leased] = await store.claim("a", 5.0, 10)
        await store.create("timed-out", 10.0, {})
        await store.create("logged-out", 100.0, {})
        await store.expire("logged-out")
        clock.now = 1020.0
        claims = await store.claim("b", 5.0, 10)
        assert [(e.uid, e.cause, e.attempt) for e in claims] == [
            ("leased", "timeout", 2),
            ("logged-out", "expired", 1),
            ("timed-out", "timeout", 1),
        ]
        assert claims[0].delivery_id == leased.delivery_id

    with_store(db, clock, body)


# -- events and next_deadline ---------------------------------------------------


def test_events_cursor_none_starts_from_now(db: str, clock: FakeClock) -> None:
    async def body(store: SQLiteStore) -> None:
        assert await store.events(None) == ([], "0")
        for uid in ("a", "b"):
            await store.create(uid, 1.0, {})
        clock.now = 1001.0
        for expiry in await store.claim("o", 30.0, 10):
            await store.ack(expiry)
        # a reader that starts now does not see the past...
        uids, cursor = await store.events(None)
        assert (uids, cursor) == ([], "2")
        assert await store.events(cursor) == ([], "2")
        # ...but sees what comes after, once
        await store.create("c", 1.0, {})
        clock.now = 1002.0
        [expiry] = await store.claim("o", 30.0, 10)
        await store.ack(expiry)
        assert await store.events(cursor) == (["c"], "3")
        assert await store.events("0") == (["a", "b", "c"], "3")
        assert await store.events("3") == ([], "3")

    with_store(db, clock, body)


def test_events_come_in_pages_and_a_cursor_ahead_of_the_file_restarts_from_now(
    db: str, clock: FakeClock
) -> None:
    async def body(store: SQLiteStore) -> None:
        count = EVENTS_PER_CALL + 5
        for i in range(count):
            await store.create(f"u{i:05}", 1.0, {})
        clock.now = 1001.0
        for expiry in await store.claim("o", 30.0, count):
            await store.ack(expiry)
        page, cursor = await store.events("0")
        assert len(page) == EVENTS_PER_CALL and cursor == str(EVENTS_PER_CALL)
        rest, cursor = await store.events(cursor)
        assert rest == [f"u{i:05}" for i in range(EVENTS_PER_CALL, count)]
        assert cursor == str(count)
        assert await store.events("999999") == ([], str(count))
        with pytest.raises(ValueError, match="cursor"):
            await store.events("not-a-number")

    with_store(db, clock, body)


def test_old_events_are_pruned_by_a_later_ack(db: str, clock: FakeClock) -> None:
    async def body(store: SQLiteStore) -> None:
        for uid in ("old", "new"):
            await store.create(uid, 600.0, {})
        await store.expire("old")
        [old] = await store.claim("o", 30.0, 10)
        await store.ack(old)
        clock.now = 1000.0 + EVENTS_KEPT_FOR + 1
        [new] = await store.claim("o", 30.0, 10)
        await store.ack(new)
        assert await store.events("0") == (["new"], "2")

    with_store(db, clock, body)


def test_next_deadline_is_the_earliest_deadline_or_lease_end_or_none(
    db: str, clock: FakeClock
) -> None:
    async def body(store: SQLiteStore) -> None:
        assert await store.next_deadline() is None
        await store.create("a", 60.0, {})
        await store.create("b", 30.0, {})
        assert await store.next_deadline() == 1030.0
        clock.now = 1040.0  # b is overdue and unclaimed: its deadline is past
        assert await store.next_deadline() == 1030.0
        [expiry] = await store.claim("o", 100.0, 10)
        assert await store.next_deadline() == 1060.0  # a's deadline; b's lease ends at 1140
        await store.expire("a")
        assert await store.next_deadline() == 1040.0  # "now": a waits to be claimed
        await store.claim("o", 50.0, 10)
        assert await store.next_deadline() == 1090.0  # a's lease
        await store.ack(expiry)
        clock.now = 1090.0
        [a] = await store.claim("o", 50.0, 10)
        await store.ack(a)
        assert await store.next_deadline() is None

    with_store(db, clock, body)


def test_now_is_the_clock(db: str, clock: FakeClock) -> None:
    async def body(store: SQLiteStore) -> None:
        assert await store.now() == 1000.0
        clock.now = 1234.5
        assert await store.now() == 1234.5

    with_store(db, clock, body)


def test_without_a_clock_the_store_uses_the_wall_clock(db: str) -> None:
    async def main() -> None:
        store = SQLiteStore(db)
        before = time.time()
        deadline = await store.create("u1", 60.0, {})
        assert before + 60.0 <= deadline <= time.time() + 60.0
        assert before <= await store.now() <= time.time()
        await store.aclose()

    run(main())


# -- open and close ------------------------------------------------------------------


def test_open_is_idempotent_and_calls_without_open_work(db: str, clock: FakeClock) -> None:
    async def main() -> None:
        store = SQLiteStore(db, clock=clock)
        await store.create("u1", 60.0, {})  # opens on first use
        await store.open()
        await store.open()
        assert await store.exists("u1")
        await store.aclose()

    run(main())


def test_open_logs_the_resolved_absolute_path_of_a_relative_url(
    tmp_path: Path,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``sqlite:///tmp/sessions.db`` (three slashes) is relative to the current
    directory: opening the store says, at INFO, which file it really is."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(tmp_path)
    store = SQLiteStore.from_url("sqlite:///tmp/sessions.db", clock=clock)

    async def main() -> None:
        await store.open()
        await store.aclose()

    with caplog.at_level(logging.INFO, logger="lapse.sessions"):
        run(main())
    said = [r.getMessage() for r in caplog.records if r.name == "lapse.sessions"]
    assert f"SQLite session store: {tmp_path / 'tmp' / 'sessions.db'}" in said
    assert (tmp_path / "tmp" / "sessions.db").exists()


def test_aclose_is_idempotent_and_then_every_method_is_unavailable(
    db: str, clock: FakeClock
) -> None:
    async def main() -> None:
        store = SQLiteStore(db, clock=clock)
        await store.open()
        await store.aclose()
        await store.aclose()
        expiry = Expiry("u", {}, "u:1", 1, "expired")
        calls: list[Awaitable[object]] = [
            store.open(),
            store.now(),
            store.load("u"),
            store.create("u", 1.0, {}),
            store.save("u", {}, []),
            store.exists("u"),
            store.expire("u"),
            store.claim("o", 1.0, 1),
            store.ack(expiry),
            store.events(None),
            store.next_deadline(),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable, match="closed"):
                await call

    run(main())


def test_aclose_lets_calls_already_made_finish(db: str, clock: FakeClock) -> None:
    async def main() -> None:
        store = SQLiteStore(db, clock=clock)
        creates = [asyncio.ensure_future(store.create(f"u{i}", 60.0, {})) for i in range(20)]
        await asyncio.sleep(0)
        await store.aclose()
        assert [await c for c in creates] == [1060.0] * 20
        again = SQLiteStore(db, clock=clock)
        assert all([await again.exists(f"u{i}") for i in range(20)])
        await again.aclose()

    run(main())


def test_a_session_survives_a_restart_with_its_data_and_remaining_time(
    db: str, clock: FakeClock
) -> None:
    delivery_ids: list[str] = []

    async def before(store: SQLiteStore) -> None:
        await store.create("u1", 60.0, {"user": "alice"})
        clock.now = 1010.0
        await store.load("u1")  # deadline 1070
        await store.save("u1", {"cart": [1, 2]}, [])
        await store.create("u2", 5.0, {"k": "v"})
        await store.create("u3", 600.0, {})
        clock.now = 1020.0
        [leased] = await store.claim("a", 60.0, 10)  # u2, leased until 1080
        assert leased.uid == "u2"
        delivery_ids.append(leased.delivery_id)
        await store.expire("u3")  # ended, not claimed yet

    with_store(db, clock, before)
    clock.now = 1030.0  # the restart took ten seconds

    async def after(store: SQLiteStore) -> None:
        assert await store.exists("u1")
        assert await store.next_deadline() == 1030.0  # u3 waits to be claimed
        [u3] = await store.claim("b", 60.0, 10)
        assert (u3.uid, u3.cause) == ("u3", "expired")
        await store.ack(u3)
        assert await store.next_deadline() == 1070.0  # u1's deadline, unchanged
        session = await store.load("u1")
        assert summary(session) == ("u1", 60.0, 1090.0, {"user": "alice", "cart": [1, 2]})
        clock.now = 1080.0  # u2's lease, taken before the restart, runs out
        [u2] = await store.claim("b", 60.0, 10)
        assert (u2.uid, u2.delivery_id, u2.attempt) == ("u2", delivery_ids[0], 2)
        assert dict(u2.data) == {"k": "v"}

    with_store(db, clock, after)


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


# -- stalls: a bound on progress, and nothing committed after a failure -----------


def hold_write_lock(db: str, seconds: float) -> sqlite3.Connection:
    """Another connection takes the file's write lock, released after
    ``seconds`` by the running event loop."""
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    asyncio.get_running_loop().call_later(seconds, holder.rollback)
    return holder


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


_SCHEMA_V1 = """
CREATE TABLE sessions (
    uid TEXT PRIMARY KEY,
    timeout REAL NOT NULL,
    deadline REAL NOT NULL,
    ended INTEGER NOT NULL DEFAULT 0,
    cause TEXT,
    delivery_id TEXT,
    attempt INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL
);
CREATE INDEX sessions_live ON sessions (ended, deadline);
CREATE INDEX sessions_lease ON sessions (ended, lease_until);
CREATE TABLE session_data (
    uid TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (uid, key)
) WITHOUT ROWID;
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    uid TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX events_at ON events (at);
PRAGMA user_version = 1;
"""


def test_a_version_1_file_is_migrated_in_place(db: str, clock: FakeClock) -> None:
    """A file of schema version 1 (before lifetimes and rotation) is upgraded by
    the first open: its live sessions keep loading (with no absolute end), and
    rotation and lifetimes work on it; the file is version 2 afterwards."""
    conn = sqlite3.connect(db)
    conn.executescript(_SCHEMA_V1)
    conn.execute("INSERT INTO sessions (uid, timeout, deadline) VALUES ('u1', 30, 1030)")
    conn.execute("INSERT INTO session_data VALUES ('u1', 'user', '\"ann\"')")
    conn.commit()
    conn.close()

    async def body(store: SQLiteStore) -> None:
        loaded = await store.load("u1")
        assert summary(loaded) == ("u1", 30.0, 1030.0, {"user": "ann"})
        assert await store.rotate("u1", "u2", 10)
        loaded = await store.load("u1")
        assert loaded is not None and loaded.uid == "u2"
        await store.create("u3", 30, {}, 5)
        clock.advance(6)
        (expiry,) = await store.claim("me", 30, 10)
        assert (expiry.uid, expiry.cause) == ("u3", "lifetime")

    with_store(db, clock, body)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone() == (3,)
    conn.close()
