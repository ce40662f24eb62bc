"""The timing and refusing half of the HTTP connection guard.

:class:`GuardedProtocol` is uvicorn's httptools protocol with the state the
guard keeps per connection, the request head's and body's timers (408), and
the graceful refusal: answer, shut down the sending side, drop what still
comes for a moment, close. :class:`~lapse.internet._http.HTTPProtocol` builds
the byte budgets and the connection cap on it (see that module).
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from lapse.internet.limits import HTTPLimits

__all__ = [
    "DEFAULT_LIMITS",
    "LINGER_BYTES",
    "LINGER_SECONDS",
    "GuardedProtocol",
    "Refused",
    "TimedFlow",
]

log = logging.getLogger("lapse.http")

LINGER_SECONDS = 1.0
"""How long a refused connection stays half-open, dropping what it receives."""

LINGER_BYTES = 1024 * 1024
"""How much a refused connection reads and drops before it stops reading."""

_UNLIMITED = 1 << 62
"""The room of a request whose head is complete: its body is not counted."""

DEFAULT_LIMITS = HTTPLimits()


class Refused(Exception):
    """Raised in a parser callback to stop parsing a request that is refused."""


class TimedFlow(FlowControl):
    """uvicorn's flow control, keeping the time reading was paused.

    ``on_resume`` is called whenever reading is asked to resume, paused or
    not: uvicorn asks it each time an application asks for (more of) the
    body, right after sending the "100 Continue" the request may expect.
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        on_resume: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(transport)
        self._time = loop.time
        self.paused_since = 0.0
        self.paused_total = 0.0
        self.on_resume = on_resume

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.paused_since = self._time()
            super().pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.paused_total += self._time() - self.paused_since
            super().resume_reading()
        if self.on_resume is not None:
            self.on_resume()

    def paused_until(self, now: float) -> float:
        """Seconds reading was paused, up to ``now``."""
        if self.read_paused:
            return self.paused_total + now - self.paused_since
        return self.paused_total


