"""Helpers for the tests of principals in the live view and the CLI: binding
sessions outside a request, seeding a shared store, posting as the page."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from _liveview import csrf_of
from conftest import Response, call

from lapse.sessions import Session
from lapse.web.liveview import CSRF_COOKIE

INJECTION = "<img src=x onerror=alert(1)>\"'</td><script>alert(2)</script>"
"""A principal a hostile user could choose: markup and script in a name."""


def bind(session: Session, principal: str) -> list[str]:
    """``await session.set_principal(principal)`` on the memory store, where
    it never waits on a loop (the uids it superseded)."""
    return asyncio.run(session.set_principal(principal))


def post_as_page(site: Any, path: str, body: dict[str, Any]) -> Response:
    """POST ``body`` as JSON to ``path`` of the view at ``/_lapse/`` as its
    page does: the CSRF cookie and header it got with the page."""
    nonce, csrf = csrf_of(call(site, "GET", "/_lapse/"))
    return call(
        site,
        "POST",
        path,
        body=json.dumps(body).encode(),
        headers=[(b"x-lapse-csrf", csrf), (b"content-type", b"application/json")],
        cookies={CSRF_COOKIE.encode(): nonce},
    )


def seed_principals(url: str, sessions: list[tuple[str, float, str | None]]) -> None:
    """Create ``(uid, timeout, principal)`` sessions, one after the other,
    in the store at ``url``, each bound to its principal (None: unbound)."""
    from lapse.sessions.stores import store_from_url

    async def run() -> None:
        store = store_from_url(url)
        await store.open()
        try:
            for uid, timeout, principal in sessions:
                await store.create(uid, timeout, {})
                if principal is not None:
                    assert await store.set_principal(uid, principal) == []
        finally:
            await store.aclose()

    asyncio.run(run())


def store_call(url: str, method: str, *args: Any) -> Any:
    """``await store.METHOD(*args)`` on a store opened on ``url`` for it."""
    from lapse.sessions.stores import store_from_url

    async def run() -> Any:
        store = store_from_url(url)
        await store.open()
        try:
            return await getattr(store, method)(*args)
        finally:
            await store.aclose()

    return asyncio.run(run())
