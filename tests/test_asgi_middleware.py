"""lapse.asgi.SessionMiddleware on real Starlette and FastAPI apps, driven in
process through httpx.ASGITransport: lazy sessions, the cookie policy, data,
logout, expiry on a fake clock, the three stores, outages (lifespan, websockets
and FastAPI: test_asgi_middleware_apps.py)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from _asgi import fetch, set_cookies, starlette_app, uid_cookie, wrapped
from _helpers import aio, eventually
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from lapse.asgi import SessionMapping, SessionMiddleware, get_session
from lapse.internet.task import Clock
from lapse.sessions import Expiry, Session
from lapse.sessions.stores.memory import MemoryStore

# -- sessions only when used ------------------------------------------------------


@aio
async def test_request_that_never_asks_gets_no_session() -> None:
    """A request that neither reads nor writes the session makes none: no
    Set-Cookie, nothing in the store."""
    app = wrapped(reactor=Clock())
    response = await fetch(app, "/plain")
    assert response.status_code == 200
    assert response.text == "plain"
    assert set_cookies(response) == []
    assert app.sessions == {}


@aio
async def test_reading_a_missing_session_reads_empty_and_makes_none() -> None:
    """request.session without a session is an empty mapping: reading it makes
    no session and sends no cookie."""
    app = wrapped(reactor=Clock())
    response = await fetch(app, "/peek")
    assert response.json() == {"data": {}, "has": False}
    assert set_cookies(response) == []
    assert app.sessions == {}


@aio
async def test_writing_request_session_makes_a_session_with_the_cookie_policy() -> None:
    """Writing request.session makes the session: Set-Cookie lapse_session=<uid>
    with Path=/, HttpOnly, SameSite=Lax, and no Secure on plain http."""
    app = wrapped(reactor=Clock())
    response = await fetch(app, "/put?n=1")
    (cookie,) = set_cookies(response)
    uid = response.json()["uid"]
    assert cookie == f"lapse_session={uid}; Path=/; HttpOnly; SameSite=Lax"
    assert len(uid) == 24
    assert set(app.sessions) == {uid}
    assert isinstance(app.sessions[uid], Session)


@aio
async def test_https_request_gets_host_prefixed_secure_cookie() -> None:
    """On https the session cookie is __Host-lapse_session with Secure, and
    only that cookie names the session of an https request."""
    app = wrapped(reactor=Clock())
    response = await fetch(app, "/put?n=1", https=True)
    uid = response.json()["uid"]
    (cookie,) = set_cookies(response)
    assert cookie == f"__Host-lapse_session={uid}; Path=/; Secure; HttpOnly; SameSite=Lax"
    again = await fetch(app, "/peek", https=True, cookie=f"__Host-lapse_session={uid}")
    assert again.json()["data"] == {"n": 1}
    plain_name = await fetch(app, "/peek", https=True, cookie=f"lapse_session={uid}")
    assert plain_name.json()["data"] == {}


@aio
async def test_forwarded_proto_is_believed_only_when_trusted() -> None:
    """X-Forwarded-Proto: https makes the request secure only with
    trust_proxy_headers=True."""
    proxied = {"x-forwarded-proto": "https"}
    untrusting = wrapped(reactor=Clock())
    response = await fetch(untrusting, "/put?n=1", headers=proxied)
    assert uid_cookie(response) == response.json()["uid"]
    trusting = wrapped(reactor=Clock(), trust_proxy_headers=True)
    response = await fetch(trusting, "/put?n=1", headers=proxied)
    assert uid_cookie(response, "__Host-lapse_session") == response.json()["uid"]
    assert "; Secure" in set_cookies(response)[0]


@aio
async def test_cookie_name_is_configurable() -> None:
    """cookie_name= names the cookie (and __Host-<name> on https)."""
    app = wrapped(reactor=Clock(), cookie_name="sid")
    response = await fetch(app, "/put?n=1")
    assert uid_cookie(response, "sid") == response.json()["uid"]
    assert app.secure_cookie_name == "__Host-sid"
    with pytest.raises(ValueError):
        wrapped(cookie_name="bad name")


# -- data, unknown cookies, logout --------------------------------------------------


@aio
async def test_data_persists_across_requests_without_resetting_the_cookie() -> None:
    """Keys written in one request are there in the next; deleted keys are gone;
    a request with the live session's cookie sets no new cookie."""
    app = wrapped(reactor=Clock())
    uid = uid_cookie(await fetch(app, "/put?n=1&who=%22ann%22"))
    cookie = f"lapse_session={uid}"
    second = await fetch(app, "/put?n=2", cookie=cookie)
    assert second.json() == {"uid": uid, "data": {"n": 2, "who": "ann"}}
    assert set_cookies(second) == []
    await fetch(app, "/drop?key=who", cookie=cookie)
    third = await fetch(app, "/peek", cookie=cookie)
    assert third.json() == {"data": {"n": 2}, "has": True}
    assert set_cookies(third) == []


