"""The HTTP connection guard: uvicorn's httptools protocol, with limits kept as bytes arrive.

uvicorn's own protocol checks nothing until httptools has assembled a whole
request head, and httptools buffers a header's name and value in Python until
the field ends: one header that never ends grows without limit. It has no
timeout for a request that arrives slowly and no cap on open connections.
:class:`HTTPProtocol` adds, per connection:

- a byte budget for the request line and header section
  (:attr:`HTTPLimits.max_head_size`): httptools is never fed more of a head
  than its budget; past it the answer is 431. The URI is checked as its pieces
  arrive (414). A request that arrives in one read costs a few comparisons
  more than in uvicorn's protocol (1.7% more instructions, bench in the
  commit log), and no timer.
- timeouts: the head (:attr:`~HTTPLimits.header_timeout`, from the request's
  first byte, or from the connection's start for its first request), the body
  (:attr:`~HTTPLimits.body_timeout`, extended by a second for every
  :attr:`~HTTPLimits.body_min_rate` bytes received; time during which uvicorn
  stopped reading because the application had not taken the body so far does
  not count, nor for a head; a body the client holds back for a
  "100 Continue" is timed from the 100), and idleness, before the first
  request and between requests (:attr:`~HTTPLimits.keep_alive_timeout`; not
  while a pipelined request's head arrives). A head or body that times out is
  answered 408 while a response can still be sent; an idle connection is
  closed silently.
- a cap on open connections in the process (:attr:`~HTTPLimits.max_connections`,
  by default derived from ``RLIMIT_NOFILE``): beyond it a new connection is
  answered 503 with ``Retry-After`` and closed.
- ``Host``: HTTP/1.1 without one, or any request with two, is a 400 (unless the
  application checks that itself, as a lapse ``Site`` does).

Refusals close the connection gracefully: the answer is written, the sending
side is shut down, and what the client still sends is read and dropped for a
moment, so that its kernel does not reset the connection before the client has
read the answer.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import Any

import httptools
import uvicorn
from uvicorn.server import ServerState

from lapse.internet._answers import text_response
from lapse.internet._http_guard import DEFAULT_LIMITS, GuardedProtocol, Refused, TimedFlow
from lapse.internet._http_now import NowServing, ServeNow
from lapse.internet.limits import HTTPLimits

__all__ = [
    "DEFAULT_LIMITS",
    "HTTPProtocol",
    "HostCheckingProtocol",
    "ServingConfig",
    "limits_for",
    "open_connections",
    "protocol_for",
    "text_response",
]

log = logging.getLogger("lapse.http")

MAX_PARSED_URI = 65_535
"""The longest URI httptools can parse; a longer one is refused with 414."""

MAX_LINGERING_REJECTS = 16
"""At most this many connections refused for the cap linger at once; the rest
are closed at once (each lingering one holds a file descriptor)."""

RETRY_AFTER = 1
"""The ``Retry-After`` (seconds) of the 503 a connection over the cap gets."""

_CAP_WARNING_INTERVAL = 10.0


def limits_for(app: Any) -> HTTPLimits:
    """The limits ``app`` asks for (``app.http_limits()``, as a ``Site`` has), or the defaults."""
    method = getattr(app, "http_limits", None)
    if callable(method):
        limits = method()
        if isinstance(limits, HTTPLimits):
            return limits
    return DEFAULT_LIMITS


class ServingConfig(uvicorn.Config):
    """uvicorn's configuration, carrying the limits the protocol enforces."""

    limits: HTTPLimits = DEFAULT_LIMITS
    connection_cap: int | None = None
    """``limits.connection_cap()``, worked out once when serving starts."""
    serve_now: ServeNow | None = None
    """The application's way to answer a request without a task, if it has
    one (a ``Site``'s; see :mod:`lapse.internet._http_now`)."""
    guard_app: Callable[[Any], Any] | None = None
    """What the rest of a request ``serve_now`` began runs under (the
    port's guard), if anything."""


# The servers of this process: the connection cap counts their connections.
_servers: weakref.WeakSet[ServerState] = weakref.WeakSet()
_lingering_rejects = 0
_rejected_since_warning = 0
_last_cap_warning = -_CAP_WARNING_INTERVAL


def open_connections() -> int:
    """HTTP connections open in this process, on every server."""
    return sum(len(state.connections) for state in _servers)


