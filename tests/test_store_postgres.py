"""The PostgreSQL session store against a real PostgreSQL (tests/_postgres.py),
never a mock: its URL, its concurrency (saves of different keys, claimers),
its failures (a stopped server, a stuck table, bad credentials, a newer
schema) and its round trips. Each test has a schema of its own; fake clocks
unless the test is about real timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from _helpers import aio
from _postgres import PostgresServer
from conftest import FakeClock

from lapse.sessions.store import StoreConfigError, StoreUnavailable
from lapse.sessions.stores import store_from_url
from lapse.sessions.stores.postgres import PostgresStore, parse_url
from lapse.sessions.stores.postgres.schema import SCHEMA_VERSION

_schemas = itertools.count()


def schema_url(server: PostgresServer, **options: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"schema": f"t{next(_schemas)}", **options}.items())
    return f"{server.url()}?{query}"


@contextlib.asynccontextmanager
async def opened(url: str, clock: FakeClock | None = None) -> AsyncIterator[PostgresStore]:
    store = PostgresStore.from_url(url, clock=clock)
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()


# -- URL ---------------------------------------------------------------------------


def test_url_forms_give_host_port_database_and_options() -> None:
    config = parse_url(
        "postgresql://app:p%40ss@db.example:6543/sessions?schema=web&table_prefix=s_"
        "&sslmode=verify-full&timeout=2.5&pool_size=3"
    )
    assert (config.host, config.port, config.user, config.password) == (
        "db.example",
        6543,
        "app",
        "p@ss",
    )
    assert (config.database, config.schema, config.table_prefix) == ("sessions", "web", "s_")
    assert (config.sslmode, config.timeout, config.pool_size) == ("verify-full", 2.5, 3)
    short = parse_url("postgres://localhost")
    assert (short.port, short.database, short.schema, short.table_prefix) == (
        5432,
        None,
        "public",
        "lapse_",
    )
    assert (short.sslmode, short.timeout, short.pool_size) == ("disable", 1.0, 10)


def test_store_from_url_routes_both_schemes_and_hides_the_password() -> None:
    for scheme in ("postgresql", "postgres", "POSTGRESQL"):
        store = store_from_url(f"{scheme}://u:hunter2@127.0.0.1:5432/db")
        assert isinstance(store, PostgresStore)
        assert "hunter2" not in store.url and "hunter2" not in repr(store)


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("postgresql://u:hunter2@h/db?colour=red", "unknown PostgreSQL store option"),
        ("postgresql://u:hunter2@h/db?sslmode=prefer", "sslmode is one of"),
        ("postgresql://u:hunter2@h/db?timeout=0", "timeout is seconds > 0"),
        ("postgresql://u:hunter2@h/db?timeout=soon", "timeout is seconds > 0"),
        ("postgresql://u:hunter2@h/db?timeout=inf", "timeout is seconds > 0"),
        ("postgresql://u:hunter2@h/db?schema=Web;DROP", "schema is a lowercase identifier"),
        ("postgresql://u:hunter2@h/db?table_prefix=a-b", "table_prefix is a lowercase"),
        ("postgresql://u:hunter2@h/db?schema=a&schema=b", "given twice"),
        ("postgresql://u:hunter2@h/db?pool_size=0", "pool_size is a whole number 1 to 100"),
        ("postgresql://u:hunter2@h/db?pool_size=101", "pool_size is a whole number 1 to 100"),
        ("postgresql://u:hunter2@h/db?pool_size=%C2%B2", "pool_size is a whole number"),
        ("postgresql://u:hunter2@h:99999/db", "bad PostgreSQL store URL"),
        ("postgresql://u:hunter2@/db", "names no host"),
        ("postgresql://u:hunter2@h/db/more", "one database name"),
        ("postgresql://u:hunter2@h/db#x", "#fragment"),
    ],
)
def test_bad_urls_are_config_errors_naming_the_fault_not_the_password(
    url: str, complaint: str
) -> None:
    with pytest.raises(StoreConfigError, match=re.escape(complaint)) as caught:
        store_from_url(url)
    assert "hunter2" not in str(caught.value)


def test_without_asyncpg_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # import asyncpg fails
    with pytest.raises(StoreConfigError, match=re.escape("pip install '.[postgres]'")):
        store_from_url("postgresql://127.0.0.1/db")


# -- concurrency ---------------------------------------------------------------------


@aio
async def test_fifty_concurrent_saves_of_different_keys_all_persist(
    postgres_server: PostgresServer,
) -> None:
    """50 requests of one session, each changing its own key at once: every
    key is there afterwards (each save merges into the row under its lock)."""
    clock = FakeClock(1000.0)
    async with opened(schema_url(postgres_server), clock) as store:
        await store.create("s1", 60, {"base": 0})
        versions = await asyncio.gather(*(store.save("s1", {f"k{i}": i}, ()) for i in range(50)))
        loaded = await store.load("s1")
        assert loaded is not None
        assert loaded.decoded() == {"base": 0, **{f"k{i}": i for i in range(50)}}
        assert sorted(versions) == list(range(2, 52))  # type: ignore[type-var]
        assert loaded.version == 51


@aio
async def test_twenty_concurrent_claimers_take_each_due_session_exactly_once(
    postgres_server: PostgresServer,
) -> None:
    """20 stores (20 pools, as 20 processes) claim at once: every due session
    is handed out once, none twice (FOR UPDATE SKIP LOCKED)."""
    clock = FakeClock(1000.0)
    url = schema_url(postgres_server)
    async with opened(url, clock) as maker:
        for i in range(200):
            await maker.create(f"u{i:03}", 10, {"i": i})
        clock.advance(11)
        stores = [PostgresStore.from_url(url, clock=clock) for _ in range(20)]
        try:
            await asyncio.gather(*(store.open() for store in stores))
            rounds = await asyncio.gather(
                *(store.claim(f"owner{n}", 30, 25) for n, store in enumerate(stores))
            )
            more = await maker.claim("late", 30, 500)
        finally:
            await asyncio.gather(*(store.aclose() for store in stores))
    claimed = [expiry.uid for batch in rounds for expiry in batch] + [e.uid for e in more]
    assert sorted(claimed) == [f"u{i:03}" for i in range(200)]
    assert all(expiry.attempt == 1 for batch in rounds for expiry in batch)


@aio
async def test_events_come_in_commit_order_so_a_slow_announcement_is_not_skipped(
    postgres_server: PostgresServer,
) -> None:
    """An announcement given its id first but committed last (a slow ack of
    another process) is still read: writers of announcements take turns,
    so ids commit in order and the cursor never passes an id to come."""
    clock = FakeClock(1000.0)
    async with opened(schema_url(postgres_server), clock) as store:
        for uid in ("x", "y"):
            await store.create(uid, 10, {})
        clock.advance(11)
        claims = {expiry.uid: expiry for expiry in await store.claim("me", 30, 10)}
        _, cursor = await store.events(None)
        slow = await asyncpg.connect(postgres_server.url())
        try:
            open_transaction = slow.transaction()
            await open_transaction.start()
            x = claims["x"]
            await slow.execute(store.sql.ack, clock(), [x.uid], [x.delivery_id], 600.0, [None])
            fast = asyncio.create_task(store.ack(claims["y"]))
            await asyncio.sleep(0.2)  # y's ack, meanwhile, as far as it can go
            seen, cursor = await store.events(cursor)
            await open_transaction.commit()
        finally:
            await slow.close()
        await fast
        more, _ = await store.events(cursor)
        assert seen + more == ["x", "y"]


# -- data PostgreSQL's text cannot hold ------------------------------------------------

TRICKY = {
    "nul": "a\x00b",
    "k\x00ey": 1,
    "private": "\ue000 \ue000\ue002 \ue001",
    "escaped": "\\u0000 and \\\x00 and \\\\u0000",
    "nested": [{"\x00": ["\x00\ue000"]}],
}


@aio
async def test_nul_and_its_escape_character_round_trip_in_keys_and_values(
    postgres_server: PostgresServer,
) -> None:
    """jsonb cannot hold U+0000: a client's NUL in session data is kept
    anyway (not a failed save, a 503, on every request), through create,
    save, load, scan and claim, and a key holding NUL can be removed."""
    clock = FakeClock(1000.0)
    async with opened(schema_url(postgres_server), clock) as store:
        await store.create("s1", 10, TRICKY)
        assert await store.save("s1", {"x\x00": "\x00", "private": "\ue000\ue001"}, ["k\x00ey"])
        expected = {**TRICKY, "x\x00": "\x00", "private": "\ue000\ue001"}
        del expected["k\x00ey"]
        loaded = await store.load("s1")
        assert loaded is not None and loaded.decoded() == expected
        infos, _ = await store.scan(None, 10)
        assert [info.data for info in infos] == [expected]
        clock.advance(11)
        (expiry,) = await store.claim("me", 30, 10)
        assert expiry.data == expected


# -- failures ------------------------------------------------------------------------


@pytest.mark.slow
@aio
async def test_a_stopped_server_fails_every_call_within_the_timeout_and_start_heals() -> None:
    with PostgresServer() as server:
        url = f"{server.url()}?timeout=0.5"
        async with opened(url) as store:
            await store.create("s1", 600, {"a": 1})
            server.stop()
            calls = [
                store.load("s1"),
                store.save("s1", {"b": 2}, ()),
                store.create("s2", 60, {}),
                store.exists("s1"),
                store.claim("me", 10, 10),
                store.events(None),
                store.next_deadline(),
                store.count(),
            ]
            for call in calls:
                began = time.monotonic()
                with pytest.raises(StoreUnavailable) as caught:
                    await call
                assert time.monotonic() - began < 1.0
                assert not caught.value.permanent
            server.start()
            end = time.monotonic() + 5
            while True:  # the pool drops the broken connections and reconnects
                try:
                    loaded = await store.load("s1")
                    break
                except StoreUnavailable:
                    assert time.monotonic() < end, "the store did not heal"
                    await asyncio.sleep(0.05)
            assert loaded is not None and loaded.decoded() == {"a": 1}


@pytest.mark.slow
def test_a_frozen_server_fails_calls_within_the_timeout_and_thawed_heals(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every server process stopped (SIGSTOP: it neither answers nor closes
    the connection, so no server-side timeout can fire): the client-side
    bound ends each call with StoreUnavailable within the timeout and a
    half; once it runs again the next call works, and no task was left
    failing in the background ("Task exception was never retrieved")."""

    async def scenario() -> None:
        with PostgresServer() as server:
            async with opened(f"{server.url()}?timeout=0.5") as store:
                await store.create("s1", 600, {"a": 1})
                frozen = server.processes()
                for pid in frozen:
                    os.kill(pid, signal.SIGSTOP)
                try:
                    for call in (store.load("s1"), store.save("s1", {"b": 2}, ()), store.count()):
                        began = time.monotonic()
                        with pytest.raises(StoreUnavailable, match="timeout"):
                            await call
                        assert time.monotonic() - began < 0.9
                    await asyncio.sleep(0.6)  # (what a release left behind has failed by now)
                finally:
                    for pid in frozen:
                        os.kill(pid, signal.SIGCONT)
                loaded = await store.load("s1")
                assert loaded is not None and loaded.decoded() == {"a": 1}

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(scenario())
        gc.collect()
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


