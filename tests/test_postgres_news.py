"""The PostgreSQL store wakes its keepers by LISTEN/NOTIFY instead of polling.

Real keepers on real event loops and a real PostgreSQL (short real waits: the
point is what happens while a process sleeps). Two Sites on one store's
tables stand for two processes; a store with no keeper stands for a process
that died after its write. Each test has a schema of its own, hence a
channel of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from _helpers import eventually
from _ports import free_port

from lapse.internet.task import Clock
from lapse.sessions import Expiry, SharedKeeper
from lapse.sessions.stores.postgres import PostgresStore
from lapse.sessions.stores.postgres.listener import DEAF_RETRY
from lapse.web.resource import Resource
from lapse.web.server import Site

_schemas = itertools.count()

WITHIN = 3.0
"""Seconds a test waits for what it expects before it fails."""


@pytest.fixture
def url(postgres_server: Any) -> str:
    """A store URL with a schema of this test's own."""
    return f"{postgres_server.url()}?schema=news{next(_schemas)}"


def keeper(site: Site) -> SharedKeeper:
    found = site._keeper
    assert isinstance(found, SharedKeeper)
    return found


class Counted:
    """Counts the statements a store sends through its pool (the listener's
    one LISTEN aside): a spy on the real store, which still runs them."""

    def __init__(self, store: PostgresStore) -> None:
        self.calls = 0
        pool = store._pool
        run = pool.run

        async def counted(work: Callable[[Any], Awaitable[Any]]) -> Any:
            self.calls += 1
            return await run(work)

        pool.run = counted  # type: ignore[method-assign]


@asynccontextmanager
async def running(url: str, count: int, **site: Any) -> AsyncIterator[list[Site]]:
    """``count`` Sites on the store at ``url`` with their keepers running
    (on this loop, real time), closed after."""
    sites = [
        Site(Resource(), reactor=Clock(), store=PostgresStore.from_url(url), **site)
        for _ in range(count)
    ]
    try:
        for each in sites:
            keeper(each).start()
        for each in sites:
            await eventually(lambda each=each: listener_of(each).connects >= 1, WITHIN)
        yield sites
    finally:
        for each in sites:
            await keeper(each).aclose()


def listener_of(site: Site) -> Any:
    store = site.store
    assert isinstance(store, PostgresStore)
    return store.listener


async def new_session(site: Site, timeout: float) -> str:
    session = site.makeSession()
    session.sessionTimeout = timeout
    await keeper(site).persist([session])
    return session.uid


def test_an_idle_process_sends_no_statement_until_its_next_deadline(url: str) -> None:
    """With a live session 60 s from its end and nothing else to do, a
    keeper sends nothing at all (a polling one sent ~40 statements/s)."""

    async def scenario() -> None:
        async with running(url, 1) as (site,):
            await new_session(site, 60)
            await asyncio.sleep(0.3)  # (the round the create's news asks for)
            spy = Counted(site.store)  # type: ignore[arg-type]
            await asyncio.sleep(1.0)
            assert spy.calls == 0

    asyncio.run(scenario())


def test_an_end_in_one_process_reaches_an_idle_one_at_once(url: str) -> None:
    """B holds a copy of a session with a notifyOnExpire callback and sleeps
    until a deadline a minute away; A ends the session (a logout): A's hook
    runs and B's callback runs within half a second, woken by the news."""
    hooked: list[str] = []

    async def scenario() -> None:
        async with running(url, 2, on_expire=lambda e: hooked.append(e.uid)) as (a, b):
            uid = await new_session(a, 60)
            assert await keeper(b).load(uid) is not None
            ended: list[float] = []
            b.sessions[uid].notifyOnExpire(lambda: ended.append(time.monotonic()))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            a.sessions[uid].expire()
            await eventually(lambda: bool(ended), WITHIN)
            assert ended[0] - started < 0.5
            assert hooked == [uid]

    asyncio.run(scenario())