class HTTPProtocol(NowServing, GuardedProtocol):
    """uvicorn's httptools protocol with :class:`HTTPLimits` enforced (module doc)."""

    # Slots (here and in GuardedProtocol), not the instance dict: uvicorn's
    # protocol has 28 attributes, and past 30 CPython 3.11 stops sharing the
    # dict's keys, which slows every attribute access in uvicorn's methods
    # (+5% instructions per request).
    __slots__ = (
        "_connection_cap",
        "_deferred",
        "_guard_app",
        "_lingering_reject",
        "_rejected",
        "_serve_now",
        "_task_app",
        "_uri_limit",
    )

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        cap = getattr(config, "connection_cap", None)
        limits = self._limits
        self._connection_cap: int = cap if isinstance(cap, int) else limits.connection_cap()
        self._uri_limit = min(limits.max_uri_length, MAX_PARSED_URI)
        self._rejected = False
        self._lingering_reject = False
        # A request the application may answer without a task (_http_now.py).
        self._serve_now: ServeNow | None = getattr(config, "serve_now", None)
        self._guard_app: Callable[[Any], Any] | None = getattr(config, "guard_app", None)
        self._deferred = None
        self._task_app = None

    # -- connections ----------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        _servers.add(self.server_state)
        if open_connections() >= self._connection_cap:
            self._reject(transport)
            return
        super().connection_made(transport)
        self.flow = TimedFlow(transport, self.loop, self._reading_resumed)
        self._opened_at = self.loop.time()
        # Idle until the first byte: closed after the keep-alive timeout.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def _reject(self, transport: asyncio.Transport) -> None:
        """Over the cap: 503 with Retry-After, then close."""
        global _lingering_rejects
        self.transport = transport
        self._rejected = True
        self._room = -1
        self._dropping = True  # whatever it sends is never parsed
        self._warn_cap()
        self._write_error(
            503,
            "The server has too many connections open; try again.",
            b"retry-after: %d\r\n" % RETRY_AFTER,
        )
        if _lingering_rejects < MAX_LINGERING_REJECTS and transport.can_write_eof():
            _lingering_rejects += 1
            self._lingering_reject = True
            self._linger()
        else:
            transport.close()

    def _warn_cap(self) -> None:
        global _last_cap_warning, _rejected_since_warning
        _rejected_since_warning += 1
        now = self.loop.time()
        if now - _last_cap_warning >= _CAP_WARNING_INTERVAL:
            log.warning(
                "%d connections open, the cap: %d new connection(s) answered 503 "
                "(max_connections; RLIMIT_NOFILE sets the default)",
                open_connections(),
                _rejected_since_warning,
            )
            _last_cap_warning = now
            _rejected_since_warning = 0

    def connection_lost(self, exc: Exception | None) -> None:
        global _lingering_rejects
        self._cancel_read_timer()
        self._idle.close()
        if isinstance(self.flow, TimedFlow):
            # Its callback refers to this protocol: without this, the two
            # (and the parser's buffers) would wait for the cyclic collector.
            self.flow.on_resume = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self._rejected:
            if self._lingering_reject:
                _lingering_rejects -= 1
                self._lingering_reject = False
            return
        super().connection_lost(exc)

    # -- reading --------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        size = len(data)
        if size > self._room:
            self._received_in_pieces(data)
            return
        self._room -= size
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if not self._parse_failed(exc):
                return
        if self._room != self._head_limit or self._head_begun:
            # A request is still arriving (a request that came whole has
            # ended, and on_message_complete gave the next one its budget;
            # on_message_begin tells if the next one began in the same read).
            self._watch_reading()

    def _received_in_pieces(self, data: bytes) -> None:
        """A read longer than the head in progress may still take: feed no more
        than its room; if that does not end the head, the head is too large."""
        if self._dropping:
            self._drop(len(data))
            return
        rest = memoryview(data)
        while rest:
            room = self._room
            if len(rest) <= room:
                self._room = room - len(rest)
                if not self._feed(rest):
                    return
                break
            if room > 0:
                piece, rest = rest[:room], rest[room:]
                self._room = 0
                if not self._feed(piece):
                    return
                if self._room != 0:
                    continue  # a request ended: the next one has its budget
            if self.cycle is self._done_cycle:
                self._refuse(431, "The request headers are too large.")
                return
            self._start_body()  # the head ended; what follows is its body
        if self._room != self._head_limit or self._head_begun:
            self._watch_reading()

    def _feed(self, data: bytes | memoryview) -> bool:
        """Parse ``data``; whether the connection still reads requests."""
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            return self._parse_failed(exc)
        return not self.transport.is_closing()

    def _parse_failed(self, exc: Exception) -> bool:
        """What the parser raised; whether the connection still reads requests."""
        if isinstance(exc, httptools.HttpParserUpgrade):
            if self._should_upgrade():
                self._cancel_read_timer()
                self._room = -1
                self._dropping = True
                self.handle_websocket_upgrade()
                return False
            self._unsupported_upgrade_warning()
            return not self.transport.is_closing()
        refusal = self._refusal
        if refusal is not None:
            self._refuse(*refusal)
        else:
            message = "Invalid HTTP request received."
            self.logger.warning(message)
            self.send_400_response(message)
        return False

    # -- parser callbacks -----------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self._uri_limit:
            self._refusal = (414, "The request URI is too long.")
            raise Refused

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_begun = True

    def on_message_complete(self) -> None:
        deferred = self._deferred
        current: Any = self.cycle
        if deferred is not None and deferred is current:
            # uvicorn's, for a request that is not an upgrade and that no
            # task waits on (its cycle's event has no waiter)
            deferred.more_body = False
        else:
            super().on_message_complete()
        self._head_begun = False
        self._room = self._head_limit
        self._done_cycle = self.cycle
        if self._read_timer is not None:
            self._cancel_read_timer()
        if deferred is not None:
            self._serve_deferred()


class HostCheckingProtocol(HTTPProtocol):
    """:class:`HTTPProtocol` that also enforces RFC 9112's Host rule (400):
    for applications that do not check it themselves, as a ``Site`` does."""

    __slots__ = ()

    def on_headers_complete(self) -> None:
        hosts = 0
        for name, _value in self.headers:
            if name == b"host":
                hosts += 1
        if hosts > 1:
            self._refusal = (400, "The request has more than one Host header.")
            raise Refused
        if hosts == 0 and self.parser.get_http_version() == "1.1":
            self._refusal = (400, "An HTTP/1.1 request needs a Host header.")
            raise Refused
        super().on_headers_complete()


def protocol_for(limits: HTTPLimits) -> type[HTTPProtocol]:
    """The protocol class that enforces ``limits``."""
    return HostCheckingProtocol if limits.check_host else HTTPProtocol