@aio
async def test_a_table_locked_by_someone_else_is_unavailable_within_the_timeout(
    postgres_server: PostgresServer,
) -> None:
    """A stuck database (another client holds the table): StoreUnavailable
    within the timeout, not a hang; usable again once it lets go."""
    url = schema_url(postgres_server, timeout="0.3")
    schema = parse_url(url).schema
    async with opened(url) as store:
        await store.create("s1", 600, {})
        other = await asyncpg.connect(postgres_server.url())
        try:
            locker = other.transaction()
            await locker.start()
            await other.execute(f"LOCK TABLE {schema}.lapse_sessions IN ACCESS EXCLUSIVE MODE")
            began = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.load("s1")
            assert time.monotonic() - began < 0.6
            await locker.rollback()
        finally:
            await other.close()
        assert await store.exists("s1")


@aio
async def test_bad_password_and_unknown_database_are_permanent(
    postgres_server: PostgresServer,
) -> None:
    bad = postgres_server.url(user=postgres_server.password_user).replace(
        postgres_server.password, "wrong"
    )
    missing = postgres_server.url("no_such_database")
    for url in (bad, missing):
        store = PostgresStore.from_url(url)
        with pytest.raises(StoreUnavailable) as caught:
            await store.open()
        assert caught.value.permanent, url
        assert "wrong" not in str(caught.value)
        await store.aclose()


