"""The live view and the metrics of a FastAPI (or Starlette) app that uses
lapse.asgi.SessionMiddleware: ``liveview_app(middleware, token=...)`` and
``metrics_app(middleware)`` are ASGI apps to ``app.mount(...)``; here a real
FastAPI app, driven through httpx."""

from __future__ import annotations

import re
from typing import Any

import httpx
from _helpers import aio
from fastapi import FastAPI
from fastapi import Request as FastAPIRequest

from lapse.asgi import SessionMiddleware, get_session
from lapse.internet.task import Clock
from lapse.metrics import metrics_app
from lapse.web.liveview import liveview_app

TOKEN = "s3cret-token-for-tests"


def fastapi_with_views(ended: list[str]) -> SessionMiddleware:
    """A FastAPI app wrapped in the middleware, the live view at /_lapse and
    the metrics at a nested /ops/lapse/metrics (as the docs show)."""
    app = FastAPI()

    @app.get("/login")
    async def login(request: FastAPIRequest) -> dict[str, Any]:
        request.session["user"] = "ann"
        get_session(request).notifyOnExpire(lambda: ended.append("ann"))
        return {"session": request.session}

    sessions = SessionMiddleware(app, reactor=Clock())
    app.mount("/_lapse", liveview_app(sessions, token=TOKEN))
    app.mount("/ops/lapse/metrics", metrics_app(sessions))
    return sessions


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


@aio
async def test_liveview_mounted_in_fastapi_shows_and_ends_its_sessions() -> None:
    """The mounted live view lists the middleware's sessions, and expiring
    one there ends it (its callback runs; the visitor's next request has no
    session); its page links stay under the mount point; without the token
    it answers 403."""
    ended: list[str] = []
    sessions = fastapi_with_views(ended)
    bearer = {"authorization": f"Bearer {TOKEN}"}
    async with client(sessions) as visitor, client(sessions) as operator:
        assert (await visitor.get("/login")).json() == {"session": {"user": "ann"}}
        assert (await operator.get("/_lapse/api/summary")).status_code == 403
        summary = await operator.get("/_lapse/api/summary", headers=bearer)
        assert summary.status_code == 200 and summary.json()["live"] == 1
        page = await operator.get("/_lapse/", headers=bearer)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert re.search(r'name="lapse-base" content="/_lapse/"', page.text)
        slashless = await operator.get("/_lapse", headers=bearer)
        assert slashless.headers["location"].endswith("/_lapse/")
        (row,) = (await operator.get("/_lapse/api/sessions", headers=bearer)).json()["sessions"]
        expired = await operator.post("/_lapse/api/expire", json={"id": row["id"]}, headers=bearer)
        assert expired.json()["expired"] is True
        assert ended == ["ann"]
        assert len(sessions.sessions) == 0


@aio
async def test_metrics_mounted_in_fastapi_count_the_middlewares_sessions() -> None:
    """The mounted metrics (at a nested path) are the middleware's, in
    Prometheus' text format, not cached."""
    sessions = fastapi_with_views([])
    async with client(sessions) as http:
        await http.get("/login")
        await http.get("/login")  # the same session: one made
        # Starlette redirects a mount point to its slash; scrapers follow.
        metrics = await http.get("/ops/lapse/metrics", follow_redirects=True)
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "lapse_sessions_live 1.0" in metrics.text
    assert "lapse_sessions_created_total 1.0" in metrics.text
    assert metrics.headers["cache-control"] == "no-store"
