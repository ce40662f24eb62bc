"""Session security on the site: id rotation at login, an absolute lifetime
next to the idle timeout, and a cap on live sessions (memory store)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeClock, call, call_async
from conftest import json_body as body
from conftest import session_cookie as cookie

from lapse.internet.task import Clock
from lapse.sessions import Expiry, StoreConfigError
from lapse.sessions.stores import store_from_url
from lapse.sessions.stores.redis import RedisStore
from lapse.sessions.stores.sqlite import SQLiteStore
from lapse.web.resource import Resource
from lapse.web.server import Session, Site


class ShortSession(Session):
    sessionTimeout = 5


class LimitedSession(Session):
    sessionTimeout = 10
    absolute_timeout = 25


class LoginPage(Resource):
    """GET /?login=name rotates the session and stores the user; every GET
    returns the session's uid and data as JSON."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        session = request.getSession()
        login = request.args.get(b"login")
        if login:
            session.rotate()
            session.data["user"] = login[0].decode()
        return json.dumps({"uid": session.uid, "data": dict(session.data)}).encode()


# -- rotation, memory store ----------------------------------------------------------


def test_rotate_gives_new_uid_same_session_and_sets_cookie(clock: Clock) -> None:
    """rotate() at login: a new uid for the same session object and data, site.sessions
    re-keyed, and the response sets the cookie to the new uid."""
    site = Site(LoginPage(), reactor=clock)
    first = call(site)
    old = body(first)["uid"]
    session = site.sessions[old]
    login = call(site, "GET", "/?login=ann", cookies=cookie(old))
    new = body(login)["uid"]
    assert new != old and len(new) == len(old)
    assert login.cookie_value(b"lapse_session") == new.encode()
    assert site.sessions == {new: session} and session.uid == new
    assert body(call(site, cookies=cookie(new)))["data"] == {"user": "ann"}


def test_a_rotated_uid_keeps_two_characters_and_renews_the_other_132_bits(
    clock: Clock,
) -> None:
    """A rotation keeps the old uid's first two characters (where a sharded
    store, Redis on a cluster, places the session: it stays in its shard) and
    draws the other 22 afresh: 132 new random bits, never the old uid."""
    site = Site(LoginPage(), reactor=clock)
    olds, news = [], []
    for _ in range(50):
        old = body(call(site))["uid"]
        new = body(call(site, "GET", "/?login=ann", cookies=cookie(old)))["uid"]
        assert len(new) == 24 and new[:2] == old[:2] and new[2:] != old[2:]
        olds.append(old)
        news.append(new)
    assert len({new[2:] for new in news}) == 50
    assert len({old[:2] for old in olds}) > 40  # the kept part itself is random


def test_old_uid_works_within_a_site_grace_then_is_unknown(clock: Clock) -> None:
    """With a site-wide rotation_grace (opt-in), a request with the old cookie
    within the grace gets the rotated session (and no cookie with its new uid);
    after the grace it gets a fresh session."""
    site = Site(LoginPage(), reactor=clock, rotation_grace=10)
    old = body(call(site))["uid"]
    new = body(call(site, "GET", "/?login=ann", cookies=cookie(old)))["uid"]
    clock.advance(9)
    late = call(site, cookies=cookie(old))
    assert body(late) == {"uid": new, "data": {"user": "ann"}}
    assert b"lapse_session" not in late.set_cookies
    clock.advance(1.5)
    after = call(site, cookies=cookie(old))
    assert body(after)["uid"] not in (old, new)
    assert body(after)["data"] == {}
    assert body(call(site, cookies=cookie(new)))["uid"] == new  # still live


def test_no_cookie_is_set_without_rotation(clock: Clock) -> None:
    """A request presenting its live session's cookie gets no Set-Cookie."""
    site = Site(LoginPage(), reactor=clock)
    uid = body(call(site))["uid"]
    assert b"lapse_session" not in call(site, cookies=cookie(uid)).set_cookies


