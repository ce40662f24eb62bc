"""The Redis store's index of sessions by principal under abuse: concurrent
logins from two store objects (two connections, as two processes have), a
process killed while it held a principal's lock, hostile principal names;
on a single node (one script per operation), a sharded layout on one node
and a real 6-node Redis Cluster (a lock per principal).

The store contract (tests/test_store_contract.py) covers the behaviour
itself; time there is fake. Here the lock's lease is real time (Redis's own
``PX``), so the lock tests wait for real, under a second each.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from _helpers import aio
from _redis_cluster import command
from _redis_server import commands_sent

from lapse.sessions.store import StoreUnavailable
from lapse.sessions.stores.redis import RedisStore
from lapse.sessions.stores.redis.slots import key_slot
from lapse.testing import FakeClock

_prefixes = itertools.count()


@dataclass
class Deployment:
    """Stores over one deployment, and a raw command on the node of a key."""

    make: Callable[..., RedisStore]
    raw: Callable[..., Any]


@pytest.fixture(params=["node", "sharded", "cluster"])
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    prefix = f"p{next(_prefixes)}{uuid.uuid4().hex[:6]}"
    if request.param == "cluster":
        cluster = request.getfixturevalue("redis_cluster")

        def make_cluster(**options: Any) -> RedisStore:
            return RedisStore(cluster.url(prefix=prefix), **options)

        def raw_cluster(key: str, *args: str | int) -> Any:
            return cluster.command(cluster.node_for_slot(key_slot(key)), *args)

        yield Deployment(make_cluster, raw_cluster)
        return
    server = request.getfixturevalue("redis_server")
    shards = 4 if request.param == "sharded" else 1

    def make(**options: Any) -> RedisStore:
        return RedisStore(server.url, prefix=prefix, shards=shards, **options)

    def raw(key: str, *args: str | int) -> Any:
        return command(server.port, *args)

    yield Deployment(make, raw)


@aio
async def test_fifty_concurrent_logins_from_two_connections_keep_the_cap(
    deployment: Deployment,
) -> None:
    """50 logins of one principal at once with a limit of 3, half through
    each of two store objects: exactly 3 sessions stay bound and live, the
    other 47 were each superseded once (returned by one call, claimed once
    with cause "superseded")."""
    clock = FakeClock()
    first, second = deployment.make(clock=clock), deployment.make(clock=clock)
    try:
        uids = [f"c{i:02d}{uuid.uuid4().hex[:8]}" for i in range(50)]
        for uid in uids:
            await first.create(uid, 60, {})
        results = await asyncio.gather(
            *(
                (first if i % 2 else second).set_principal(uid, "alice", limit=3)
                for i, uid in enumerate(uids)
            )
        )
        superseded = [uid for result in results for uid in result or ()]
        bound = [info.uid for info in await second.sessions_of("alice")]
        assert len(bound) == 3 and len(superseded) == 47
        assert sorted(bound + superseded) == sorted(uids)
        assert [uid for uid in uids if await first.exists(uid)] == sorted(bound)
        claimed = await first.claim("test", 30, 100)
        assert sorted(e.uid for e in claimed) == sorted(superseded)
        assert {e.cause for e in claimed} == {"superseded"}
    finally:
        await first.aclose()
        await second.aclose()


def _lock_key(store: RedisStore, principal: str) -> str:
    return store._principal_keys(principal)[1]


@aio
async def test_a_killed_lock_holder_delays_the_next_login_by_its_lease_only(
    deployment: Deployment,
) -> None:
    """A process killed while it held a principal's lock (taken here by hand
    and never released, with the lease a store of timeout 0.5 s takes): the
    next login of that principal waits until the lease runs out, then binds;
    other principals are not held up."""
    store = deployment.make(timeout=0.5)
    try:
        await store.create("k1", 60, {})
        await store.create("k2", 60, {})
        lock = _lock_key(store, "alice")
        assert deployment.raw(lock, "SET", lock, "dead", "PX", 500) == "OK"
        started = time.monotonic()
        assert await store.set_principal("k2", "bob", limit=1) == []
        other = time.monotonic() - started
        assert await store.set_principal("k1", "alice", limit=1) == []
        waited = time.monotonic() - started
        assert [info.uid for info in await store.sessions_of("alice")] == ["k1"]
        if store.shard_count == 1:
            assert waited < 0.2  # one script: no lock at all
        else:
            assert other < 0.2 and 0.3 < waited < 1.0
    finally:
        await store.aclose()


@pytest.mark.slow
@pytest.mark.parametrize("deployment", ["sharded", "cluster"], indirect=True)
@aio
async def test_a_lock_held_for_ever_is_a_clear_store_error_not_a_hang(
    deployment: Deployment,
) -> None:
    """A principal's lock (taken across shards; one shard takes none) that
    never runs out (set by hand with no lease):
    a login and a "log out everywhere" of that principal fail with
    StoreUnavailable naming the lock within twice the store timeout,
    changing nothing."""
    store = deployment.make(timeout=0.2)
    try:
        assert store.shard_count > 1
        await store.create("k1", 60, {})
        lock = _lock_key(store, "alice")
        assert deployment.raw(lock, "SET", lock, "dead") == "OK"
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="lock"):
            await store.set_principal("k1", "alice")
        with pytest.raises(StoreUnavailable, match="lock"):
            await store.expire_principal("alice")
        assert time.monotonic() - started < 1.5  # 2 x 2 x 0.2 s, and the calls
        assert await store.sessions_of("alice") == []
        assert await store.exists("k1")
        deployment.raw(lock, "DEL", lock)
        assert await store.set_principal("k1", "alice") == []
    finally:
        await store.aclose()


HOSTILE = [
    "{",
    "}",
    "{a}",
    "}{",
    "*",
    "a*",
    ":",
    "a:b",
    "a b",
    " ",
    "x" * 256,
    "caf\u00e9",
    "\u4e2d",
]


@aio
async def test_hostile_principals_are_data_never_key_patterns_or_hash_tags(
    deployment: Deployment,
) -> None:
    """Principals made of braces, wildcards, separators, spaces, 256
    characters or non-ASCII each get their own index, in the slot of their
    shard's tag (a brace in the name is no hash tag), and are kept apart:
    listing, capping and ending one never touches another."""
    store = deployment.make()
    try:
        for i, name in enumerate(HOSTILE):
            await store.create(f"h{i:02d}", 60, {})
            await store.set_principal(f"h{i:02d}", name, limit=1)
            index, lock = store._principal_keys(name)
            if store.shard_count > 1:  # tagged: the shard's tag decides the slot
                base = index[: index.index(":p:")]
                assert key_slot(index) == key_slot(lock) == key_slot(base + ":deadlines")
        for i, name in enumerate(HOSTILE):
            assert [info.uid for info in await store.sessions_of(name)] == [f"h{i:02d}"]
        assert await store.expire_principal("*") == ["h04"]
        assert await store.expire_principal("{") == ["h00"]
        assert [info.uid for info in await store.sessions_of("a*")] == ["h05"]
        assert [info.uid for info in await store.sessions_of("}{")] == ["h03"]
        for bad in ("x" * 257, "a\nb", "", "\ud800"):
            with pytest.raises(ValueError):
                await store.set_principal("h05", bad)
            with pytest.raises(ValueError):
                await store.sessions_of(bad)
    finally:
        await store.aclose()


@aio
async def test_an_acknowledged_or_unbound_session_leaves_its_principals_index(
    deployment: Deployment,
) -> None:
    """The index holds no uid for good once its session is gone: an
    acknowledged expiry, and an unbinding, take the uid out of the
    principal's index set (not only out of what sessions_of lists)."""
    clock = FakeClock()
    store = deployment.make(clock=clock)
    try:
        for uid in ("g1", "g2", "g3"):
            await store.create(uid, 60, {})
            await store.set_principal(uid, "alice")
        index = store._principal_keys("alice")[0]
        assert sorted(deployment.raw(index, "SMEMBERS", index)) == ["g1", "g2", "g3"]
        await store.expire("g1")
        for expiry in await store.claim("test", 30, 10):
            await store.ack(expiry)
        await store.set_principal("g2", None)
        assert deployment.raw(index, "SMEMBERS", index) == ["g3"]
    finally:
        await store.aclose()


