"""The Redis store on a real Redis Cluster (6 nodes: 3 primaries, 3
replicas): the published store contract, the default shard layout, the
deployment's shard count, and the keeper's rounds, one round trip per
primary.

Time is a fake clock given to the store, so nothing sleeps.
"""

from __future__ import annotations

import collections
import itertools
import logging
import re
import uuid
from typing import Any

import pytest
from _helpers import aio
from _redis_cluster import RedisCluster
from _redis_server import CountingTransport
from _shards import uid_in

from lapse.internet.task import Clock
from lapse.sessions import SharedKeeper
from lapse.sessions.store import StoreConfigError, StoreUnavailable
from lapse.sessions.stores import store_from_url
from lapse.sessions.stores.redis import RedisStore
from lapse.sessions.stores.redis.cluster import ClusterClient
from lapse.sessions.stores.redis.slots import key_slot
from lapse.testing import FakeClock, StoreContract
from lapse.web.resource import Resource
from lapse.web.server import Site

_prefixes = itertools.count()


class TestRedisClusterStore(StoreContract):
    """Every operation of the contract on the cluster (12 shards over the 3
    primaries), with no CROSSSLOT: each script's keys share a hash tag."""

    @pytest.fixture
    def store(self, store_clock: FakeClock, redis_cluster: Any) -> RedisStore:
        url = redis_cluster.url(prefix=f"k{next(_prefixes)}{uuid.uuid4().hex[:6]}")
        store = store_from_url(url, store_clock)
        assert isinstance(store, RedisStore)
        return store


def test_a_cluster_url_makes_a_sharded_store_and_names_the_cluster() -> None:
    """redis+cluster:// makes a store of 12 shards (the default), whose tags
    spread over the slot range; shards= sets another count; its repr and
    url name the seeds, never the password."""
    store = RedisStore("redis+cluster://:pw@127.0.0.1:7000,127.0.0.1:7001/?prefix=app")
    assert store.shard_count == 12
    slots = sorted(key_slot(shard.deadlines) for shard in store._shards)
    assert slots[0] < 16384 // 12 and slots[-1] >= 16384 * 11 // 12
    assert "pw" not in repr(store) and "pw" not in store.url
    assert RedisStore("redis+cluster://127.0.0.1:7000/?shards=3").shard_count == 3
    with pytest.raises(StoreConfigError):
        RedisStore("redis+cluster://127.0.0.1:7000/?shards=0")


@aio
async def test_a_cluster_process_with_another_shard_count_refuses_to_run(
    redis_cluster: Any,
) -> None:
    """The first process stores the shard count in the cluster; a second with
    another count gets a permanent error naming both."""
    prefix = f"k{uuid.uuid4().hex[:8]}"
    first = RedisStore(redis_cluster.url(prefix=prefix))
    other = RedisStore(redis_cluster.url(prefix=prefix) + "&shards=4")
    try:
        await first.open()
        with pytest.raises(StoreUnavailable, match=r"shards=12.*shards=4") as failed:
            await other.open()
        assert failed.value.permanent
    finally:
        await first.aclose()
        await other.aclose()


@aio
async def test_every_seed_unreachable_is_a_clear_503_within_the_timeout() -> None:
    """No seed answers: every call is a StoreUnavailable naming the cluster,
    not a hang."""
    store = RedisStore("redis+cluster://127.0.0.1:1,127.0.0.1:2/", timeout=0.5)
    try:
        with pytest.raises(StoreUnavailable, match=re.escape("cluster 127.0.0.1:1,127.0.0.1:2")):
            await store.load("abc")
    finally:
        await store.aclose()


@aio
async def test_an_idle_keeper_round_is_one_write_to_each_primary(redis_cluster: Any) -> None:
    """A keeper's round on the cluster (claim, announcements, next deadline,
    time) asks all 12 shards, and leaves as one write to each of the three
    primaries: one round trip per primary, in parallel."""
    clock = FakeClock()
    store = RedisStore(redis_cluster.url(prefix=f"k{uuid.uuid4().hex[:8]}"), clock=clock)
    site = Site(Resource(), reactor=Clock(), store=store)
    keeper = site._keeper
    assert isinstance(keeper, SharedKeeper)
    try:
        await keeper.poll_once()  # opens connections to every primary, reads the cursor
        client = store._client
        assert isinstance(client, ClusterClient)
        counting = {}
        for address in client.primaries:
            conn = client.node(address)._conn
            assert conn is not None
            counting[address] = conn.transport = CountingTransport(conn.transport)
        await keeper.poll_once()
        assert {address: len(c.writes) for address, c in counting.items()} == dict.fromkeys(
            counting, 1
        )
        scripts = sum(c.writes[0].count(b"EVALSHA") for c in counting.values())
        assert scripts == 2 * 12  # due + next deadline, per shard (XRANGE for announcements)
    finally:
        await keeper.aclose()
        await store.aclose()


def test_the_default_shards_split_evenly_over_three_primaries(redis_cluster: Any) -> None:
    """The 12 default shards fall 4, 4 and 4 on the three primaries the
    cluster tools made (equal slot ranges)."""
    store = RedisStore(redis_cluster.url(prefix="even"))
    owners = collections.Counter(
        redis_cluster.node_for_slot(key_slot(shard.deadlines)) for shard in store._shards
    )
    assert sorted(owners.values()) == [4, 4, 4]


@pytest.mark.slow
@aio
async def test_a_primary_down_leaves_the_other_shards_claimed_and_announced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cluster whose primary for some shards is gone for good (no replica,
    full coverage not required): claims, announcements and the next deadline
    still come from the other shards (logged once as an outage of those
    shards), instead of every keeper round failing; only the dead primary's
    sessions wait."""
    clock = FakeClock()
    with RedisCluster(replicas=0, args=["--cluster-require-full-coverage", "no"]) as cluster:
        store = RedisStore(cluster.url(prefix="down"), clock=clock, timeout=0.5)
        try:
            await store.open()
            layout = store._layout
            uids = [uid_in(layout, i) for i in range(len(layout.shards))]
            for uid in uids:
                await store.create(uid, 5, {})
            _, cursor = await store.events(None)
            victim = cluster.node_for_slot(key_slot(layout.shards[0].deadlines))
            lost = [uid for uid in uids if store_node(cluster, store, uid) == victim]
            assert 0 < len(lost) < len(uids)
            cluster.kill(victim)
            clock.advance(6)
            with caplog.at_level(logging.WARNING, logger="lapse.sessions"):
                claimed = await store.claim("me", 30, 100)
                assert sorted(e.uid for e in claimed) == sorted(set(uids) - set(lost))
                for expiry in claimed:
                    await store.ack(expiry)
                ended, _ = await store.events(cursor)
                assert sorted(ended) == sorted(e.uid for e in claimed)  # type: ignore[type-var]
                assert await store.next_deadline() is None  # the live shards hold nothing
            outages = [r for r in caplog.records if "unavailable, the other shards" in r.message]
            assert len({r.args[0] for r in outages if isinstance(r.args, tuple)}) == len(
                {layout.shard_of(uid).base for uid in lost}
            )
        finally:
            await store.aclose()


def store_node(cluster: Any, store: RedisStore, uid: str) -> int:
    """The port of the primary holding session ``uid``."""
    return int(cluster.node_for_slot(key_slot(store._shard(uid).deadlines)))