def test_a_session_that_ends_first_is_ended_though_its_maker_is_gone(url: str) -> None:
    """A process that made a session ending before any other, and died: the
    store's news wakes the idle keepers (asleep until a deadline a minute
    away), and one of them delivers the hook on time."""
    hooked: list[tuple[str, float]] = []

    async def scenario() -> None:
        hook = lambda e: hooked.append((e.uid, time.monotonic()))  # noqa: E731
        async with running(url, 1, on_expire=hook) as (site,):
            await new_session(site, 60)
            await asyncio.sleep(0.3)
            maker = PostgresStore.from_url(url)  # no keeper: it "died"
            try:
                made = time.monotonic()
                await maker.create("gone-maker-session-uid-00", 0.5, {})
            finally:
                await maker.aclose()
            await eventually(lambda: bool(hooked), WITHIN)
            assert hooked[0][0] == "gone-maker-session-uid-00"
            assert 0.4 < hooked[0][1] - made < 1.0

    asyncio.run(scenario())


def test_a_lost_listening_connection_is_made_again_and_news_still_heard(
    url: str, postgres_server: Any
) -> None:
    """The listening connection killed by the server (pg_terminate_backend):
    the keeper listens again by itself (and reads the store), and a later
    end elsewhere still reaches it at once."""

    async def scenario() -> None:
        async with running(url, 2) as (a, b):
            uid = await new_session(a, 60)
            assert await keeper(b).load(uid) is not None
            ended: list[str] = []
            b.sessions[uid].notifyOnExpire(lambda: ended.append(uid))
            listener = listener_of(b)
            pid = listener._conn.get_server_pid()
            postgres_server.psql(f"SELECT pg_terminate_backend({pid})")
            await eventually(lambda: listener.connects == 2, WITHIN)
            assert listener._conn.get_server_pid() != pid
            await asyncio.sleep(0.2)
            a.sessions[uid].expire()
            assert await eventually(lambda: bool(ended), WITHIN) < 0.5

    asyncio.run(scenario())


def test_news_said_while_the_listener_was_down_is_read_when_it_is_back(url: str) -> None:
    """Notifications are not kept: B's listener is closed, A ends a session
    B holds, then B listens again: B's first wait answers at once ("read
    the store"), and the catch-up round ends B's copy."""

    async def scenario() -> None:
        async with running(url, 2) as (a, b):
            uid = await new_session(a, 60)
            assert await keeper(b).load(uid) is not None
            await asyncio.sleep(0.2)
            await keeper(b).aclose()  # B stops (listener and loop) ...
            b_store = PostgresStore.from_url(url)
            b_keeper = SharedKeeper(b, b_store)
            await b_keeper.poll_once()  # ... and a new keeper reads from now on
            await a.store.expire(uid)
            await eventually(lambda: uid not in a.sessions, WITHIN)  # A delivered and announced it
            started = time.monotonic()
            assert await b_store.wait_for_news(5.0) is True  # the LISTEN is new
            await b_keeper.poll_once()
            assert uid not in b.sessions
            assert time.monotonic() - started < 1.0
            await b_keeper.aclose()

    asyncio.run(scenario())