def test_rotated_session_ends_once_with_new_uid_and_callbacks(clock: Clock) -> None:
    """A rotated session keeps its callbacks; at its end they run once and the
    hook reports the new uid, once."""
    hooked: list[Expiry] = []
    site = Site(LoginPage(), reactor=clock, on_expire=hooked.append)
    site.sessionFactory = ShortSession
    old = body(call(site))["uid"]
    runs: list[str] = []
    site.sessions[old].notifyOnExpire(lambda: runs.append("ended"))
    new = body(call(site, "GET", "/?login=ann", cookies=cookie(old)))["uid"]
    clock.advance(5)
    clock.advance(60)
    assert runs == ["ended"]
    assert [(e.uid, e.cause, dict(e.data)) for e in hooked] == [(new, "timeout", {"user": "ann"})]
    assert not site.sessions and not clock.calls


def test_rotation_of_a_session_on_the_heap_keeps_its_deadline(clock: Clock) -> None:
    """A touched session whose queue entry moved it to the expiry heap still ends
    on time after rotation (its heap entry follows the new uid)."""
    site = Site(Resource(), reactor=clock)
    site.sessionFactory = ShortSession
    session = site.makeSession()
    clock.advance(4)
    session.touch()  # deadline 9
    clock.advance(1)  # t=5: the queue moves it to the heap, keyed 9
    session.rotate()
    clock.advance(3.9)  # rotation touched it at 5: deadline 10
    assert not session.expired and session.uid in site.sessions
    clock.advance(1.1)
    assert session.expired and not site.sessions and not clock.calls


def test_rotate_on_ended_session_does_nothing(clock: Clock) -> None:
    """rotate() on an expired session keeps its uid and touches nothing."""
    site = Site(Resource(), reactor=clock)
    session = site.makeSession()
    uid = session.uid
    session.expire()
    assert session.rotate() == uid and not site.sessions


def test_negative_rotation_grace_is_refused(clock: Clock) -> None:
    """rotation_grace must be seconds >= 0."""
    with pytest.raises(ValueError, match="rotation_grace"):
        Site(Resource(), reactor=clock, rotation_grace=-1)


# -- rotation, shared stores ---------------------------------------------------------


