"""The Redis store's sharded key layout, on one real redis-server: every
script's keys in one hash slot (what a cluster needs), sessions spread over
the shards, one shard count per deployment, rotations that stay in their
shard, and claims, announcements and inspection across the shards.

Time is a fake clock given to the store, so nothing sleeps.
"""

from __future__ import annotations

import collections
import contextlib
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from _helpers import aio
from _redis_server import RedisServer, full_commands
from _shards import rotated, uid_in

from lapse.sessions.store import StoreUnavailable
from lapse.sessions.stores.redis import RedisStore
from lapse.sessions.stores.redis.layout import Layout
from lapse.sessions.stores.redis.slots import SLOTS, key_slot
from lapse.testing import FakeClock


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@contextlib.asynccontextmanager
async def opened(
    server: RedisServer, shards: int | None, clock: FakeClock | None = None, prefix: str = ""
) -> AsyncIterator[RedisStore]:
    store = RedisStore(
        server.url, clock=clock, prefix=prefix or f"t{uuid.uuid4().hex[:12]}", shards=shards
    )
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()


def test_shard_tags_spread_evenly_over_the_slot_range() -> None:
    """Shard i's keys hash into the i-th of N equal slices of the 16384 slots,
    so a cluster's contiguous slot ranges give each primary an even share."""
    for count in (2, 3, 16, 64):
        layout = Layout("lapse", count, tagged=True)
        for i, shard in enumerate(layout.shards):
            slot = key_slot(shard.deadlines)
            assert i * SLOTS // count <= slot < (i + 1) * SLOTS // count
            keys = [shard.ended, shard.leases, shard.seq, shard.events, f"{shard.base}:s:x"]
            assert {key_slot(key) for key in keys} == {slot}


def test_uids_spread_evenly_over_the_shards_and_a_rotation_keeps_its_shard() -> None:
    """Random uids land in every shard about equally; a uid with the same
    first two characters is in the same shard; any other string has a shard."""
    layout = Layout("lapse", 16, tagged=True)
    counts = collections.Counter(
        layout.shard_of(secrets.token_urlsafe(18)).base for _ in range(16_000)
    )
    assert len(counts) == 16 and min(counts.values()) > 800 and max(counts.values()) < 1200
    for _ in range(200):
        uid = secrets.token_urlsafe(18)
        assert layout.shard_of(rotated(uid)) is layout.shard_of(uid)
    for odd in ("", "x", "é€", "{}", "a" * 5000):
        assert layout.shard_of(odd) in layout.shards


def test_one_shard_on_one_node_keeps_the_old_key_names() -> None:
    """Without shards=, a single node's keys are the ones lapse has always
    used (``prefix:deadlines``...): an existing deployment upgrades in place."""
    layout = Layout("lapse", 1, tagged=False)
    assert layout.shards[0].deadlines == "lapse:deadlines"
    assert Layout("lapse", 1, tagged=True).shards[0].deadlines == "{lapse:0}:deadlines"


@aio
async def test_every_script_and_command_uses_keys_of_one_slot(server: RedisServer) -> None:
    """The whole lifecycle on 8 shards (create, load, save, rotate with alias,
    exists, expire, timeout, claim, renew, ack, announcements, next deadline,
    inspection): every command that names keys names keys of one slot, so the
    same calls run on a Redis Cluster without CROSSSLOT."""
    clock = FakeClock()
    async with opened(server, 8, clock) as store:
        layout = store._layout
        uids = [uid_in(layout, i) for i in range(8)]

        async def lifecycle() -> None:
            for uid in uids:
                await store.create(uid, 10, {"n": 1})
                await store.load(uid)
                await store.save(uid, {"m": 2}, ["n"])
            new = rotated(uids[0])
            assert await store.rotate(uids[0], new, 5)
            assert (await store.load(uids[0])) is not None  # through the alias
            assert await store.exists(new)
            assert await store.expire(uids[1])
            _, cursor = await store.events(None)
            clock.advance(11)
            claimed = await store.claim("me", 30, 100)
            assert len(claimed) == 8
            assert await store.renew(claimed[0], "me", 30)
            for expiry in claimed:
                await store.ack(expiry)
            ended, _ = await store.events(cursor)
            assert len(ended) == 8
            await store.next_deadline()
            await store.scan(None, 5)
            await store.info(uids[2])
            await store.count()
            await store.deadlines(clock.now, 60, 4)

        sent = await full_commands(server, lifecycle)
    keyed = 0
    for command in sent:
        name = command[0].lower()
        if name in ("evalsha", "eval"):
            keys = command[3 : 3 + int(command[2])]
        elif name in ("xrange", "xrevrange", "zcount", "get", "set"):
            keys = command[1:2]
        else:
            assert name in ("time", "script", "echo"), command
            continue
        assert keys and len({key_slot(key) for key in keys}) == 1, command
        keyed += 1
    assert keyed > 50


@aio
async def test_sessions_are_stored_in_their_own_shard(server: RedisServer) -> None:
    """A session of shard i is in shard i's deadline index and nowhere else."""
    async with opened(server, 4) as store:
        layout = store._layout
        for i in range(4):
            await store.create(uid_in(layout, i), 60, {})
        raw = store._client
        for shard in layout.shards:
            assert await raw.execute_on(shard.deadlines, "ZCARD", shard.deadlines) == 1
        assert await store.count() == 4


