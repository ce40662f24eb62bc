"""Live connections bound to a session: a WebSocket, a streamed response.

- :func:`bind`: run ``on_end()`` when a session ends (in this process:
  a logout here, or the end of the session anywhere once the keeper learns
  of it). One ``notifyOnExpire`` callback per session, however many
  connections come and go under it: a connection that closes first unbinds
  itself, and nothing accumulates on a long-lived session.
- :func:`keep_alive`: touch a session for a message received on one of its
  sockets, at most once per ``fraction`` of its timeout.
- :class:`SocketSessions`: both, for the sessions of one socket (the Site's
  and the middleware's WebSockets).
- :class:`SocketLink`: an ASGI websocket connection lapse can end (close
  1008, the app's ``receive`` sees the close, its later sends dropped), with
  a message size limit (close 1009) and a hook per message received.
- :class:`StreamLink`: the same for an HTTP response streamed under the
  middleware (the body ended, ``receive`` sees ``http.disconnect``);
  :func:`end_stream`, for a Site's ``NOT_DONE_YET`` response.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from lapse.sessions import Session, Visit
from lapse.web._types import Message, Receive, Send

if TYPE_CHECKING:
    from lapse.web._request import Request
    from lapse.web._session_mapping import MiddlewareVisit

__all__ = [
    "SESSION_ENDED",
    "SocketLink",
    "SocketSessions",
    "StreamLink",
    "bind",
    "end_stream",
    "follow_rotations",
    "keep_alive",
]

log = logging.getLogger("lapse.web")

SESSION_ENDED = "session ended"
"""The close reason of a WebSocket whose session ended (code 1008)."""

POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009


class _Bound(dict[Callable[[], None], None]):
    """The connections bound to one session, and the event loop they live on."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop


_bound: weakref.WeakKeyDictionary[Session, _Bound] = weakref.WeakKeyDictionary()


def _ended(connections: _Bound) -> None:
    """The session ended: end its connections, on their loop (a session may
    end in a worker thread: a plain ``def`` endpoint's logout)."""
    loop = connections.loop
    try:
        here = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    if here is not loop:
        if not loop.is_closed():
            loop.call_soon_threadsafe(_end_all, connections)
        return
    _end_all(connections)


def _end_all(connections: _Bound) -> None:
    ends = list(connections)
    connections.clear()
    for on_end in ends:
        try:
            on_end()
        except Exception:
            log.exception("ending a connection of an ended session failed")


def bind(session: Session, on_end: Callable[[], None]) -> Callable[[], None]:
    """Call ``on_end()`` once when ``session`` ends (at once if it has), on
    this event loop; returns the function that unbinds it (call it when the
    connection closes first)."""
    if session.expired:
        on_end()
        return _nothing
    connections = _bound.get(session)
    if connections is None:
        connections = _bound[session] = _Bound(asyncio.get_running_loop())
        session.notifyOnExpire(partial(_ended, connections))
    connections[on_end] = None
    return partial(connections.pop, on_end, None)


def _nothing() -> None:
    pass


def bound_count(session: Session) -> int:
    """How many connections are bound to ``session`` (for tests and tools)."""
    return len(_bound.get(session) or ())


def keep_alive(session: Session, fraction: float) -> bool:
    """A message arrived on a socket of ``session``: touch it if the last
    touch (here) is older than ``fraction`` of its timeout. Whether it did."""
    if session.expired:
        return False
    now = session._reactor.seconds()
    if now - session.lastModified < session.sessionTimeout * fraction:
        return False
    session.touch()
    return True


class SocketSessions:
    """The sessions one socket is bound to: the end of any closes it
    (:func:`bind`), and each message received touches them
    (:func:`keep_alive`, at most once per ``fraction`` of a timeout)."""

    __slots__ = ("_fraction", "_sessions", "_unbinds")

    def __init__(self, fraction: float) -> None:
        self._fraction = fraction
        self._sessions: list[Session] = []
        self._unbinds: list[Callable[[], None]] = []

    def add(self, session: Session, on_end: Callable[[], None]) -> None:
        """Bind the socket to ``session`` (unless it has ended)."""
        if not session.expired:
            self._sessions.append(session)
            self._unbinds.append(bind(session, on_end))

    def message(self) -> None:
        """A message arrived on the socket."""
        for session in self._sessions:
            keep_alive(session, self._fraction)

    def release(self) -> None:
        """The socket closed: unbind it from its sessions."""
        for unbind in self._unbinds:
            unbind()
        self._unbinds.clear()