@aio
async def test_unknown_cookie_is_never_adopted() -> None:
    """A cookie naming no live session is ignored: reading sees nothing; writing
    makes a fresh session with a fresh uid; a malformed cookie is the same."""
    app = wrapped(reactor=Clock())
    stranger = "lapse_session=" + "f" * 24
    read = await fetch(app, "/peek", cookie=stranger)
    assert read.json()["data"] == {}
    assert set_cookies(read) == []
    written = await fetch(app, "/put?n=1", cookie=stranger)
    assert written.json()["uid"] != "f" * 24
    assert uid_cookie(written) == written.json()["uid"]
    for junk in ('lapse_session=""', "lapse_session=" + "x" * 300, "lapse_session"):
        response = await fetch(app, "/put?n=1", cookie=junk)
        assert uid_cookie(response) == response.json()["uid"]


@aio
async def test_logout_deletes_the_cookie_and_runs_callbacks() -> None:
    """session.expire() ends the session: its notifyOnExpire callbacks run, the
    response deletes the cookie (Max-Age=0), and the old cookie is then unknown."""
    events: list[Any] = []
    app = wrapped(events, reactor=Clock())
    uid = (await fetch(app, "/watch")).json()["uid"]
    cookie = f"lapse_session={uid}"
    response = await fetch(app, "/logout", cookie=cookie)
    assert events == [("expired", uid)]
    (deletion,) = set_cookies(response)
    assert deletion.startswith("lapse_session=; Path=/; Max-Age=0; Expires=")
    assert "HttpOnly" in deletion
    assert app.sessions == {}
    assert (await fetch(app, "/peek", cookie=cookie)).json()["data"] == {}


@aio
async def test_clearing_request_session_is_a_logout() -> None:
    """request.session.clear() (Starlette's logout idiom) expires the session:
    callbacks run and the cookie is deleted; without a session it does nothing."""
    events: list[Any] = []
    app = wrapped(events, reactor=Clock())
    uid = (await fetch(app, "/watch")).json()["uid"]
    response = await fetch(app, "/clear", cookie=f"lapse_session={uid}")
    assert events == [("expired", uid)]
    assert set_cookies(response)[0].startswith("lapse_session=; ")
    nothing = await fetch(app, "/clear")
    assert set_cookies(nothing) == []


@aio
async def test_session_mapping_is_a_mutable_mapping_over_session_data() -> None:
    """scope["session"] is a SessionMapping; setdefault/update/pop behave as a
    dict's, and JSON-incompatible values are refused naming the key."""
    seen: dict[str, Any] = {}

    async def endpoint(request: Request) -> Response:
        mapping = request.session
        seen["type"] = type(mapping)
        seen["empty_get"] = mapping.get("a", "default")
        mapping.setdefault("a", 1)
        mapping.update({"b": [1, 2]})
        seen["popped"] = mapping.pop("a")
        with pytest.raises(TypeError, match="'bad'"):
            mapping["bad"] = object()
        seen["data"] = dict(get_session(request).data)
        return PlainTextResponse("ok")

    app = SessionMiddleware(Starlette(routes=[Route("/", endpoint)]), reactor=Clock())
    await fetch(app, "/")
    assert seen == {
        "type": SessionMapping,
        "empty_get": "default",
        "popped": 1,
        "data": {"b": [1, 2]},
    }


@aio
async def test_get_session_without_the_middleware_is_an_error() -> None:
    """get_session on a request that did not come through the middleware raises
    RuntimeError naming SessionMiddleware."""
    errors: list[str] = []

    async def endpoint(request: Request) -> Response:
        with pytest.raises(RuntimeError, match="SessionMiddleware") as info:
            get_session(request)
        errors.append(str(info.value))
        return PlainTextResponse("ok")

    await fetch(Starlette(routes=[Route("/", endpoint)]), "/")
    assert errors


# -- time: expiry on a fake clock ----------------------------------------------------


