"""WebSockets in a Site, in process (ASGI messages, a fake Clock): the
session as in render_GET, the handshake's checks, keep-alive throttling,
closing at the session's end, and NOT_DONE_YET streams ending with it."""

from __future__ import annotations

import asyncio
from typing import Any

from _ws import FakeSocket, FakeStream, ws_scope
from conftest import call_async, make_scope

from lapse.internet.task import Clock
from lapse.web._live import bound_count
from lapse.web.resource import Resource
from lapse.web.server import NOT_DONE_YET, Session, Site
from lapse.web.websocket import WebSocket, WebSocketClosed, WebSocketResource


class Hundred(Session):
    sessionTimeout = 100.0


class Echo(WebSocketResource):
    """Echoes; records what it saw (the session, how it ended)."""

    def __init__(self) -> None:
        super().__init__()
        self.sessions: list[Session] = []
        self.closed: list[WebSocketClosed] = []
        self.late_send_ok = False

    async def websocket(self, request: Any, socket: WebSocket) -> None:
        session = request.getSession()
        self.sessions.append(session)
        try:
            while True:
                message = await socket.receive()
                await socket.send(f"echo {message}")
        except WebSocketClosed as closed:
            self.closed.append(closed)
            await socket.send("after the close")  # dropped, not an error
            self.late_send_ok = True


