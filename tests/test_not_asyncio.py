"""An app served on an event loop that is not asyncio's (trio, under
``hypercorn -k trio``): lapse's sessions need asyncio (timers, expiry, store
calls), so a Site and the middleware refuse at start-up (lifespan) with a
clear message naming asyncio, and a request served without lifespan gets a
short 500 page and one log line, never a traceback per request.

What trio looks like to lapse is "no running asyncio loop": the ASGI
coroutines are driven here by hand, with no loop at all (every ``receive``
and ``send`` answers at once). Under trio itself too, if it is installed.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Any

import pytest
from conftest import Leaf, make_scope

from lapse.asgi import SessionMiddleware
from lapse.web.server import Site


def drive(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that never suspends, with no event loop running."""
    with pytest.raises(StopIteration):
        coroutine.send(None)


class Exchange:
    """ASGI receive/send that answer at once, recording what was sent."""

    def __init__(self, *incoming: dict[str, Any]) -> None:
        self.incoming = list(incoming)
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        return self.incoming.pop(0)

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


async def plain_app(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app that takes lifespan and answers every request 200."""
    if scope["type"] == "lifespan":
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"app"})


APPS = {
    "Site": lambda: Site(Leaf()),
    "middleware": lambda: SessionMiddleware(plain_app),
}


@pytest.mark.parametrize("kind", list(APPS))
def test_lifespan_startup_fails_without_asyncio(kind: str) -> None:
    """lifespan.startup.failed, saying asyncio is needed and what to run."""
    app = APPS[kind]()
    exchange = Exchange({"type": "lifespan.startup"})
    drive(app({"type": "lifespan", "asgi": {"version": "3.0"}}, exchange.receive, exchange.send))
    assert [m["type"] for m in exchange.sent] == ["lifespan.startup.failed"]
    message = exchange.sent[0]["message"]
    assert "asyncio" in message and "hypercorn -k asyncio" in message


@pytest.mark.parametrize("kind", list(APPS))
def test_requests_without_asyncio_get_a_500_page_and_one_log_line(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Served without lifespan and without asyncio, each request gets a short
    500 page (nothing the app would have answered); the reason is logged
    once for all requests, with no traceback."""
    app = APPS[kind]()
    answers = []
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            exchange = Exchange({"type": "http.request", "body": b"", "more_body": False})
            drive(app(make_scope(), exchange.receive, exchange.send))
            answers.append(exchange.sent)
    for sent in answers:
        assert sent[0]["status"] == 500
        assert b"log says why" in sent[1]["body"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "asyncio" in errors[0].getMessage()
    assert errors[0].exc_info is None


def test_under_trio_the_site_refuses_at_startup() -> None:
    """Under trio itself: the Site's lifespan startup fails, naming asyncio."""
    trio = pytest.importorskip("trio", reason="trio is not installed (the [test] extra)")
    site = Site(Leaf())
    sent: list[dict[str, Any]] = []

    async def main() -> None:
        async def receive() -> dict[str, Any]:
            await trio.sleep(0)
            return {"type": "lifespan.startup"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await site({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)

    trio.run(main)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "asyncio" in sent[0]["message"]