@aio
async def test_session_expires_after_the_timeout_with_callbacks_and_hook() -> None:
    """timeout=5: visits keep the session alive (sliding expiry, even visits that
    do not use it); 5 s after the last one it ends: notifyOnExpire callbacks
    run, then the durable hook with the final data and cause "timeout"."""
    clock = Clock()
    events: list[Any] = []
    app = wrapped(events, reactor=clock, timeout=5, on_expire=events.append)
    uid = (await fetch(app, "/watch")).json()["uid"]
    cookie = f"lapse_session={uid}"
    await fetch(app, "/put?cart=[1,2]", cookie=cookie)
    for _ in range(3):
        clock.advance(4)
        await fetch(app, "/plain", cookie=cookie)
    clock.advance(4.9)
    assert events == []
    clock.advance(0.2)
    callback, expiry = events
    assert callback == ("expired", uid)
    assert isinstance(expiry, Expiry)
    assert (expiry.uid, dict(expiry.data), expiry.cause) == (uid, {"cart": [1, 2]}, "timeout")
    assert not clock.calls
    after = await fetch(app, "/peek", cookie=cookie)
    assert after.json()["data"] == {}


@aio
async def test_session_factory_sets_the_timeout() -> None:
    """session_factory= a Session subclass makes those sessions (its
    sessionTimeout); timeout= overrides it."""

    class ShortSession(Session):
        sessionTimeout = 7

    clock = Clock()
    app = wrapped(reactor=clock, session_factory=ShortSession)
    uid = (await fetch(app, "/watch")).json()["uid"]
    session = app.sessions[uid]
    assert isinstance(session, ShortSession)
    assert session.sessionTimeout == 7
    clock.advance(7)
    assert session.expired
    other = wrapped(reactor=clock, session_factory=ShortSession, timeout=2)
    uid = (await fetch(other, "/watch")).json()["uid"]
    assert isinstance(other.sessions[uid], ShortSession)
    assert other.sessions[uid].sessionTimeout == 2
    with pytest.raises(ValueError):
        wrapped(timeout=0)


@aio
async def test_changes_made_after_the_response_are_saved() -> None:
    """A background task (run after the response is sent) that writes
    session.data: the change is saved, and the next request sees it."""
    app = wrapped(reactor=Clock())
    uid = (await fetch(app, "/later")).json()["uid"]
    assert (await fetch(app, "/peek", cookie=f"lapse_session={uid}")).json()["data"] == {
        "later": True
    }


@pytest.mark.skipif(not hasattr(Session, "rotate"), reason="Session.rotate() not there yet")
@aio
async def test_rotation_resets_the_cookie_to_the_new_uid() -> None:
    """session.rotate() during a request: the response sets the cookie to the
    new uid, which then names the same session with its data."""
    app = wrapped(reactor=Clock())
    uid = uid_cookie(await fetch(app, "/put?n=1"))
    response = await fetch(app, "/rotate", cookie=f"lapse_session={uid}")
    body = response.json()
    assert body["old"] == uid
    assert body["new"] != uid
    assert uid_cookie(response) == body["new"]
    seen = await fetch(app, "/peek", cookie=f"lapse_session={body['new']}")
    assert seen.json()["data"] == {"n": 1}


# -- stores -------------------------------------------------------------------------


def test_sessions_on_each_store(any_store: str) -> None:
    """On memory, SQLite and Redis: data persists across requests, a second
    middleware on the same shared store sees it, an unknown cookie is not
    adopted, and a logout runs the callbacks, deletes the cookie and reaches
    the durable hook once with cause "expired"."""

    async def scenario() -> None:
        events: list[Any] = []
        hooked: list[Expiry] = []
        app = wrapped(events, store=any_store, on_expire=hooked.append)
        # Both claim ended sessions from the shared store, so both carry the
        # hook, as every process of one deployment does; it must run once.
        other = wrapped(store=any_store, on_expire=hooked.append) if app.store.shared else app
        try:
            uid = uid_cookie(await fetch(app, "/put?n=1"))
            cookie = f"lapse_session={uid}"
            await fetch(app, "/watch", cookie=cookie)
            seen = await fetch(other, "/put?m=2", cookie=cookie)
            assert seen.json() == {"uid": uid, "data": {"n": 1, "m": 2}}
            assert set_cookies(seen) == []
            assert (await fetch(app, "/peek", cookie=cookie)).json()["data"] == {"n": 1, "m": 2}
            stranger = await fetch(app, "/put?x=1", cookie="lapse_session=" + "z" * 24)
            assert stranger.json()["uid"] != "z" * 24
            logout = await fetch(app, "/logout", cookie=cookie)
            assert set_cookies(logout)[0].startswith("lapse_session=; ")
            assert events == [("expired", uid)]
            await eventually(lambda: any(e.uid == uid for e in hooked))
            assert [(e.cause, dict(e.data)) for e in hooked if e.uid == uid] == [
                ("expired", {"n": 1, "m": 2})
            ]
            assert (await fetch(other, "/peek", cookie=cookie)).json()["data"] == {}
        finally:
            await app.aclose()
            if other is not app:
                await other.aclose()

    asyncio.run(scenario())