def follow_rotations(visit: Visit) -> None:
    """A socket belongs to its session, not to the uid it was opened under:
    once this process knows the session by a new uid (rotated here, or
    announced), the socket's changes go to that uid (a request's would be
    refused: it loaded the session under the old one)."""
    views = visit._views
    if views:
        for session, (view, uid) in list(views.items()):
            if uid != session.uid and not session.expired:
                views[session] = (view, session.uid)


def message_size(message: Message) -> int:
    """The payload size of a ``websocket.receive`` message, in bytes (a
    text's length in characters is a lower bound of its UTF-8 size, checked
    first so that a short text is not encoded)."""
    data = message.get("bytes")
    if data is not None:
        return len(data)
    text = message.get("text") or ""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def end_stream(request: Request) -> None:
    """A streamed (``NOT_DONE_YET``) response's session ended: the response
    ends (what was written is sent, then the end of the body); later writes
    are dropped, ``finish()`` raises as after a lost connection, and
    ``notifyFinish()`` fails with ``ConnectionDone("the session ended")``."""
    if request.finished or request._disconnected:
        return
    request._session_ended = True  # type: ignore[attr-defined]
    request._connection_lost("the session ended")


class SocketLink:
    """An ASGI websocket connection between the server and the app, which
    lapse can close: :meth:`receive` and :meth:`send` are what the app gets.

    Messages are read from the server by a task of its own into a short
    queue (the app reads them from there; a client faster than the app
    waits on TCP, not on memory). ``on_message`` is called for each message
    received; a message over ``max_size`` bytes closes the socket (1009).
    ``skip_connect``: the app is not given ``websocket.connect``.
    :meth:`end` closes it from outside (a session's end): the server is sent
    the close, the app's pending and later ``receive`` return
    ``websocket.disconnect`` with the code, its later sends are dropped.
    """

    def __init__(
        self,
        receive: Receive,
        send: Send,
        on_message: Callable[[], object] | None = None,
        max_size: int | None = None,
        queue_size: int = 16,
        *,
        skip_connect: bool = False,
    ) -> None:
        self._skip_connect = skip_connect
        self._server_receive = receive
        self._server_send = send
        self._on_message = on_message
        self._max_size = max_size
        self._queue: asyncio.Queue[Message] = asyncio.Queue(queue_size)
        self._pump: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.accepted = False
        self.closed = False
        """The close was sent (by the app or by lapse), or the app was told
        the client left."""
        self.ended_by: tuple[int, str] | None = None
        """The code and reason lapse closed the socket with, if it did."""
        self._closing: asyncio.Task[None] | None = None
        self._last: Message = {"type": "websocket.disconnect", "code": 1006}
        self._gone = False

    async def receive(self) -> Message:
        if self._gone:
            return self._last  # (asked again after the close)
        if self._pump is None:
            self._pump = asyncio.ensure_future(self._read())
        message = await self._queue.get()
        if message["type"] == "websocket.disconnect":
            self._gone = self.closed = True
            self._last = message
        return message

    async def _read(self) -> None:
        limit = self._max_size
        while True:
            message = await self._server_receive()
            kind = message["type"]
            if kind == "websocket.receive":
                if limit is not None and message_size(message) > limit:
                    self.end(MESSAGE_TOO_BIG, "message too big")
                    return
                if self._on_message is not None:
                    self._on_message()
            elif kind == "websocket.connect" and self._skip_connect:
                continue
            await self._queue.put(message)
            if kind == "websocket.disconnect":
                return

    async def send(self, message: Message) -> None:
        if self.closed:
            return  # closed by lapse (or gone): the app's late sends are dropped
        kind = message["type"]
        if kind == "websocket.accept":
            self.accepted = True
        elif kind == "websocket.close":
            self.closed = True
        async with self._lock:
            await self._server_send(message)

    def end(self, code: int = POLICY_VIOLATION, reason: str = SESSION_ENDED) -> None:
        """Close the socket now (idempotent): see the class doc."""
        if self.ended_by is not None:
            return
        self.ended_by = (code, reason)
        pump = self._pump
        if pump is not None and pump is not asyncio.current_task():
            pump.cancel()
        while not self._queue.empty():  # what the client sent after the end is not read
            self._queue.get_nowait()
        self._queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        if not self.closed:
            self.closed = True
            self._closing = asyncio.ensure_future(self._send_close(code, reason))

    async def _send_close(self, code: int, reason: str) -> None:
        async with self._lock:
            # (before the accept, the server refuses the handshake: 403)
            with contextlib.suppress(Exception):  # the client may be gone already
                await self._server_send({"type": "websocket.close", "code": code, "reason": reason})

    async def aclose(self) -> None:
        """The app returned: stop reading; let a close being sent finish."""
        pump = self._pump
        if pump is not None:
            pump.cancel()
        if self._closing is not None:
            await self._closing


