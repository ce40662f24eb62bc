"""Redis with Sentinel, through lapse's own client
(lapse.sessions.stores.redis.sentinel.SentinelClient), against real
processes: a primary, a replica and 3 ``redis-sentinel`` (tests/_redis_sentinel.py).

Tests run on asyncio's own loop (the connection code under both loops is
tested by tests/test_resp_client.py; each deployment here takes seconds to
start). Tests that do not change the deployment share one; those that fail it over
or kill its primary have one of their own (and are slow: the sentinels need
about a second to see a primary down and one more to elect).
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from _helpers import aio, eventually
from _loops import sockets_to
from _ports import free_port
from _redis_sentinel import SentinelSetup, ask
from _redis_server import RedisServer

from lapse.sessions.stores.redis.client import (
    RedisClient,
    RedisConnectionError,
    RedisError,
    RedisRoleError,
)
from lapse.sessions.stores.redis.sentinel import SentinelClient, UnknownServiceError


@pytest.fixture(scope="module")
def shared() -> Iterator[SentinelSetup]:
    """One deployment for the tests that leave it as it was."""
    with SentinelSetup() as setup:
        yield setup


@pytest.fixture
def own() -> Iterator[SentinelSetup]:
    """A deployment of this test's own, to fail over or kill."""
    with SentinelSetup() as setup:
        yield setup


def client_for(setup: SentinelSetup, **kw: Any) -> SentinelClient:
    return SentinelClient(setup.sentinels, setup.service, **kw)


def key() -> str:
    return f"sentinel:{uuid.uuid4().hex}"


# -- discovery --------------------------------------------------------------------


@aio
async def test_commands_go_to_the_primary_the_sentinels_name(shared: SentinelSetup) -> None:
    """Every kind of call reaches the primary (not the replica): a key set
    through the client is on the primary the sentinels name."""
    client = client_for(shared)
    name = key()
    try:
        assert await client.execute("SET", name, "v") == "OK"
        assert await client.execute_on(name, "GET", name) == "v"
        assert await client.each_primary("EXISTS", name) == [1]
        assert client.primary == ("127.0.0.1", shared.primary_port())
        assert ask(shared.primary_port(), "GET", name) == "v"
    finally:
        await client.aclose()


@aio
async def test_an_unknown_service_is_a_clear_error_naming_it(shared: SentinelSetup) -> None:
    client = SentinelClient(shared.sentinels, "no-such-service", timeout=1.0)
    started = time.monotonic()
    try:
        with pytest.raises(
            UnknownServiceError, match="no sentinel knows a primary named 'no-such-service'"
        ):
            await client.execute("PING")
        assert time.monotonic() - started < 1.0
    finally:
        await client.aclose()


@aio
async def test_no_sentinel_answering_fails_fast_with_a_connection_error() -> None:
    """Sentinels nobody listens on: a RedisConnectionError naming them, at
    once (refused), and the sentinels' password is in no message."""
    ports = [free_port() for _ in range(3)]
    client = SentinelClient(
        [("127.0.0.1", port) for port in ports], "svc", sentinel_password="s3cret-pw"
    )
    started = time.monotonic()
    try:
        with pytest.raises(RedisConnectionError, match="no sentinel answered for 'svc'") as caught:
            await client.execute("PING")
        assert time.monotonic() - started < 1.0
        assert f"127.0.0.1:{ports[2]}" in str(caught.value)
        assert "s3cret-pw" not in str(caught.value)
    finally:
        await client.aclose()


@aio
async def test_one_sentinel_down_of_three_changes_nothing(shared: SentinelSetup) -> None:
    """The first sentinel listed is down: discovery uses the others and the
    failover subscription moves on to the next one."""
    dead = ("127.0.0.1", free_port())
    client = SentinelClient([dead, *shared.sentinels[:2]], shared.service)
    try:
        assert await client.execute("ECHO", "up") == "up"
        await eventually(lambda: client.subscriptions == 1)
        assert client.primary == ("127.0.0.1", shared.primary_port())
    finally:
        await client.aclose()


# -- the role, checked ---------------------------------------------------------------


@aio
async def test_a_client_requiring_a_master_refuses_a_replica_in_the_handshake_write(
    shared: SentinelSetup,
) -> None:
    """RedisClient(require_role="master") sends ROLE with its handshake and
    drops a replica: a RedisRoleError, and the command never ran there."""
    replica = next(server.port for server in shared.servers if server.port != shared.primary_port())
    client = RedisClient("127.0.0.1", replica, require_role="master")
    try:
        with pytest.raises(RedisRoleError, match=f"127.0.0.1:{replica} is in role 'slave'"):
            await client.execute("GET", "anything")
        assert not client.connected
    finally:
        await client.aclose()
    primary = RedisClient("127.0.0.1", shared.primary_port(), require_role="master")
    try:
        assert await primary.execute("ECHO", "master") == "master"
    finally:
        await primary.aclose()