def test_store_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without store=, LAPSE_SESSION_STORE chooses the store; without either,
    sessions live in memory."""
    monkeypatch.delenv("LAPSE_SESSION_STORE", raising=False)
    assert isinstance(wrapped().store, MemoryStore)
    monkeypatch.setenv("LAPSE_SESSION_STORE", f"sqlite:///{tmp_path}/env.db")
    assert wrapped().store.url.endswith("/env.db")


def test_late_change_is_saved_on_a_shared_store(tmp_path: Path) -> None:
    """On SQLite, a change made by a background task after the response was
    sent is written when the app returns: the next request sees it."""

    async def scenario() -> None:
        app = wrapped(store=f"sqlite:///{tmp_path}/late.db")
        try:
            uid = (await fetch(app, "/later")).json()["uid"]
            seen = await fetch(app, "/peek", cookie=f"lapse_session={uid}")
            assert seen.json()["data"] == {"later": True}
        finally:
            await app.aclose()

    asyncio.run(scenario())


def unreachable_redis() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def test_unreachable_store_answers_503_with_retry_after() -> None:
    """With the store unreachable: a request with a session cookie whose app
    reads its session gets 503 with Retry-After: 1 within 1 s (the app's
    error for the failed read is replaced); one whose app never asks for it
    is served as usual, cookie or not; a new visitor whose request makes a
    session gets the 503 too (the write failed), not the app's 200."""
    calls: list[str] = []

    async def scenario() -> None:
        app = wrapped(store=unreachable_redis())

        async def counted(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                calls.append(scope["path"])
            await inner(scope, receive, send)

        inner, app.app = app.app, counted
        try:
            started = time.monotonic()
            touched = await fetch(app, "/peek", cookie="lapse_session=" + "a" * 24)
            assert time.monotonic() - started < 1.0
            assert touched.status_code == 503
            assert touched.headers["retry-after"] == "1"
            assert "unavailable" in touched.text
            assert set_cookies(touched) == []
            assert calls == ["/peek"]
            unused = await fetch(app, "/plain", cookie="lapse_session=" + "a" * 24)
            assert (unused.status_code, unused.text) == (200, "plain")
            assert set_cookies(unused) == []
            created = await fetch(app, "/put?n=1")
            assert created.status_code == 503
            assert created.headers["retry-after"] == "1"
            assert set_cookies(created) == []
            assert (await fetch(app, "/plain")).status_code == 200
        finally:
            await app.aclose()

    asyncio.run(scenario())


def test_outage_503_under_add_middleware() -> None:
    """Installed with ``app.add_middleware`` (inside Starlette's error
    middleware), a route that reads its session during an outage gets the
    503, not Starlette's 500."""

    async def scenario() -> None:
        app = starlette_app()
        app.add_middleware(SessionMiddleware, store=unreachable_redis())
        answer = await fetch(app, "/peek", cookie="lapse_session=" + "a" * 24)
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "1"
        plain = await fetch(app, "/plain", cookie="lapse_session=" + "a" * 24)
        assert plain.status_code == 200

    asyncio.run(scenario())


@aio
async def test_a_login_superseded_before_its_answer_gets_the_cookie_deleted() -> None:
    """With one session per user, a login whose session a second login
    supersedes while the first is still being answered is answered 200 with
    the cookie's deletion, not a cookie naming an ended session; the second
    login gets its own cookie."""
    bound = asyncio.Event()
    superseded = asyncio.Event()

    async def login(request: Request) -> Response:
        session = get_session(request)
        await session.set_principal("alice")
        if request.query_params.get("first"):
            bound.set()
            await superseded.wait()
        return PlainTextResponse(session.uid)

    app = SessionMiddleware(
        Starlette(routes=[Route("/login", login)]),
        reactor=Clock(),
        max_sessions_per_principal=1,
    )
    first = asyncio.ensure_future(fetch(app, "/login?first=1"))
    await bound.wait()
    second = await fetch(app, "/login")
    superseded.set()
    answer = await first
    assert answer.status_code == 200
    (deletion,) = set_cookies(answer)
    assert deletion.startswith("lapse_session=; Path=/; Max-Age=0;")
    assert uid_cookie(second) == second.text
    assert set(app.sessions) == {second.text}
