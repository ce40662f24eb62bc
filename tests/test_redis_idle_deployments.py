"""Idle cost and wake-ups on a Redis Cluster and behind Sentinel: one blocking
read per shard, each on a connection of its own to the node that holds the
shard (the shards' streams are in slots of their own: one read cannot cover
two). Real processes, real time (short waits)."""

from __future__ import annotations

import asyncio
import time
import types
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from _helpers import aio, eventually
from _redis_sentinel import SentinelSetup
from _redis_server import commands_sent

from lapse.internet.task import Clock
from lapse.sessions import SharedKeeper
from lapse.sessions.stores.redis import RedisStore
from lapse.web.resource import Resource
from lapse.web.server import Site

WITHIN = 5.0
PROMPT = 0.5
SENTINELS_OWN = {"ping", "info", "publish"}
"""What the sentinels send a primary they watch (each, once a second or so)."""


@pytest.fixture(scope="module")
def sentinels() -> Iterator[SentinelSetup]:
    with SentinelSetup() as setup:
        yield setup


async def monitored(ports: list[int], action: Callable[[], Awaitable[Any]]) -> list[str]:
    """The commands clients sent to any of the nodes at ``ports`` while ``action`` ran."""
    found: list[str] = []

    async def under(rest: list[int]) -> None:
        if not rest:
            await action()
            return
        node = types.SimpleNamespace(port=rest[0])
        found.extend(await commands_sent(node, lambda: under(rest[1:])))  # type: ignore[arg-type]

    await under(ports)
    return found


async def idle_commands(url: str, ports: list[int]) -> list[str]:
    """What one idle keeper (a session a minute from its end) sends the
    nodes at ``ports`` in one second."""
    site = Site(Resource(), reactor=Clock(), store=RedisStore.from_url(url))
    found = site._keeper
    assert isinstance(found, SharedKeeper)
    found.start()
    try:
        session = site.makeSession()
        session.sessionTimeout = 60
        await found.persist([session])
        store = site.store
        assert isinstance(store, RedisStore)
        await eventually(lambda: store._news.reads >= store.shard_count, WITHIN)
        await asyncio.sleep(0.3)
        return await monitored(ports, lambda: asyncio.sleep(1.0))
    finally:
        await found.aclose()


async def wakes(url: str, uid: str) -> float:
    """Seconds until a store waiting for news hears another one end ``uid``."""
    a, b = RedisStore.from_url(url), RedisStore.from_url(url)
    try:
        await a.create(uid, 60, {})
        await b.events(None)
        while await b.wait_for_news(0.2):  # (new connections: read the store)
            await b.events(",".join(b._news.marks or []))
        waiting = asyncio.ensure_future(b.wait_for_news(WITHIN))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        assert await a.expire(uid)
        assert await waiting is True
        return time.monotonic() - started
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.slow
@aio
async def test_an_idle_process_on_a_cluster_sends_nothing_and_hears_every_shard(
    redis_cluster: Any,
) -> None:
    """On a 12-shard cluster an idle keeper sends no command for a second
    (polling, it sent ~350 a second), and a session ended on any shard
    wakes a waiting store at once."""
    url = redis_cluster.url(prefix=f"idle{uuid.uuid4().hex[:6]}")
    assert await idle_commands(url, redis_cluster.primaries()) == []
    for uid in ("AAaaaa", "Zzzzzz", "mmmmmm", "999999"):  # shards 0 to 11, in turn
        assert await wakes(url, uid) < PROMPT


@pytest.mark.slow
@aio
async def test_an_idle_process_behind_sentinel_sends_nothing_and_hears_news(
    sentinels: SentinelSetup,
) -> None:
    """Behind Sentinel an idle keeper sends the primary no command for a
    second, and an end in another process wakes a waiting store at once."""
    url = f"{sentinels.url()}?prefix=idle{uuid.uuid4().hex[:6]}"
    sent = await idle_commands(url, [sentinels.primary_port()])
    assert [c for c in sent if c not in SENTINELS_OWN] == []
    assert await wakes(url, "sentinel-session") < PROMPT