@aio
async def test_rotations_racing_logins_never_let_a_session_slip_out_of_the_index(
    deployment: Deployment,
) -> None:
    """Bound sessions rotated (uid changed, no grace) while more sessions of
    the same principal log in, through two store objects at once: every live
    bound session is listed under its new uid, none under an old one, and
    "log out everywhere" then ends every one of them."""
    clock = FakeClock()
    first, second = deployment.make(clock=clock), deployment.make(clock=clock)
    try:
        old = [f"r{i}{uuid.uuid4().hex[:8]}" for i in range(6)]
        new = [uid[:2] + uuid.uuid4().hex[:8] for uid in old]
        fresh = [f"n{i}{uuid.uuid4().hex[:8]}" for i in range(6)]
        for uid in old + fresh:
            await first.create(uid, 60, {})
        for uid in old:
            await first.set_principal(uid, "alice")
        moves = [
            (first if i % 2 else second).rotate(a, b, 0)
            for i, (a, b) in enumerate(zip(old, new, strict=True))
        ]
        logins = [
            (second if i % 2 else first).set_principal(uid, "alice", limit=20)
            for i, uid in enumerate(fresh)
        ]
        results = await asyncio.gather(*moves, *logins)
        assert results == [True] * 6 + [[]] * 6
        listed = sorted(info.uid for info in await first.sessions_of("alice"))
        assert listed == sorted(new + fresh)
        index = first._principal_keys("alice")[0]
        assert not set(deployment.raw(index, "SMEMBERS", index)) & set(old) - set(new)
        assert sorted(await second.expire_principal("alice")) == listed
        assert not [uid for uid in new + fresh if await first.exists(uid)]
    finally:
        await first.aclose()
        await second.aclose()


@pytest.mark.parametrize("shards", [1, 4])
@aio
async def test_what_a_login_costs_in_commands(redis_server: Any, shards: int) -> None:
    """A login with a cap, two sessions of the principal already bound: one
    script on the one-shard layout; on a sharded one, six in sequence (take
    the lock and read the index, peek at the session, read the others' times
    in their shards, one script per shard in parallel, write the index,
    bind, release)."""
    store = RedisStore(redis_server.url, prefix=f"w{uuid.uuid4().hex[:8]}", shards=shards)
    try:
        for uid in ("AA1", "AB2", "AC3"):  # one shard
            await store.create(uid, 60, {f"k{i}": "x" * 100 for i in range(100)})
        await store.set_principal("AA1", "alice", limit=3)
        await store.set_principal("AB2", "alice", limit=3)
        sent = await commands_sent(redis_server, lambda: store.set_principal("AC3", "alice", 3))
        assert sent == ["evalsha"] * (1 if shards == 1 else 6)
    finally:
        await store.aclose()
