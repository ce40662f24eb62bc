"""A Starlette app that uses the session in each way an app would, wrapped in
lapse's SessionMiddleware, and the calls tests make to it in process through
httpx.ASGITransport."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from lapse.asgi import SessionMiddleware, current_session, get_session

__all__ = ["fetch", "set_cookies", "starlette_app", "uid_cookie", "wrapped"]


def starlette_app(events: list[Any] | None = None, **starlette: Any) -> Starlette:
    """Routes that use the session in each way an app would."""
    seen = events if events is not None else []

    async def plain(request: Request) -> Response:
        return PlainTextResponse("plain")

    async def peek(request: Request) -> Response:
        return JSONResponse({"data": dict(request.session), "has": "n" in request.session})

    async def put(request: Request) -> Response:
        for key, value in request.query_params.items():
            request.session[key] = json.loads(value)
        return JSONResponse({"uid": get_session(request).uid, "data": dict(request.session)})

    async def drop(request: Request) -> Response:
        del request.session[request.query_params["key"]]
        return JSONResponse({"data": dict(request.session)})

    async def watch(request: Request) -> Response:
        session = get_session(request)
        session.notifyOnExpire(lambda: seen.append(("expired", session.uid)))
        return JSONResponse({"uid": session.uid})

    async def logout(request: Request) -> Response:
        session = current_session(request)
        if session is not None:
            session.expire()
        return PlainTextResponse("bye")

    async def clear(request: Request) -> Response:
        request.session.clear()
        return PlainTextResponse("cleared")

    async def later(request: Request) -> Response:
        session = get_session(request)

        def write_later() -> None:
            session.data["later"] = True

        return JSONResponse({"uid": session.uid}, background=BackgroundTask(write_later))

    async def rotate(request: Request) -> Response:
        session = get_session(request)
        old = session.uid
        return JSONResponse({"old": old, "new": session.rotate()})

    return Starlette(
        routes=[
            Route("/plain", plain),
            Route("/peek", peek),
            Route("/put", put),
            Route("/drop", drop),
            Route("/watch", watch),
            Route("/logout", logout),
            Route("/clear", clear),
            Route("/later", later),
            Route("/rotate", rotate),
        ],
        **starlette,
    )


async def fetch(
    app: Any,
    path: str,
    *,
    cookie: str | None = None,
    https: bool = False,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """One GET through ``app`` in process, with exactly the Cookie header given."""
    all_headers = dict(headers or {})
    if cookie is not None:
        all_headers["cookie"] = cookie
    base = "https://testserver" if https else "http://testserver"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base) as client:
        return await client.get(path, headers=all_headers)


def set_cookies(response: httpx.Response) -> list[str]:
    return response.headers.get_list("set-cookie")


def uid_cookie(response: httpx.Response, name: str = "lapse_session") -> str:
    """The uid of the one session cookie the response sets."""
    (cookie,) = set_cookies(response)
    value, *_ = cookie.split(";")
    key, uid = value.split("=", 1)
    assert key == name
    return uid


def wrapped(events: list[Any] | None = None, **options: Any) -> SessionMiddleware:
    return SessionMiddleware(starlette_app(events), **options)


async def lifespan_startup(app: Any) -> list[dict[str, Any]]:
    """Run an ASGI lifespan startup (and shutdown, if started) on ``app``."""
    incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    sent: list[dict[str, Any]] = []
    await incoming.put({"type": "lifespan.startup"})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "lifespan.startup.complete":
            await incoming.put({"type": "lifespan.shutdown"})

    await asyncio.wait_for(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, incoming.get, send), 10
    )
    return sent