@aio
async def test_an_unknown_host_and_ssl_refused_by_the_server_are_permanent(
    postgres_server: PostgresServer,
) -> None:
    """Retrying cannot help these, so start-up stops on them."""
    for url, said in (
        ("postgresql://u@no-such-host.invalid/db", "no-such-host.invalid"),
        (f"{postgres_server.url()}?sslmode=require", "SSL"),
    ):
        store = PostgresStore.from_url(url)
        with pytest.raises(StoreUnavailable, match=said) as caught:
            await store.open()
        assert caught.value.permanent, url
        await store.aclose()


@aio
async def test_without_a_clock_time_is_the_databases(postgres_server: PostgresServer) -> None:
    """Deadlines are in the server's clock_timestamp() (here the same
    machine's clock, so close to time.time())."""
    async with opened(schema_url(postgres_server)) as store:
        now = await store.now()
        assert abs(now - time.time()) < 1
        deadline = await store.create("s1", 60, {})
        assert now + 60 <= deadline < time.time() + 61
        assert await store.next_deadline() == deadline


@aio
async def test_a_schema_version_newer_than_the_code_is_refused(
    postgres_server: PostgresServer,
) -> None:
    url = schema_url(postgres_server)
    schema = parse_url(url).schema
    async with opened(url):
        pass
    postgres_server.psql(f"UPDATE {schema}.lapse_schema_version SET version = {SCHEMA_VERSION + 1}")
    store = PostgresStore.from_url(url)
    with pytest.raises(StoreUnavailable, match="newer than this lapse") as caught:
        await store.open()
    assert caught.value.permanent
    await store.aclose()


