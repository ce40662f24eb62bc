"""WebSockets and streams under SessionMiddleware, in process (Starlette
endpoints, ASGI messages): websocket.session and get_session, the cookie on
the accept, writes while open, keep-alive, closing at the session's end, a
StreamingResponse ended with its session."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from _ws import FakeSocket, FakeStream, ws_scope
from conftest import make_scope
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from lapse.asgi import SessionMiddleware, current_session, get_session
from lapse.internet.task import Clock
from lapse.web._live import bound_count


def make_app(
    clock: Clock | None = None, **options: Any
) -> tuple[SessionMiddleware, dict[str, Any]]:
    seen: dict[str, Any] = {"received": [], "disconnect": None, "generated": 0}

    async def login(request: Request) -> PlainTextResponse:
        request.session["name"] = request.query_params.get("name", "ada")
        return PlainTextResponse(get_session(request).uid)

    async def chat(websocket: WebSocket) -> None:
        seen["session"] = current_session(websocket)
        await websocket.accept()
        try:
            while True:
                text = await websocket.receive_text()
                seen["received"].append(text)
                websocket.session["last"] = text
                await websocket.send_text(f"{websocket.session.get('name')}: {text}")
        except WebSocketDisconnect as gone:
            seen["disconnect"] = gone.code

    async def feed(request: Request) -> StreamingResponse:
        get_session(request)

        async def ticks() -> AsyncIterator[bytes]:
            while True:
                seen["generated"] += 1
                yield b"tick;"
                await asyncio.sleep(0.001)

        return StreamingResponse(ticks())

    def logout_in_a_thread(request: Request) -> PlainTextResponse:
        # (a plain def endpoint: Starlette runs it in a worker thread)
        seen["thread"] = threading.get_ident()
        get_session(request).expire()
        return PlainTextResponse("bye")

    async def rotate(request: Request) -> PlainTextResponse:
        return PlainTextResponse(get_session(request).rotate())

    app = Starlette(
        routes=[
            Route("/login", login),
            Route("/rotate", rotate),
            Route("/logout-sync", logout_in_a_thread),
            Route("/feed", feed),
            WebSocketRoute("/ws", chat),
        ]
    )
    return SessionMiddleware(app, reactor=clock or Clock(), **options), seen


async def login(app: SessionMiddleware) -> tuple[str, bytes]:
    stream = FakeStream(make_scope("GET", b"/login")).connect(app)
    assert stream.task is not None
    await stream.task
    uid = stream.body.decode()
    return uid, b"lapse_session=" + uid.encode()


def test_websocket_endpoint_has_the_session_and_writes_its_changes(tmp_path: Path) -> None:
    """On a shared store (SQLite): websocket.session reads the cookie's
    session; what the endpoint writes to it is in the store while the socket
    is still open (written before its next send)."""

    async def scenario() -> None:
        app, seen = make_app(None, store=f"sqlite:///{tmp_path}/s.db")
        uid, cookie = await login(app)
        socket = FakeSocket(ws_scope(cookie=cookie)).connect(app)
        await socket.wait_for("websocket.accept")
        socket.say("hello")
        assert (await socket.wait_for("websocket.send"))["text"] == "ada: hello"
        assert seen["session"].uid == uid
        stored = await app.store.load(uid)
        assert stored is not None and stored.decoded()["last"] == "hello"
        socket.leave()
        await socket.done()
        await app.aclose()

    asyncio.run(scenario())


def test_logout_closes_the_endpoint_socket_1008() -> None:
    """The session ends: the server is sent close 1008 "session ended", and
    the endpoint's receive raises WebSocketDisconnect(1008)."""

    async def scenario() -> None:
        app, seen = make_app()
        uid, cookie = await login(app)
        socket = FakeSocket(ws_scope(cookie=cookie)).connect(app)
        await socket.wait_for("websocket.accept")
        await socket.settle()
        assert bound_count(app.sessions[uid]) == 1
        app.sessions[uid].expire()
        close = await socket.wait_for("websocket.close")
        assert (close["code"], close["reason"]) == (1008, "session ended")
        await socket.done()
        assert seen["disconnect"] == 1008

    asyncio.run(scenario())


def test_busy_endpoint_socket_touches_throttled_idle_one_times_out() -> None:
    """touch_fraction=0.5 of a 10 s timeout: 300 messages over 30 s touch the
    session 6 times and keep it; then 10 s without a message end it."""

    async def scenario() -> None:
        clock = Clock()
        app, _ = make_app(clock, timeout=10, touch_fraction=0.5)
        uid, cookie = await login(app)
        touches: list[float] = []
        original = app._touched

        def counting(session: Any) -> None:
            touches.append(clock.seconds())
            original(session)

        app._touched = counting  # type: ignore[method-assign]
        socket = FakeSocket(ws_scope(cookie=cookie)).connect(app)
        await socket.wait_for("websocket.accept")
        for n in range(300):
            socket.say(str(n))
            await socket.wait_for("websocket.send", n + 1)
            clock.advance(0.1)
        assert uid in app.sessions and 5 <= len(touches) <= 7
        clock.advance(10)
        assert (await socket.wait_for("websocket.close"))["code"] == 1008
        await socket.done()

    asyncio.run(scenario())


