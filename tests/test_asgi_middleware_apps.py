"""lapse.asgi.SessionMiddleware around whole applications: lifespan (the
store opened and closed with the app), websockets, FastAPI dependencies and
add_middleware, sync endpoints in threads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from _asgi import fetch, set_cookies, starlette_app, uid_cookie, wrapped
from _helpers import aio, eventually
from fastapi import Depends, FastAPI
from fastapi import Request as FastAPIRequest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from lapse.asgi import SessionMiddleware, current_session, get_session
from lapse.internet.task import Clock
from lapse.sessions import Expiry, Session

# -- lifespan and websockets ------------------------------------------------------


async def drive_lifespan(app: Any, between: Callable[[], Coroutine[Any, Any, None]]) -> list[str]:
    """Run the lifespan protocol against ``app`` as a server would: startup,
    ``between()``, shutdown; the message types the app sent."""
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[str] = []
    answered = asyncio.Event()

    async def receive() -> dict[str, Any]:
        return await incoming.get()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])
        answered.set()

    task = asyncio.ensure_future(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    )
    await incoming.put({"type": "lifespan.startup"})
    await asyncio.wait_for(answered.wait(), 5)
    answered.clear()
    await between()
    await incoming.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(task, 5)
    return sent


def test_lifespan_passes_through_and_runs_the_keeper(tmp_path: Path) -> None:
    """The app's own startup and shutdown handlers run (the lifespan messages
    reach it); the session keeper's loop runs from startup and is closed after
    the app's shutdown."""
    order: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        order.append("app startup")
        yield
        order.append("app shutdown")

    async def scenario() -> None:
        app = SessionMiddleware(
            starlette_app(lifespan=lifespan), store=f"sqlite:///{tmp_path}/life.db"
        )
        keeper = app._keeper

        async def between() -> None:
            order.append(f"keeper running: {keeper._task is not None and not keeper._task.done()}")
            response = await fetch(app, "/put?n=1")
            assert response.status_code == 200

        sent = await drive_lifespan(app, between)
        assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        assert keeper._closing and keeper._task is None

    asyncio.run(scenario())
    assert order == ["app startup", "keeper running: True", "app shutdown"]


def test_app_without_lifespan_support_still_gets_one() -> None:
    """A bare ASGI app that refuses lifespan scopes: the middleware answers the
    lifespan itself (startup and shutdown complete), for its keeper."""

    async def bare(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http", "http only"
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def nothing() -> None:
        pass

    app = SessionMiddleware(bare, reactor=Clock())
    sent = asyncio.run(drive_lifespan(app, nothing))
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def test_without_lifespan_the_keeper_starts_on_the_first_request(tmp_path: Path) -> None:
    """A server that sends no lifespan (httpx's ASGITransport): the shared
    store's loop starts with the first request; aclose() stops it."""

    async def scenario() -> None:
        app = wrapped(store=f"sqlite:///{tmp_path}/nolife.db")
        assert app._keeper._task is None
        await fetch(app, "/plain")
        assert app._keeper._task is not None
        await app.aclose()
        assert app._keeper._task is None

    asyncio.run(scenario())


def test_websockets_get_the_session_with_its_cookie_on_the_accept() -> None:
    """A websocket scope gets a session as an HTTP request does: a cookie
    naming no session gives none; get_session() before the accept makes one,
    whose cookie goes on the accept's headers."""
    seen: dict[str, Any] = {}

    async def ws(websocket: WebSocket) -> None:
        seen["keys"] = "session" in websocket.scope and "lapse.session" in websocket.scope
        seen["before"] = current_session(websocket)
        seen["uid"] = get_session(websocket).uid
        websocket.session["name"] = "ada"
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    app = SessionMiddleware(Starlette(routes=[WebSocketRoute("/ws", ws)]), reactor=Clock())
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"cookie", b"lapse_session=" + b"a" * 24)],
        "subprotocols": [],
    }
    incoming = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert sent[1]["text"] == "hi"
    assert seen["keys"] is True and seen["before"] is None
    cookies = [v for k, v in sent[0]["headers"] if k == b"set-cookie"]
    assert len(cookies) == 1 and cookies[0].startswith(b"lapse_session=" + seen["uid"].encode())
    assert dict(app.sessions[seen["uid"]].data) == {"name": "ada"}


# -- FastAPI and add_middleware -----------------------------------------------------


def lapse_session(request: FastAPIRequest) -> Session:
    """The FastAPI dependency: the request's Session (made if need be)."""
    return get_session(request)


SessionDep = Annotated[Session, Depends(lapse_session)]