@pytest.mark.slow
def test_rotation_on_shared_store_across_processes(
    shared_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite and Redis, a rotation through site A: the new cookie is set, B
    serves the old cookie as the same session within the (opt-in) grace, never
    setting the new cookie, B's own copy moves to the new uid with its
    callbacks, and the old uid is unknown after the grace; the hook reports the
    new uid once. (Store time is a fake clock; the keepers' rounds are run by
    hand.)"""
    hooked: list[Expiry] = []

    async def scenario() -> None:
        clock = FakeClock()
        a, b = (
            Site(
                LoginPage(),
                store=store_from_url(shared_store, clock),
                rotation_grace=0.5,
                on_expire=hooked.append,
            )
            for _ in "ab"
        )
        for site in (a, b):  # (rounds only by hand: none of a background loop's mid-delivery)
            monkeypatch.setattr(site._keeper, "start", lambda: None)
        try:
            old = body(await call_async(a))["uid"]
            await call_async(b, cookies=cookie(old))
            runs: list[str] = []
            b.sessions[old].notifyOnExpire(lambda: runs.append("b"))
            login = await call_async(a, "GET", "/?login=ann", cookies=cookie(old))
            new = body(login)["uid"]
            assert new != old and login.cookie_value(b"lapse_session") == new.encode()
            in_flight = await call_async(b, cookies=cookie(old))
            assert body(in_flight) == {"uid": new, "data": {"user": "ann"}}
            assert b"lapse_session" not in in_flight.set_cookies
            assert old not in b.sessions and new in b.sessions
            clock.advance(0.7)
            for site in (a, b):
                after = body(await call_async(site, cookies=cookie(old)))
                assert after["uid"] not in (old, new) and after["data"] == {}
            assert runs == []
            logout = b.sessions[new]
            logout.expire()
            await b._keeper.settle()
            for site in (a, b, a):
                await site._keeper.poll_once()
            assert runs == ["b"]
            assert [(e.uid, dict(e.data)) for e in hooked] == [(new, {"user": "ann"})]
        finally:
            await a._keeper.aclose()
            await b._keeper.aclose()

    asyncio.run(scenario())


def test_other_process_rekeys_its_copy_from_the_announcement(
    shared_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process holding a copy under the old uid moves it to the new uid when it
    reads the rotation's announcement (its next round), without any request."""

    async def scenario() -> None:
        a = Site(LoginPage(), store=shared_store)
        b = Site(LoginPage(), store=shared_store)
        # b's rounds only when the test runs them: its background loop never
        # starts. (A background round in flight, or one woken by the store's
        # news of a's login, would re-key the copy before the first assertion.)
        monkeypatch.setattr(b._keeper, "start", lambda: None)
        try:
            old = body(await call_async(a))["uid"]
            await call_async(b, cookies=cookie(old))
            copy = b.sessions[old]
            await b._keeper.poll_once()  # b reads announcements from now on
            new = body(await call_async(a, "GET", "/?login=ann", cookies=cookie(old)))["uid"]
            assert b.sessions.get(old) is copy
            await b._keeper.poll_once()
            assert b.sessions.get(new) is copy and old not in b.sessions
        finally:
            await a._keeper.aclose()
            await b._keeper.aclose()

    asyncio.run(scenario())


# -- absolute lifetime --------------------------------------------------------------


def test_session_has_no_absolute_timeout_by_default() -> None:
    """Session.absolute_timeout is None: only the idle timeout ends a session."""
    assert Session.absolute_timeout is None


def test_touched_session_ends_at_absolute_timeout(clock: Clock) -> None:
    """A session touched every few seconds still ends at creation +
    absolute_timeout: callbacks run and the hook's cause is "lifetime"."""
    hooked: list[Expiry] = []
    site = Site(Resource(), reactor=clock, on_expire=hooked.append)
    site.sessionFactory = LimitedSession
    session = site.makeSession()
    runs: list[int] = []
    session.notifyOnExpire(lambda: runs.append(1))
    for _ in range(6):
        clock.advance(4)
        session.touch()
    assert not session.expired  # t = 24
    clock.advance(0.999)
    assert not session.expired
    clock.advance(0.001)
    assert session.expired and runs == [1]
    assert [(e.uid, e.cause) for e in hooked] == [(session.uid, "lifetime")]
    assert not clock.calls


def test_idle_session_with_lifetime_ends_by_timeout(clock: Clock) -> None:
    """With an absolute_timeout, a session left idle ends at its idle deadline,
    with cause "timeout"."""
    hooked: list[Expiry] = []
    site = Site(Resource(), reactor=clock, on_expire=hooked.append)
    site.sessionFactory = LimitedSession
    session = site.makeSession()
    clock.advance(10)
    assert [(e.uid, e.cause) for e in hooked] == [(session.uid, "timeout")]


def test_lifetime_shorter_than_timeout(clock: Clock) -> None:
    """An absolute_timeout shorter than sessionTimeout ends the session first."""

    class Brief(Session):
        sessionTimeout = 100
        absolute_timeout = 3

    hooked: list[Expiry] = []
    site = Site(Resource(), reactor=clock, on_expire=hooked.append)
    site.sessionFactory = Brief
    site.makeSession()
    clock.advance(2.9)
    assert not hooked
    clock.advance(0.1)
    assert [e.cause for e in hooked] == ["lifetime"]


def test_requests_cannot_extend_lifetime_and_rotation_keeps_it(clock: Clock) -> None:
    """Through requests (which touch) and a rotation at login, the session still
    ends at creation + absolute_timeout; the next request gets a fresh session."""
    site = Site(LoginPage(), reactor=clock)
    site.sessionFactory = LimitedSession
    old = body(call(site))["uid"]
    clock.advance(8)
    uid = body(call(site, "GET", "/?login=ann", cookies=cookie(old)))["uid"]
    for _ in range(4):
        clock.advance(4)
        assert body(call(site, cookies=cookie(uid)))["uid"] == uid  # t = 24
    clock.advance(1)
    assert body(call(site, cookies=cookie(uid)))["uid"] != uid


def test_lifetime_on_shared_store_through_the_site(tmp_path: Path, request: Any) -> None:
    """On SQLite and Redis (with a fake store clock), a site's session of a class
    with absolute_timeout ends at creation + absolute_timeout however often its
    requests touch it, with cause "lifetime"."""
    server = request.getfixturevalue("redis_server")

    async def scenario(make: Any) -> None:
        clock = FakeClock()
        store = make(clock)
        site = Site(LoginPage(), store=store)
        site.sessionFactory = LimitedSession
        try:
            uid = body(await call_async(site))["uid"]
            for _ in range(6):
                clock.advance(4)
                assert body(await call_async(site, cookies=cookie(uid)))["uid"] == uid
            clock.advance(1.5)
            assert body(await call_async(site, cookies=cookie(uid)))["uid"] != uid
            claimed = await store.claim("me", 30, 10)
            assert [(e.uid, e.cause) for e in claimed] == [(uid, "lifetime")]
        finally:
            await site._keeper.aclose()

    asyncio.run(scenario(lambda c: SQLiteStore(str(tmp_path / "life.db"), clock=c)))
    prefix = f"life{time.monotonic_ns()}"
    asyncio.run(scenario(lambda c: RedisStore(server.url, clock=c, prefix=prefix)))


# -- the cap on live sessions ----------------------------------------------------------


class NewSessionPage(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> str:
        return str(request.getSession().uid)


def test_flood_of_new_sessions_leaves_the_cap(clock: Clock) -> None:
    """With max_sessions=N, N+k cookie-less requests leave N live sessions; the k
    evicted ones (the least recently used) ran their callbacks and got the hook
    with cause "evicted"."""
    hooked: list[Expiry] = []
    site = Site(NewSessionPage(), reactor=clock, max_sessions=10, on_expire=hooked.append)
    ended: list[str] = []
    uids: list[str] = []
    for _ in range(15):
        uid = call(site).body.decode()
        uids.append(uid)
        site.sessions[uid].notifyOnExpire(lambda uid=uid: ended.append(uid))
        clock.advance(0.1)
    assert len(site.sessions) == 10
    assert set(site.sessions) == set(uids[5:])
    assert ended == uids[:5]
    assert [(e.uid, e.cause) for e in hooked] == [(uid, "evicted") for uid in uids[:5]]


def test_most_recently_used_sessions_survive_the_cap(clock: Clock) -> None:
    """Eviction takes the session closest to its end: sessions touched recently
    survive a flood, untouched older ones go first."""
    site = Site(NewSessionPage(), reactor=clock, max_sessions=5)
    first = [call(site).body.decode() for _ in range(5)]
    clock.advance(1)
    for uid in first[:2]:
        assert call(site, cookies=cookie(uid)).body.decode() == uid  # touched
    clock.advance(1)
    flood = [call(site).body.decode() for _ in range(3)]
    assert set(site.sessions) == set(first[:2]) | set(flood)


def test_eviction_follows_deadlines_across_timeouts(clock: Clock) -> None:
    """With sessions of different timeouts, the one whose deadline is earliest is
    evicted, wherever it waits (queue or heap)."""
    site = Site(Resource(), reactor=clock, max_sessions=2)
    site.sessionFactory = ShortSession
    short = site.makeSession()  # ends at 5
    site.sessionFactory = Session
    long = site.makeSession()  # ends at 900
    clock.advance(1)
    site.makeSession()
    assert short.expired and not long.expired and len(site.sessions) == 2


def test_callback_that_makes_sessions_under_the_cap(clock: Clock) -> None:
    """An eviction callback that makes a session still leaves at most the cap."""
    site = Site(Resource(), reactor=clock, max_sessions=3)
    made = [site.makeSession() for _ in range(3)]
    made[0].notifyOnExpire(site.makeSession)
    site.makeSession()
    assert len(site.sessions) == 3
    assert made[0].expired and made[1].expired and not made[2].expired


def test_max_sessions_is_refused_on_shared_stores(tmp_path: Path) -> None:
    """max_sessions is a memory-store feature: a shared store refuses it at
    construction with StoreConfigError."""
    with pytest.raises(StoreConfigError, match="max_sessions"):
        Site(Resource(), store=f"sqlite:///{tmp_path}/s.db", max_sessions=10)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_max_sessions_is_refused(clock: Clock, bad: Any) -> None:
    """max_sessions is a positive int (or None)."""
    with pytest.raises(ValueError, match="max_sessions"):
        Site(Resource(), reactor=clock, max_sessions=bad)