def test_cross_origin_handshake_refused_403() -> None:
    async def scenario() -> None:
        app, seen = make_app()
        socket = FakeSocket(ws_scope(origin=b"https://evil.example")).connect(app)
        await socket.done()
        assert socket.sent[0]["status"] == 403 and "session" not in seen
        app2, _ = make_app(allowed_origins=["https://evil.example"])
        socket = FakeSocket(ws_scope(origin=b"https://evil.example")).connect(app2)
        await socket.wait_for("websocket.accept")
        socket.leave()
        await socket.done()

    asyncio.run(scenario())


def test_streaming_response_ends_with_its_session() -> None:
    """A StreamingResponse whose session ends: the body ends, the app's
    receive sees http.disconnect (Starlette stops the generator)."""

    async def scenario() -> None:
        app, seen = make_app()
        uid, cookie = await login(app)
        stream = FakeStream(make_scope("GET", b"/feed", [(b"cookie", cookie)])).connect(app)
        await stream.wait_until(lambda: stream.body.count(b"tick;") >= 3)
        app.sessions[uid].expire()
        await stream.wait_until(lambda: stream.ended)
        assert stream.task is not None
        async with asyncio.timeout(2):
            await stream.task
        generated = seen["generated"]
        await asyncio.sleep(0.05)
        assert seen["generated"] == generated  # the generator stopped
        ends = [m for m in stream.sent if m["type"] == "http.response.body" and not m["more_body"]]
        assert len(ends) == 1 and stream.sent[-1] is ends[0]

    asyncio.run(scenario())


def test_socket_follows_its_session_rotated_by_a_request(tmp_path: Path) -> None:
    """On a shared store (SQLite): a request rotates the session while its
    socket is open; the socket stays open and its writes go to the new uid
    (not refused as a request's would be)."""

    async def scenario() -> None:
        app, _ = make_app(None, store=f"sqlite:///{tmp_path}/s.db")
        uid, cookie = await login(app)
        socket = FakeSocket(ws_scope(cookie=cookie)).connect(app)
        await socket.wait_for("websocket.accept")
        rotation = FakeStream(make_scope("GET", b"/rotate", [(b"cookie", cookie)])).connect(app)
        assert rotation.task is not None
        await rotation.task
        new_uid = rotation.body.decode()
        assert new_uid != uid
        socket.say("after the rotation")
        sent = await socket.wait_for("websocket.send")
        assert sent["text"] == "ada: after the rotation"
        assert "websocket.close" not in socket.types()
        stored = await app.store.load(new_uid)
        assert stored is not None and stored.decoded()["last"] == "after the rotation"
        assert await app.store.load(uid) is None
        socket.leave()
        await socket.done()
        await app.aclose()

    asyncio.run(scenario())


def test_logout_in_a_worker_thread_closes_the_socket_on_its_loop() -> None:
    """A plain ``def`` endpoint (run in a worker thread) logs out: the
    session's socket is still closed with 1008 (on the server's loop)."""

    async def scenario() -> None:
        app, seen = make_app()
        _uid, cookie = await login(app)
        socket = FakeSocket(ws_scope(cookie=cookie)).connect(app)
        await socket.wait_for("websocket.accept")
        logout = FakeStream(make_scope("GET", b"/logout-sync", [(b"cookie", cookie)]))
        logout.connect(app)
        assert logout.task is not None
        await logout.task
        assert logout.body == b"bye" and seen["thread"] != threading.get_ident()
        close = await socket.wait_for("websocket.close")
        assert (close["code"], close["reason"]) == (1008, "session ended")
        await socket.done()
        assert seen["disconnect"] == 1008

    asyncio.run(scenario())


def test_store_down_closes_1013_and_refuses_handshakes_503() -> None:
    """Redis stops while a socket is open: the endpoint's next change cannot
    be written, and the socket closes with 1013 (try again later); a new
    handshake presenting a session is refused with 503, not a crash."""
    from _redis_server import RedisServer

    async def scenario(server: RedisServer) -> None:
        app, _ = make_app(None, store=server.url)
        _uid, cookie = await login(app)
        socket = FakeSocket(ws_scope(cookie=cookie)).connect(app)
        await socket.wait_for("websocket.accept")
        socket.say("one")
        await socket.wait_for("websocket.send")
        server.stop()
        socket.say("two")
        close = await socket.wait_for("websocket.close", timeout=10)
        assert (close["code"], close["reason"]) == (1013, "sessions unavailable")
        await socket.done(timeout=10)
        refused = FakeSocket(ws_scope(cookie=cookie)).connect(app)
        await refused.done(timeout=10)
        assert refused.sent[0]["type"] == "websocket.http.response.start"
        assert refused.sent[0]["status"] == 503
        await app.aclose()

    with RedisServer() as server:
        asyncio.run(scenario(server))
