"""The SQLite store's index of sessions by principal, beyond the contract
(tests/test_store_contract.py runs that): the cap under concurrent logins
from two stores on one file, hostile principals, the cost of a lookup (the
index, never a scan), the index through claim, ack and a restart, and the
in-place migration of a version 3 file.

Time is a fake clock, except in the two-process test.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
from pathlib import Path

import pytest
from _store_sqlite import bind_in_process, run, with_store
from conftest import FakeClock

from lapse.sessions.store import MAX_PRINCIPAL_LENGTH, TooManySessions
from lapse.sessions.stores.sqlite import SQLiteStore
from lapse.sessions.stores.sqlite.queries import SQL


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "sessions.db")


async def _uids_of(store: SQLiteStore, principal: str) -> list[str]:
    return [info.uid for info in await store.sessions_of(principal)]


# -- the cap, concurrently, across stores ------------------------------------------


def test_50_logins_at_once_through_two_stores_on_one_file_leave_exactly_3_bound(
    db: str, clock: FakeClock
) -> None:
    """Two stores on one file (two connections, two worker threads: two
    processes' worth) each bind 25 of 50 sessions to one principal at once,
    limit 3: exactly 3 stay bound and live, the other 47 were superseded,
    each once, and are claimed with cause "superseded"; both stores agree."""

    async def main() -> None:
        one, two = SQLiteStore(db, clock=clock), SQLiteStore(db, clock=clock)
        uids = [f"c{i:02d}" for i in range(50)]
        for i, uid in enumerate(uids):
            await one.create(uid, 60, {"i": i})
            clock.advance(0.01)  # distinct last accesses
        results = await asyncio.gather(
            *(
                (one if i % 2 else two).set_principal(uid, "alice", limit=3)
                for i, uid in enumerate(uids)
            )
        )
        superseded = [uid for result in results for uid in result or []]
        bound = await _uids_of(one, "alice")
        assert len(bound) == 3 and len(superseded) == 47 == len(set(superseded))
        assert sorted(superseded + bound) == uids
        assert sorted(await _uids_of(two, "alice")) == sorted(bound)
        assert [uid for uid in uids if await two.exists(uid)] == sorted(bound)
        assert await one.count() == 3
        claimed = await two.claim("hook", 30, 100) + await one.claim("hook", 30, 100)
        assert sorted(e.uid for e in claimed) == sorted(superseded)
        assert {e.cause for e in claimed} == {"superseded"}
        await one.aclose()
        await two.aclose()

    run(main())


@pytest.mark.slow
def test_50_logins_from_two_real_processes_never_exceed_the_cap(tmp_path: Path) -> None:
    """Two processes, each binding 25 of 50 sessions to one principal with
    limit 3 as fast as it can, both starting at once: exactly 3 stay bound."""
    db = str(tmp_path / "sessions.db")
    uids = [f"p{i:02d}" for i in range(50)]

    async def make(store: SQLiteStore) -> None:
        for uid in uids:
            await store.create(uid, 3600, {})

    with_store(db, lambda: 1000.0, make)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results = context.Queue()
    halves = [uids[0::2], uids[1::2]]
    processes = [
        context.Process(target=bind_in_process, args=(db, half, 3, barrier, results))
        for half in halves
    ]
    for process in processes:
        process.start()
    got = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    superseded = [uid for result in got for uid in result]

    async def check(store: SQLiteStore) -> None:
        bound = await _uids_of(store, "alice")
        assert len(bound) == 3 and len(superseded) == 47 == len(set(superseded))
        assert sorted(bound + superseded) == uids
        assert sum([await store.exists(uid) for uid in uids]) == 3

    with_store(db, lambda: 1000.0, check)


def test_a_lowered_limit_refuses_or_supersedes_even_an_already_bound_session(
    db: str, clock: FakeClock
) -> None:
    """A session already bound counts as one of the limit (as in the memory
    store): with more live sessions than a limit lowered since, binding it
    again is refused (nothing changed), or ends the least recently used
    others down to the limit; sessions_of ties are ordered by uid."""

    async def body(store: SQLiteStore) -> None:
        for uid in ("u4", "u3", "u2", "u1"):
            await store.create(uid, 60, {})
            await store.set_principal(uid, "alice")
        assert await _uids_of(store, "alice") == ["u1", "u2", "u3", "u4"]  # one instant
        with pytest.raises(TooManySessions):
            await store.set_principal("u1", "alice", limit=2, refuse=True)
        assert len(await store.sessions_of("alice")) == 4
        assert await store.set_principal("u1", "alice", limit=2) == ["u2", "u3"]
        assert await _uids_of(store, "alice") == ["u1", "u4"]

    with_store(db, clock, body)


def test_expire_principal_spares_the_session_an_old_uid_names(db: str, clock: FakeClock) -> None:
    """except_uid may be an old uid within its grace (a request that loaded
    the session before another rotated it): the session it names is kept."""

    async def body(store: SQLiteStore) -> None:
        for uid in ("u1", "u2"):
            await store.create(uid, 60, {})
            await store.set_principal(uid, "alice")
        assert await store.rotate("u1", "u1-new", 10)
        assert await store.expire_principal("alice", except_uid="u1") == ["u2"]
        assert await _uids_of(store, "alice") == ["u1-new"]

    with_store(db, clock, body)


# -- hostile principals ------------------------------------------------------------

HOSTILE = [
    "x' OR '1'='1",
    "'; DROP TABLE sessions; --",
    '"',
    "%",
    "_",
    "a%",
    "a_c",
    "abc",
    "\\",
    "'" * MAX_PRINCIPAL_LENGTH,
    "%" * MAX_PRINCIPAL_LENGTH,
]


def test_a_hostile_principal_is_data_never_sql(db: str, clock: FakeClock) -> None:
    """Quotes, LIKE wildcards (% and _), SQL and 256-character names are
    matched exactly, each to its own session: no wildcard matches another
    name, no quote breaks a statement, and the tables are intact."""

    async def body(store: SQLiteStore) -> None:
        for i, name in enumerate(HOSTILE):
            await store.create(f"u{i}", 60, {})
            assert await store.set_principal(f"u{i}", name) == []
        for i, name in enumerate(HOSTILE):
            assert await _uids_of(store, name) == [f"u{i}"], name
            info = await store.info(f"u{i}")
            assert info is not None and info.principal == name
        assert await store.expire_principal("%") == [f"u{HOSTILE.index('%')}"]
        assert await store.expire_principal("_") == [f"u{HOSTILE.index('_')}"]
        assert await _uids_of(store, "a%") == [f"u{HOSTILE.index('a%')}"]
        assert await store.count() == len(HOSTILE) - 2

    with_store(db, clock, body)


@pytest.mark.parametrize(
    ("principal", "error"),
    [
        ("a" * (MAX_PRINCIPAL_LENGTH + 1), ValueError),
        ("", ValueError),
        ("line\nbreak", ValueError),
        ("\ud800", ValueError),
        (42, TypeError),
    ],
)
def test_a_principal_no_store_can_index_is_refused_binding_nothing(
    db: str, clock: FakeClock, principal: object, error: type[Exception]
) -> None:
    """Too long, empty, with control characters, not valid Unicode, not a
    str: a clear TypeError or ValueError from each method, nothing written."""

    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60, {})
        with pytest.raises(error, match="principal"):
            await store.set_principal("u1", principal)  # type: ignore[arg-type]
        with pytest.raises(error, match="principal"):
            await store.sessions_of(principal)  # type: ignore[arg-type]
        with pytest.raises(error, match="principal"):
            await store.expire_principal(principal)  # type: ignore[arg-type]
        loaded = await store.load("u1")
        assert loaded is not None and loaded.principal is None

    with_store(db, clock, body)


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "3"])
def test_a_limit_that_is_not_a_positive_int_is_a_value_error(
    db: str, clock: FakeClock, limit: object
) -> None:
    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60, {})
        with pytest.raises(ValueError, match="at least 1"):
            await store.set_principal("u1", "alice", limit=limit)  # type: ignore[arg-type]
        assert await store.sessions_of("alice") == []

    with_store(db, clock, body)


# -- the cost of a lookup ------------------------------------------------------------


def _steps(conn: sqlite3.Connection, principal: str, now: float) -> int:
    """The SQLite virtual machine steps of one sessions_of lookup (after a
    first one, which also reads the schema)."""
    conn.execute(SQL.sessions_of, (principal, now)).fetchall()
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(count, 1)
    conn.execute(SQL.sessions_of, (principal, now)).fetchall()
    conn.set_progress_handler(None, 1)
    return steps


def test_a_lookup_by_principal_uses_the_index_and_costs_that_principals_rows_only(
    db: str, clock: FakeClock
) -> None:
    """EXPLAIN QUERY PLAN of sessions_of searches sessions_principal, and the
    work of one lookup (VM steps) is the same whether the file holds 10 or
    2000 other live sessions (bound to others or to no one): O(sessions of
    that principal), not O(sessions). The index holds the principal alone,
    so a touch, which writes the deadline, never writes to it."""

    async def fill(store: SQLiteStore, first: int, count: int) -> None:
        for i in range(first, first + count):
            await store.create(f"u{i}", 60, {})
            if i % 2:
                await store.set_principal(f"u{i}", f"user{i % 7}")

    async def body(store: SQLiteStore) -> None:
        for uid in ("a1", "a2", "a3"):
            await store.create(uid, 60, {})
            await store.set_principal(uid, "alice")
        await fill(store, 0, 10)

    with_store(db, clock, body)
    conn = sqlite3.connect(db)
    ((*_, plan),) = conn.execute("EXPLAIN QUERY PLAN " + SQL.sessions_of, ("alice", 1.0))
    assert plan == "SEARCH sessions USING INDEX sessions_principal (principal=?)"
    columns = [row[2] for row in conn.execute("PRAGMA index_info(sessions_principal)")]
    assert columns == ["principal"]
    few = _steps(conn, "alice", 1000.0)
    conn.close()
    with_store(db, clock, lambda store: fill(store, 10, 2000))
    conn = sqlite3.connect(db)
    many = _steps(conn, "alice", 1000.0)
    conn.close()
    assert few == many


# -- the index through claim, ack, create and a restart ----------------------------------


def _bound_rows(db: str) -> int:
    """Rows in the file bound to any principal (live or ended, unacknowledged)."""
    conn = sqlite3.connect(db)
    try:
        (n,) = conn.execute("SELECT COUNT(*) FROM sessions WHERE principal IS NOT NULL").fetchone()
        return int(n)
    finally:
        conn.close()


def test_ended_sessions_leave_the_file_at_ack_and_superseded_ends_are_announced(
    db: str, clock: FakeClock
) -> None:
    """A superseded, a timed-out and an expired bound session are claimed with
    their causes, then acknowledged: their rows go, and each end is announced
    in events() as an expire's is."""

    async def body(store: SQLiteStore) -> None:
        _, cursor = await store.events(None)
        await store.create("old", 5, {})
        await store.create("lru", 60, {})
        await store.create("gone", 60, {})
        for uid in ("old", "lru", "gone"):
            await store.set_principal(uid, "alice")
        clock.advance(6)  # "old" times out
        await store.expire("gone")
        await store.create("new", 60, {})
        assert await store.set_principal("new", "alice", limit=1) == ["lru"]
        assert _bound_rows(db) == 4  # the ended rows wait for their hook
        claimed = await store.claim("hook", 30, 10)
        assert {e.uid: e.cause for e in claimed} == {
            "old": "timeout",
            "gone": "expired",
            "lru": "superseded",
        }
        for expiry in claimed:
            await store.ack(expiry)
        assert _bound_rows(db) == 1
        events, _ = await store.events(cursor)
        assert sorted(str(event) for event in events) == ["gone", "lru", "old"]

    with_store(db, clock, body)


def test_creating_over_a_bound_uid_unbinds_it(db: str, clock: FakeClock) -> None:
    """create() replaces a row and all of it: the new session is unbound."""

    async def body(store: SQLiteStore) -> None:
        await store.create("u1", 60, {})
        await store.set_principal("u1", "alice")
        await store.create("u1", 60, {})
        assert await store.sessions_of("alice") == []
        loaded = await store.load("u1", version=1)
        assert loaded is not None and loaded.unchanged and loaded.principal is None

    with_store(db, clock, body)


def test_the_principal_survives_a_restart_and_is_returned_by_every_read(
    db: str, clock: FakeClock
) -> None:
    """A bound session reopened by another store: load (with and without its
    data), info, scan and sessions_of all return its principal."""

    async def before(store: SQLiteStore) -> None:
        await store.create("u1", 60, {"k": 1})
        await store.set_principal("u1", "alice")

    async def after(store: SQLiteStore) -> None:
        full = await store.load("u1")
        same = await store.load("u1", version=1)
        info = await store.info("u1")
        (scanned,), _ = await store.scan(None, 10)
        (listed,) = await store.sessions_of("alice")
        assert full is not None and same is not None and info is not None
        principals = {x.principal for x in (full, same, info, scanned, listed)}
        assert principals == {"alice"} and same.unchanged

    with_store(db, clock, before)
    with_store(db, clock, after)


# -- migration ------------------------------------------------------------------------

_SCHEMA_V3 = """
CREATE TABLE sessions (
    uid TEXT PRIMARY KEY, timeout REAL NOT NULL, deadline REAL NOT NULL,
    ended INTEGER NOT NULL DEFAULT 0, cause TEXT, delivery_id TEXT,
    attempt INTEGER NOT NULL DEFAULT 0, lease_owner TEXT, lease_until REAL,
    created REAL, ends_at REAL, version INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX sessions_live ON sessions (ended, deadline);
CREATE INDEX sessions_lease ON sessions (ended, lease_until);
CREATE TABLE session_data (
    uid TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (uid, key)
) WITHOUT ROWID;
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, uid TEXT NOT NULL, at REAL NOT NULL, target TEXT
);
CREATE INDEX events_at ON events (at);
CREATE TABLE aliases (uid TEXT PRIMARY KEY, target TEXT NOT NULL, until REAL NOT NULL)
    WITHOUT ROWID;
CREATE INDEX aliases_target ON aliases (target);
CREATE INDEX aliases_until ON aliases (until);
INSERT INTO sessions (uid, timeout, deadline, created, version)
    VALUES ('live', 60, 1050, 990, 4);
INSERT INTO session_data VALUES ('live', 'user', '"ann"');
INSERT INTO sessions (uid, timeout, deadline, ended, cause, lease_until, created, version)
    VALUES ('ended', 60, 995, 1, 'expired', 995, 900, 1);
INSERT INTO session_data VALUES ('ended', 'cart', '[1]');
INSERT INTO aliases VALUES ('was-live', 'live', 1100);
PRAGMA user_version = 3;
"""


def test_a_version_3_file_is_migrated_in_place_keeping_its_sessions(
    db: str, clock: FakeClock
) -> None:
    """A file made at schema version 3 (before principals) is upgraded by the
    first open: its sessions, data, versions, aliases and pending ends are
    kept, every session unbound; binding, listing and the cap work on it,
    through the new index; the file is version 4 afterwards."""
    conn = sqlite3.connect(db)
    conn.executescript(_SCHEMA_V3)
    conn.close()

    async def body(store: SQLiteStore) -> None:
        loaded = await store.load("was-live", version=4)
        assert loaded is not None and (loaded.uid, loaded.unchanged) == ("live", True)
        assert loaded.principal is None and loaded.deadline == 1060.0
        assert await store.set_principal("was-live", "alice") == []
        (info,) = await store.sessions_of("alice")
        assert (info.uid, dict(info.data), info.principal) == ("live", {"user": "ann"}, "alice")
        await store.create("u2", 60, {})
        assert await store.set_principal("u2", "alice", limit=1) == ["live"]
        claimed = {e.uid: (e.cause, dict(e.data)) for e in await store.claim("me", 30, 10)}
        assert claimed == {
            "ended": ("expired", {"cart": [1]}),
            "live": ("superseded", {"user": "ann"}),
        }

    with_store(db, clock, body)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone() == (4,)
    ((*_, plan),) = conn.execute("EXPLAIN QUERY PLAN " + SQL.sessions_of, ("alice", 1.0))
    assert "USING INDEX sessions_principal" in plan
    conn.close()