class IdleTimer:
    """The keep-alive timer, armed after every response and cancelled by
    every read, for the price of a clock read: uvicorn makes and cancels a
    loop timer each time. Here one loop timer per connection runs at most
    until the deadline; when it rings early (the deadline moved on) it is
    set again for the new one."""

    __slots__ = ("_callback", "_deadline", "_handle", "_loop", "_timeout")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeout: float, callback: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._timeout = timeout
        self._callback = callback
        self._deadline: float | None = None
        self._handle: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        """Ring ``timeout`` seconds from now, unless cancelled before."""
        self._deadline = deadline = self._loop.time() + self._timeout
        if self._handle is None:
            self._handle = self._loop.call_at(deadline, self._ring)

    def cancel(self) -> None:
        self._deadline = None

    def close(self) -> None:
        """Cancel, and let go of the loop timer (the connection is gone)."""
        self._deadline = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _ring(self) -> None:
        self._handle = None
        deadline = self._deadline
        if deadline is None:
            return  # (set again at the next response)
        if self._loop.time() < deadline:
            self._handle = self._loop.call_at(deadline, self._ring)
            return
        self._deadline = None
        self._callback()


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the guard's state, timers and refusals."""

    __slots__ = (
        "_body_paused",
        "_body_room",
        "_body_started",
        "_continue_due",
        "_done_cycle",
        "_dropped",
        "_dropping",
        "_head_begun",
        "_head_limit",
        "_head_paused",
        "_head_started",
        "_idle",
        "_limits",
        "_linger_timer",
        "_opened_at",
        "_read_timer",
        "_refusal",
        "_room",
    )

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = getattr(config, "limits", DEFAULT_LIMITS)
        if not isinstance(limits, HTTPLimits):
            limits = DEFAULT_LIMITS
        self._limits = limits
        self._head_limit = limits.max_head_size
        self.timeout_keep_alive = limits.keep_alive_timeout  # type: ignore[assignment]
        self._idle = IdleTimer(
            self.loop, limits.keep_alive_timeout, self.timeout_keep_alive_handler
        )
        # Bytes the parser may still be fed before the head in progress must
        # have ended: the whole budget between requests, _UNLIMITED once the
        # head is complete (then it counts down the body's bytes), -1 once the
        # connection is refused (every read then goes to _received_in_pieces).
        self._room = self._head_limit
        # The cycle (uvicorn's) of the last request that arrived whole; a
        # newer self.cycle means the head of the request arriving is complete.
        self._done_cycle: RequestResponseCycle | None = None
        self._read_timer: asyncio.TimerHandle | None = None
        # A request's head began in the read that ended the one before it
        # (pipelining): it is arriving though its bytes were not counted.
        self._head_begun = False
        self._head_started = 0.0
        self._head_paused = 0.0
        self._opened_at = 0.0
        self._body_started = 0.0
        self._body_room = 0
        self._body_paused = 0.0
        # The request whose body is timed waits for our "100 Continue".
        self._continue_due = False
        self._refusal: tuple[int, str] | None = None
        self._dropping = False
        self._dropped = 0
        self._linger_timer: asyncio.TimerHandle | None = None

    # -- timeouts -------------------------------------------------------------

    def _watch_reading(self) -> None:
        """A request is still arriving after a read: time its head or its body.

        Its head is complete once uvicorn made its cycle (at the end of the
        head); until then the head's timer runs.
        """
        if self._dropping or self.transport.is_closing():
            return
        if self.cycle is not self._done_cycle:
            if self._room <= self._head_limit:
                self._start_body()
            return
        if self._read_timer is None:
            # The first request's head is timed from the connection's start.
            now = self.loop.time()
            started = self._opened_at if self.cycle is None else now
            self._head_started = started
            self._head_paused = self._paused(now)
            self._read_timer = self.loop.call_at(
                started + self._limits.header_timeout, self._head_timed_out
            )

    def _start_body(self) -> None:
        """The head is complete and the body is not: count and time the body."""
        self._room = _UNLIMITED
        cycle = self.cycle
        self._continue_due = cycle is not None and cycle.waiting_for_100_continue
        self._restart_body_clock()

    def _restart_body_clock(self) -> None:
        """Time the body from now: its bytes, its time, its paused time."""
        self._cancel_read_timer()
        now = self.loop.time()
        self._body_started = now
        self._body_room = self._room
        self._body_paused = self._paused(now)
        self._read_timer = self.loop.call_at(now + self._limits.body_timeout, self._check_body)

    def _reading_resumed(self) -> None:
        """The application asked for the body: if that sent the "100 Continue"
        the client waited for, its body's time starts now (not at the last check)."""
        if not self._continue_due:
            return
        cycle = self.cycle
        if cycle is not None and cycle.waiting_for_100_continue:
            return  # an earlier request's application: the 100 is still to come
        self._continue_due = False
        if self._read_timer is not None and self._room > self._head_limit and not self._dropping:
            self._restart_body_clock()

    def _paused(self, now: float) -> float:
        flow = self.flow
        return flow.paused_until(now) if isinstance(flow, TimedFlow) else 0.0

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _head_timed_out(self) -> None:
        self._read_timer = None
        if self._dropping or self.transport.is_closing():
            return
        if self.cycle is not self._done_cycle:
            self._start_body()
            return
        # Time uvicorn stopped reading (a pipelined request waits its turn)
        # is not the client's delay.
        now = self.loop.time()
        taken = now - self._head_started - (self._paused(now) - self._head_paused)
        if taken < self._limits.header_timeout:
            self._read_timer = self.loop.call_at(
                now + self._limits.header_timeout - taken, self._head_timed_out
            )
            return
        self._refuse(408, "The request headers took too long to arrive.")

    def _check_body(self) -> None:
        """The body's deadline came: extend it by what arrived, or time it out."""
        self._read_timer = None
        if self._room <= self._head_limit or self._dropping or self.transport.is_closing():
            return  # the request or the connection ended
        limits = self._limits
        now = self.loop.time()
        cycle = self.cycle
        if cycle is not None and cycle.waiting_for_100_continue:
            # The client waits for our "100 Continue": not its delay (the
            # clock restarts again when it is sent, in _reading_resumed).
            self._restart_body_clock()
            return
        received = self._body_room - self._room
        allowed = limits.body_timeout
        if limits.body_min_rate:
            allowed += received / limits.body_min_rate
        taken = now - self._body_started - (self._paused(now) - self._body_paused)
        if taken < allowed:
            self._read_timer = self.loop.call_at(now + allowed - taken, self._check_body)
            return
        log.info(
            "%s: request body too slow (%d bytes in %.1f s); closing",
            self._peer(),
            received,
            taken,
        )
        if cycle is None or cycle.response_started:
            # Its answer is (being) sent: only the connection can end.
            self.transport.close()
            return
        cycle.disconnected = True
        cycle.message_event.set()
        self._write_error(408, "The request body took too long to arrive.")
        self._linger()

    def on_response_complete(self) -> None:
        # uvicorn's, but for its keep-alive timer (IdleTimer), which is not
        # armed while the next request's head is arriving (pipelined): the
        # connection is not idle, and the header timer times that head.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        task = self.timeout_keep_alive_task
        if task is not None:  # (uvicorn's _unset_keepalive_if_required)
            task.cancel()
            self.timeout_keep_alive_task = None
        flow = self.flow
        if flow.read_paused or self._continue_due:
            # (else resuming does nothing: reading goes on, and
            # _reading_resumed, the flow's on_resume, has no 100 to time)
            flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self._read_timer is None or self.cycle is not self._done_cycle:
            self._idle.arm()
            self.timeout_keep_alive_task = self._idle  # type: ignore[assignment]

    def _drop(self, size: int) -> None:
        """What a refused connection still receives: dropped, up to LINGER_BYTES."""
        self._dropped += size
        if self._dropped >= LINGER_BYTES:
            self.transport.pause_reading()

    # -- refusing -------------------------------------------------------------

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "-"

    def _refuse(self, status: int, reason: str) -> None:
        """Refuse the request whose head is arriving: answer ``status``, close."""
        log.info("%s: %d %s", self._peer(), status, reason)
        self._refusal = None
        self._cancel_read_timer()
        # The refused request's parts so far (up to its whole budget) are
        # not kept while the connection lingers.
        self.url = b""
        self.headers = []
        self.scope = None  # type: ignore[assignment]
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # An earlier request's response is on its way: do not write into
            # it; the connection closes once it is sent.
            cycle.keep_alive = False
            self._room = -1
            self._dropping = True
            self.parser = None  # type: ignore[assignment]
            return
        self._write_error(status, reason)
        self._linger()

    def _write_error(self, status: int, reason: str, headers: bytes = b"") -> None:
        body = reason.encode("ascii") + b"\n"
        phrase = http.HTTPStatus(status).phrase.encode("ascii")
        head = [b"HTTP/1.1 %d %s\r\n" % (status, phrase)]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(body),
            headers,
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(head))

    def _linger(self) -> None:
        """Close after the answer: shut down our side, drop what still comes,
        close at the client's end of stream or after LINGER_SECONDS."""
        self._room = -1
        self._dropping = True
        self._cancel_read_timer()
        self.parser = None  # type: ignore[assignment]  # and the header it holds
        transport = self.transport
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        if self.flow is not None:
            self.flow.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, transport.close)
