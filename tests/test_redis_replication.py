"""wait_replicas=N: a write is answered only once N replicas have it.

Redis replicates asynchronously, so a write its primary answered can be lost
when a replica takes over. With ``wait_replicas`` every write lapse's client
makes to a primary ends with ``WAIT N ms`` in the same packet: the replies
of that write's commands reach their callers only once N replicas
acknowledged them, else each caller gets a 503 (the write may be on the
primary: a 503 never promises it was not applied). Real redis-servers: a
primary with a replica, and a Sentinel deployment failed over under writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator

import pytest
from _helpers import aio
from _redis_sentinel import SentinelSetup
from _redis_server import CountingTransport, RedisServer

from lapse.sessions.store import StoreConfigError, StoreUnavailable
from lapse.sessions.stores.redis import RedisStore
from lapse.sessions.stores.redis.client import RedisClient, RedisReplicationError


@pytest.fixture
def primary_and_replica() -> Iterator[tuple[RedisServer, RedisServer]]:
    with RedisServer() as primary:
        replica = RedisServer(args=["--replicaof", "127.0.0.1", str(primary.port)])
        with replica:
            end = time.monotonic() + 10
            while time.monotonic() < end:
                info = primary_info(primary)
                if "connected_slaves:1" in info and "state=online" in info:
                    break
                time.sleep(0.05)
            yield primary, replica


def primary_info(server: RedisServer) -> str:
    async def ask() -> str:
        client = RedisClient("127.0.0.1", server.port)
        try:
            return str(await client.execute("INFO", "replication"))
        finally:
            await client.aclose()

    return asyncio.run(ask())


@contextlib.contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    """The server's process stopped (SIGSTOP) inside the block."""
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


@pytest.mark.parametrize("value", ["-1", "17", "x", "1.5", ""])
def test_a_bad_wait_replicas_is_a_config_error_naming_it(value: str) -> None:
    """wait_replicas is a whole number from 0 to 16."""
    with pytest.raises(StoreConfigError, match="wait_replicas must be a whole number"):
        RedisStore(f"redis://127.0.0.1:6379/0?wait_replicas={value}")


@aio
async def test_a_write_is_answered_once_the_replica_has_it(
    primary_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    """With wait_replicas=1, a session created is on the replica when create()
    returns; with the replica frozen, the same write is a 503 within the
    timeout (the primary may hold it); thawed, writes work again. Without the
    option the frozen replica changes nothing."""
    primary, replica = primary_and_replica
    prefix = f"w{uuid.uuid4().hex[:8]}"
    # WAIT may take half the timeout: room for a replica slowed by a busy machine.
    waiting = RedisStore(f"{primary.url}?wait_replicas=1&prefix={prefix}", timeout=2.0)
    plain = RedisStore(f"{primary.url}?prefix={prefix}", timeout=1.0)
    on_replica = RedisClient("127.0.0.1", replica.port)
    try:
        await waiting.open()
        await plain.open()
        for i in range(20):
            await waiting.create(f"ab-{i}", 60, {"i": i})
            assert await on_replica.execute("EXISTS", f"{prefix}:s:ab-{i}") == 1
        with frozen(replica):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="replica") as failed:
                await waiting.create("ab-frozen", 60, {})
            assert time.monotonic() - started < 2.2
            assert not failed.value.permanent
            assert isinstance(failed.value.__cause__, RedisReplicationError)
            await plain.create("ab-plain", 60, {})  # no WAIT: answered at once
        await waiting.create("ab-after", 60, {})
        assert await on_replica.execute("EXISTS", f"{prefix}:s:ab-after") == 1
    finally:
        await waiting.aclose()
        await plain.aclose()
        await on_replica.aclose()


@aio
async def test_a_tick_of_commands_and_its_wait_leave_in_one_write(
    primary_and_replica: tuple[RedisServer, RedisServer],
) -> None:
    """50 loads in one tick: one write to the primary, carrying the 50 scripts
    and one WAIT; every caller gets its own answer."""
    primary, _ = primary_and_replica
    store = RedisStore(f"{primary.url}?wait_replicas=1&prefix=w{uuid.uuid4().hex[:8]}", timeout=4)
    try:
        await store.open()
        uids = [f"cd-{i}" for i in range(50)]
        for uid in uids:
            await store.create(uid, 60, {"uid": uid})
        client = store._client
        assert isinstance(client, RedisClient)
        conn = client._conn
        assert conn is not None
        counting = conn.transport = CountingTransport(conn.transport)
        loaded = await asyncio.gather(*(store.load(uid) for uid in uids))
        assert [stored.decoded()["uid"] for stored in loaded if stored] == uids
        assert len(counting.writes) == 1
        assert counting.writes[0].count(b"EVALSHA") == 50
        assert counting.writes[0].count(b"WAIT") == 1
    finally:
        await store.aclose()


@pytest.mark.slow
@aio
async def test_no_acknowledged_write_is_lost_in_a_sentinel_failover() -> None:
    """Writers create sessions through a SENTINEL FAILOVER with
    wait_replicas=1: every create that was answered (not a 503) is found on
    the new primary afterwards. (Without it, more than half of the writes
    answered during a failover were measured lost: the old primary accepts
    them until it is demoted.)"""
    with SentinelSetup() as deployment:
        store = RedisStore(f"{deployment.url()}?wait_replicas=1&prefix=fo", timeout=1.0)
        reader = RedisStore(f"{deployment.url()}?prefix=fo")
        answered: list[str] = []
        refused = 0
        stop = asyncio.Event()

        async def writer(n: int) -> None:
            nonlocal refused
            i = 0
            while not stop.is_set():
                uid = f"{n:02d}-{i}"
                i += 1
                try:
                    await store.create(uid, 600, {"n": n})
                    answered.append(uid)
                except StoreUnavailable:
                    refused += 1
                    await asyncio.sleep(0.01)

        try:
            await store.open()
            writers = [asyncio.create_task(writer(n)) for n in range(10)]
            await asyncio.sleep(0.3)
            await asyncio.to_thread(deployment.failover)
            await asyncio.sleep(1.0)  # writes on the new primary too
            stop.set()
            await asyncio.gather(*writers)
            # Read back without WAIT: the demoted primary may not be the new
            # one's replica yet (writes are refused until it is).
            lost = [uid for uid in answered if not await reader.exists(uid)]
            assert len(answered) > 100
            assert lost == [], f"{len(lost)} of {len(answered)} answered writes lost"
        finally:
            await store.aclose()
            await reader.aclose()
