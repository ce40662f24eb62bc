"""Redis Cluster routing in lapse's own client (lapse.sessions.stores.redis.cluster),
against a real 6-node cluster (3 primaries, 3 replicas; tests/_redis_cluster.py):
routing, one write per node per tick, MOVED, ASK, TRYAGAIN, CLUSTERDOWN,
failover (graceful and kill -9), NOSCRIPT on a promoted replica, AUTH, and
unreachable seeds.

Most tests share one cluster per module and leave it whole (a migrated slot
stays migrated, a graceful failover swaps roles); the ones that kill a node
or need a password start a cluster of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import hiredis
import pytest
from _helpers import aio
from _ports import free_port
from _redis_cluster import RedisCluster
from _redis_server import CountingTransport
from _tls import make_certificates

from lapse.sessions.stores.redis import cluster as cluster_module
from lapse.sessions.stores.redis.client import (
    RedisClient,
    RedisConnectionError,
    RedisError,
    ReplyError,
    Script,
)
from lapse.sessions.stores.redis.cluster import ClusterClient
from lapse.sessions.stores.redis.slots import key_slot


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster() as running:
        yield running


def keys_on(cluster: RedisCluster, port: int, count: int, tag: str = "") -> list[str]:
    """``count`` fresh keys whose slots the primary on ``port`` owns."""
    owners = cluster.slot_map()
    run = uuid.uuid4().hex[:8]
    found = []
    for i in itertools.count():
        key = f"{tag}k:{run}:{i}"
        if owners[key_slot(key)] == port:
            found.append(key)
            if len(found) == count:
                return found
    raise AssertionError("unreachable")


def packed(*args: str) -> bytes:
    return hiredis.pack_command(args)  # type: ignore[arg-type]


def count_writes(client: ClusterClient, port: int) -> CountingTransport:
    conn = client.node(("127.0.0.1", port))._conn
    assert conn is not None, "connect first"
    counting = CountingTransport(conn.transport)
    conn.transport = counting  # type: ignore[assignment]
    return counting


def other_primary(cluster: RedisCluster, port: int) -> int:
    return next(each for each in cluster.primaries() if each != port)


# -- routing -----------------------------------------------------------------------


@aio
async def test_commands_for_keys_of_every_primary_are_answered_after_one_map_read(
    cluster: RedisCluster,
) -> None:
    """One seed is enough: the map is read once, then keys of every primary,
    scripts, keyless commands and each_primary all reach the right node."""
    client = ClusterClient(cluster.seeds[:1])
    try:
        keys = {port: keys_on(cluster, port, 5) for port in cluster.primaries()}
        every = [key for group in keys.values() for key in group]
        await asyncio.gather(*(client.execute_on(key, "SET", key, key.upper()) for key in every))
        assert await asyncio.gather(*(client.execute_on(key, "GET", key) for key in every)) == [
            key.upper() for key in every
        ]
        for port, group in keys.items():  # each key really is on its slot's primary
            assert cluster.command(port, "GET", group[0]) == group[0].upper()
        script = Script("return redis.call('GET', KEYS[1])")
        assert await client.evalsha(script, [every[-1]], []) == every[-1].upper()
        assert len(await client.execute("TIME")) == 2
        sizes = await client.each_primary("DBSIZE")
        assert len(sizes) == 3 and all(size >= 5 for size in sizes)
        assert sorted(port for _, port in client.primaries) == cluster.primaries()
        assert client.refreshes == 1
    finally:
        await client.aclose()


@aio
async def test_a_tick_s_commands_leave_as_at_most_one_write_per_node(cluster: RedisCluster) -> None:
    """300 callers in one tick, keys spread over the three primaries: each
    node's connection gets one write carrying all of its commands."""
    client = ClusterClient(cluster.seeds)
    try:
        keys = {port: keys_on(cluster, port, 100) for port in cluster.primaries()}
        await client.each_primary("PING")  # map read, a connection to each primary
        counting = {port: count_writes(client, port) for port in keys}
        every = [key for group in keys.values() for key in group]
        replies = await asyncio.gather(*(client.execute_on(key, "INCR", key) for key in every))
        assert replies == [1] * 300
        for port, group in keys.items():
            assert len(counting[port].writes) == 1
            assert counting[port].writes[0].count(b"INCR") == len(group) == 100
    finally:
        await client.aclose()