@aio
async def test_a_replica_that_the_sentinels_name_as_primary_is_not_used(
    shared: SentinelSetup,
) -> None:
    """A node the sentinels name that says it is a replica (what a demoted
    old primary is) serves nothing, reads included: the call fails with a
    clear error naming the service."""
    replica = next(server.port for server in shared.servers if server.port != shared.primary_port())
    name = key()
    assert ask(shared.primary_port(), "SET", name, "replicated") == "OK"
    await eventually(lambda: ask(replica, "GET", name) == "replicated")
    wrong = f"wrong-{uuid.uuid4().hex[:8]}"
    for _, port in shared.sentinels:
        assert ask(port, "SENTINEL", "MONITOR", wrong, "127.0.0.1", replica, 2) == "OK"
    client = SentinelClient(shared.sentinels, wrong)
    try:
        for _ in range(3):
            with pytest.raises(RedisConnectionError, match=f"not the primary of '{wrong}'"):
                await client.execute("GET", name)
    finally:
        await client.aclose()
        for _, port in shared.sentinels:
            ask(port, "SENTINEL", "REMOVE", wrong)


@aio
async def test_a_primary_demoted_under_the_connection_is_dropped_on_readonly(
    shared: SentinelSetup,
) -> None:
    """A node made a replica while the client is connected to it answers a
    write -READONLY: the connection is closed (no read is served by a
    replica either), the sentinels are asked again, and as they still name
    that node the call fails with a clear connection error, as do the next
    ones (the ROLE check on reconnecting)."""
    with RedisServer() as node:
        service = f"demoted-{uuid.uuid4().hex[:8]}"
        for _, port in shared.sentinels:
            assert ask(port, "SENTINEL", "MONITOR", service, "127.0.0.1", node.port, 2) == "OK"
        client = SentinelClient(shared.sentinels, service)
        try:
            name = key()
            assert await client.execute("SET", name, "v") == "OK"
            await eventually(lambda: client.subscriptions == 1)
            assert await client.execute("GET", name) == "v"  # asks again: subscribed since
            asks = client.discoveries
            assert ask(node.port, "REPLICAOF", "127.0.0.1", shared.primary_port()) == "OK"
            with pytest.raises(RedisConnectionError, match=f"not the primary of '{service}'"):
                await client.execute("SET", name, "w")
            assert client.discoveries == asks + 1
            with pytest.raises(RedisConnectionError):
                await client.execute("GET", name)
        finally:
            await client.aclose()
            for _, port in shared.sentinels:
                ask(port, "SENTINEL", "REMOVE", service)


# -- AUTH ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_auth_on_the_primary_and_a_bad_password_is_a_clear_error() -> None:
    with SentinelSetup(password="primary-pw") as setup:

        async def run() -> None:
            good = client_for(setup, password="primary-pw")
            bad = client_for(setup, password="not-the-pw")
            try:
                assert await good.execute("ECHO", "in") == "in"
                with pytest.raises(RedisError) as caught:
                    await bad.execute("ECHO", "in")
                assert "WRONGPASS" in str(caught.value) or "invalid" in str(caught.value)
                assert "not-the-pw" not in str(caught.value)
            finally:
                await good.aclose()
                await bad.aclose()

        asyncio.run(run())


@pytest.mark.slow
def test_sentinels_with_a_password_and_a_wrong_one_is_a_clear_error() -> None:
    """Sentinels with requirepass: the client authenticates its questions and
    its subscription with sentinel_password; a wrong one fails the call with
    the sentinels' answer, and the password is in no message."""
    with SentinelSetup(sentinel_password="sentinel-pw") as setup:

        async def run() -> None:
            good = client_for(setup, sentinel_password="sentinel-pw")
            bad = client_for(setup, sentinel_password="wrong-sentinel-pw")
            try:
                assert await good.execute("ECHO", "in") == "in"
                await eventually(lambda: good.subscriptions == 1)
                with pytest.raises(RedisConnectionError, match="no sentinel answered") as caught:
                    await bad.execute("ECHO", "in")
                assert "WRONGPASS" in str(caught.value) or "invalid" in str(caught.value)
                assert "wrong-sentinel-pw" not in str(caught.value)
                await asyncio.sleep(0.2)
                assert bad.subscriptions == 0
            finally:
                await good.aclose()
                await bad.aclose()

        asyncio.run(run())


# -- nothing left behind ----------------------------------------------------------------


def test_nothing_is_left_running_or_open_after_the_loop_closes(shared: SentinelSetup) -> None:
    """Used and never closed, the client leaves no task, socket or transport
    behind when asyncio.run() ends (warnings are errors: an unclosed one
    fails this test); closed, it holds no socket to the sentinels or the
    primary; and it works again in a new event loop."""
    client = client_for(shared)

    async def use() -> None:
        assert await client.execute("ECHO", "one") == "one"
        await eventually(lambda: client.subscriptions >= 1)

    asyncio.run(use())
    gc.collect()

    async def use_and_close() -> None:
        assert await client.execute("ECHO", "two") == "two"
        await eventually(lambda: client.subscriptions >= 2)
        await client.aclose()
        assert sockets_to(shared.primary_port()) == 0
        for _, port in shared.sentinels:
            assert sockets_to(port) == 0
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        assert others == []

    asyncio.run(use_and_close())
    gc.collect()