@aio
async def test_tables_are_made_in_the_schema_with_the_prefix(
    postgres_server: PostgresServer,
) -> None:
    url = schema_url(postgres_server, table_prefix="app_")
    schema = parse_url(url).schema
    async with opened(url):
        pass
    tables = postgres_server.psql(
        f"SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables "
        f"WHERE schemaname = '{schema}'"
    )
    assert tables == "app_aliases,app_events,app_schema_version,app_sessions"


# -- round trips ---------------------------------------------------------------------


def _statements_logged(server: PostgresServer, since: int) -> list[str]:
    return re.findall(r"LOG:  (?:statement|execute [^:]*): (.*)", server.log[since:])


@aio
async def test_load_and_save_are_one_statement_each(postgres_server: PostgresServer) -> None:
    """With every statement logged by the server (log_statement = all for
    this database): a warm load is ONE statement, a save ONE, and nothing
    is run when a connection goes back to the pool."""
    dbname = f"roundtrips{next(_schemas)}"
    postgres_server.create_database(dbname)
    postgres_server.psql(f"ALTER DATABASE {dbname} SET log_statement = 'all'")
    async with opened(postgres_server.url(dbname)) as store:
        await store.create("s1", 600, {"a": 1})
        await store.load("s1")  # prepares the statement
        await store.save("s1", {"a": 2}, ())
        since = len(postgres_server.log)
        loaded = await store.load("s1", version=1)
        await asyncio.sleep(0.05)  # the server writes its log line
        logged = _statements_logged(postgres_server, since)
        assert loaded is not None and loaded.decoded() == {"a": 2}
        assert len(logged) == 1 and logged[0].startswith("WITH t AS"), logged
        since = len(postgres_server.log)
        await store.save("s1", {"b": 3}, ["a"])
        await asyncio.sleep(0.05)
        assert len(_statements_logged(postgres_server, since)) == 1


@aio
async def test_pool_size_caps_the_connections_of_one_store(
    postgres_server: PostgresServer,
) -> None:
    """``?pool_size=2``: forty concurrent saves all succeed, through at most
    two connections (counted by the server), the rest waiting their turn."""
    dbname = f"poolsize{next(_schemas)}"
    postgres_server.create_database(dbname)
    async with opened(f"{postgres_server.url(dbname)}?pool_size=2") as store:
        await store.create("s1", 600, {})
        saved = await asyncio.gather(*(store.save("s1", {f"k{n}": n}, ()) for n in range(40)))
        assert sorted(saved) == list(range(2, 42))
        opened_here = postgres_server.psql(
            f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{dbname}' "
            "AND application_name = 'lapse'"
        )
        assert opened_here == "2"


@aio
async def test_a_loop_held_past_the_timeout_is_not_the_databases_fault(
    postgres_server: PostgresServer,
) -> None:
    """Calls in flight while this process's loop is held for 1 s (a page
    that blocks it) with a 0.3 s store timeout: the database answered in
    time, so they succeed rather than fail as an outage."""
    async with opened(schema_url(postgres_server, timeout="0.3")) as store:
        await store.create("s1", 600, {"a": 1})
        # (two connections with the statements prepared: a first use is a
        # multi-step exchange, and the server's statement_timeout counts a
        # client that stalls between its steps)
        await asyncio.gather(store.load("s1"), store.save("s1", {"b": 1}, ()))
        await asyncio.gather(store.load("s1"), store.save("s1", {"b": 1}, ()))
        calls = asyncio.gather(store.load("s1"), store.save("s1", {"b": 2}, ()))
        asyncio.get_running_loop().call_soon(time.sleep, 1.0)  # once both are sent
        loaded = await calls
        assert loaded[0] is not None and loaded[1] == 4


@pytest.mark.slow
@aio
async def test_a_call_cancelled_while_the_server_is_frozen_ends_at_once() -> None:
    """A call cancelled by its caller (a closing keeper) while the server is
    frozen: the cancel takes effect at once (its connection is dropped),
    rather than wait for a server that does not answer to confirm it."""
    with PostgresServer() as server:
        async with opened(f"{server.url()}?timeout=5") as store:
            await store.create("s1", 600, {})
            frozen = server.processes()
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
            try:
                call = asyncio.create_task(store.count())
                await asyncio.sleep(0.2)
                call.cancel()
                began = time.monotonic()
                with pytest.raises(asyncio.CancelledError):
                    await call
                assert time.monotonic() - began < 0.5
            finally:
                for pid in frozen:
                    os.kill(pid, signal.SIGCONT)
            assert await store.count() == 1
