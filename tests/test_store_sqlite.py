"""The SQLite store: the protocol's semantics, its URL, opening and closing,
restarts and schema migrations. (Several stores and processes on one file
and the event loop: test_store_sqlite_concurrency.py; errors and a file
replaced in use: test_store_sqlite_failures.py.)

Time is a fake clock moved by assignment.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable
from pathlib import Path

import pytest
from _store_sqlite import (
    run,
    summary,
    with_store,
)
from conftest import FakeClock

from lapse.sessions.store import (
    Expiry,
    SessionStore,
    StoreConfigError,
    StoreUnavailable,
)
from lapse.sessions.stores.sqlite import EVENTS_KEPT_FOR, EVENTS_PER_CALL, SQLiteStore


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "sessions.db")


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
    rotation and lifetimes work on it; the file is version 4 afterwards."""
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
    assert conn.execute("PRAGMA user_version").fetchone() == (4,)
    conn.close()
