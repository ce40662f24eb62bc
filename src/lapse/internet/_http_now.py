"""Answering a request in the parser's callback, without an ASGI task.

uvicorn serves every request the same way: at the end of its head it makes a
cycle and starts a task running the application, which sends its response
as two ASGI messages. For a ``Site`` served by lapse's reactor, most
requests need none of that: the render is synchronous and so is the memory
store. :class:`NowServing` (a part of lapse's protocol) defers a request
whose body is small enough to arrive without the application reading it;
when it has arrived whole, it asks the application's ``serve_now(scope,
body)``:

- None: nothing was done; the request is served as uvicorn serves it;
- ``(status, headers, body)``: the response, written here in one write
  (head and body), checked as uvicorn checks an application's response
  (header names and values, the ``Content-Length``, ``Connection: close``);
- an ASGI app: the application began the request and needs to wait (an
  async render, a streamed response); it is run as uvicorn runs any app,
  with this request's ``receive`` and ``send``.

A request is never deferred while an earlier one's response is still being
sent (uvicorn queues it, as before), nor while the client does not read its
responses (the transport's writes are paused), nor with a body that is
chunked, over 64 KiB, or awaits a ``100 Continue``.

The response is written to the connection's :class:`~._turn.TurnTransport`
(installed at ``connection_made``), which holds what is written until the
end of the event loop's turn: the turn's requests are served one after
another and their writes follow one after another (``_turn.py`` says why
and what it measured). The end of the client's stream and a WebSocket
upgrade write what it holds first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import httptools
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from lapse.internet._turn import TurnTransport

__all__ = ["NowServing", "ServeNow", "response_bytes"]

log = logging.getLogger("lapse.http")

ServeNow = Callable[[Any, bytes], Any]
"""An application's ``serve_now(scope, body)`` (module doc)."""

_ERROR_BODY = b"Internal Server Error"
_ERROR = (
    500,
    [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"21"),
        (b"connection", b"close"),
    ],
    _ERROR_BODY,
)
_NO_BODY = frozenset({204, 304})


_METHODS = {m.encode("ascii"): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS")}


class _Unawaited:
    """A pending cycle's ``message_event``: nothing waits on it."""

    __slots__ = ()

    def set(self) -> None:
        pass


class PendingCycle:
    """A request waiting to arrive whole before it is answered: what of
    uvicorn's cycle the protocol and its guard look at until then (the
    scope, the body so far, whether it ended, was answered or its client
    left). A real cycle replaces it if a task serves the request."""

    __slots__ = (
        "body",
        "disconnected",
        "keep_alive",
        "more_body",
        "response_complete",
        "response_started",
        "scope",
    )

    message_event = _Unawaited()
    waiting_for_100_continue = False

    def __init__(self, scope: Any, keep_alive: bool) -> None:
        self.scope = scope
        self.keep_alive = keep_alive
        self.body = bytearray()
        self.more_body = True
        self.response_started = False
        self.response_complete = False
        self.disconnected = False


class BadResponse(Exception):
    """The application's response cannot be sent as it is."""


def response_bytes(
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    default_headers: list[tuple[bytes, bytes]],
    keep_alive: bool,
    head: bool,
) -> tuple[bytes, bool]:
    """The response's bytes, and whether the connection stays open after it.
    :class:`BadResponse` for a header name or value that would break the
    response's framing, or a body that is not its ``Content-Length``."""
    line = STATUS_LINE.get(status)
    if line is None:
        raise BadResponse(f"no status line for {status}")
    seen, defaults = _defaults
    if seen is not default_headers:  # (a new list each second: the date)
        defaults = _default_lines(default_headers)
    key = tuple(headers)
    block = _blocks.get(key)
    if block is None:
        block = _block(key)
    lines, length, close_said = block
    if close_said:
        keep_alive = False
    content = [line, defaults, lines]
    if not keep_alive and not close_said:
        content.append(b"connection: close\r\n")
    if head:
        body = b""
    elif length is not None:
        if not length.isdigit() or int(length) != len(body):
            raise BadResponse("The response's body is not its Content-Length.")
    elif status not in _NO_BODY:
        content.append(b"transfer-encoding: chunked\r\n")
        body = (b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)) if body else b"0\r\n\r\n"
    content += (b"\r\n", body)
    return b"".join(content), keep_alive


_BLOCKS_MAX = 256
_blocks: dict[tuple[tuple[bytes, bytes], ...], tuple[bytes, bytes | None, bool]] = {}
"""Whole header blocks already checked (most responses of a site repeat a
few), as :func:`_block` reads them; never one with a ``Set-Cookie``; no
more once full."""


