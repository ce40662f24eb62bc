"""One HTTP session plumbing: a Site and the middleware answer alike.

Every test runs the same page logic behind both entry points (a ``Site``
over a leaf resource, and ``SessionMiddleware`` around a plain ASGI app, and
where lifespan is concerned around a Starlette app too), driven in process
as an ASGI server would, and pins what they must share: the 503 when the
store is down, the 409 when the session changed under the request, the
session cookie's attributes on plain, secure and proxied requests, the
deletion at logout, and the lifespan failure for a store that can never
work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from _asgi import lifespan_startup
from _servers import free_port
from conftest import Response, call_async
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from lapse.asgi import SessionMiddleware, get_session
from lapse.internet.task import Clock
from lapse.sessions import Session, StoreUnavailable
from lapse.sessions.stores import store_from_url
from lapse.web.resource import Resource
from lapse.web.server import Site

ENTRY_POINTS = ["site", "middleware"]
UNIX_EPOCH = formatdate(0, usegmt=True)


class Gate:
    """Holds a request that asks to pause until the test lets it go."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.go = asyncio.Event()

    async def pause(self) -> None:
        self.arrived.set()
        await self.go.wait()


async def act(path: str, query: str, session_of: Callable[[], Session], gate: Gate) -> str:
    """The page, the same behind both entry points: ``/plain`` uses no
    session; ``/mine`` gets it; ``/set?k=v[&pause=1]`` writes to it (pausing
    at the gate if asked); ``/login`` rotates it; ``/logout`` ends it."""
    if path == "/plain":
        return "plain"
    session = session_of()
    args = {key: values[0] for key, values in parse_qs(query).items()}
    if path == "/set":
        session.data[args["k"]] = args.get("v", "1")
        if "pause" in args:
            await gate.pause()
    elif path == "/login":
        session.rotate()
    elif path == "/logout":
        session.expire()
    return session.uid


class Page(Resource):
    isLeaf = True

    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.gate = gate

    def render_GET(self, request: Any) -> Awaitable[bytes]:
        async def render() -> bytes:
            query = request.uri.partition(b"?")[2].decode()
            text = await act(request.path.decode(), query, request.getSession, self.gate)
            return text.encode()

        return render()