def test_a_store_that_cannot_listen_polls_every_second_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No server to listen to: each wait returns within DEAF_RETRY asking
    for a read (polling at that pace), and the warning is logged once."""

    async def scenario() -> None:
        store = PostgresStore.from_url(f"postgresql://nobody@127.0.0.1:{free_port()}/db")
        try:
            for _ in range(2):
                started = time.monotonic()
                assert await store.wait_for_news(30.0) is True
                assert time.monotonic() - started < DEAF_RETRY + 0.5
            assert await store.wait_for_news(0.1) is False
        finally:
            await store.aclose()

    with caplog.at_level(logging.WARNING, logger="lapse.sessions"):
        asyncio.run(scenario())
    warnings = [r for r in caplog.records if "cannot listen" in r.getMessage()]
    assert len(warnings) == 1


def test_a_burst_of_ends_is_read_in_few_rounds(url: str) -> None:
    """Twenty sessions ended by hand at once in A: B (which holds them all)
    hears twenty notifications but reads them in a few rounds (at most one
    per poll_interval after news), and every copy ends."""
    rounds: list[float] = []

    async def scenario() -> None:
        async with running(url, 2) as (a, b):
            uids = [await new_session(a, 60) for _ in range(20)]
            for uid in uids:
                assert await keeper(b).load(uid) is not None
            await asyncio.sleep(0.3)
            b_keeper = keeper(b)
            poll = b_keeper.poll_once

            async def counted() -> float:
                rounds.append(time.monotonic())
                return await poll()

            b_keeper.poll_once = counted  # type: ignore[method-assign]
            for uid in uids:
                await a.store.expire(uid)
            await eventually(lambda: not any(uid in b.sessions for uid in uids), WITHIN)
            assert 1 <= len(rounds) <= 6

    asyncio.run(scenario())


def test_acknowledge_in_the_apps_transaction_counts_only_if_it_commits(url: str) -> None:
    """``acknowledge(conn, expiry)`` inside the application's transaction:
    rolled back, the session is still claimed (not forgotten, nothing
    announced); committed, it is gone and its end announced; the keeper's
    own ack afterwards changes nothing."""
    import asyncpg

    async def scenario() -> None:
        store = PostgresStore.from_url(url)
        conn = await asyncpg.connect(url.partition("?")[0])
        try:
            await store.create("acknowledged-in-tx-uid-00", 0.01, {"n": 1})
            _, cursor = await store.events(None)
            await asyncio.sleep(0.05)
            (expiry,) = await store.claim("me", 30.0, 10)
            with pytest.raises(RuntimeError, match="inside the application's transaction"):
                await store.acknowledge(conn, expiry)
            tr = conn.transaction()
            await tr.start()
            await store.acknowledge(conn, expiry)
            await tr.rollback()
            assert await store.events(cursor) == ([], cursor)
            assert await store.renew(expiry, "me", 30.0) is True  # still claimed
            async with conn.transaction():
                await store.acknowledge(conn, expiry)
            events, _ = await store.events(cursor)
            assert events == [expiry.uid]
            assert await store.renew(expiry, "me", 30.0) is False
            await store.ack(expiry)
            assert (await store.events(cursor))[0] == [expiry.uid]  # not announced twice
        finally:
            await conn.close()
            await store.aclose()

    asyncio.run(scenario())


def test_acknowledge_of_a_delivery_another_claim_holds_raises(url: str) -> None:
    """A hook whose lease ran out, the session claimed again by another
    process: its in-transaction acknowledge raises AlreadyDelivered (the
    application rolls back), and the new holder's succeeds."""
    import asyncpg

    from lapse.sessions import AlreadyDelivered

    async def scenario() -> None:
        store = PostgresStore.from_url(url)
        conn = await asyncpg.connect(url.partition("?")[0])
        try:
            await store.create("taken-over-delivery-uid-0", 0.01, {})
            await asyncio.sleep(0.05)
            (first,) = await store.claim("a", 0.05, 10)
            await asyncio.sleep(0.1)
            (second,) = await store.claim("b", 30.0, 10)
            assert (second.delivery_id, second.attempt) == (first.delivery_id, 2)
            with pytest.raises(AlreadyDelivered):
                async with conn.transaction():
                    await store.acknowledge(conn, first)
            async with conn.transaction():
                await store.acknowledge(conn, second)
            with pytest.raises(AlreadyDelivered):
                async with conn.transaction():
                    await store.acknowledge(conn, second)
        finally:
            await conn.close()
            await store.aclose()

    asyncio.run(scenario())


def test_a_hook_that_meets_already_delivered_is_not_retried_or_counted_failed(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The keeper takes AlreadyDelivered from a hook as "someone else holds
    it": no acknowledgement of its own, no failure logged, no retry."""
    from lapse.sessions import AlreadyDelivered

    calls: list[Expiry] = []

    def hook(expiry: Expiry) -> None:
        calls.append(expiry)
        raise AlreadyDelivered("taken")

    async def scenario() -> None:
        async with running(url, 1, on_expire=hook) as (site,):
            await new_session(site, 0.2)
            await eventually(lambda: bool(calls), WITHIN)
            await asyncio.sleep(0.3)
            assert len(calls) == 1
            assert await site.store.renew(calls[0], keeper(site).node_id, 30.0) is True

    with caplog.at_level(logging.INFO, logger="lapse.sessions"):
        asyncio.run(scenario())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("left to the process that holds it" in r.getMessage() for r in caplog.records)