def _block(
    headers: tuple[tuple[bytes, bytes], ...],
) -> tuple[bytes, bytes | None, bool]:
    """``headers``' lines, checked; their ``Content-Length`` (None: none);
    whether one says ``Connection: close``."""
    lines = []
    length: bytes | None = None
    close_said = False
    cookie = False
    for header in headers:
        checked = _checked.get(header)
        if checked is None:
            checked = _check(header)
        line, kind = checked
        lines.append(line)
        if kind is not None:
            if kind is _LENGTH:
                length = header[1]
            elif kind is _CLOSE:
                close_said = True
            else:
                cookie = True
    block = (b"".join(lines), length, close_said)
    if not cookie and len(_blocks) < _BLOCKS_MAX:  # (no uid kept here)
        _blocks[headers] = block
    return block


_LENGTH = "content-length"
_COOKIE = "set-cookie"
_CLOSE = "connection: close"
_CHECKED_MAX = 1024
_checked: dict[tuple[bytes, bytes], tuple[bytes, str | None]] = {}
"""Header lines already checked and encoded, by (name, value), with what
the header says of the framing (``_LENGTH``, ``_CLOSE`` or None): most
responses repeat the same few. Never a ``Set-Cookie`` (a session's uid is
not kept here); no more once full."""


def _check(header: tuple[bytes, bytes]) -> tuple[bytes, str | None]:
    """``header``'s line, once its name and value are checked (as uvicorn
    checks them: nothing that would end the header early), and what it says
    of the framing."""
    name, value = header
    if HEADER_RE.search(name):
        raise BadResponse("Invalid HTTP header name.")
    if HEADER_VALUE_RE.search(value):
        raise BadResponse("Invalid HTTP header value.")
    name = name.lower()
    kind: str | None = None
    if name == b"content-length":
        kind = _LENGTH
    elif name == b"connection" and b"close" in [
        token.strip().lower() for token in value.split(b",")
    ]:
        kind = _CLOSE
    elif name == b"set-cookie":
        return b"%b: %b\r\n" % (name, value), _COOKIE  # (no uid kept here)
    checked = (b"%b: %b\r\n" % (name, value), kind)
    if len(_checked) < _CHECKED_MAX:
        _checked[header] = checked
    return checked


_defaults: tuple[object, bytes] = (None, b"")