class StreamLink:
    """An HTTP response under the middleware, which lapse can end once it
    streams (a body with ``more_body``, or the app waiting for the client's
    disconnect after reading the request): :meth:`end` sends the end of the
    body to the server (``send``), makes the app's pending and later
    ``receive`` return ``http.disconnect``; the middleware's send drops the
    app's later messages (it tells this one :attr:`started`, :meth:`streams`
    and :attr:`complete`, and sends under :attr:`lock` once streaming).

    It is bound to the visit's current session when the response is found
    to stream (most responses never are), and unbound by :meth:`aclose`.
    """

    # Defaults on the class: every middleware request makes one of these,
    # and most never stream.
    _body_read = False
    streaming = False
    started = False
    """The app started its response."""
    complete = False
    """The last message of its body was sent."""
    _ended: asyncio.Event | None = None
    lock: asyncio.Lock | None = None
    """Held while a body message goes to the server, once streaming."""
    _closing: asyncio.Task[None] | None = None
    _unbind: Callable[[], None] | None = None

    def __init__(self, receive: Receive, send: Send, visit: MiddlewareVisit) -> None:
        self._server_receive = receive
        self._server_send = send
        self._visit = visit

    def streams(self) -> None:
        """The response streams: bind it to the visit's current session."""
        if not self.streaming:
            self.streaming = True
            self._ended = asyncio.Event()
            self.lock = asyncio.Lock()
            session = self._visit.current
            if session is not None and not session.expired:
                self._unbind = bind(session, self.end)

    async def receive(self) -> Message:
        ended = self._ended
        if ended is not None and ended.is_set():
            return {"type": "http.disconnect"}
        if not self._body_read:
            message = await self._server_receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                self._body_read = True
            return message
        # The body is read: the app waits for the client to leave (a
        # streaming response does, Starlette's): the session's end is one way.
        self.streams()
        assert self._ended is not None
        waiting = asyncio.ensure_future(self._server_receive())
        ending = asyncio.ensure_future(self._ended.wait())
        try:
            await asyncio.wait((waiting, ending), return_when=asyncio.FIRST_COMPLETED)
        finally:
            ending.cancel()
        if waiting.done():
            return waiting.result()
        waiting.cancel()
        return {"type": "http.disconnect"}

    def end(self) -> None:
        """End the response now (idempotent): see the class doc."""
        ended = self._ended
        if ended is None or ended.is_set():
            return
        ended.set()
        if self.started and not self.complete:
            self.complete = True
            self._closing = asyncio.ensure_future(self._send_end())

    async def _send_end(self) -> None:
        assert self.lock is not None
        async with self.lock:
            with contextlib.suppress(Exception):  # the client may be gone already
                await self._server_send(
                    {"type": "http.response.body", "body": b"", "more_body": False}
                )

    @property
    def ended(self) -> bool:
        """Whether lapse ended the response (its session ended)."""
        return self._ended is not None and self._ended.is_set()

    async def aclose(self) -> None:
        """The app returned (call it if :attr:`streaming`): unbind; let the
        end being sent finish."""
        if self._unbind is not None:
            self._unbind()
        if self._closing is not None:
            await self._closing