def plain_app(gate: Gate) -> Callable[..., Awaitable[None]]:
    """A plain ASGI app (no lifespan: it raises on one) running :func:`act`."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise RuntimeError(f"no {scope['type']} here")
        text = await act(
            scope["path"], scope["query_string"].decode(), lambda: get_session(scope), gate
        )
        body = text.encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


def starlette_app() -> Starlette:
    async def plain(request: Any) -> PlainTextResponse:
        return PlainTextResponse("plain")

    return Starlette(routes=[Route("/plain", plain)])


Host = Site | SessionMiddleware


def entry(kind: str, gate: Gate | None = None, **options: Any) -> Host:
    """The entry point ``kind`` with ``options`` (store, trust_proxy_headers...)."""
    gate = gate or Gate()
    if kind == "site":
        return Site(Page(gate), **options)
    if kind == "middleware":
        return SessionMiddleware(plain_app(gate), **options)
    assert kind == "starlette"
    return SessionMiddleware(starlette_app(), **options)


async def get(host: Host, path: str, uid: str | None = None, **kw: Any) -> Response:
    cookies = None if uid is None else {kw.pop("cookie_name", b"lapse_session"): uid.encode()}
    return await call_async(host, "GET", path, cookies=cookies, **kw)  # type: ignore[arg-type]


def answer(response: Response) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """What the client sees of a response, headers in a fixed order."""
    return response.status, sorted(response.headers), response.body


def expected(status: int, body: bytes, *headers: tuple[bytes, bytes]) -> Any:
    return (
        status,
        sorted(
            [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"vary", b"Cookie"),
                *headers,
            ]
        ),
        body,
    )


UNAVAILABLE_503 = expected(
    503, b"Sessions are unavailable for a moment; try again.\n", (b"retry-after", b"1")
)
CONFLICT_409 = expected(
    409, b"Your session changed while this request ran; nothing was saved. Try again.\n"
)


def closed_redis() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


# -- the answers that replace a response ----------------------------------------------


@pytest.mark.parametrize("kind", ENTRY_POINTS)
def test_store_down_answers_the_same_plain_text_503_from_both(kind: str) -> None:
    """With the store unreachable, a request whose page needs its session
    (presented by cookie, or new) gets the one 503: plain text, Retry-After: 1,
    Vary: Cookie, no Set-Cookie, the same bytes from a Site and the
    middleware; a page that needs no session is served."""

    async def scenario() -> None:
        host = entry(kind, store=closed_redis())
        try:
            assert answer(await get(host, "/mine", "a" * 24)) == UNAVAILABLE_503
            assert answer(await get(host, "/set?k=v")) == UNAVAILABLE_503
            served = await get(host, "/plain", "a" * 24)
            assert (served.status, served.body) == (200, b"plain")
        finally:
            await host._keeper.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ENTRY_POINTS)
def test_write_racing_a_logout_answers_the_same_plain_text_409_from_both(
    kind: str, tmp_path: Path
) -> None:
    """A request writing to a session that another request logged out while
    it ran gets the one 409 (plain text, Vary: Cookie, no Set-Cookie), the
    same bytes from a Site and the middleware, on a shared store."""
    gate = Gate()

    async def scenario() -> None:
        host = entry(kind, gate, store=f"sqlite:///{tmp_path}/s.db")
        try:
            uid = (await get(host, "/set?k=a")).body.decode()
            slow = asyncio.ensure_future(get(host, "/set?k=b&pause=1", uid))
            await gate.arrived.wait()
            assert (await get(host, "/logout", uid)).status == 200
            gate.go.set()
            assert answer(await slow) == CONFLICT_409
        finally:
            await host._keeper.aclose()

    asyncio.run(scenario())


# -- the session cookie ---------------------------------------------------------------

PLAIN_FLAGS = b"; Path=/; HttpOnly; SameSite=Lax"
SECURE_FLAGS = b"; Path=/; Secure; HttpOnly; SameSite=Lax"
FORWARDED = [(b"x-forwarded-proto", b"https"), (b"x-forwarded-for", b"203.0.113.9")]

# (how the request comes, the host's trust_proxy_headers, the cookie it gets)
REQUESTS = {
    "plain": ({}, False, b"lapse_session", PLAIN_FLAGS),
    "tls": ({"scheme": "https"}, False, b"__Host-lapse_session", SECURE_FLAGS),
    "trusted proxy": ({"headers": FORWARDED}, True, b"__Host-lapse_session", SECURE_FLAGS),
    "untrusted proxy": ({"headers": FORWARDED}, False, b"lapse_session", PLAIN_FLAGS),
    "listed proxy": (
        {"headers": FORWARDED, "client": ("10.1.2.3", 4000)},
        "10.0.0.0/8",
        b"__Host-lapse_session",
        SECURE_FLAGS,
    ),
    "unlisted peer": ({"headers": FORWARDED}, "10.0.0.0/8", b"lapse_session", PLAIN_FLAGS),
}


@pytest.mark.parametrize("how", list(REQUESTS))
@pytest.mark.parametrize("kind", ENTRY_POINTS)
def test_session_cookie_is_set_only_when_made_or_rotated_with_the_same_attributes(
    kind: str, how: str
) -> None:
    """A new session's cookie, and a rotated one's, carry Path=/, HttpOnly,
    SameSite=Lax, and on a secure request (TLS, or a trusted proxy's
    X-Forwarded-Proto) the __Host- name and Secure; the same header from a
    host that trusts no proxy, or from a peer not among the trusted proxies,
    changes nothing; a request presenting its session gets no
    Set-Cookie; every one varies on Cookie. The same from both."""
    request, trust, name, flags = REQUESTS[how]

    async def scenario() -> None:
        host = entry(kind, reactor=Clock(), trust_proxy_headers=trust)
        made = await get(host, "/mine", **request)
        uid = made.body.decode()
        assert made.set_cookies == {name: name + b"=" + uid.encode() + flags}
        again = await get(host, "/mine", uid, cookie_name=name, **request)
        assert (again.body.decode(), again.set_cookies) == (uid, {})
        rotated = await get(host, "/login", uid, cookie_name=name, **request)
        new = rotated.body.decode()
        assert new != uid
        assert rotated.set_cookies == {name: name + b"=" + new.encode() + flags}
        for response in (made, again, rotated):
            assert response.header(b"vary") == b"Cookie"

    asyncio.run(scenario())


# How a hostile or odd Cookie header is read: True if it names the session {uid}.
COOKIE_HEADERS: dict[str, tuple[list[bytes], bool]] = {
    "among others, in a second Cookie header": ([b"a=1", b"b=2; lapse_session={uid}"], True),
    "quoted, spaced": ([b' lapse_session = "{uid}" ; a=1'], True),
    "twice: the first wins": ([b"lapse_session={uid}; lapse_session=bogus"], True),
    "twice, the first bogus": ([b"lapse_session=bogus; lapse_session={uid}"], False),
    "a longer name ending in it": ([b"xlapse_session={uid}"], False),
    "the secure name on a plain request": ([b"__Host-lapse_session={uid}"], False),
    "oversized": ([b"lapse_session={uid}" + b"x" * 300], False),
    "empty": ([b"lapse_session="], False),
}


@pytest.mark.parametrize("case", list(COOKIE_HEADERS))
@pytest.mark.parametrize("kind", ENTRY_POINTS)
def test_cookie_headers_are_read_the_same_way(kind: str, case: str) -> None:
    """Both find the session cookie alike in what a client may send: several
    Cookie headers, quotes and spaces, the name twice (the first wins), a
    look-alike name, the secure name on a plain request, an oversized or
    empty value; what names no live session gets a new one (and its cookie),
    never an error."""
    values, names_it = COOKIE_HEADERS[case]

    async def scenario() -> None:
        host = entry(kind, reactor=Clock())
        uid = (await get(host, "/mine")).body.decode()
        headers = [(b"cookie", value.replace(b"{uid}", uid.encode())) for value in values]
        response = await get(host, "/mine", headers=headers)
        assert response.status == 200
        if names_it:
            assert (response.body.decode(), response.set_cookies) == (uid, {})
        else:
            new = response.body.decode()
            assert new != uid and response.cookie_value(b"lapse_session") == new.encode()

    asyncio.run(scenario())


@pytest.mark.parametrize("secure", [False, True])
@pytest.mark.parametrize("kind", ENTRY_POINTS)
def test_logout_deletes_the_cookie_the_same_way(kind: str, secure: bool) -> None:
    """Ending the session (a logout) answers with the one deletion of its
    cookie: empty, Max-Age=0, expired at the epoch, with the cookie's flags."""
    name = b"__Host-lapse_session" if secure else b"lapse_session"
    scheme = "https" if secure else "http"

    async def scenario() -> None:
        host = entry(kind, reactor=Clock())
        uid = (await get(host, "/mine", scheme=scheme)).body.decode()
        out = await get(host, "/logout", uid, cookie_name=name, scheme=scheme)
        deletion = (
            name
            + b"=; Path=/; Max-Age=0; Expires="
            + UNIX_EPOCH.encode()
            + b"; HttpOnly; SameSite=Lax"
            + (b"; Secure" if secure else b"")
        )
        assert out.set_cookies == {name: deletion}
        assert uid not in host.sessions

    asyncio.run(scenario())