def _default_lines(default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """The server's own headers' lines, remembered with their list in
    ``_defaults`` (the date changes once a second: a new list each time)."""
    global _defaults
    lines = b"".join(b"%b: %b\r\n" % pair for pair in default_headers)
    _defaults = (default_headers, lines)
    return lines


_TARGETS_MAX = 256
_targets: dict[bytes, tuple[str, bytes, bytes]] = {}
"""Request targets already read (short ones: a site's few hot URLs), no
more once full; only for a server without a root path."""


def _target(url: bytes, root: str) -> tuple[str, bytes, bytes]:
    """The scope's ``path``, ``raw_path`` and ``query_string`` for the
    request target ``url``, as uvicorn makes them."""
    parsed = httptools.parse_url(url)
    raw_path = parsed.path
    path = raw_path.decode("ascii")
    if "%" in path:
        path = unquote(path)
    if root:
        path = root + path
        raw_path = root.encode("ascii") + raw_path
    target = (path, raw_path, parsed.query or b"")
    if not root and len(url) <= 128 and len(_targets) < _TARGETS_MAX:
        _targets[url] = target
    return target


def answerable_now(headers: list[tuple[bytes, bytes]], expect_100: bool) -> bool:
    """Whether a request with ``headers`` may wait for its body unread: none,
    or a ``Content-Length`` of at most 64 KiB (uvicorn stops reading past
    that until the application reads it), and no ``100 Continue`` awaited."""
    if expect_100:
        return False
    for name, value in headers:
        if name == b"content-length":
            if not value.isdigit() or int(value) > HIGH_WATER_LIMIT:
                return False
        elif name == b"transfer-encoding":
            return False
    return True


class NowServing(HttpToolsProtocol):
    """The deferring and answering half of lapse's protocol (module doc).

    A subclass sets ``_serve_now`` (None: never) and calls
    :meth:`_serve_deferred` at the end of ``on_message_complete``.
    """

    __slots__ = ()

    _serve_now: ServeNow | None
    _guard_app: Callable[[Any], Any] | None
    _deferred: PendingCycle | None
    _task_app: Any
    _done_cycle: Any

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # (uvicorn's flow control keeps the transport it was given: pausing
        # and resuming reading need no order)
        self.transport = TurnTransport(transport, self.loop)

    def eof_received(self) -> None:
        # The loop closes the transport when this returns: what is held
        # goes first (a client that half-closes after its request).
        transport = self.transport
        if type(transport) is TurnTransport:
            transport.release()
        super().eof_received()

    def handle_websocket_upgrade(self) -> None:
        # The WebSocket protocol gets the transport itself, after what is held.
        transport = self.transport
        if type(transport) is TurnTransport:
            transport.release()
            self.transport = transport.inner
        super().handle_websocket_upgrade()

    def on_headers_complete(self) -> None:
        # A request that may be answered without a task gets its scope as
        # uvicorn makes it, and a PendingCycle until it has arrived whole;
        # any other goes to uvicorn (a task, or the queue behind the one
        # being answered).
        cycle = self.cycle
        parser = self.parser
        if (
            self._serve_now is None
            or (cycle is not None and not cycle.response_complete)
            or self.limit_concurrency is not None
            or not answerable_now(self.headers, self.expect_100_continue)
            or parser.should_upgrade()
        ):
            super().on_headers_complete()
            return
        scope = self.scope
        method = parser.get_method()
        scope["method"] = _METHODS.get(method) or method.decode("ascii")
        version = parser.get_http_version()
        if version != "1.1":
            scope["http_version"] = version
        root = self.root_path
        target = None if root else _targets.get(self.url)
        if target is None:
            target = _target(self.url, root)
        scope["path"], scope["raw_path"], scope["query_string"] = target
        keep_alive = version != "1.0" and parser.should_keep_alive()
        self.cycle = self._deferred = PendingCycle(scope, keep_alive)  # type: ignore[assignment]

    def _serve_deferred(self) -> None:
        """The deferred request has arrived whole: serve it (module doc)."""
        cycle, self._deferred = self._deferred, None
        current: Any = self.cycle
        if (
            cycle is None
            or cycle is not current
            or cycle.response_complete
            or cycle.disconnected
            or self.transport.is_closing()
        ):
            return
        if self.flow.write_paused:
            self._start_task(cycle, None)
            return
        body = cycle.body
        try:
            # (a request is deferred only when there is a _serve_now)
            outcome = self._serve_now(cycle.scope, bytes(body) if body else b"")  # type: ignore[misc]
        except Exception as exc:  # (raised in a parser callback, it would be a 400)
            log.error("Exception in ASGI application", exc_info=exc)
            outcome = _ERROR
        if type(outcome) is tuple:  # (the usual outcome first)
            if body:
                cycle.body = bytearray()
            status, headers, content = outcome  # (a call with *outcome costs more)
            self._send_now(cycle, status, headers, content)
        elif outcome is None:
            self._start_task(cycle, None)
        else:
            guard = self._guard_app
            self._start_task(cycle, outcome if guard is None else guard(outcome))

    def _start_task(self, pending: PendingCycle, app: Any) -> None:
        """Serve ``pending`` as uvicorn serves a request: its cycle made as
        uvicorn makes it (the request's head is still the parser's), its
        whole body given, and a task running ``app`` (None: the server's)."""
        self.cycle = None  # type: ignore[assignment]  # (no response is in progress)
        self._task_app = app
        HttpToolsProtocol.on_headers_complete(self)
        cycle = self.cycle
        cycle.body = pending.body
        cycle.more_body = False
        cycle.message_event.set()
        if self._done_cycle is pending:
            self._done_cycle = cycle

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        task_app = self._task_app
        if task_app is not None:
            self._task_app = None
            app = task_app
        super()._start_asgi_task(cycle, app)

    def _send_now(
        self,
        cycle: PendingCycle,
        status: int,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        head = cycle.scope["method"] == "HEAD"
        defaults = self.server_state.default_headers
        try:
            data, keep_alive = response_bytes(
                status, headers, body, defaults, cycle.keep_alive, head
            )
        except BadResponse as exc:
            log.error("Exception in ASGI application: %s", exc)
            data, keep_alive = response_bytes(*_ERROR, defaults, False, head)
        cycle.response_started = True
        cycle.response_complete = True
        self.transport.write(data)  # (held until the turn ends: TurnTransport)
        if not keep_alive:
            self.transport.close()
        self.on_response_complete()