# -- failovers ----------------------------------------------------------------------------


@pytest.mark.slow
@aio
async def test_a_sentinel_failover_is_followed_by_the_subscription_even_after_losing_it(
    own: SentinelSetup,
) -> None:
    """The sentinel the client subscribed on goes away: it subscribes on
    another and asks for the primary again. Then SENTINEL FAILOVER: the
    client switches to the new primary by itself (no call made meanwhile),
    a command pending on the old one fails with a connection error, and the
    same client works on the new primary."""
    client = client_for(own, timeout=5.0)  # longer than the failover: BLPOP waits
    try:
        old = own.primary_port()
        assert await client.execute("SET", "counter", 10) == "OK"
        await eventually(lambda: client.subscriptions == 1)
        own.stop_sentinel(0)
        await eventually(lambda: client.subscriptions == 2)
        pending = asyncio.create_task(client.execute("BLPOP", key(), 0))
        await asyncio.sleep(0.1)
        new = await asyncio.to_thread(own.failover, sentinel=1)
        assert new != old
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(pending, 2)
        await eventually(lambda: client.primary == ("127.0.0.1", new))
        assert client.switches == 1
        assert await client.execute("INCR", "counter") == 11
    finally:
        await client.aclose()


@pytest.mark.slow
@aio
async def test_calls_during_a_failover_fail_fast_and_work_after_it_on_the_same_client(
    own: SentinelSetup,
) -> None:
    """20 callers INCR without pause through a SENTINEL FAILOVER: every call
    ends within 2 timeouts (a success or a RedisError, never a hang), few
    fail, and all succeed on the new primary afterwards."""
    client = client_for(own, timeout=1.0)
    name = key()
    outcomes: list[tuple[bool, float]] = []
    stop = asyncio.Event()

    async def caller() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                await client.execute("INCR", name)
                outcomes.append((True, time.monotonic() - started))
                await asyncio.sleep(0.001)  # a steady load, not all of a shared CPU
            except RedisError:
                outcomes.append((False, time.monotonic() - started))
                await asyncio.sleep(0.01)

    try:
        await client.execute("SET", name, 0)
        callers = [asyncio.create_task(caller()) for _ in range(20)]
        await asyncio.sleep(0.2)
        new = await asyncio.to_thread(own.failover)
        await eventually(lambda: client.primary == ("127.0.0.1", new))
        mark = len(outcomes)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*callers)
        after = outcomes[mark:]
        failures = [took for ok, took in outcomes if not ok]
        assert after and all(ok for ok, _ in after)
        assert max(took for _, took in outcomes) < 2.0
        assert len(failures) <= 200, len(failures)
        successes = sum(1 for ok, _ in outcomes if ok)
        final = int(await client.execute("GET", name))
        print(f"{successes} INCRs acknowledged, {final} kept, {len(failures)} failed, ")
        print(f"{client.discoveries} discoveries")
    finally:
        stop.set()
        await client.aclose()


@pytest.mark.slow
@aio
async def test_a_killed_primary_is_replaced_once_elected_and_not_used_when_it_returns(
    own: SentinelSetup,
) -> None:
    """kill -9 of the primary: calls fail fast (never hang) while the
    sentinels elect, the sentinels are asked at most ~10 times a second, and
    then the same client works on the new primary. The old one restarted
    (empty, and saying it is a master until the sentinels demote it) is not
    written to: the counter goes on from the new primary's value."""
    client = client_for(own, timeout=0.5)
    name = key()
    try:
        assert await client.execute("SET", name, 100) == "OK"
        assert await client.execute("WAIT", 1, 1000) == 1  # the replica has it
        old = own.kill_primary()
        killed_at = time.monotonic()
        asks_before = client.discoveries
        failures = 0
        while True:
            started = time.monotonic()
            try:
                value = await client.execute("INCR", name)
                break
            except RedisError:
                failures += 1
                assert time.monotonic() - started < 1.2
                assert time.monotonic() - killed_at < 30, "no new primary"
                await asyncio.sleep(0.02)
        elapsed = time.monotonic() - killed_at
        assert value == 101  # the replica had the SET
        assert client.primary is not None and client.primary[1] != old
        assert client.discoveries - asks_before <= elapsed / 0.1 + 2
        own.server_on(old).start()  # back, empty, as a master at first
        for expected in range(102, 112):
            assert await client.execute("INCR", name) == expected
            await asyncio.sleep(0.05)
        assert client.primary[1] != old
        print(f"{failures} failed calls over {elapsed:.2f}s")
    finally:
        await client.aclose()