def fastapi_app(events: list[str]) -> FastAPI:
    app = FastAPI()

    @app.get("/count")
    def count(session: SessionDep) -> dict[str, Any]:
        visits = session.data.get("visits", 0) + 1
        session.data["visits"] = visits
        if visits == 1:
            uid = session.uid
            session.notifyOnExpire(lambda: events.append(uid))
        return {"visits": visits}

    @app.post("/logout")
    def logout(request: FastAPIRequest) -> dict[str, bool]:
        session = current_session(request)
        if session is not None:
            session.expire()
        return {"ok": True}

    return app


@aio
async def test_fastapi_dependency_and_add_middleware() -> None:
    """FastAPI with app.add_middleware(SessionMiddleware, ...) and a Depends
    giving the Session: a visit counter persists, logout deletes the cookie
    and runs notifyOnExpire."""
    events: list[str] = []
    app = fastapi_app(events)
    app.add_middleware(SessionMiddleware, reactor=Clock(), timeout=60)
    first = await fetch(app, "/count")
    assert first.json() == {"visits": 1}
    uid = uid_cookie(first)
    cookie = f"lapse_session={uid}"
    assert (await fetch(app, "/count", cookie=cookie)).json() == {"visits": 2}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        logout = await client.post("/logout", headers={"cookie": cookie})
    assert logout.json() == {"ok": True}
    assert logout.headers["set-cookie"].startswith("lapse_session=; ")
    assert events == [uid]
    assert (await fetch(app, "/count", cookie=cookie)).json() == {"visits": 1}


class ThreadClock(Clock):
    """A Clock that records which thread asked for each timer."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        self.threads.add(threading.get_ident())
        return super().callLater(delay, callable, *args, **kw)


def sync_fastapi_app() -> FastAPI:
    """Plain ``def`` endpoints: FastAPI runs them in a thread pool."""
    app = FastAPI()

    @app.get("/make")
    def make(request: FastAPIRequest) -> dict[str, str]:
        session = get_session(request)
        session.data["thread"] = "worker"
        return {"uid": session.uid}

    @app.get("/end")
    def end(request: FastAPIRequest) -> dict[str, bool]:
        session = current_session(request)
        if session is not None:
            session.expire()
        return {"ended": session is not None}

    return app


@aio
async def test_sessions_made_in_worker_threads_are_kept_by_the_loop() -> None:
    """A sync endpoint (run in a worker thread) that makes a session: the
    expiry timer is armed from the event loop's thread, and the session
    expires on time."""
    clock = ThreadClock()
    app = SessionMiddleware(sync_fastapi_app(), reactor=clock, timeout=5)
    uid = (await fetch(app, "/make")).json()["uid"]
    assert clock.threads == {threading.get_ident()}
    clock.advance(5)
    assert uid not in app.sessions


def test_logout_in_a_worker_thread_on_a_shared_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On SQLite, a sync endpoint's session.expire() is written through the
    event loop (no "no running event loop" warning); the hook runs once."""
    hooked: list[Expiry] = []

    async def scenario() -> None:
        app = SessionMiddleware(
            sync_fastapi_app(), store=f"sqlite:///{tmp_path}/t.db", on_expire=hooked.append
        )
        try:
            uid = (await fetch(app, "/make")).json()["uid"]
            ended = await fetch(app, "/end", cookie=f"lapse_session={uid}")
            assert ended.json() == {"ended": True}
            assert set_cookies(ended)[0].startswith("lapse_session=; ")
            await eventually(lambda: bool(hooked))
            assert [(e.uid, e.cause, dict(e.data)) for e in hooked] == [
                (uid, "expired", {"thread": "worker"})
            ]
        finally:
            await app.aclose()

    with caplog.at_level(logging.WARNING, logger="lapse"):
        asyncio.run(scenario())
    assert not [r for r in caplog.records if "event loop" in r.getMessage()]


@aio
async def test_absolute_timeout_ends_a_session_however_often_it_is_used() -> None:
    """absolute_timeout=10: a session visited every 2 s still ends 10 s after
    it was made, its callbacks run."""
    clock = Clock()
    events: list[Any] = []
    app = wrapped(events, reactor=clock, timeout=5, absolute_timeout=10)
    uid = (await fetch(app, "/watch")).json()["uid"]
    cookie = f"lapse_session={uid}"
    for _ in range(4):
        clock.advance(2)
        assert (await fetch(app, "/put?n=1", cookie=cookie)).json()["uid"] == uid
    clock.advance(2)
    assert events == [("expired", uid)]
