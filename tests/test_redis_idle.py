"""An idle process on Redis sleeps until its next deadline: the store wakes it
(``wait_for_news``, a blocking ``XREAD`` per shard on a connection of its own)
when another process ends a session, rotates one, or makes one that ends
before every other, instead of polling every ``poll_interval``.

Real keepers and a real redis-server, real time (short waits: the point is
what happens while a process sleeps). Two stores on one prefix stand for two
processes; a store with no keeper stands for a process that died after its
write. Each test has a prefix of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from _helpers import aio, eventually
from _redis_server import RedisServer, commands_sent

from lapse.internet.task import Clock
from lapse.sessions import SharedKeeper
from lapse.sessions.stores.redis import RedisStore
from lapse.sessions.stores.redis.news import DEAF_RETRY
from lapse.web.resource import Resource
from lapse.web.server import Site

WITHIN = 3.0
"""Seconds a test waits for what it expects before it fails."""

PROMPT = 0.5
"""Seconds within which news must wake a sleeping process."""


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@pytest.fixture
def url(server: RedisServer) -> str:
    return f"{server.url}?prefix=idle{uuid.uuid4().hex[:8]}"


def keeper(site: Site) -> SharedKeeper:
    found = site._keeper
    assert isinstance(found, SharedKeeper)
    return found


def news_of(site: Site) -> Any:
    store = site.store
    assert isinstance(store, RedisStore)
    return store._news


@contextlib.asynccontextmanager
async def running(url: str, count: int, **site: Any) -> AsyncIterator[list[Site]]:
    """``count`` Sites on the store at ``url`` with their keepers running (on
    this loop, real time), each listening for news; closed after."""
    sites = [
        Site(Resource(), reactor=Clock(), store=RedisStore.from_url(url), **site)
        for _ in range(count)
    ]
    try:
        for each in sites:
            keeper(each).start()
        for each in sites:
            await eventually(lambda each=each: news_of(each).reads >= 1, WITHIN)
        yield sites
    finally:
        for each in sites:
            await keeper(each).aclose()


@contextlib.asynccontextmanager
async def stores(url: str, count: int) -> AsyncIterator[list[RedisStore]]:
    made = [RedisStore.from_url(url) for _ in range(count)]
    try:
        for store in made:
            await store.open()
        yield made
    finally:
        for store in made:
            await store.aclose()


async def new_session(site: Site, timeout: float) -> str:
    session = site.makeSession()
    session.sessionTimeout = timeout
    await keeper(site).persist([session])
    return session.uid


async def woken_by(store: RedisStore, action: Any, seconds: float = WITHIN) -> float | None:
    """Seconds until ``store.wait_for_news`` returned True after ``action``
    ran (None: it returned False after ``seconds``); the store's news read
    up to now first (as a keeper's round does)."""
    await store.events(None)
    while await store.wait_for_news(0.1):  # (its connection is new: read the store)
        await store.events(None)
    waiting = asyncio.ensure_future(store.wait_for_news(seconds))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    started = time.monotonic()
    await action()
    heard = await waiting
    return time.monotonic() - started if heard else None


# -- what wakes a sleeping process ----------------------------------------------


@aio
async def test_each_kind_of_news_wakes_a_waiting_store_at_once(url: str) -> None:
    """Another process's logout (expire), end announced (ack), rotation, and
    session made that ends before every other each wake a store blocked in
    wait_for_news within PROMPT."""
    async with stores(url, 2) as (a, b):
        await a.create("aa-later", 60, {})
        assert (await woken_by(b, lambda: a.create("aa-first", 30, {}))) < PROMPT
        assert (await woken_by(b, lambda: a.rotate("aa-first", "aa-rotated", 5))) < PROMPT
        assert (await woken_by(b, lambda: a.expire("aa-later"))) < PROMPT
        [expiry] = await a.claim("o", 30, 10)
        assert (await woken_by(b, lambda: a.ack(expiry))) < PROMPT


@aio
async def test_a_session_that_ends_later_than_another_wakes_no_one(url: str) -> None:
    """The common create (it ends after some other live session of its
    shard) adds nothing to the stream: a waiting store sleeps on."""
    async with stores(url, 2) as (a, b):
        await a.create("bb-first", 30, {})
        assert await woken_by(b, lambda: a.create("bb-later", 60, {}), seconds=0.3) is None


@aio
async def test_principals_ended_by_hand_wake_a_waiting_store(url: str) -> None:
    """Sessions ended with expire_principal, or superseded by a login over
    the principal's limit, wake a waiting store at once."""
    async with stores(url, 2) as (a, b):
        for uid in ("cc-1", "cc-2", "cc-3"):
            await a.create(uid, 60, {})
        await a.set_principal("cc-1", "ann")
        await a.set_principal("cc-2", "ann")
        superseding = lambda: a.set_principal("cc-3", "ann", limit=2)  # noqa: E731
        assert (await woken_by(b, superseding)) < PROMPT
        assert (await woken_by(b, lambda: a.expire_principal("ann"))) < PROMPT


@aio
async def test_news_read_before_the_wait_does_not_wake_it_but_news_after_the_read_does(
    url: str,
) -> None:
    """The blocking read starts where the last events() read stopped: news
    that read already saw does not wake the next wait; news that came after
    the read, even before the wait began, wakes it at once."""
    async with stores(url, 2) as (a, b):
        _, cursor = await b.events(None)
        assert await b.wait_for_news(WITHIN) is True  # (its connection is new)
        await a.expire_principal("nobody")  # (nothing ended: no news)
        await a.create("dd-1", 60, {})  # the first: news
        _, cursor = await b.events(cursor)
        assert await b.wait_for_news(0.3) is False
        await a.expire("dd-1")  # after b's read, before its wait
        started = time.monotonic()
        assert await b.wait_for_news(WITHIN) is True
        assert time.monotonic() - started < 0.1


# -- keepers ----------------------------------------------------------------------


@pytest.mark.slow
@aio
async def test_an_idle_process_sends_no_command_until_its_next_deadline(
    url: str, server: RedisServer
) -> None:
    """With a live session 60 s from its end and nothing else to do, a
    keeper sends Redis nothing for a second (polling, it sent ~40 commands
    a second): its blocking read waits 30 s on the server."""
    async with running(url, 1) as (site,):
        await new_session(site, 60)
        await asyncio.sleep(0.3)  # (the round the create's news asks for)
        assert await commands_sent(server, lambda: asyncio.sleep(1.0)) == []


@pytest.mark.slow
@aio
async def test_a_logout_in_one_process_reaches_an_idle_one_at_once(url: str) -> None:
    """B holds a copy of a session with a notifyOnExpire callback and sleeps
    until a deadline a minute away; A ends the session (a logout): A's hook
    runs once and B's callback runs within PROMPT, woken by the news."""
    hooked: list[str] = []
    async with running(url, 2, on_expire=lambda e: hooked.append(e.uid)) as (a, b):
        uid = await new_session(a, 60)
        assert await keeper(b).load(uid) is not None
        ended: list[float] = []
        b.sessions[uid].notifyOnExpire(lambda: ended.append(time.monotonic()))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        a.sessions[uid].expire()
        await eventually(lambda: bool(ended), WITHIN)
        assert ended[0] - started < PROMPT
        await asyncio.sleep(0.2)
        assert hooked == [uid]


@pytest.mark.slow
@aio
async def test_a_session_that_ends_first_is_delivered_on_time_though_its_maker_died(
    url: str,
) -> None:
    """A process made a session that ends before anything the idle keeper
    knows (its own session ends in a minute), and died: the create's news
    wakes the keeper, which delivers the hook on time."""
    hooked: list[tuple[str, float]] = []
    hook = lambda e: hooked.append((e.uid, time.monotonic()))  # noqa: E731
    async with running(url, 1, on_expire=hook) as (site,):
        await new_session(site, 60)
        await asyncio.sleep(0.3)
        async with stores(url, 1) as (maker,):  # no keeper: it "died"
            made = time.monotonic()
            await maker.create("gone-maker-session-uid-00", 0.5, {})
        await eventually(lambda: bool(hooked), WITHIN)
        assert hooked[0][0] == "gone-maker-session-uid-00"
        assert 0.4 < hooked[0][1] - made < 0.5 + 0.25


@pytest.mark.slow
@aio
async def test_a_lease_that_lapses_in_a_dead_process_wakes_an_idle_one(url: str) -> None:
    """A process claimed an ended session (a lease of 0.6 s) and died mid-hook:
    the idle keeper, with nothing else due for a minute, wakes at the lease's
    end (it read the lease in its round) and delivers it again (attempt 2)."""
    hooked: list[tuple[int, float]] = []
    hook = lambda e: hooked.append((e.attempt, time.monotonic()))  # noqa: E731
    async with stores(url, 1) as (dead,):
        await dead.create("ee-claimed", 0.05, {})
        await asyncio.sleep(0.1)
        [expiry] = await dead.claim("dead-owner", 0.6, 10)
        leased = time.monotonic()
    async with running(url, 1, on_expire=hook) as (site,):
        await new_session(site, 60)
        await eventually(lambda: bool(hooked), WITHIN)
        assert hooked[0][0] == expiry.attempt + 1
        assert 0.5 < hooked[0][1] - leased < 0.6 + 0.25


@aio
async def test_closing_a_keeper_blocked_in_its_read_does_not_hang(url: str) -> None:
    """A keeper asleep in its blocking read (30 s on the server) closes at
    once, and so does a store with a wait pending (the wait returns)."""
    async with stores(url, 1) as (store,):
        waiting = asyncio.ensure_future(store.wait_for_news(30))
        await eventually(lambda: store._news.reads >= 1 or waiting.done(), WITHIN)
        if waiting.done():  # (the first: its connection is new)
            waiting = asyncio.ensure_future(store.wait_for_news(30))
            await eventually(lambda: store._news.reads >= 1, WITHIN)
        started = time.monotonic()
        await asyncio.wait_for(store.aclose(), 1.0)
        assert await asyncio.wait_for(waiting, 1.0) is True
        assert time.monotonic() - started < 0.5
    site = Site(Resource(), reactor=Clock(), store=RedisStore.from_url(url))
    keeper(site).start()
    await eventually(lambda: news_of(site).reads >= 1, WITHIN)
    started = time.monotonic()
    await asyncio.wait_for(keeper(site).aclose(), 1.0)
    assert time.monotonic() - started < 0.5


# -- failures ---------------------------------------------------------------------


@aio
async def test_a_blocking_read_whose_connection_is_killed_wakes_the_waiter_not_resent(
    url: str, server: RedisServer
) -> None:
    """The server drops the blocked connection (CLIENT KILL): the wait
    returns True at once (news may be lost: read the store) rather than the
    read being sent again on a new connection unnoticed; the next wait makes
    a connection anew and says so too."""
    async with stores(url, 1) as (store,), _raw(server) as client:
        await store.events(None)
        while await store.wait_for_news(0.1):  # (its connection is new)
            pass
        waiting = asyncio.ensure_future(store.wait_for_news(WITHIN))
        blocked: list[str] = []

        async def find() -> bool:
            listed = await client.client_list()
            blocked[:] = [str(c["id"]) for c in listed if c.get("cmd") == "xread"]
            return bool(blocked)

        for _ in range(50):
            if await find():
                break
            await asyncio.sleep(0.02)
        [blocked_id] = blocked
        started = time.monotonic()
        await client.execute_command("CLIENT", "KILL", "ID", blocked_id)
        assert await waiting is True
        assert time.monotonic() - started < PROMPT
        assert await store.wait_for_news(WITHIN) is True  # (made again)
        assert store._news.connects == 2
        assert await store.wait_for_news(0.2) is False


@pytest.mark.slow
@aio
async def test_a_killed_and_restarted_server_is_listened_to_again_and_no_expiry_is_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server dies (SIGKILL) under the blocking read: the wait returns
    at once (read the store); while it is down each wait returns after
    DEAF_RETRY (polling at that pace), said once in the log; once it is
    back the next wait returns (connection made again: read the store), a
    session that ended meanwhile is delivered, and a logout in another
    process wakes the keeper again."""
    hooked: list[str] = []
    durable = RedisServer(args=["--appendonly", "yes", "--appendfsync", "always"])
    with durable as server, caplog.at_level(logging.INFO, logger="lapse.sessions"):
        url = f"{server.url}?prefix=killed"
        async with running(url, 2, on_expire=lambda e: hooked.append(e.uid)) as (a, b):
            short = await new_session(a, 1.0)
            kept = await new_session(a, 60)
            assert await keeper(b).load(kept) is not None
            ended: list[str] = []
            b.sessions[kept].notifyOnExpire(lambda: ended.append(kept))
            await asyncio.sleep(0.3)
            assert server.pid is not None
            os.kill(server.pid, signal.SIGKILL)
            await asyncio.sleep(0.1)
            server.stop()  # (reaps the process)
            await asyncio.sleep(DEAF_RETRY * 1.5)
            server.start()
            await eventually(lambda: hooked == [short], WITHIN)
            await eventually(lambda: news_of(b).connects >= 2 and news_of(b).reads >= 2, WITHIN)
            await asyncio.sleep(0.2)
            started = time.monotonic()
            a.sessions[kept].expire()
            await eventually(lambda: bool(ended), WITHIN)
            assert time.monotonic() - started < PROMPT
    said = [r.getMessage() for r in caplog.records if "news" in r.getMessage()]
    assert len([m for m in said if "cannot listen" in m]) == 2  # once per process
    assert len([m for m in said if "listening for other processes' news again" in m]) == 2


@pytest.mark.slow
@aio
async def test_a_store_that_cannot_listen_polls_every_deaf_retry_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No server to read from: each wait returns True within DEAF_RETRY (and
    a bit), asking for a read; the warning is logged once."""
    dead = RedisServer()  # (a port of its own, never started)
    store = RedisStore(dead.url, timeout=0.2)
    with caplog.at_level(logging.WARNING, logger="lapse.sessions"):
        try:
            for _ in range(3):
                started = time.monotonic()
                assert await store.wait_for_news(30.0) is True
                assert time.monotonic() - started < DEAF_RETRY + 0.5
        finally:
            await store.aclose()
    assert len([r for r in caplog.records if "cannot listen" in r.getMessage()]) == 1


@pytest.mark.slow
@aio
async def test_a_huge_or_foreign_stream_entry_wakes_once_and_breaks_nothing(
    url: str, server: RedisServer
) -> None:
    """Entries another program put in the events stream (one of 2 MB, one
    with fields lapse does not write): the waiting store wakes, the keeper's
    round reads past them (events() skips what is not an announcement), the
    next wait sleeps, and a real end is still heard."""
    async with stores(url, 2) as (a, b), _raw(server) as client:
        events = b._shards[0].events
        hostile = lambda: client.xadd(events, {"blob": "x" * 2_000_000})  # noqa: E731
        assert (await woken_by(b, hostile)) < PROMPT
        found, _ = await b.events(",".join(b._news.marks))
        assert found == []
        assert await b.wait_for_news(0.3) is False
        assert (await woken_by(b, lambda: client.xadd(events, {"uid": "", "x": "y"}))) < PROMPT
        await a.create("ff-1", 60, {})
        await b.events(",".join(b._news.marks))
        await a.expire("ff-1")
        started = time.monotonic()
        assert await b.wait_for_news(WITHIN) is True
        assert time.monotonic() - started < PROMPT


@aio
async def test_an_entry_that_is_not_utf8_neither_wedges_the_reads_nor_the_waiter(
    url: str, server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Another program put an entry that is not UTF-8 in the events stream
    (it fails a whole XRANGE reply): the waiting store wakes, events() reads
    the announcements around it and skips it (said in the log), its cursor
    moves past it, and the next wait sleeps."""
    async with stores(url, 2) as (a, b), _raw(server) as client:
        await a.create("gg-1", 60, {})
        await a.expire("gg-1")
        [expiry] = await a.claim("o", 30, 10)
        events = b._shards[0].events
        _, cursor = await b.events(None)
        garbled = lambda: client.xadd(events, {"uid": b"\xff\xfe"})  # noqa: E731
        assert (await woken_by(b, garbled)) < PROMPT
        await a.ack(expiry)
        with caplog.at_level(logging.WARNING, logger="lapse.sessions"):
            found, after = await b.events(cursor)
        assert found == ["gg-1"]
        assert after == (await client.xrevrange(events, count=1))[0][0]
        assert any("not UTF-8" in r.getMessage() for r in caplog.records)
        assert await b.events(after) == ([], after)
        assert await b.wait_for_news(0.3) is False


@pytest.mark.slow
@aio
async def test_an_events_key_that_is_not_a_stream_is_polled_not_spun_on(
    url: str, server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The events key replaced by a string (XREAD answers WRONGTYPE): the
    store asks for a read at once, then every DEAF_RETRY, not in a tight
    loop, and says so once."""
    async with stores(url, 1) as (store,), _raw(server) as client:
        await store.events(None)
        assert await store.wait_for_news(WITHIN) is True  # (its connection is new)
        await client.set(store._shards[0].events, "not a stream")
        with caplog.at_level(logging.WARNING, logger="lapse.sessions"):
            started = time.monotonic()
            wakes = 0
            while time.monotonic() - started < 2.5:
                wakes += await store.wait_for_news(WITHIN)
        assert 2 <= wakes <= 4
        assert store._news.reads <= 6
    assert len([r for r in caplog.records if "cannot listen" in r.getMessage()]) == 1


@contextlib.asynccontextmanager
async def _raw(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(port=server.port, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()
