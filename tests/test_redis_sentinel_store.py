"""The Redis store on Redis with Sentinel, by its URL: the published store
contract on a real primary with a replica and three real sentinels, an
unknown service as a permanent error, and a failover followed without a
restart (503s meanwhile, never a hang; sessions found on the new primary,
whose script cache is empty).
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Iterator

import pytest
from _helpers import aio, eventually
from _redis_sentinel import SentinelSetup, ask

from lapse.sessions.store import StoreUnavailable
from lapse.sessions.stores import store_from_url
from lapse.sessions.stores.redis import RedisStore
from lapse.sessions.stores.redis.sentinel import SentinelClient
from lapse.testing import FakeClock, StoreContract

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def sentinels() -> Iterator[SentinelSetup]:
    """One deployment (primary, replica, three sentinels) for the tests that
    leave it as it was."""
    with SentinelSetup() as setup:
        yield setup


class TestRedisSentinelStore(StoreContract):
    """Every operation of the contract, through the primary the sentinels name."""

    @pytest.fixture
    def store(self, store_clock: FakeClock, sentinels: SentinelSetup) -> RedisStore:
        url = f"{sentinels.url()}?prefix=s{next(_prefixes)}{uuid.uuid4().hex[:6]}"
        store = store_from_url(url, store_clock)
        assert isinstance(store, RedisStore)
        return store


@aio
async def test_an_unknown_service_is_a_permanent_error_naming_it(
    sentinels: SentinelSetup,
) -> None:
    """Sentinels that monitor no primary by that name: a permanent
    StoreUnavailable (a configuration mistake: the server refuses to start)
    naming the service, within the timeout."""
    where = ",".join(f"127.0.0.1:{port}" for _, port in sentinels.sentinels)
    store = RedisStore(f"redis+sentinel://{where}/nosuchservice/0")
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable, match="nosuchservice") as failed:
            await store.open()
        assert failed.value.permanent
        assert time.monotonic() - started < 1.5
    finally:
        await store.aclose()


@pytest.mark.slow
@aio
async def test_the_store_answers_unavailable_during_a_failover_then_works() -> None:
    """A store made from a redis+sentinel:// URL across a SENTINEL FAILOVER:
    sessions created before it (and replicated: WAIT) load after it from the
    new primary, whose script cache is empty (NOSCRIPT, then EVAL); during
    it an operation either works or is a StoreUnavailable, never a hang."""
    with SentinelSetup() as own:
        store = RedisStore(own.url())
        sentinel = store._client
        assert isinstance(sentinel, SentinelClient)
        try:
            await store.open()
            uids = [uuid.uuid4().hex for _ in range(20)]
            for uid in uids:
                await store.create(uid, 60.0, {"n": uid})
            assert await sentinel.execute("WAIT", 1, 1000) == 1
            replica = next(s.port for s in own.servers if s.port != own.primary_port())
            assert ask(replica, "SCRIPT", "EXISTS", store._load_script.sha) == [0]
            failing = asyncio.create_task(asyncio.to_thread(own.failover))
            outcomes: list[str] = []
            while not failing.done():
                started = time.monotonic()
                try:
                    await store.load(uids[0])
                    outcomes.append("ok")
                except StoreUnavailable:
                    outcomes.append("unavailable")
                    await asyncio.sleep(0.01)
                assert time.monotonic() - started < 2.5
            assert await failing == replica
            await eventually(lambda: sentinel.primary == ("127.0.0.1", replica))
            for uid in uids:
                stored = await store.load(uid)
                assert stored is not None and stored.uid == uid
            assert outcomes.count("ok") > 0
        finally:
            await store.aclose()
