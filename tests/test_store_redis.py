"""The Redis session store against a real redis-server (never a mock).

Semantics tests drive time with a fake clock passed as ``clock=`` (so nothing
sleeps) and each store gets a unique key prefix, so tests share one server
without seeing each other's keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from _helpers import aio
from _redis_server import RedisServer, commands_and_clients, commands_sent
from conftest import FakeClock

from lapse.sessions.store import Expiry, SessionStore, StoreConfigError, StoreUnavailable
from lapse.sessions.stores.redis import RedisStore
from lapse.sessions.stores.redis import store as redis_store_module

PASSWORD = "s3cret-Pa55word"


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@contextlib.asynccontextmanager
async def opened(
    url: str, clock: FakeClock | None = None, prefix: str | None = None, **kw: Any
) -> AsyncIterator[RedisStore]:
    """An opened store with a prefix of its own (or the one given), closed after."""
    store = RedisStore(url, clock=clock, prefix=prefix or f"t{uuid.uuid4().hex[:12]}", **kw)
    await store.open()
    try:
        yield store
    finally:
        await store.aclose()


@contextlib.asynccontextmanager
async def raw(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client, to look at what the store wrote."""
    client = aioredis.Redis(port=server.port, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def server_time(client: aioredis.Redis) -> float:
    seconds, micros = await client.time()
    return seconds + micros / 1_000_000


# -- protocol semantics ---------------------------------------------------------


@aio
async def test_store_satisfies_the_protocol_and_is_shared(server: RedisServer) -> None:
    async with opened(server.url) as store:
        assert isinstance(store, SessionStore)
        assert store.shared is True
        assert store.url == server.url


@aio
async def test_load_touches_and_slides_the_deadline(server: RedisServer) -> None:
    clock = FakeClock(1000.0)
    async with opened(server.url, clock) as store:
        assert await store.create("u1", 60, {"n": 1, "who": "ann"}) == 1060.0
        clock.advance(50)
        loaded = await store.load("u1")
        assert loaded is not None
        assert (loaded.uid, loaded.timeout, loaded.deadline) == ("u1", 60.0, 1110.0)
        assert loaded.decoded() == {"n": 1, "who": "ann"}
        clock.advance(50)  # 1100: past the first deadline, within the slid one
        assert await store.exists("u1")
        loaded = await store.load("u1")
        assert loaded is not None and loaded.deadline == 1160.0


@aio
async def test_load_past_the_deadline_is_none_and_does_not_revive(server: RedisServer) -> None:
    clock = FakeClock(1000.0)
    async with opened(server.url, clock) as store:
        await store.create("u1", 60, {"k": "v"})
        clock.advance(60)  # deadline == now: no longer live
        assert await store.load("u1") is None
        assert await store.load("u1") is None
        assert not await store.exists("u1")
        assert await store.load("nobody") is None
        [expiry] = await store.claim("o", 30, 10)
        assert (expiry.uid, expiry.cause, dict(expiry.data)) == ("u1", "timeout", {"k": "v"})


@aio
async def test_exists_does_not_touch(server: RedisServer) -> None:
    clock = FakeClock(1000.0)
    async with opened(server.url, clock) as store:
        await store.create("u1", 60, {})
        clock.advance(59)
        assert await store.exists("u1")
        clock.advance(1)
        assert not await store.exists("u1")
        assert not await store.exists("nobody")


@aio
async def test_concurrent_saves_of_different_keys_both_persist(server: RedisServer) -> None:
    clock = FakeClock(1000.0)
    async with (
        opened(server.url, clock) as one,
        opened(server.url, clock, prefix=one.prefix) as two,
    ):
        await one.create("u1", 60, {"a": 0, "b": 0})
        results = await asyncio.gather(one.save("u1", {"a": 1}, []), two.save("u1", {"b": 2}, []))
        assert sorted(results) == [2, 3]  # both written: the data's versions after each
        loaded = await two.load("u1")
        assert loaded is not None and loaded.decoded() == {"a": 1, "b": 2}


@aio
async def test_save_writes_json_values_removes_keys_and_keeps_the_deadline(
    server: RedisServer,
) -> None:
    clock = FakeClock(1000.0)
    async with opened(server.url, clock) as store:
        await store.create("u1", 60, {"gone": 1, "kept": [1, 2], "also": "x"})
        clock.advance(30)
        value = {"nested": [1, 2.5, None, True], "text": "héllo ✓"}
        assert await store.save("u1", {"new": value}, ["gone", "also", "never-there"])
        assert await store.next_deadline() == 1060.0  # save does not touch
        loaded = await store.load("u1")
        assert loaded is not None and loaded.decoded() == {"kept": [1, 2], "new": value}
        assert await store.save("u1", {"both": 1}, ["both"])  # removal wins
        loaded = await store.load("u1")
        assert loaded is not None and "both" not in loaded.decoded()


@aio
async def test_save_of_an_ended_session_is_false_and_writes_nothing(server: RedisServer) -> None:
    clock = FakeClock(1000.0)
    async with opened(server.url, clock) as store:
        await store.create("u1", 60, {"a": 1})
        await store.create("u2", 60, {"a": 1})
        assert await store.expire("u1")
        clock.advance(60)  # u2 timed out
        assert not await store.save("u1", {"a": 2, "b": 3}, ["a"])
        assert not await store.save("u2", {"a": 2, "b": 3}, ["a"])
        assert not await store.save("nobody", {"a": 2}, [])
        claimed = {e.uid: dict(e.data) for e in await store.claim("o", 30, 10)}
        assert claimed == {"u1": {"a": 1}, "u2": {"a": 1}}


@aio
async def test_expire_ends_now_and_claim_gives_cause_expired(server: RedisServer) -> None:
    clock = FakeClock(1000.0)
    async with opened(server.url, clock) as store:
        await store.create("u1", 60, {"cart": ["book"]})
        assert await store.expire("u1")
        assert not await store.expire("u1")
        assert not await store.expire("nobody")
        assert not await store.exists("u1")
        assert await store.load("u1") is None
        [expiry] = await store.claim("worker", 30, 10)  # claimable at once, no time passes
        assert expiry.uid == "u1"
        assert expiry.cause == "expired"
        assert expiry.attempt == 1
        assert dict(expiry.data) == {"cart": ["book"]}
        assert expiry.delivery_id


@aio
async def test_timeout_claim_hands_out_the_final_data(server: RedisServer) -> None:
    clock = FakeClock(1000.0)
    async with opened(server.url, clock) as store:
        await store.create("u1", 60, {"a": 1})
        clock.advance(10)
        await store.save("u1", {"a": 2, "b": 3}, [])
        assert await store.claim("o", 30, 10) == []  # not due yet
        clock.advance(50)
        [expiry] = await store.claim("o", 30, 10)
        assert expiry == Expiry("u1", expiry.data, expiry.delivery_id, 1, "timeout")
        assert dict(expiry.data) == {"a": 2, "b": 3}


@aio
async def test_claim_is_oldest_first_and_honours_limit(server: RedisServer) -> None:
    clock = FakeClock(1000.0)
    async with opened(server.url, clock) as store:
        await store.create("late", 30, {})
        await store.create("early", 10, {})
        await store.create("middle", 20, {})
        await store.create("alive", 100, {})
        clock.advance(25)
        await store.expire("alive")  # ended at 1025, after the others' deadlines
        clock.advance(10)
        first = await store.claim("o", 60, 2)
        assert [e.uid for e in first] == ["early", "middle"]
        second = await store.claim("o", 60, 10)
        assert [(e.uid, e.cause) for e in second] == [("alive", "expired"), ("late", "timeout")]
        assert await store.claim("o", 60, 0) == []


@aio
async def test_no_double_hand_out_while_the_lease_holds(server: RedisServer) -> None:
    clock = FakeClock(1000.0)
    async with (
        opened(server.url, clock) as a,
        opened(server.url, clock, prefix=a.prefix) as b,
    ):
        await a.create("u1", 10, {})
        clock.advance(10)
        [taken] = await a.claim("A", 30, 10)
        assert taken.uid == "u1"
        assert await b.claim("B", 30, 10) == []
        clock.advance(29.999)
        assert await b.claim("B", 30, 10) == []
        assert await a.claim("A", 30, 10) == []


@aio
async def test_redelivery_after_the_lease_runs_out_keeps_the_delivery_id(
    server: RedisServer,
) -> None:
    clock = FakeClock(1000.0)
    async with (
        opened(server.url, clock) as a,
        opened(server.url, clock, prefix=a.prefix) as b,
    ):
        await a.create("u1", 60, {"x": 1})
        await a.expire("u1")
        [first] = await a.claim("A", 30, 10)
        clock.advance(30)  # A died mid-hook; its lease is over
        [again] = await b.claim("B", 30, 10)
        assert again.uid == "u1"
        assert again.delivery_id == first.delivery_id
        assert again.attempt == 2
        assert again.cause == "expired"
        assert dict(again.data) == {"x": 1}
        clock.advance(30)
        [third] = await a.claim("A", 30, 10)
        assert (third.delivery_id, third.attempt) == (first.delivery_id, 3)


@aio
async def test_delivery_ids_differ_between_sessions(server: RedisServer) -> None:
    clock = FakeClock(1000.0)
    async with opened(server.url, clock) as store:
        for uid in ("a", "b", "c"):
            await store.create(uid, 1, {})
        clock.advance(1)
        ids = [e.delivery_id for e in await store.claim("o", 30, 10)]
        assert len(set(ids)) == 3


@aio
async def test_ack_forgets_the_session_and_announces_its_end(server: RedisServer) -> None:
    clock = FakeClock(1000.0)
    async with opened(server.url, clock) as store, raw(server) as client:
        _, cursor = await store.events(None)
        await store.create("u1", 60, {"a": 1})
        await store.expire("u1")
        [expiry] = await store.claim("o", 30, 10)
        _, cursor = await store.events(cursor)  # (past the news of the create and expire)
        wrong = Expiry("u1", {}, "u1:not-the-id", 1, "expired")
        await store.ack(wrong)  # another delivery's ack: nothing happens
        assert await store.events(cursor) == ([], cursor)
        await store.ack(expiry)
        uids, after = await store.events(cursor)
        assert uids == ["u1"] and after != cursor
        assert await client.keys(f"{store.prefix}:s:*") == []
        assert await client.keys(f"{store.prefix}:c:*") == []
        assert await client.zcard(f"{store.prefix}:leases") == 0
        clock.advance(1000)
        assert await store.claim("o", 30, 10) == []  # never redelivered
        assert await store.load("u1") is None
        await store.ack(expiry)  # a second ack is a no-op
        assert await store.events(after) == ([], after)


@aio
async def test_events_cursor_from_now_on_in_order_and_in_batches(server: RedisServer) -> None:
    clock = FakeClock(1000.0)
    async with opened(server.url, clock) as store, raw(server) as client:
        assert await store.events(None) == ([], "0-0")  # empty stream
        for uid in ("a", "b", "c"):
            await store.create(uid, 60, {})
            await store.expire(uid)
        for expiry in await store.claim("o", 30, 10):
            await store.ack(expiry)
        uids, cursor = await store.events("0-0")
        assert uids == ["a", "b", "c"]
        assert await store.events(None) == ([], cursor)  # None: from now on
        async with client.pipeline(transaction=False) as pipe:
            for i in range(1005):
                pipe.xadd(f"{store.prefix}:events", {"uid": f"x{i}"})
            await pipe.execute()
        batch, cursor2 = await store.events(cursor)
        assert batch == [f"x{i}" for i in range(1000)]
        rest, cursor3 = await store.events(cursor2)
        assert rest == [f"x{i}" for i in range(1000, 1005)]
        assert await store.events(cursor3) == ([], cursor3)
        with pytest.raises(ValueError):
            await store.events("not a cursor")


@aio
async def test_next_deadline_covers_deadlines_leases_and_unclaimed_ends(
    server: RedisServer,
) -> None:
    clock = FakeClock(1000.0)
    async with opened(server.url, clock) as store:
        assert await store.next_deadline() is None
        await store.create("long", 60, {})
        await store.create("short", 30, {})
        assert await store.next_deadline() == 1030.0
        clock.advance(30)
        assert await store.next_deadline() == 1030.0  # due, not yet claimed
        [claimed] = await store.claim("o", 10, 10)
        assert claimed.uid == "short"
        assert await store.next_deadline() == 1040.0  # its lease end
        clock.advance(5)
        await store.expire("long")
        assert await store.next_deadline() == 1035.0  # ended, unclaimed: now
        [ended] = await store.claim("o", 100, 10)
        assert await store.next_deadline() == 1040.0
        await store.ack(claimed)
        await store.ack(ended)
        assert await store.next_deadline() is None


@aio
async def test_now_is_the_clock_when_given(server: RedisServer) -> None:
    clock = FakeClock(1234.5)
    async with opened(server.url, clock) as store:
        assert await store.now() == 1234.5


@aio
async def test_open_and_aclose_are_idempotent_and_a_closed_store_reconnects(
    server: RedisServer,
) -> None:
    store = RedisStore(server.url, clock=FakeClock(), prefix=f"t{uuid.uuid4().hex}")
    await store.aclose()
    await store.open()
    await store.open()
    await store.create("u1", 60, {})
    await store.aclose()
    await store.aclose()
    assert await store.exists("u1")
    await store.aclose()


@aio
async def test_url_prefix_option_names_the_keys(server: RedisServer) -> None:
    prefix = f"app{uuid.uuid4().hex[:8]}"
    store = RedisStore.from_url(f"{server.url}?prefix={prefix}", clock=FakeClock())
    assert store.prefix == prefix
    async with raw(server) as client:
        try:
            await store.create("u1", 60, {"a": 1})
            assert await client.hget(f"{prefix}:s:u1", "d:a") == "1"
        finally:
            await store.aclose()


# -- one round trip per operation ------------------------------------------------


@aio
async def test_each_operation_is_one_command_on_the_server(server: RedisServer) -> None:
    clock = FakeClock(1000.0)
    async with opened(server.url, clock) as store:
        await store.create("warm", 60, {"a": 1})  # the connection exists now
        await store.create("u2", 60, {})
        await store.expire("u2")
        claimed: list[Expiry] = []

        async def claim() -> None:
            claimed.extend(await store.claim("o", 30, 10))

        operations: dict[str, Callable[[], Awaitable[Any]]] = {
            "create": lambda: store.create("u1", 60, {"a": 1, "b": [2]}),
            "load": lambda: store.load("u1"),
            "save": lambda: store.save("u1", {"a": 2, "c": 3}, ["b"]),
            "exists": lambda: store.exists("u1"),
            "expire": lambda: store.expire("warm"),
            "next_deadline": store.next_deadline,
            "claim": claim,
            "ack": lambda: store.ack(claimed[0]),
        }
        for name, operation in operations.items():
            assert await commands_sent(server, operation) == ["evalsha"], name
        assert await commands_sent(server, lambda: store.events("0-0")) == ["xrange"]
        assert await commands_sent(server, lambda: store.events(None)) == ["xrevrange"]
        loaded = await store.load("u1")
        assert loaded is not None and loaded.decoded() == {"a": 2, "c": 3}


@aio
async def test_concurrent_operations_of_a_store_share_one_connection(server: RedisServer) -> None:
    """A store keeps one connection: 100 concurrent loads, saves and creates
    (as concurrent requests make them) all reach Redis through it, one
    command each, and each caller gets its own answer."""
    clock = FakeClock(1000.0)
    async with opened(server.url, clock) as store:
        for i in range(50):
            await store.create(f"u{i}", 60, {"i": i})
        results: list[Any] = []

        async def burst() -> None:
            results.extend(
                await asyncio.gather(
                    *(store.load(f"u{i}") for i in range(50)),
                    *(store.save(f"u{i}", {"j": i}, []) for i in range(25)),
                    *(store.create(f"new{i}", 60, {}) for i in range(25)),
                )
            )

        sent = await commands_and_clients(server, burst)
        assert [command for _, command in sent] == ["evalsha"] * 100
        assert len({client for client, _ in sent}) == 1
        loaded = results[:50]
        assert [s.decoded()["i"] if s else None for s in loaded] == list(range(50))
        assert results[50:75] == [2] * 25  # each session's data version after one save
        assert all(deadline == 1060.0 for deadline in results[75:])


@aio
async def test_a_server_that_lost_its_scripts_gets_them_again(server: RedisServer) -> None:
    clock = FakeClock(1000.0)
    async with opened(server.url, clock) as store, raw(server) as client:
        await store.create("u1", 60, {"a": 1})
        await client.script_flush()
        loaded = await store.load("u1")
        assert loaded is not None and loaded.decoded() == {"a": 1}
        assert await commands_sent(server, lambda: store.load("u1")) == ["evalsha"]


# -- the server's TIME ---------------------------------------------------------


@aio
async def test_without_a_clock_deadlines_follow_the_server_time(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local clock is a day ahead (skew): deadlines still come from Redis TIME."""
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 86400)
    async with opened(server.url) as store, raw(server) as client:
        before = await server_time(client)
        now = await store.now()
        deadline = await store.create("u1", 60, {})
        after = await server_time(client)
        assert before <= now <= after
        assert before + 60 <= deadline <= after + 60
        loaded = await store.load("u1")
        assert loaded is not None
        assert deadline <= loaded.deadline <= await server_time(client) + 60
        assert await store.exists("u1")
        assert await store.claim("o", 30, 10) == []  # a skewed node ends nothing early
        score = await client.zscore(f"{store.prefix}:deadlines", "u1")
        assert score is not None and score / 1e6 == loaded.deadline


# -- many claimers ----------------------------------------------------------------


@aio
async def test_twenty_concurrent_claimers_take_each_due_session_exactly_once(
    server: RedisServer,
) -> None:
    clock = FakeClock(1000.0)
    prefix = f"t{uuid.uuid4().hex[:12]}"
    stores = [RedisStore(server.url, clock=clock, prefix=prefix) for _ in range(5)]
    try:
        uids = [f"s{i:03d}" for i in range(500)]
        await asyncio.gather(
            *(stores[i % 5].create(uid, 10, {"i": i}) for i, uid in enumerate(uids))
        )
        clock.advance(10)

        async def claimer(store: RedisStore, owner: str) -> list[Expiry]:
            taken: list[Expiry] = []
            while batch := await store.claim(owner, 300, 7):
                taken.extend(batch)
            return taken

        results = await asyncio.gather(*(claimer(stores[n % 5], f"owner{n}") for n in range(20)))
        claimed = [e.uid for taken in results for e in taken]
        assert len(claimed) == 500
        assert sorted(claimed) == uids
        assert sum(1 for taken in results if taken) > 1  # they really competed
        assert all(e.attempt == 1 and e.cause == "timeout" for t in results for e in t)
        assert all(e.data == {"i": int(e.uid[1:])} for t in results for e in t)
    finally:
        for store in stores:
            await store.aclose()


# -- failures -------------------------------------------------------------------


def _all_operations(store: RedisStore) -> dict[str, Callable[[], Awaitable[Any]]]:
    expiry = Expiry("u1", {}, "u1:1", 1, "timeout")
    return {
        "open": store.open,
        "now": store.now,
        "load": lambda: store.load("u1"),
        "create": lambda: store.create("u2", 60, {"a": 1}),
        "save": lambda: store.save("u1", {"a": 2}, []),
        "exists": lambda: store.exists("u1"),
        "expire": lambda: store.expire("u1"),
        "claim": lambda: store.claim("o", 30, 10),
        "ack": lambda: store.ack(expiry),
        "events": lambda: store.events(None),
        "events-after": lambda: store.events("0-0"),
        "next_deadline": store.next_deadline,
    }


async def _assert_all_unavailable(store: RedisStore, where: str, limit: float = 1.5) -> None:
    for name, operation in _all_operations(store).items():
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            await operation()
        elapsed = time.monotonic() - started
        assert elapsed < limit, (name, elapsed)
        assert where in str(caught.value), (name, str(caught.value))
        assert caught.value.__cause__ is not None, name
        assert PASSWORD not in str(caught.value), name


@aio
async def test_a_stopped_server_makes_every_call_unavailable_and_a_restart_heals() -> None:
    with RedisServer() as own:
        where = f"127.0.0.1:{own.port}"
        store = RedisStore(own.url)  # server time: now() goes to Redis too
        try:
            await store.create("u1", 60, {"a": 1})
            own.stop()
            await _assert_all_unavailable(store, where)
            own.start()
            assert await store.load("u1") is None  # no persistence: it forgot
            await store.create("u1", 60, {"a": 1})
            loaded = await store.load("u1")
            assert loaded is not None and loaded.decoded() == {"a": 1}
            # A restart between two calls: the store's connection is stale, the
            # next call still works (one immediate reconnect), and the new
            # server gets the scripts it lacks (NOSCRIPT, then EVAL).
            own.stop()
            own.start()
            assert await store.create("u3", 60, {}) > 0
            assert await store.exists("u3")
        finally:
            await store.aclose()


@aio
@pytest.mark.slow
async def test_a_server_that_never_answers_fails_within_the_timeout() -> None:
    """Every call gives up after ``timeout`` (here 0.25 s); with the default
    1 s, a call fails within 1.5 s."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # the kernel accepts connections; nobody ever replies
        port = silent.getsockname()[1]
        url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
        quick = RedisStore(url, timeout=0.25)
        default = RedisStore(url)
        try:
            await _assert_all_unavailable(quick, f"127.0.0.1:{port}", limit=0.5)
            for operation in (lambda: default.load("u1"), lambda: default.claim("o", 30, 10)):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await operation()
                assert 0.9 < time.monotonic() - started < 1.5
        finally:
            await quick.aclose()
            await default.aclose()


@aio
async def test_nobody_listening_fails_fast() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = RedisStore(f"redis://:{PASSWORD}@127.0.0.1:{port}/0")
    try:
        await _assert_all_unavailable(store, f"127.0.0.1:{port}", limit=0.5)
    finally:
        await store.aclose()


@aio
async def test_password_works_and_never_shows() -> None:
    with RedisServer(args=["--requirepass", PASSWORD]) as locked:
        url = f"redis://:{PASSWORD}@127.0.0.1:{locked.port}/0"
        store = RedisStore(url, clock=FakeClock())
        wrong = RedisStore(f"redis://:{PASSWORD}x@127.0.0.1:{locked.port}/0")
        none = RedisStore(locked.url)
        try:
            for shown in (store.url, str(store), repr(store), wrong.url, repr(wrong)):
                assert PASSWORD not in shown, shown
            assert store.url == f"redis://:***@127.0.0.1:{locked.port}/0"
            await store.create("u1", 60, {"a": 1})
            assert await store.exists("u1")
            for bad in (wrong, none):
                with pytest.raises(StoreUnavailable) as caught:
                    await bad.load("u1")
                assert PASSWORD not in str(caught.value)
                assert f"127.0.0.1:{locked.port}" in str(caught.value)
        finally:
            for each in (store, wrong, none):
                await each.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "redis://host:notaport",
        "redis://h:1/x",
        "http://h",
        "redis://h:1/0?nope=1",
        "redis://h:1/0?prefix=",
        "redis://h:1/0?prefix=a&prefix=b",
        "redis://h:99999/0",
        "redis://h:0/0",
        "redis:///0",
        "redis://h:1/0/1",
        "redis://h:1/0#frag",
        "unix:///tmp/redis.sock",
        f"redis://:{PASSWORD}@h:notaport/0",
    ],
)
def test_bad_urls_are_config_errors_at_construction(url: str) -> None:
    started = time.monotonic()
    with pytest.raises(StoreConfigError) as caught:
        RedisStore(url)
    assert time.monotonic() - started < 0.1  # no network
    assert "Redis store URL" in str(caught.value)
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "where", "prefix"),
    [
        ("redis://localhost", "localhost:6379", "lapse"),
        ("redis://h:7000/3?prefix=app", "h:7000", "app"),
        ("rediss://user:pw@h.example:6380/0", "h.example:6380", "lapse"),
        ("redis://[::1]:6379/", "[::1]:6379", "lapse"),
    ],
)
def test_good_urls_construct_without_network(url: str, where: str, prefix: str) -> None:
    store = RedisStore.from_url(url)
    assert store.prefix == prefix
    assert store._where == where
    assert "pw@" not in store.url


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(StoreConfigError):
        RedisStore("redis://h", timeout=0)
    with pytest.raises(StoreConfigError):
        RedisStore("redis://h", prefix="")


def test_without_hiredis_the_error_names_an_install_command_that_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redis_store_module, "_IMPORT_ERROR", ImportError("No module named 'redis'"))
    works = r"`pip install hiredis`.*`pip install '\.\[redis\]'`"
    with pytest.raises(StoreConfigError, match=works):
        RedisStore("redis://localhost")