class Login(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> str:
        return str(request.getSession().uid)


class Ticker(Resource):
    """A NOT_DONE_YET response written to by the test."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []
        self.finish_seen: list[Any] = []

    def render_GET(self, request: Any) -> int:
        request.getSession()
        request.write(b"first;")
        request.notifyFinish().addBoth(self.finish_seen.append)
        self.requests.append(request)
        return NOT_DONE_YET


def make_site(clock: Clock) -> tuple[Site, Echo, Ticker]:
    root = Resource()
    echo, ticker = Echo(), Ticker()
    root.putChild(b"ws", echo)
    root.putChild(b"login", Login())
    root.putChild(b"tick", ticker)
    site = Site(root, reactor=clock)
    site.sessionFactory = Hundred
    return site, echo, ticker


async def login(site: Site) -> tuple[str, bytes]:
    response = await call_async(site, "GET", "/login")
    uid = response.body.decode()
    return uid, b"lapse_session=" + uid.encode()


def test_handler_gets_the_cookie_session_and_echoes() -> None:
    """The socket's request.getSession() is the session the cookie names."""

    async def scenario() -> None:
        site, echo, _ = make_site(Clock())
        uid, cookie = await login(site)
        socket = FakeSocket(ws_scope(cookie=cookie)).connect(site)
        accept = await socket.wait_for("websocket.accept")
        assert not [v for k, v in accept.get("headers", ()) if k == b"set-cookie"]
        socket.say("hi")
        assert (await socket.wait_for("websocket.send"))["text"] == "echo hi"
        assert echo.sessions[0].uid == uid
        socket.leave()
        await socket.done()
        assert echo.closed[0].code == 1000

    asyncio.run(scenario())


def test_session_made_at_the_handshake_gets_its_cookie_on_the_accept() -> None:
    async def scenario() -> None:
        site, echo, _ = make_site(Clock())
        socket = FakeSocket(ws_scope()).connect(site)
        accept = await socket.wait_for("websocket.accept")
        cookies = [v for k, v in accept["headers"] if k == b"set-cookie"]
        assert len(cookies) == 1
        assert cookies[0].startswith(b"lapse_session=" + echo.sessions[0].uid.encode())
        socket.leave()
        await socket.done()

    asyncio.run(scenario())


def test_logout_closes_the_socket_1008_and_the_waiting_handler_sees_it() -> None:
    """The session ends while the handler awaits receive: the server is sent
    close 1008 "session ended", the handler's receive raises with that code,
    and its later send is dropped; the binding is gone."""

    async def scenario() -> None:
        site, echo, _ = make_site(Clock())
        uid, cookie = await login(site)
        socket = FakeSocket(ws_scope(cookie=cookie)).connect(site)
        await socket.wait_for("websocket.accept")
        await socket.settle()
        session = site.sessions[uid]
        assert bound_count(session) == 1
        session.expire()
        close = await socket.wait_for("websocket.close")
        assert (close["code"], close["reason"]) == (1008, "session ended")
        await socket.done()
        assert (echo.closed[0].code, echo.closed[0].reason) == (1008, "session ended")
        assert echo.late_send_ok and socket.types().count("websocket.close") == 1
        assert socket.types()[-1] == "websocket.close"

    asyncio.run(scenario())


def test_timeout_closes_an_idle_socket_server_sends_do_not_touch() -> None:
    """An open socket with no client traffic does not keep its session: it
    times out and the socket closes 1008. Messages the server sends do not
    touch it either."""

    class Pusher(WebSocketResource):
        async def websocket(self, request: Any, socket: WebSocket) -> None:
            request.getSession()
            with_clock = self.clock
            for _ in range(200):
                await socket.send("news")
                with_clock.advance(1.0)
                await asyncio.sleep(0)

    async def scenario() -> None:
        clock = Clock()
        site, _, _ = make_site(clock)
        pusher = Pusher()
        pusher.clock = clock  # type: ignore[attr-defined]
        site.resource.putChild(b"push", pusher)
        uid, cookie = await login(site)
        socket = FakeSocket(ws_scope(b"/push", cookie=cookie)).connect(site)
        close = await socket.wait_for("websocket.close")
        assert close["code"] == 1008
        assert uid not in site.sessions
        assert 99 <= socket.types().count("websocket.send") <= 101  # sent until the 100 s timeout

    asyncio.run(scenario())


def test_busy_socket_touches_at_most_once_per_tenth_of_the_timeout() -> None:
    """2000 messages over 200 s (10 a second, twice the timeout): the
    session stays alive, and is touched 20 times (once per 10 s), not 2000."""

    async def scenario() -> None:
        clock = Clock()
        site, _, _ = make_site(clock)
        uid, cookie = await login(site)
        touches: list[float] = []
        original = site._touched

        def counting(session: Session) -> None:
            touches.append(clock.seconds())
            original(session)

        site._touched = counting  # type: ignore[method-assign]
        socket = FakeSocket(ws_scope(cookie=cookie)).connect(site)
        await socket.wait_for("websocket.accept")
        for n in range(2000):
            socket.say(str(n))
            await socket.wait_for("websocket.send", n + 1)
            clock.advance(0.1)
        assert uid in site.sessions and not site.sessions[uid].expired
        assert 19 <= len(touches) <= 21
        socket.leave()
        await socket.done()

    asyncio.run(scenario())


def test_rotated_session_keeps_its_socket_which_follows_the_new_uid() -> None:
    async def scenario() -> None:
        clock = Clock()
        site, _, _ = make_site(clock)
        uid, cookie = await login(site)
        socket = FakeSocket(ws_scope(cookie=cookie)).connect(site)
        await socket.wait_for("websocket.accept")
        session = site.sessions[uid]
        new_uid = session.rotate()
        assert new_uid != uid and site.sessions[new_uid] is session
        clock.advance(50)
        socket.say("still here")
        assert (await socket.wait_for("websocket.send"))["text"] == "echo still here"
        assert session.lastModified == clock.seconds()  # touched under its new uid
        clock.advance(99)  # 149 s after login: alive thanks to the touch at 50
        assert not session.expired and "websocket.close" not in socket.types()
        session.expire()
        assert (await socket.wait_for("websocket.close"))["code"] == 1008
        await socket.done()

    asyncio.run(scenario())


def test_reconnects_leave_one_expiry_callback_on_the_session() -> None:
    """A long-lived session whose sockets come and go (500 of them) keeps one
    internal expiry callback, and none are bound once they closed."""

    async def scenario() -> None:
        site, _, _ = make_site(Clock())
        uid, cookie = await login(site)
        session = site.sessions[uid]
        for _ in range(500):
            socket = FakeSocket(ws_scope(cookie=cookie)).connect(site)
            await socket.wait_for("websocket.accept")
            socket.leave()
            await socket.done()
        assert len(session.expireCallbacks) == 1
        assert bound_count(session) == 0

    asyncio.run(scenario())


def test_plain_request_to_a_websocket_resource_gets_426() -> None:
    async def scenario() -> None:
        site, _, _ = make_site(Clock())
        for method in ("GET", "POST", "HEAD"):
            response = await call_async(site, method, "/ws")
            assert response.status == 426
            assert response.header(b"upgrade") == b"websocket"

    asyncio.run(scenario())


def test_websocket_to_an_ordinary_resource_is_refused_404() -> None:
    async def scenario() -> None:
        site, _, _ = make_site(Clock())
        for path in (b"/login", b"/nowhere"):
            socket = FakeSocket(ws_scope(path)).connect(site)
            await socket.done()
            assert socket.sent[0]["type"] == "websocket.http.response.start"
            assert socket.sent[0]["status"] == 404

    asyncio.run(scenario())


def test_foreign_origin_refused_403_own_listed_and_absent_accepted() -> None:
    """Cross-site WebSocket hijacking: another site's page is refused (403)
    unless listed in allowed_origins; the site's own origin and a client
    without Origin (not a browser) are accepted."""

    async def scenario() -> None:
        site, echo, _ = make_site(Clock())
        socket = FakeSocket(ws_scope(origin=b"http://evil.example")).connect(site)
        await socket.done()
        assert socket.sent[0]["status"] == 403 and not echo.sessions
        # (https: TLS ended by a proxy in front; the Host is the same)
        own_origins = (
            b"http://127.0.0.1:8080",
            b"HTTP://127.0.0.1:8080",
            b"https://127.0.0.1:8080",
        )
        for own in (*own_origins, None):
            socket = FakeSocket(ws_scope(origin=own)).connect(site)
            await socket.wait_for("websocket.accept")
            socket.leave()
            await socket.done()
        others = (b"http://127.0.0.1:9999", b"http://127.0.0.1.evil:8080", b"null", b"junk", b"")
        for other in others:
            socket = FakeSocket(ws_scope(origin=other)).connect(site)
            await socket.done()
            assert socket.sent[0]["status"] == 403, other
        echo.allowed_origins = ("https://app.example",)
        socket = FakeSocket(ws_scope(origin=b"https://app.example")).connect(site)
        await socket.wait_for("websocket.accept")
        socket.leave()
        await socket.done()

    asyncio.run(scenario())


def test_oversized_message_closes_1009() -> None:
    async def scenario() -> None:
        site, echo, _ = make_site(Clock())
        echo.max_message_size = 1000
        socket = FakeSocket(ws_scope()).connect(site)
        await socket.wait_for("websocket.accept")
        socket.say("x" * 1000)
        await socket.wait_for("websocket.send")
        socket.say("é" * 501)  # 1002 bytes of UTF-8
        close = await socket.wait_for("websocket.close")
        assert close["code"] == 1009
        await socket.done()
        assert echo.closed[0].code == 1009

    asyncio.run(scenario())


def test_not_done_yet_stream_ends_with_its_session() -> None:
    """A NOT_DONE_YET response whose session ends: what was written is sent
    and the body ends; a later request.write() is dropped (no crash), and
    notifyFinish fails with ConnectionDone("the session ended")."""

    async def scenario() -> None:
        site, _, ticker = make_site(Clock())
        uid, cookie = await login(site)
        stream = FakeStream(make_scope("GET", b"/tick", [(b"cookie", cookie)])).connect(site)
        await stream.wait_until(lambda: bool(ticker.requests))
        request = ticker.requests[0]
        request.write(b"second;")
        await stream.wait_until(lambda: b"second;" in stream.body)
        site.sessions[uid].expire()
        await stream.wait_until(lambda: stream.ended)
        request.write(b"too late")
        assert stream.body == b"first;second;"
        assert stream.task is not None
        await stream.task
        failure = ticker.finish_seen[0]
        assert "the session ended" in str(failure.value)

    asyncio.run(scenario())


def test_origin_rules() -> None:
    """The site's own origin is the same host and port (the port a Host
    without one leaves is the Origin scheme's default); nothing else is."""
    from lapse.web.websocket import origin_allowed

    assert origin_allowed(b"https://example.com", b"example.com")
    assert origin_allowed(b"http://Example.COM:80", b"example.com")
    assert origin_allowed(b"https://example.com:443", b"example.com:443")
    assert not origin_allowed(b"https://example.com:8443", b"example.com")
    assert not origin_allowed(b"https://example.com.evil.net", b"example.com")
    assert not origin_allowed(b"https://example.com", None)
    assert not origin_allowed(b"ftp://example.com", b"example.com")
    assert not origin_allowed(b"https://example.com:99999", b"example.com")
    assert origin_allowed(b"https://other.net", b"example.com", ["*"])
    assert origin_allowed(b"https://other.net/", b"example.com", ["https://OTHER.net"])


def test_shared_store_session_made_at_handshake_and_changes_written_while_open(
    tmp_path: Any,
) -> None:
    """On SQLite: a session made at the handshake is in the store when the
    accept goes (its cookie names a stored session); what the handler writes
    to session.data is stored before its next send, while the socket is open."""

    class Counter(WebSocketResource):
        async def websocket(self, request: Any, socket: WebSocket) -> None:
            session = request.getSession()
            async for message in socket:
                session.data["last"] = message
                await socket.send("noted")

    async def scenario() -> None:
        root = Resource()
        root.putChild(b"ws", Counter())
        site = Site(root, store=f"sqlite:///{tmp_path}/s.db")
        socket = FakeSocket(ws_scope()).connect(site)
        accept = await socket.wait_for("websocket.accept")
        cookie = next(v for k, v in accept["headers"] if k == b"set-cookie")
        uid = cookie.split(b";")[0].split(b"=", 1)[1].decode()
        assert await site.store.load(uid) is not None
        for n, word in enumerate(("first", "second"), 1):
            socket.say(word)
            await socket.wait_for("websocket.send", n)
            stored = await site.store.load(uid)
            assert stored is not None and stored.decoded() == {"last": word}
        socket.leave()
        await socket.done()
        await site.keeper.aclose()

    asyncio.run(scenario())


def test_finished_streams_leave_nothing_bound_to_their_session() -> None:
    """100 NOT_DONE_YET responses under one session, each finished by the
    page: none stays bound, and the session keeps one internal callback."""

    async def scenario() -> None:
        site, _, ticker = make_site(Clock())
        uid, cookie = await login(site)
        for n in range(100):
            stream = FakeStream(make_scope("GET", b"/tick", [(b"cookie", cookie)])).connect(site)
            await stream.wait_until(lambda n=n: len(ticker.requests) > n)
            ticker.requests[n].finish()
            assert stream.task is not None
            await stream.task
            assert stream.ended and stream.body == b"first;"
        session = site.sessions[uid]
        assert bound_count(session) == 0 and len(session.expireCallbacks) == 1

    asyncio.run(scenario())