@aio
async def test_a_process_with_another_shard_count_refuses_to_run(server: RedisServer) -> None:
    """The first process stores the deployment's shard count; one started with
    another count fails at open with a permanent error naming both counts, and
    so does its first operation when it was never opened."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    async with opened(server, 4, prefix=prefix):
        pass
    for other in (8, 1, None):
        store = RedisStore(server.url, prefix=prefix, shards=other)
        try:
            with pytest.raises(StoreUnavailable) as failed:
                await store.open()
            assert failed.value.permanent
            assert "shards=4" in str(failed.value) and f"shards={other or 1}" in str(failed.value)
            with pytest.raises(StoreUnavailable):
                await store.load("abc")
        finally:
            await store.aclose()
    async with opened(server, 4, prefix=prefix) as same:
        assert await same.count() == 0


@aio
async def test_sharding_a_deployment_that_has_unsharded_sessions_is_refused(
    server: RedisServer,
) -> None:
    """Sessions of the one-shard layout exist (an upgrade from a lapse without
    shards, whose processes never stored a count): starting with shards=4
    would hide them, so it is refused, naming the key found."""
    prefix = f"t{uuid.uuid4().hex[:12]}"
    async with opened(server, None, prefix=prefix) as old:
        await old.create("someone", 60, {})
        await old._client.execute("DEL", old._layout.meta_key)  # as an old lapse left it
    store = RedisStore(server.url, prefix=prefix, shards=4)
    try:
        with pytest.raises(StoreUnavailable, match=f"{prefix}:deadlines exists") as failed:
            await store.open()
        assert failed.value.permanent
    finally:
        await store.aclose()
    async with opened(server, None, prefix=prefix) as again:
        assert await again.exists("someone")


@aio
async def test_a_rotation_that_would_leave_its_shard_is_refused(server: RedisServer) -> None:
    """rotate() to a uid of another shard raises ValueError and changes nothing
    (lapse itself never asks it: it keeps a uid's first two characters)."""
    async with opened(server, 4) as store:
        uid, elsewhere = uid_in(store._layout, 0), uid_in(store._layout, 3)
        await store.create(uid, 60, {"k": 1})
        with pytest.raises(ValueError, match="stays in its shard"):
            await store.rotate(uid, elsewhere, 5)
        assert await store.exists(uid) and not await store.exists(elsewhere)


@aio
async def test_claims_are_oldest_first_across_shards(server: RedisServer) -> None:
    """With sessions of four shards ending at different times, a claim of 3
    takes the 3 that ended first overall, in that order; the next claim the
    rest."""
    clock = FakeClock()
    async with opened(server, 4, clock) as store:
        layout = store._layout
        order = [3, 0, 2, 1, 3, 0]  # the shard of the session ending i-th
        uids = []
        for i, shard in enumerate(order):
            uid = uid_in(layout, shard)
            uids.append(uid)
            await store.create(uid, 10 + i, {})
        clock.advance(30)
        first = await store.claim("me", 30, 3)
        assert [e.uid for e in first] == uids[:3]
        rest = await store.claim("me", 30, 10)
        assert [e.uid for e in rest] == uids[3:]


@aio
async def test_announcements_of_every_shard_reach_a_reader(server: RedisServer) -> None:
    """events() reads every shard's stream: ends and rotations of sessions of
    all shards arrive, with a cursor of one mark per shard; a cursor of
    another layout is refused."""
    clock = FakeClock()
    async with opened(server, 4, clock) as store:
        _, cursor = await store.events(None)
        assert cursor.count(",") == 3
        uids = [uid_in(store._layout, i) for i in range(4)]
        for uid in uids:
            await store.create(uid, 5, {})
        new = rotated(uids[2])
        await store.rotate(uids[2], new, 0)
        clock.advance(6)
        for expiry in await store.claim("me", 30, 10):
            await store.ack(expiry)
        events, after = await store.events(cursor)
        assert (uids[2], new) in events
        assert {e for e in events if isinstance(e, str)} == {uids[0], uids[1], new, uids[3]}
        assert await store.events(after) == ([], after)
        for bad in ("0-0", "0-0,0-0", "0-0,0-0,0-0,x", "0-0,0-0,0-0,0-0,0-0"):
            with pytest.raises(ValueError):
                await store.events(bad)


@aio
async def test_scan_pages_through_every_shard_in_one_order(server: RedisServer) -> None:
    """A scan across shards returns every live session once, latest deadline
    first, in pages of the limit asked, whatever shard each is in."""
    clock = FakeClock()
    async with opened(server, 4, clock) as store:
        made: dict[str, float] = {}
        for i in range(23):
            uid = uid_in(store._layout, i % 4)
            made[uid] = await store.create(uid, 100 + i, {"i": i})
        seen: list[Any] = []
        cursor = None
        while True:
            page, cursor = await store.scan(cursor, 5)
            assert len(page) <= 5
            seen += page
            if cursor is None:
                break
        assert [info.uid for info in seen] == sorted(made, key=made.__getitem__, reverse=True)
        assert await store.count() == 23
        assert sum(await store.deadlines(clock.now, 200, 4)) == 23