# -- migration: MOVED, ASK, TRYAGAIN --------------------------------------------------


@aio
async def test_moved_after_a_completed_migration_updates_the_map_at_once_and_refreshes_once(
    cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 callers get MOVED for a migrated slot: the map takes the new owner
    at once (later calls go straight there, before any refresh: the rate
    limit is 1 s here), and the 50 MOVED schedule one refresh between them."""
    monkeypatch.setattr(cluster_module, "REFRESH_INTERVAL", 1.0)
    client = ClusterClient(cluster.seeds)
    try:
        source = cluster.primaries()[0]
        key = keys_on(cluster, source, 1)[0]
        slot = key_slot(key)
        await client.execute_on(key, "SET", key, "v")
        first_read = time.monotonic()
        target = other_primary(cluster, source)
        cluster.migrate_slot(slot, target)
        assert client.owner(slot) == ("127.0.0.1", source)  # not known yet
        replies = await asyncio.gather(*(client.execute_on(key, "GET", key) for _ in range(50)))
        assert replies == ["v"] * 50  # MOVED, then the target
        assert client.owner(slot) == ("127.0.0.1", target)
        refused = moved_errors(cluster, source)
        for _ in range(20):
            assert await client.execute_on(key, "GET", key) == "v"
        assert moved_errors(cluster, source) == refused  # straight to the target
        assert client.refreshes == 1
        await asyncio.sleep(max(0.0, first_read + 1.3 - time.monotonic()))
        assert client.refreshes == 2
    finally:
        await client.aclose()


@aio
async def test_ask_mid_migration_finds_moved_keys_sending_asking_with_each_command(
    cluster: RedisCluster,
) -> None:
    """A slot half migrated: keys already moved are found through ASK. Each
    ASKING and its command are adjacent in one write on the target's
    connection, so with 5 such callers and 100 others using that connection
    at once, no command slips between an ASKING and its command (the target
    would answer it MOVED); the map is unchanged."""
    client = ClusterClient(cluster.seeds)
    source = cluster.primaries()[0]
    target = other_primary(cluster, source)
    tag = "{" + keys_on(cluster, source, 1)[0] + "}"
    moved, staying = [f"{tag}:moved{i}" for i in range(5)], f"{tag}:staying"
    slot = key_slot(staying)
    try:
        await asyncio.gather(*(client.execute_on(key, "SET", key, key) for key in moved))
        others = keys_on(cluster, target, 100)
        await asyncio.gather(*(client.execute_on(key, "SET", key, key) for key in others))
        cluster.begin_migration(slot, target)
        # (>=: the cluster is shared by the session's tests, and another test's
        # key may hash to the same slot; ours are all moved either way)
        assert cluster.move_keys(slot) >= 5
        await client.execute_on(staying, "SET", staying, "s")  # a new key: source has the slot
        counting = count_writes(client, target)
        refused_before = moved_errors(cluster, target)
        results = await asyncio.gather(
            *(client.execute_on(key, "GET", key) for key in moved),
            *(client.execute_on(key, "GET", key) for key in others),
        )
        assert results == [*moved, *others]
        assert moved_errors(cluster, target) == refused_before
        for key in moved:
            pair = packed("ASKING") + packed("GET", key)
            assert any(pair in write for write in counting.writes), key
        assert client.owner(slot) == ("127.0.0.1", source)
        script = Script("return redis.call('GET', KEYS[1])")
        assert await client.evalsha(script, [moved[0]], []) == moved[0]  # EVALSHA, EVAL too
        assert await client.execute_on(staying, "GET", staying) == "s"
    finally:
        cluster.finish_migration(slot)
        await client.aclose()


def moved_errors(cluster: RedisCluster, port: int) -> int:
    """How many commands the node on ``port`` has answered with MOVED."""
    for line in cluster.command(port, "INFO", "errorstats").splitlines():
        if line.startswith("errorstat_MOVED:count="):
            return int(line.split("=", 1)[1])
    return 0


@aio
async def test_tryagain_is_retried_until_the_migration_finishes(cluster: RedisCluster) -> None:
    """A two-key command whose keys are split by a migration (TRYAGAIN) is
    retried, and answered once the slot has moved."""
    client = ClusterClient(cluster.seeds, timeout=3.0)
    source = cluster.primaries()[1]
    target = other_primary(cluster, source)
    tag = "{" + keys_on(cluster, source, 1)[0] + "}"
    first, second = f"{tag}:a", f"{tag}:b"
    slot = key_slot(first)
    try:
        await client.execute_on(first, "SET", first, "1")
        await client.execute_on(first, "SET", second, "2")
        cluster.begin_migration(slot, target)
        cluster.move_keys(slot, limit=1)

        async def finish_later() -> None:
            await asyncio.sleep(0.3)
            await asyncio.to_thread(cluster.finish_migration, slot)

        finishing = asyncio.create_task(finish_later())
        started = time.monotonic()
        assert await client.execute_on(first, "MGET", first, second) == ["1", "2"]
        assert time.monotonic() - started >= 0.25  # it did wait for the migration
        await finishing
    finally:
        if slot in cluster._migrating:
            cluster.finish_migration(slot)
        await client.aclose()


@aio
async def test_tryagain_past_the_timeout_is_a_clear_error_after_about_the_timeout(
    cluster: RedisCluster,
) -> None:
    client = ClusterClient(cluster.seeds, timeout=0.5)
    source = cluster.primaries()[2]
    tag = "{" + keys_on(cluster, source, 1)[0] + "}"
    first, second = f"{tag}:a", f"{tag}:b"
    slot = key_slot(first)
    try:
        await client.execute_on(first, "SET", first, "1")
        await client.execute_on(first, "SET", second, "2")
        cluster.begin_migration(slot, other_primary(cluster, source))
        cluster.move_keys(slot, limit=1)
        started = time.monotonic()
        with pytest.raises(ReplyError, match="TRYAGAIN"):
            await client.execute_on(first, "MGET", first, second)
        assert 0.4 <= time.monotonic() - started <= 0.8
    finally:
        cluster.finish_migration(slot)
        await client.aclose()


@aio
async def test_clusterdown_is_retried_until_the_cluster_is_up_again(cluster: RedisCluster) -> None:
    """A slot taken away from every node (the cluster answers CLUSTERDOWN,
    full coverage being required) and given back 0.3 s later: the call
    waits it out instead of failing."""
    client = ClusterClient(cluster.seeds, timeout=3.0)
    owner = cluster.primaries()[0]
    key = keys_on(cluster, owner, 1)[0]
    slot = key_slot(key)
    try:
        await client.execute_on(key, "SET", key, "v")
        await client.execute_on(key, "DEL", key)  # an empty slot can be deleted
        for port in cluster.alive():
            cluster.command(port, "CLUSTER", "DELSLOTS", slot)
        assert "CLUSTERDOWN" in str(cluster.command(owner, "GET", key))

        async def restore_later() -> None:
            await asyncio.sleep(0.3)
            await asyncio.to_thread(cluster.command, owner, "CLUSTER", "ADDSLOTS", slot)

        restoring = asyncio.create_task(restore_later())
        started = time.monotonic()
        assert await client.execute_on(key, "SET", key, "back") == "OK"
        assert time.monotonic() - started >= 0.25
        await restoring
    finally:
        with contextlib.suppress(Exception):
            cluster.command(owner, "CLUSTER", "ADDSLOTS", slot)
        cluster.wait_ok()
        await client.aclose()


# -- failover -------------------------------------------------------------------------


@aio
async def test_a_graceful_failover_is_followed_and_noscript_on_the_promoted_replica_handled(
    cluster: RedisCluster,
) -> None:
    """CLUSTER FAILOVER: the old primary answers MOVED, the client follows
    to the promoted replica, whose empty script cache gets the script by EVAL."""
    client = ClusterClient(cluster.seeds)
    primary = cluster.primaries()[0]
    replica = cluster.replicas_of(primary)[0]
    key = keys_on(cluster, primary, 1)[0]
    script = Script(f"-- {uuid.uuid4().hex}\nreturn redis.call('INCR', KEYS[1])")
    try:
        assert await client.evalsha(script, [key], []) == 1
        assert cluster.command(replica, "SCRIPT", "EXISTS", script.sha) == [0]
        cluster.failover(replica)
        assert await client.evalsha(script, [key], []) == 2
        assert cluster.command(replica, "SCRIPT", "EXISTS", script.sha) == [1]
        assert client.owner(key_slot(key)) == ("127.0.0.1", replica)
    finally:
        await client.aclose()


@pytest.mark.slow
@aio
async def test_kill_9_of_a_primary_fails_only_its_slots_until_a_replica_takes_over() -> None:
    """50 callers hammer keys of every primary while one is killed: only
    calls for the dead primary's keys fail (RedisError, each within about the
    timeout), and only until its replica is promoted; then every call works
    on the same client, the promoted replica runs the script (NOSCRIPT ->
    EVAL), the map was read a bounded number of times, and the dead node's
    connection is gone. (With ``cluster-require-full-coverage no``: with
    ``yes``, the default, every slot answers CLUSTERDOWN from the moment the
    dead primary is marked failed until its replica is elected, which can
    outlast a call's timeout.)"""
    with RedisCluster(args=["--cluster-require-full-coverage", "no"]) as own:
        client = ClusterClient(own.seeds[:1], timeout=1.0)
        victim = own.primaries()[0]
        replica = own.replicas_of(victim)[0]
        keys = {port: keys_on(own, port, 20) for port in own.primaries()}
        script = Script("return redis.call('INCR', KEYS[1])")
        failures: dict[int, list[float]] = {port: [] for port in keys}
        slowest = 0.0
        promoted_at: float | None = None
        stop_at = float("inf")

        async def caller(i: int) -> None:
            nonlocal slowest
            port = list(keys)[i % 3]
            key = keys[port][i % 20]
            while time.monotonic() < stop_at:
                started = time.monotonic()
                try:
                    await client.evalsha(script, [key], [])
                except RedisError:
                    failures[port].append(time.monotonic())
                slowest = max(slowest, time.monotonic() - started)
                await asyncio.sleep(0.005)

        try:
            await client.each_primary("PING")
            victim_node = client._nodes[("127.0.0.1", victim)]
            callers = [asyncio.create_task(caller(i)) for i in range(50)]
            await asyncio.sleep(0.2)
            killed_at = time.monotonic()
            own.kill(victim)
            while promoted_at is None:
                assert time.monotonic() - killed_at < 20, "no failover"
                if replica in await asyncio.to_thread(own.primaries):
                    promoted_at = time.monotonic()
                await asyncio.sleep(0.05)
            stop_at = time.monotonic() + 1.5
            await asyncio.gather(*callers)
            assert failures[victim], "the dead primary's keys never failed?"
            others = [port for port in keys if port != victim]
            assert all(not failures[port] for port in others), failures
            # Nothing failed once the replica was promoted (allowing for one
            # call's budget already running then, and for a refresh).
            assert max(failures[victim]) < promoted_at + 1.2
            assert slowest < 1.5
            assert client.refreshes <= 60
            for key in keys[victim]:
                await client.evalsha(script, [key], [])
            assert own.command(replica, "SCRIPT", "EXISTS", script.sha) == [1]
            # The dead node left the map: its client was dropped and closed.
            assert ("127.0.0.1", victim) not in client._nodes
            assert victim_node._generation > 0 and not victim_node.connected
        finally:
            await client.aclose()


# -- AUTH and unreachable nodes ---------------------------------------------------------


@pytest.mark.slow
@aio
async def test_auth_reaches_every_node_and_a_bad_password_is_a_clear_error_without_it() -> None:
    password = "pw-" + uuid.uuid4().hex
    with RedisCluster(password=password) as locked:
        client = ClusterClient(locked.seeds[:1], password=password)
        wrong = ClusterClient(locked.seeds[:1], password="not-" + password)
        anonymous = ClusterClient(locked.seeds[:1])
        try:
            every = [key for port in locked.primaries() for key in keys_on(locked, port, 3)]
            await asyncio.gather(*(client.execute_on(key, "SET", key, "v") for key in every))
            assert await client.each_primary("PING") == ["PONG"] * 3
            with pytest.raises(RedisError, match="WRONGPASS") as bad:
                await wrong.execute_on("k", "GET", "k")
            assert password not in str(bad.value) and password not in repr(wrong)
            with pytest.raises(RedisError, match="NOAUTH"):
                await anonymous.execute_on("k", "GET", "k")
        finally:
            for each in (client, wrong, anonymous):
                await each.aclose()


@pytest.mark.slow
@aio
async def test_tls_reaches_every_node_the_ones_learned_from_the_map_included(
    tmp_path: Path,
) -> None:
    """A cluster on TLS (bus and replication too): from one TLS seed, the
    client learns the others' TLS ports from the map and reaches every
    primary with the same verified context; a context that does not trust
    the cluster's CA cannot read the map."""
    # The nodes present it to each other on the TLS bus too: a client certificate as well.
    make_certificates(tmp_path, server_usage="serverAuth,clientAuth")
    with RedisCluster(tls_dir=tmp_path) as secure:
        trusting = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        client = ClusterClient(secure.tls_seeds[:1], ssl_context=trusting)
        distrusting = ClusterClient(secure.tls_seeds[:1], ssl_context=ssl.create_default_context())
        try:
            every = [key for port in secure.primaries() for key in keys_on(secure, port, 3)]
            await asyncio.gather(*(client.execute_on(key, "SET", key, "v") for key in every))
            assert await client.each_primary("PING") == ["PONG"] * 3
            tls_primaries = sorted(secure.tls_ports[port] for port in secure.primaries())
            assert sorted(port for _, port in client.primaries) == tls_primaries
            with pytest.raises(RedisConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                await distrusting.execute_on("k", "GET", "k")
        finally:
            await client.aclose()
            await distrusting.aclose()


@aio
async def test_unreachable_seeds_are_a_redis_error_within_the_timeout() -> None:
    """Seeds where nothing listens fail at once; a seed that accepts and
    never answers fails after about the timeout."""
    refused = ClusterClient([("127.0.0.1", free_port()), ("127.0.0.1", free_port())], timeout=0.3)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", free_port()))
        silent.listen(8)
        mute = ClusterClient([silent.getsockname()], timeout=0.3)
        try:
            started = time.monotonic()
            with pytest.raises(RedisConnectionError, match="slot map"):
                await refused.execute_on("k", "GET", "k")
            assert time.monotonic() - started < 0.3
            started = time.monotonic()
            with pytest.raises(RedisError):
                await mute.execute_on("k", "GET", "k")
            assert 0.25 <= time.monotonic() - started < 0.8
        finally:
            await refused.aclose()
            await mute.aclose()


@aio
async def test_aclose_while_the_map_is_read_fails_waiting_callers_with_a_redis_error() -> None:
    """Callers waiting for the first map read when the client is closed get
    a RedisConnectionError (not a CancelledError they did not ask for)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", free_port()))
        silent.listen(8)
        client = ClusterClient([silent.getsockname()], timeout=5.0)
        calls = [asyncio.create_task(client.execute_on("k", "GET", "k")) for _ in range(3)]
        await asyncio.sleep(0.05)
        await client.aclose()
        for call in calls:
            with pytest.raises(RedisConnectionError, match="closed"):
                await call


@aio
async def test_aclose_closes_every_node_and_the_client_works_again_after(
    cluster: RedisCluster,
) -> None:
    client = ClusterClient(cluster.seeds)
    try:
        await client.each_primary("PING")
        nodes: list[RedisClient] = list(client._nodes.values())
        assert sum(node.connected for node in nodes) >= 3
        await client.aclose()
        assert not any(node.connected for node in nodes) and not client._nodes
        assert await client.each_primary("PING") == ["PONG"] * 3
    finally:
        await client.aclose()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="seed"):
        ClusterClient([])
    with pytest.raises(ValueError, match="timeout"):
        ClusterClient([("127.0.0.1", 1)], timeout=0)
