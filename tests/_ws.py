"""Helpers for WebSocket and stream tests.

- :class:`FakeSocket`: an ASGI websocket connection driven by a test, in
  process (no network): ``connect(app)`` runs the app in a task; ``say``
  queues a client message; ``sent`` is what the app sent; ``wait_for``
  waits (on the loop, not the clock) for a sent message of a type.
- :class:`FakeStream`: the same for an HTTP request whose response streams.
- :func:`ws_scope`: a websocket scope (with ``Host``, and ``Origin`` unless
  told otherwise).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def ws_scope(
    path: bytes = b"/ws",
    cookie: bytes | None = None,
    origin: bytes | None = b"http://127.0.0.1:8080",
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> dict[str, Any]:
    """A websocket scope on ``127.0.0.1:8080``."""
    all_headers = [(b"host", b"127.0.0.1:8080"), *headers]
    if origin is not None:
        all_headers.append((b"origin", origin))
    if cookie is not None:
        all_headers.append((b"cookie", cookie))
    return {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": path.decode("latin-1"),
        "raw_path": path,
        "query_string": b"",
        "root_path": "",
        "headers": all_headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
        "subprotocols": [],
        "extensions": {"websocket.http.response": {}},
    }


class FakeSocket:
    """One in-process websocket connection to an ASGI app."""

    def __init__(self, scope: dict[str, Any]) -> None:
        self.scope = scope
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.incoming.put_nowait({"type": "websocket.connect"})
        self.sent: list[dict[str, Any]] = []
        self._news = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def connect(self, app: App) -> FakeSocket:
        self.task = asyncio.ensure_future(app(self.scope, self.incoming.get, self._send))
        return self

    async def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        self._news.set()

    def say(self, text: str) -> None:
        self.incoming.put_nowait({"type": "websocket.receive", "text": text})

    def leave(self, code: int = 1000) -> None:
        self.incoming.put_nowait({"type": "websocket.disconnect", "code": code})

    def types(self) -> list[str]:
        return [m["type"] for m in self.sent]

    async def wait_for(self, kind: str, count: int = 1, timeout: float = 2.0) -> dict[str, Any]:
        """The ``count``-th sent message of type ``kind`` (waits for it)."""
        async with asyncio.timeout(timeout):
            while True:
                found = [m for m in self.sent if m["type"] == kind]
                if len(found) >= count:
                    return found[count - 1]
                self._news.clear()
                await self._news.wait()

    async def settle(self) -> None:
        """Let the app run until it waits (a few loop turns)."""
        for _ in range(20):
            await asyncio.sleep(0)

    async def done(self, timeout: float = 2.0) -> None:
        assert self.task is not None
        async with asyncio.timeout(timeout):
            await self.task


class FakeStream:
    """One in-process HTTP request whose response the app streams."""

    def __init__(self, scope: dict[str, Any]) -> None:
        self.scope = scope
        self.incoming: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.incoming.put_nowait({"type": "http.request", "body": b"", "more_body": False})
        self.sent: list[dict[str, Any]] = []
        self._news = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def connect(self, app: App) -> FakeStream:
        self.task = asyncio.ensure_future(app(self.scope, self.incoming.get, self._send))
        return self

    async def _send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        self._news.set()

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")

    @property
    def ended(self) -> bool:
        """The body's last message was sent."""
        return any(
            m["type"] == "http.response.body" and not m.get("more_body", False) for m in self.sent
        )

    async def wait_until(self, check: Callable[[], bool], timeout: float = 2.0) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                self._news.clear()
                await self._news.wait()