# -- lifespan -------------------------------------------------------------------------

LIFESPAN_ENTRY_POINTS = ["site", "middleware", "starlette"]


@pytest.mark.parametrize("kind", LIFESPAN_ENTRY_POINTS)
def test_lifespan_fails_the_same_for_a_store_that_can_never_work(kind: str, tmp_path: Path) -> None:
    """A store that can never work (a SQLite file in a missing directory)
    fails the lifespan startup with the one message, whether a Site serves
    lifespan, the middleware serves it for an app without lifespan, or it
    passes through to a Starlette app (which never sees the startup)."""
    url = f"sqlite:///{tmp_path}/missing/s.db"
    with pytest.raises(StoreUnavailable) as why:
        asyncio.run(store_from_url(url).open())
    assert why.value.permanent
    sent = asyncio.run(lifespan_startup(entry(kind, store=url)))
    failed = {
        "type": "lifespan.startup.failed",
        "message": f"the session store cannot work: {why.value}",
    }
    assert sent == [failed]


@pytest.mark.parametrize("kind", LIFESPAN_ENTRY_POINTS)
def test_lifespan_starts_and_stops_the_sessions_the_same_way(kind: str, tmp_path: Path) -> None:
    """A store that works: startup completes (the store opened), shutdown
    completes (the store closed), the same messages from each entry point."""
    host = entry(kind, store=f"sqlite:///{tmp_path}/s.db")
    sent = asyncio.run(lifespan_startup(host))
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    assert (tmp_path / "s.db").exists()
