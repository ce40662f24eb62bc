"""The shared keeper's logic on a fake clock, with no real sleeps.

Each test drives :meth:`SharedKeeper.poll_once` (one round: claim, read the
announcements, deliver, acknowledge, say how long to sleep) by hand, on real
stores given a fake clock: an SQLite file, a real redis-server (one node and
a cluster) and a real PostgreSQL. Two Sites on one store stand for two processes. Lease renewal
runs on an injected ``sleep`` the test releases beat by beat.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from _dict_store import DictStore
from _redis_server import RedisServer
from _store_sqlite import PollingSQLiteStore
from conftest import FakeClock

from lapse.internet.task import Clock
from lapse.sessions import Expiry, SessionStore, SharedKeeper
from lapse.sessions.stores.postgres import PostgresStore
from lapse.sessions.stores.redis import RedisStore
from lapse.sessions.stores.sqlite import SQLiteStore
from lapse.web.resource import Resource
from lapse.web.server import Site

_prefixes = itertools.count()

Sites = Callable[..., Site]


@pytest.fixture(params=["sqlite", "redis", "redis-cluster", "postgres"])
def store_maker(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[FakeClock], Any]:
    """Makes a store object on a fake clock; every one made by one test
    names the same sessions (as processes sharing a file, a server or a
    Redis Cluster, whose 12 shards each keeper's rounds must all serve)."""
    if request.param == "sqlite":
        path = str(tmp_path / "sessions.db")
        return lambda clock: SQLiteStore(path, clock=clock)
    prefix = f"k{next(_prefixes)}"
    if request.param == "postgres":
        base = request.getfixturevalue("postgres_server").url()
        return lambda clock: PostgresStore.from_url(f"{base}?schema={prefix}", clock=clock)
    if request.param == "redis-cluster":
        url = request.getfixturevalue("redis_cluster").url(prefix=prefix)
        return lambda clock: RedisStore(url, clock=clock)
    server = request.getfixturevalue("redis_server")
    return lambda clock: RedisStore(server.url, clock=clock, prefix=prefix)


@asynccontextmanager
async def processes(
    make_store: Callable[[FakeClock], SessionStore], clock: FakeClock, count: int, **site: Any
) -> AsyncIterator[list[Site]]:
    """``count`` Sites on the same shared store (their keepers not started:
    the test runs their rounds), closed after."""
    sites = [
        Site(Resource(), reactor=Clock(), store=make_store(clock), **site) for _ in range(count)
    ]
    try:
        yield sites
    finally:
        for site in sites:
            await site._keeper.aclose()


def keeper(site: Site) -> SharedKeeper:
    found = site._keeper
    assert isinstance(found, SharedKeeper)
    return found


async def new_session(site: Site, timeout: float, **data: Any) -> str:
    """A session made and written through ``site``; its uid."""
    session = site.makeSession()
    session.sessionTimeout = timeout
    session.data.update(data)
    await keeper(site).persist([session])
    return session.uid


def test_a_round_delivers_once_acknowledges_and_ends_every_copy(
    store_maker: Callable[[FakeClock], SessionStore],
) -> None:
    """A session ending on the fake clock: the next round of one process runs
    the hook once with the final data and acknowledges it; its own copy and,
    on their next round, the other process's copy end (their notifyOnExpire
    callbacks run); no later round delivers it again."""
    hooked: list[tuple[str, Expiry]] = []

    async def scenario() -> None:
        clock = FakeClock()
        async with processes(store_maker, clock, 2) as (a, b):
            a.on_expire = lambda e: hooked.append(("a", e))
            b.on_expire = lambda e: hooked.append(("b", e))
            await keeper(b).poll_once()  # b reads announcements from now on
            uid = await new_session(a, 10, n=1)
            assert await keeper(b).load(uid) is not None
            ended: list[str] = []
            a.sessions[uid].notifyOnExpire(lambda: ended.append("a"))
            b.sessions[uid].notifyOnExpire(lambda: ended.append("b"))
            clock.advance(9.9)
            assert await keeper(a).poll_once() == pytest.approx(0.1)
            assert hooked == []
            clock.advance(0.2)
            await keeper(a).poll_once()
            assert [(who, e.uid, e.cause, e.attempt, dict(e.data)) for who, e in hooked] == [
                ("a", uid, "timeout", 1, {"n": 1})
            ]
            assert ended == ["a"] and uid not in a.sessions
            await keeper(b).poll_once()
            assert ended == ["a", "b"] and uid not in b.sessions
            clock.advance(100)
            for site in (a, b, a):
                await keeper(site).poll_once()
            assert len(hooked) == 1
            assert await a.store.count() == 0 and await a.store.next_deadline() is None

    asyncio.run(scenario())


def test_a_failing_hook_is_retried_after_each_lease_until_max_attempts(
    store_maker: Callable[[FakeClock], SessionStore], caplog: pytest.LogCaptureFixture
) -> None:
    """A hook that raises is not acknowledged: its claim comes back once the
    lease runs out (same delivery id, next attempt), in whichever process
    polls; at ``max_attempts`` the keeper gives up and acknowledges it."""
    attempts: list[tuple[str, int]] = []

    def failing(expiry: Expiry) -> None:
        attempts.append((expiry.delivery_id, expiry.attempt))
        raise RuntimeError("the mail server is down")

    async def scenario() -> None:
        clock = FakeClock()
        async with processes(store_maker, clock, 2, on_expire=failing) as sites:
            for site in sites:
                keeper(site).lease = 10
                keeper(site).max_attempts = 3
            await new_session(sites[0], 5)
            clock.advance(5.5)
            assert await keeper(sites[0]).poll_once() <= 10
            assert len(attempts) == 1
            clock.advance(9)  # the lease holds
            await keeper(sites[1]).poll_once()
            assert len(attempts) == 1
            clock.advance(1.5)  # the lease ran out: redelivered
            await keeper(sites[1]).poll_once()
            clock.advance(10.5)  # and again, to the first process
            await keeper(sites[0]).poll_once()
            assert [attempt for _, attempt in attempts] == [1, 2, 3]
            assert len({delivery for delivery, _ in attempts}) == 1
            clock.advance(60)
            await keeper(sites[0]).poll_once()
            assert len(attempts) == 3  # given up: acknowledged
            assert await sites[0].store.claim("anyone", 10, 10) == []
            assert sum(keeper(s).stats.hook_failures for s in sites) == 3

    with caplog.at_level(logging.ERROR, logger="lapse.sessions"):
        asyncio.run(scenario())
    assert "giving up" in caplog.text


class Beats:
    """An injected ``sleep``: each sleeper waits until the test lets one
    beat pass, which advances the fake clock by what it slept."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sleepers: asyncio.Queue[tuple[float, asyncio.Future[None]]] = asyncio.Queue()

    async def sleep(self, seconds: float) -> None:
        woken = asyncio.get_running_loop().create_future()
        await self.sleepers.put((seconds, woken))
        await woken

    async def beat(self) -> None:
        """Wait for the next sleeper, advance the clock, wake it."""
        seconds, woken = await self.sleepers.get()
        self.clock.advance(seconds)
        woken.set_result(None)


def test_a_hook_slower_than_its_lease_keeps_its_claim_by_renewing(
    store_maker: Callable[[FakeClock], SessionStore],
) -> None:
    """While a hook runs, its lease is renewed every third of the lease, so
    another process polling after the first lease would have run out claims
    nothing; the hook runs once, and is acknowledged when it returns."""
    runs: list[int] = []
    release = asyncio.Event()

    async def slow(expiry: Expiry) -> None:
        runs.append(expiry.attempt)
        await release.wait()

    async def scenario() -> None:
        clock = FakeClock()
        async with processes(store_maker, clock, 2, on_expire=slow) as (a, b):
            beats = Beats(clock)
            keeper(a).sleep = beats.sleep
            keeper(a).lease = 9
            await new_session(a, 5)
            clock.advance(5.5)
            delivering = asyncio.ensure_future(keeper(a).poll_once())
            for _ in range(4):  # 12 s of fake time: past the first lease
                await beats.beat()
            await beats.sleepers.get()  # the fourth renewal is written
            assert runs == [1]
            assert await b.store.claim("b", 9, 10) == []
            await keeper(b).poll_once()
            assert runs == [1]
            release.set()
            await delivering
            clock.advance(60)
            await keeper(b).poll_once()
            assert runs == [1]
            assert await b.store.claim("b", 9, 10) == []

    asyncio.run(scenario())


def test_a_rotation_and_an_end_announced_rekey_then_end_the_other_copy(
    store_maker: Callable[[FakeClock], SessionStore],
) -> None:
    """Process B holds a copy (with a callback) of a session A rotates: B's
    round reads the rotation and moves its copy to the new uid; when A ends
    it by hand, B's next round ends the copy and runs its callback, once."""

    async def scenario() -> None:
        clock = FakeClock()
        async with processes(store_maker, clock, 2) as (a, b):
            await keeper(b).poll_once()
            old = await new_session(a, 60, user="ann")
            copy = await keeper(b).load(old)
            assert copy is not None
            ended: list[str] = []
            copy.notifyOnExpire(lambda: ended.append(copy.uid))
            session = a.sessions[old]
            new = session.rotate()
            await keeper(a).persist([session])
            await keeper(b).poll_once()
            assert b.sessions.get(new) is copy and old not in b.sessions
            session.expire()
            await keeper(a).settle()
            await keeper(a).poll_once()
            assert ended == []
            await keeper(b).poll_once()
            assert ended == [new] and not b.sessions
            await keeper(b).poll_once()
            assert ended == [new]

    asyncio.run(scenario())


def test_the_sleep_between_rounds_is_the_next_deadline_capped_by_the_poll_interval(
    tmp_path: Path,
) -> None:
    """On a shared store that cannot wake its keepers a round sleeps until
    the store's next deadline, at most ``poll_interval`` (another process
    may make a session ending sooner), and ``poll_interval`` when nothing is
    pending; on an in-process store that only speaks the protocol, or a
    shared one that wakes its keepers (SQLite's wait_for_news), until the
    next deadline, and for ever (``inf``: until woken) when nothing is
    pending."""

    async def scenario() -> None:
        clock = FakeClock()
        shared = Site(
            Resource(),
            reactor=Clock(),
            store=PollingSQLiteStore(str(tmp_path / "s.db"), clock=clock),
        )
        woken = Site(
            Resource(), reactor=Clock(), store=SQLiteStore(str(tmp_path / "s.db"), clock=clock)
        )
        alone = Site(Resource(), reactor=Clock(), store=DictStore(clock=clock))
        try:
            keeper(shared).poll_interval = 30
            assert await keeper(shared).poll_once() == 30
            assert await keeper(alone).poll_once() == math.inf
            for site in (shared, alone):
                await new_session(site, 50)
            clock.advance(8)
            assert await keeper(shared).poll_once() == pytest.approx(30)
            assert await keeper(alone).poll_once() == pytest.approx(42)
            await new_session(shared, 12)
            assert await keeper(shared).poll_once() == pytest.approx(12)
            clock.advance(20)
            assert await keeper(shared).poll_once() == pytest.approx(22)  # the 12 s one ended
            assert keeper(shared).delay_until(None, clock()) == 30
            assert keeper(shared).delay_until(clock() - 5, clock()) == 0
            keeper(woken).poll_interval = 5
            assert await keeper(woken).poll_once() == pytest.approx(22)  # not capped at 5
            assert keeper(woken).delay_until(clock() + 45, clock()) == 45
            assert keeper(woken).delay_until(None, clock()) == math.inf
        finally:
            await keeper(woken).aclose()
            await keeper(shared).aclose()
            await keeper(alone).aclose()

    asyncio.run(scenario())


def test_an_outage_is_retried_and_recovery_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A round on a Redis that is down fails (StoreUnavailable, logged once
    as an outage) and the loop's round says retry in RETRY_DELAY; once the
    server is up, the next round opens the store again and delivers what
    ended meanwhile, and the recovery is logged."""
    hooked: list[str] = []

    async def scenario(server: RedisServer) -> None:
        clock = FakeClock()
        site = Site(
            Resource(),
            reactor=Clock(),
            store=RedisStore(server.url, clock=clock, prefix="outage", timeout=0.5),
            on_expire=lambda e: hooked.append(e.uid),
        )
        found = keeper(site)
        try:
            uid = await new_session(site, 5)
            server.stop()
            clock.advance(6)
            assert await found._round() == 1.0
            assert await found._round() == 1.0
            server.start()
            assert await found._round() == math.inf  # nothing pending: asleep until news
            assert hooked == [uid]
        finally:
            await found.aclose()

    durable = RedisServer(args=["--appendonly", "yes"])  # its data survive the restart
    with durable as server, caplog.at_level(logging.WARNING, logger="lapse.sessions"):
        asyncio.run(scenario(server))
    outages = [r for r in caplog.records if "session store unavailable" in r.getMessage()]
    assert len(outages) == 1
    assert "reachable again" in caplog.text
