"""The Site on each store: session data, the durable expiry hook, store URLs,
round trips, and what a request gets when the store is unreachable."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Leaf, SessionPage, call, call_async
from conftest import json_body as body

from lapse.internet.task import Clock
from lapse.sessions import Expiry, StoreConfigError
from lapse.sessions.stores.memory import MemoryStore
from lapse.web.resource import Resource
from lapse.web.server import Session, Site


class ShortSession(Session):
    sessionTimeout = 5


class DataPage(Resource):
    """GET /data?set=k&v=json sets a key; every GET returns the data as JSON."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        session = request.getSession()
        key = request.args.get(b"set")
        if key:
            session.data[key[0].decode()] = json.loads(request.args[b"v"][0])
        drop = request.args.get(b"drop")
        if drop:
            del session.data[drop[0].decode()]
        if request.args.get(b"logout"):
            session.expire()
        return json.dumps({"uid": session.uid, "data": dict(session.data)}).encode()


def memory_site(clock: Clock, hook: Callable[[Expiry], Any] | None = None) -> Site:
    site = Site(DataPage(), reactor=clock, on_expire=hook)
    site.sessionFactory = ShortSession
    return site


# -- session data ---------------------------------------------------------------


def test_data_rejects_values_that_are_not_json(clock: Clock) -> None:
    """Assigning a value that JSON cannot hold is a TypeError naming the key."""
    session = memory_site(clock).makeSession()
    session.data["fine"] = {"list": [1, 2.5, None, "x"]}
    with pytest.raises(TypeError, match="'when'"):
        session.data["when"] = object()
    with pytest.raises(TypeError, match="'bad'"):
        session.data["bad"] = {1, 2}
    assert "when" not in session.data


def test_data_persists_between_requests(clock: Clock) -> None:
    """Data set in one request is there in the next, and removed keys are gone."""
    site = memory_site(clock)
    first = body(call(site, "GET", "/?set=n&v=1"))
    cookie = {b"lapse_session": first["uid"].encode()}
    call(site, "GET", "/?set=who&v=%22ann%22", cookies=cookie)
    call(site, "GET", "/?drop=n", cookies=cookie)
    assert body(call(site, "GET", "/", cookies=cookie))["data"] == {"who": "ann"}


# -- the durable hook, memory store ------------------------------------------------


def test_hook_runs_once_with_final_data_on_timeout(clock: Clock) -> None:
    """When a session times out, on_expire gets its uid, final data, cause
    "timeout" and a delivery id, exactly once, after the notifyOnExpire callbacks."""
    events: list[Any] = []
    site = memory_site(clock, events.append)
    uid = body(call(site, "GET", "/?set=cart&v=[1,2]"))["uid"]
    site.sessions[uid].notifyOnExpire(lambda: events.append("callback"))
    clock.advance(5)
    clock.advance(60)
    callback, expiry = events
    assert callback == "callback"
    assert (expiry.uid, dict(expiry.data), expiry.cause, expiry.attempt) == (
        uid,
        {"cart": [1, 2]},
        "timeout",
        1,
    )
    assert expiry.delivery_id
    assert not clock.calls


def test_hook_runs_on_logout_with_cause_expired(clock: Clock) -> None:
    """A session expired by a request gets the hook at once with cause "expired"."""
    hooked: list[Expiry] = []
    site = memory_site(clock, hooked.append)
    uid = body(call(site, "GET", "/?set=a&v=1"))["uid"]
    call(site, "GET", "/?logout=1", cookies={b"lapse_session": uid.encode()})
    assert [(e.uid, e.cause, dict(e.data)) for e in hooked] == [(uid, "expired", {"a": 1})]
    assert not clock.calls


def test_failing_hook_is_retried_then_given_up(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A hook that raises is delivered again after the lease, with the same
    delivery id, up to max_attempts; then it is logged and dropped."""
    attempts: list[Expiry] = []

    def hook(expiry: Expiry) -> None:
        attempts.append(expiry)
        raise RuntimeError("downstream is down")

    site = memory_site(clock, hook)
    site._keeper.lease = 10
    site.makeSession()
    with caplog.at_level(logging.ERROR, logger="lapse.sessions"):
        clock.advance(5)
        for _ in range(10):
            clock.advance(10)
    assert [e.attempt for e in attempts] == [1, 2, 3, 4, 5]
    assert len({e.delivery_id for e in attempts}) == 1
    assert "giving up" in caplog.records[-1].getMessage()
    assert not clock.calls


def test_hook_can_be_set_after_construction(clock: Clock) -> None:
    """site.on_expire may be assigned later, as sessionFactory is."""
    site = memory_site(clock)
    hooked: list[str] = []
    site.on_expire = lambda expiry: hooked.append(expiry.uid)
    session = site.makeSession()
    clock.advance(5)
    assert hooked == [session.uid]


# -- choosing a store -----------------------------------------------------------------


def test_default_store_is_memory(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without store= or LAPSE_SESSION_STORE, sessions live in memory."""
    monkeypatch.delenv("LAPSE_SESSION_STORE", raising=False)
    site = Site(Resource(), reactor=clock)
    assert isinstance(site.store, MemoryStore)
    assert site.store.url == "memory:"


def test_environment_chooses_the_store(
    clock: Clock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """LAPSE_SESSION_STORE picks the store without changing code."""
    monkeypatch.setenv("LAPSE_SESSION_STORE", f"sqlite:///{tmp_path}/s.db")
    site = Site(Resource(), reactor=clock)
    assert site.store.shared
    assert site.store.url.endswith("/s.db")


@pytest.mark.parametrize(
    "url",
    [
        "",
        "mem:",
        "memory:x",
        "mysql://db/1",
        "postgres://db/1?colour=blue",
        "sqlite://",
        "sqlite:///",
        "redis://host:port/0",
        "redis://host:6379/zero",
        "redis://host:6379/0?colour=blue",
        "memory:\x00",
        "sqlite:///sessions\x00.db",
        "sqlite:///sessions.db\n",
        "sqlite:///ses\tsions.db",
        "redis://host\x00:6379/0",
        "rediss://host:6379/0\r\n",
        "redis://host:6379/0?prefix=a\x7fb",
        "sqlite:///" + "a" * 5000,
        "sqlite:///" + "d" * 300 + "/sessions.db",
        "sqlite:///" + "d/" * 2100 + "sessions.db",
    ],
)
def test_bad_store_url_is_an_error_at_construction(clock: Clock, url: str) -> None:
    """A store URL that cannot work is a StoreConfigError when the Site is made,
    not at the first request."""
    with pytest.raises(StoreConfigError):
        Site(Resource(), reactor=clock, store=url)


def test_control_characters_in_a_store_url_are_named_not_echoed(clock: Clock) -> None:
    """A NUL (or any control character) in a store URL is refused at
    construction with where it is, without echoing the URL (which may hold a
    password); SQLiteStore and RedisStore made directly refuse it too."""
    from lapse.sessions.stores.redis import RedisStore
    from lapse.sessions.stores.sqlite import SQLiteStore

    with pytest.raises(
        StoreConfigError, match=r"control characters: '\\x00' at position 15"
    ) as caught:
        Site(Resource(), reactor=clock, store="redis://:secret\x00@host:6379/0")
    assert "secret" not in str(caught.value)
    with pytest.raises(StoreConfigError, match="control characters"):
        RedisStore("redis://:secret@host:6379/0\n")
    with pytest.raises(StoreConfigError, match="control characters"):
        SQLiteStore("sessions\x00.db")
    with pytest.raises(StoreConfigError, match="too long for a file"):
        SQLiteStore("x" * 256 + ".db")


class _NotAStore:
    url = "memory:"
    shared = False

    async def load(self, uid: str) -> None:
        return None


@pytest.mark.parametrize(
    ("store", "message"),
    [
        (b"sqlite:///sessions.db", "not bytes: decode it first"),
        (bytearray(b"memory:"), "not bytearray"),
        (42, "not int$"),
        (3.5, "not float$"),
        (["memory:"], "not list$"),
        (_NotAStore(), "not _NotAStore \\(it has no open, aclose, now, create, rotate, save"),
    ],
    ids=["bytes", "bytearray", "int", "float", "list", "object-missing-the-protocol"],
)
def test_store_that_is_neither_url_nor_store_is_an_error_at_construction(
    clock: Clock, store: Any, message: str
) -> None:
    """store= of another type than a str URL or a store object (bytes, a
    number, an object without the store's methods) is a StoreConfigError
    naming what was given, when the Site or the middleware is made (not an
    AttributeError, not at the first request)."""
    from lapse.asgi import SessionMiddleware

    with pytest.raises(StoreConfigError, match=message) as caught:
        Site(Resource(), reactor=clock, store=store)
    assert "sessions.db" not in str(caught.value)  # a URL given as bytes is not echoed
    with pytest.raises(StoreConfigError, match=message):
        SessionMiddleware(Resource(), reactor=clock, store=store)


def test_bad_store_url_in_environment_is_an_error(
    clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad LAPSE_SESSION_STORE is reported at construction too, naming the URL."""
    monkeypatch.setenv("LAPSE_SESSION_STORE", "nosuch://x")
    with pytest.raises(StoreConfigError, match="nosuch://x"):
        Site(Resource(), reactor=clock)


# -- shared stores, in one process ----------------------------------------------------


def test_two_sites_share_sessions_and_data(shared_store: str) -> None:
    """Two Sites on one shared store (as two processes would be) see the same
    sessions: one made through A is accepted by B with its data, and keys
    changed by concurrent requests through A and B both persist."""

    async def scenario() -> None:
        a = Site(DataPage(), store=shared_store)
        b = Site(DataPage(), store=shared_store)
        try:
            first = body(await call_async(a, "GET", "/?set=from&v=%22a%22"))
            cookie = {b"lapse_session": first["uid"].encode()}
            seen = body(await call_async(b, "GET", "/", cookies=cookie))
            assert seen == {"uid": first["uid"], "data": {"from": "a"}}
            await asyncio.gather(
                call_async(a, "GET", "/?set=x&v=1", cookies=cookie),
                call_async(b, "GET", "/?set=y&v=2", cookies=cookie),
            )
            final = body(await call_async(a, "GET", "/", cookies=cookie))
            assert final["data"] == {"from": "a", "x": 1, "y": 2}
        finally:
            await a._keeper.aclose()
            await b._keeper.aclose()

    asyncio.run(scenario())


def test_unknown_cookie_on_shared_store_gets_fresh_session(shared_store: str) -> None:
    """On a shared store too, a cookie naming no live session is not adopted."""

    async def scenario() -> None:
        site = Site(DataPage(), store=shared_store)
        try:
            response = await call_async(site, cookies={b"lapse_session": b"f" * 64})
            assert body(response)["uid"] != "f" * 64
            assert response.cookie_value(b"lapse_session") == body(response)["uid"].encode()
        finally:
            await site._keeper.aclose()

    asyncio.run(scenario())


def test_logout_on_shared_store_ends_session_everywhere(
    shared_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Expiring a session through A ends it for B, and the durable hook runs once."""
    hooked: list[Expiry] = []

    async def scenario() -> None:
        a = Site(DataPage(), store=shared_store, on_expire=hooked.append)
        b = Site(DataPage(), store=shared_store, on_expire=hooked.append)
        for site in (a, b):  # (rounds only by hand: none of a background loop's mid-delivery)
            monkeypatch.setattr(site._keeper, "start", lambda: None)
        try:
            await b._keeper.poll_once()  # b reads announcements from now on
            uid = body(await call_async(a, "GET", "/?set=k&v=1"))["uid"]
            cookie = {b"lapse_session": uid.encode()}
            await call_async(b, "GET", "/", cookies=cookie)
            logout = await call_async(a, "GET", "/?logout=1", cookies=cookie)
            assert b"Max-Age=0" in logout.set_cookies[b"lapse_session"]
            after = body(await call_async(b, "GET", "/", cookies=cookie))
            assert after["uid"] != uid
            for site in (a, b, a, b):  # their keepers' rounds, run by hand
                await site._keeper.poll_once()
            assert [(e.uid, e.cause, dict(e.data)) for e in hooked] == [(uid, "expired", {"k": 1})]
            assert uid not in b.sessions
        finally:
            await a._keeper.aclose()
            await b._keeper.aclose()

    asyncio.run(scenario())


def test_touch_costs_one_redis_round_trip(redis_server: Any) -> None:
    """On Redis, a request that touches an existing session costs exactly one
    command on the server; one that creates a session costs one more."""
    from _redis_server import commands_sent

    async def scenario() -> None:
        site = Site(DataPage(), store=f"{redis_server.url}?prefix=rt{time.monotonic_ns()}")
        # MONITOR shows every client: keep the site's background expiry loop
        # off so that only the requests' own commands are counted.
        site._keeper._closing = True
        try:
            await site.store.open()
            await site.store.exists("warm-up")  # the connection exists now
            created: list[Any] = []

            async def create() -> None:
                created.append(await call_async(site))

            assert await commands_sent(redis_server, create) == ["evalsha"]
            cookie = {b"lapse_session": body(created[0])["uid"].encode()}
            touch = await commands_sent(redis_server, lambda: call_async(site, cookies=cookie))
            assert touch == ["evalsha"]
        finally:
            await site._keeper.aclose()

    asyncio.run(scenario())


# -- an unreachable store -------------------------------------------------------------


def test_unreachable_store_answers_503_quickly_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With Redis unreachable, a request presenting a session cookie gets a 503
    with Retry-After and a short page within 1 s; the outage is logged once,
    not once per request."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def scenario() -> None:
        site = Site(DataPage(), store=f"redis://127.0.0.1:{port}/0")
        cookie = {b"lapse_session": b"a" * 64}
        with caplog.at_level(logging.ERROR, logger="lapse.sessions"):
            for _ in range(5):
                started = time.monotonic()
                response = await call_async(site, cookies=cookie)
                assert time.monotonic() - started < 1.0
                assert response.status == 503
                assert response.header(b"retry-after") == b"1"
                assert b"unavailable" in response.body
                assert b"lapse_session" not in response.set_cookies
            new_visitor = await call_async(site)
            assert new_visitor.status == 503
        await site._keeper.aclose()

    asyncio.run(scenario())
    outages = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outages) == 1


def test_outage_gives_503_only_to_pages_that_ask_for_their_session() -> None:
    """During an outage, a request carrying a session cookie to a page that
    never asks for its session is rendered (200, the cookie neither set nor
    deleted); a page that calls getSession() gets the 503."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Resource()
    plain = Leaf(b"no session here")
    root.putChild(b"plain", plain)
    root.putChild(b"mine", SessionPage())

    async def scenario() -> None:
        site = Site(root, store=f"redis://127.0.0.1:{port}/0")
        cookie = {b"lapse_session": b"a" * 24}
        try:
            rendered = await call_async(site, path=b"/plain", cookies=cookie)
            assert (rendered.status, rendered.body) == (200, b"no session here")
            assert rendered.set_cookies == {}
            assert plain.requests[0].session is None
            asked = await call_async(site, path=b"/mine", cookies=cookie)
            assert asked.status == 503
            assert asked.header(b"retry-after") == b"1"
            assert b"lapse_session" not in asked.set_cookies
        finally:
            await site._keeper.aclose()

    asyncio.run(scenario())


@pytest.mark.slow
def test_frozen_redis_answers_503_within_the_store_timeout_then_recovers() -> None:
    """A Redis that accepts connections but never answers (SIGSTOP): a request
    with a session cookie gets a 503 within about the store's 1 s timeout (the
    client's watchdog bounds the call; the site adds no timer of its own), and
    once Redis runs again the same session is served."""
    import os
    import signal

    from _redis_server import RedisServer

    with RedisServer() as server:
        assert server.pid is not None

        async def scenario() -> None:
            site = Site(DataPage(), store=f"redis://127.0.0.1:{server.port}/0?prefix=frozen")
            try:
                first = await call_async(site)
                assert first.status == 200
                cookie = {b"lapse_session": body(first)["uid"].encode()}
                os.kill(server.pid, signal.SIGSTOP)
                try:
                    started = time.monotonic()
                    frozen = await call_async(site, cookies=cookie)
                    elapsed = time.monotonic() - started
                finally:
                    os.kill(server.pid, signal.SIGCONT)
                assert frozen.status == 503
                assert frozen.header(b"retry-after") == b"1"
                assert 0.9 < elapsed < 2.5, elapsed
                again = await call_async(site, cookies=cookie)
                assert again.status == 200
                assert body(again)["uid"] == body(first)["uid"]
            finally:
                await site._keeper.aclose()

        asyncio.run(scenario())


# -- a hook slower than its lease ------------------------------------------------------


def test_an_async_hook_slower_than_the_lease_runs_once_on_the_memory_store(clock: Clock) -> None:
    """On the memory store an async hook that takes ten leases is not
    delivered again meanwhile (its lease is renewed while it runs); once it
    returns it is acknowledged, and nothing is left on the clock."""
    calls: list[Expiry] = []

    async def scenario() -> None:
        release = asyncio.Event()

        async def hook(expiry: Expiry) -> None:
            calls.append(expiry)
            await release.wait()

        site = memory_site(clock, hook)
        site._keeper.lease = 10
        site.makeSession()
        clock.advance(5)
        for _ in range(20):
            await asyncio.sleep(0)
            clock.advance(5)
        assert [e.attempt for e in calls] == [1]
        release.set()
        for _ in range(5):
            await asyncio.sleep(0)
        clock.advance(100)
        assert [e.attempt for e in calls] == [1]
        assert not clock.calls

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["sync"])
@pytest.mark.slow
def test_a_hook_slower_than_the_lease_runs_once_across_two_sites(
    shared_store: str, kind: str
) -> None:
    """Two sites on one shared store (as two processes), a lease of 0.45 s
    and a hook that takes 1.2 s (async, or a plain function that blocks,
    which runs off the event loop, so the loop keeps ticking): the hook runs
    once, in one site, and is not delivered to the other while it runs or
    after."""
    runs: list[tuple[str, int]] = []
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    def make_hook(name: str) -> Callable[[Expiry], Any]:
        if kind == "async":

            async def slow(expiry: Expiry) -> None:
                runs.append((name, expiry.attempt))
                await asyncio.sleep(1.2)

            return slow

        def blocking(expiry: Expiry) -> None:
            runs.append((name, expiry.attempt))
            time.sleep(1.2)

        return blocking

    async def scenario() -> None:
        sites = [Site(DataPage(), store=shared_store, on_expire=make_hook(n)) for n in "ab"]
        for site in sites:
            site.sessionFactory = ShortSession
            site._keeper.lease = 0.45
        try:
            session = sites[0].makeSession()
            session.sessionTimeout = 0.2
            await sites[0]._keeper.persist([session])
            for site in sites:
                site._keeper.start()
            ticking = asyncio.get_running_loop().create_task(ticker())
            for _ in range(60):
                await asyncio.sleep(0.05)
                if runs:
                    break
            await asyncio.sleep(2.0)  # the hook's 1.2 s and more than two leases
            ticking.cancel()
            assert len(runs) == 1, runs
            assert runs[0][1] == 1
            assert await sites[1].store.claim("someone", 10, 10) == []
            assert max(gaps) < 0.3, max(gaps)
        finally:
            for site in sites:
                await site._keeper.aclose()

    asyncio.run(scenario())


# -- a busy process is not an unreachable store ---------------------------------------


def shared_store_object(url: str, timeout: float) -> Any:
    """The store ``url`` names, with its own timeout (the site adds none)."""
    from lapse.sessions.stores import store_from_url
    from lapse.sessions.stores.redis import RedisStore
    from lapse.sessions.stores.sqlite import SQLiteStore

    if url.startswith("sqlite:"):
        return SQLiteStore(url[len("sqlite:///") :], timeout=timeout)
    if url.startswith("postgresql:"):
        return store_from_url(f"{url}&timeout={timeout}")
    return RedisStore(url, timeout=timeout)


def run_on_loop(kind: str, scenario: Callable[[], Any]) -> None:
    """Run ``scenario()`` on asyncio's own event loop or on uvloop (the server's)."""
    factory = None
    if kind == "uvloop":
        factory = pytest.importorskip("uvloop").new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(scenario())


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_loop_held_past_the_store_timeout_fails_no_request(
    shared_store: str,
    loop_kind: str,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    """Twenty requests are at their store call when the event loop is held
    (a long render, say) for 0.8 s, past the store's 0.3 s timeout, while the
    store answers at once: every request gets its 200 and nothing is logged
    as an outage."""

    async def scenario() -> None:
        site = Site(DataPage(), store=shared_store_object(shared_store, 0.3))
        site._keeper.store_timeout = 1.0
        try:
            first = await call_async(site, "GET", "/?set=n&v=1")
            cookie = {b"lapse_session": body(first)["uid"].encode()}
            requests = [
                asyncio.ensure_future(call_async(site, "GET", f"/?set=k{i}&v={i}", cookies=cookie))
                for i in range(20)
            ]
            await asyncio.sleep(0)  # each is at its store call now
            time.sleep(0.8)
            responses = await asyncio.gather(*requests)
            assert [r.status for r in responses] == [200] * 20
            final = body(await call_async(site, cookies=cookie))["data"]
            assert final == {"n": 1, **{f"k{i}": i for i in range(20)}}
        finally:
            await site._keeper.aclose()

    with caplog.at_level(logging.WARNING, logger="lapse.sessions"):
        run_on_loop(loop_kind, scenario)
    assert [r.getMessage() for r in caplog.records] == []


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
@pytest.mark.slow
def test_a_long_sqlite_queue_that_moves_fails_no_request(
    tmp_path: Path, loop_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """4000 requests at once, each making a session, queue up behind SQLite's
    one worker for longer than the store timeout (0.25 s) in all (batched
    into transactions of a few hundred calls, they take about 1 s); each
    batch is quick, so none fails."""
    from lapse.sessions.stores.sqlite import SQLiteStore

    async def scenario() -> None:
        site = Site(DataPage(), store=SQLiteStore(str(tmp_path / "q.db"), timeout=0.25))
        site._keeper.store_timeout = 0.25
        try:
            await site.store.open()
            started = time.monotonic()
            responses = await asyncio.gather(
                *(call_async(site, "GET", f"/?set=i&v={i}") for i in range(4000))
            )
            elapsed = time.monotonic() - started
            assert sorted({r.status for r in responses}) == [200]
            assert elapsed > 0.25, elapsed
            assert await site.store.count() == 4000
        finally:
            await site._keeper.aclose()

    with caplog.at_level(logging.WARNING, logger="lapse.sessions"):
        run_on_loop(loop_kind, scenario)
    assert [r.getMessage() for r in caplog.records] == []


# -- a real SQLite outage, and what a 503 leaves behind ----------------------------------

_LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.rollback()
"""


@pytest.mark.slow
def test_sqlite_locked_by_another_process_answers_503_in_about_the_timeout_then_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process holds the file's write lock for 2.5 s: a request gets
    a 503 with Retry-After within about the store's 1 s timeout (not
    busy_timeout's 5 s), the outage is logged once; once the lock is free
    the same session is served, without the write of the request that got
    the 503, and the retried request applies it."""
    import subprocess
    import sys

    db = tmp_path / "locked.db"

    async def scenario() -> None:
        site = Site(DataPage(), store=f"sqlite:///{db}")
        try:
            first = await call_async(site, "GET", "/?set=a&v=1")
            cookie = {b"lapse_session": body(first)["uid"].encode()}
            with subprocess.Popen(  # closes locker.stdout (and waits) on the way out
                [sys.executable, "-c", _LOCKER, str(db), "2.5"], stdout=subprocess.PIPE
            ) as locker:
                try:
                    assert locker.stdout is not None
                    assert locker.stdout.readline() == b"locked\n"
                    started = time.monotonic()
                    refused = await call_async(site, "GET", "/?set=b&v=2", cookies=cookie)
                    elapsed = time.monotonic() - started
                    assert refused.status == 503 and refused.header(b"retry-after") == b"1"
                    assert 0.9 < elapsed < 1.7, elapsed
                    assert locker.wait(timeout=10) == 0
                finally:
                    if locker.poll() is None:
                        locker.kill()
            assert body(await call_async(site, cookies=cookie))["data"] == {"a": 1}
            retried = await call_async(site, "GET", "/?set=b&v=2", cookies=cookie)
            assert retried.status == 200 and body(retried)["data"] == {"a": 1, "b": 2}
        finally:
            await site._keeper.aclose()

    with caplog.at_level(logging.WARNING, logger="lapse.sessions"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "unavailable" in m]) == 1, messages
    assert len([m for m in messages if "reachable again" in m]) == 1, messages


class CountPage(Resource):
    """GET /?inc=KEY adds one to the session's KEY; returns the uid."""

    isLeaf = True

    def render_GET(self, request: Any) -> str:
        session = request.getSession()
        key = request.args[b"inc"][0].decode()
        session.data[key] = session.data.get(key, 0) + 1
        return str(session.uid)


def test_after_a_503_on_sqlite_the_write_is_not_in_the_store_and_a_retry_applies_it_once(
    tmp_path: Path,
) -> None:
    """Under load, with a tiny store timeout (0.05 s) and another connection
    taking the write lock for 0.12 s at a time, some requests get 503s:
    afterwards none of their writes is in the store (each 200's is, once),
    and retrying each of them applies its increment exactly once."""
    import threading

    from lapse.sessions.stores.sqlite import SQLiteStore

    path = str(tmp_path / "busy.db")
    stop = threading.Event()

    def hold_the_lock_on_and_off() -> None:
        conn = sqlite3.connect(path, isolation_level=None, timeout=5)
        try:
            while not stop.is_set():
                conn.execute("BEGIN IMMEDIATE")
                time.sleep(0.12)
                conn.execute("ROLLBACK")
                time.sleep(0.03)
        finally:
            conn.close()

    import sqlite3

    async def scenario() -> None:
        store = SQLiteStore(path, timeout=0.05)
        site = Site(CountPage(), store=store)
        try:
            uids = []
            for _ in range(10):
                # (before the lock is held: a 503 here is a loaded machine
                # starving the store's thread past 0.05 s; asked again, as a
                # client would, so that every visitor has its session)
                made = await call_async(site, "GET", "/?inc=start")
                for _ in range(20):
                    if made.status != 503:
                        break
                    made = await call_async(site, "GET", "/?inc=start")
                assert made.status == 200, made.status
                uids.append(made.body)
            outcomes: list[tuple[bytes, str, int]] = []

            async def visitor(uid: bytes) -> None:
                for i in range(15):
                    key = f"k{i}"
                    response = await call_async(
                        site, "GET", f"/?inc={key}", cookies={b"lapse_session": uid}
                    )
                    outcomes.append((uid, key, response.status))

            holder = threading.Thread(target=hold_the_lock_on_and_off)
            holder.start()
            try:
                await asyncio.gather(*(visitor(uid) for uid in uids))
            finally:
                stop.set()
                holder.join()
            statuses = {status for _, _, status in outcomes}
            assert statuses == {200, 503}, statuses
            reader = SQLiteStore(path)  # a patient one, to look
            try:
                for uid, key, status in outcomes:
                    stored = await reader.load(uid.decode())
                    assert stored is not None
                    assert stored.decoded().get(key) == (1 if status == 200 else None), (
                        key,
                        status,
                    )
                for uid, key, status in outcomes:
                    if status == 503:  # retried, as a client would, until it is a 200
                        retries = [
                            await call_async(
                                site, "GET", f"/?inc={key}", cookies={b"lapse_session": uid}
                            )
                        ]
                        while retries[-1].status == 503 and len(retries) < 20:
                            retries.append(
                                await call_async(
                                    site, "GET", f"/?inc={key}", cookies={b"lapse_session": uid}
                                )
                            )
                        assert retries[-1].status == 200, [r.status for r in retries]
                for uid in uids:
                    stored = await reader.load(uid.decode())
                    assert stored is not None
                    assert stored.decoded() == {"start": 1, **{f"k{i}": 1 for i in range(15)}}
            finally:
                await reader.aclose()
        finally:
            await site._keeper.aclose()

    asyncio.run(scenario())
