"""WebSockets in a Site, bound to the visitor's session.

Subclass :class:`WebSocketResource`, write ``websocket``, and put it in the
tree like any resource::

    class Echo(WebSocketResource):
        async def websocket(self, request, socket):
            session = request.getSession()   # as in render_GET
            async for message in socket:
                await socket.send(f"{session.uid[:4]}: {message}")

    root.putChild(b"echo", Echo())

The handshake is a request like any other (limits, cookies, traversal):
the session its cookie names is loaded and touched, and ``getSession()``
gives it; a session made before the socket is accepted (the first
``send``/``receive``, or ``accept()``) gets its cookie on the accept. Then:

- **origin**: a handshake whose ``Origin`` is not the site's own (its
  ``Host``) nor in ``allowed_origins`` is refused (403): cookies ride on
  cross-site WebSockets too (cross-site WebSocket hijacking). A handshake
  without ``Origin`` is not a browser's, so not one a cookie rides on
  uninvited: it is let through.
- **keep-alive**: a message received touches the session, at most once per
  ``touch_fraction`` of its timeout; sending does not, nor does an idle
  open socket.
- **end**: when the session ends (logout, timeout, ended from another
  process), the socket is closed with 1008 "session ended"; ``receive``
  raises :class:`WebSocketClosed`, iteration stops, later sends are dropped.
- **size**: a message over ``max_message_size`` bytes closes it with 1009.

A plain HTTP request to the resource gets 426 Upgrade Required; a WebSocket
handshake to a resource that is not one is refused (404).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from lapse.sessions import SessionConflict, StoreUnavailable, current_visit
from lapse.web._live import SocketLink, SocketSessions, follow_rotations
from lapse.web._plumbing import UNAVAILABLE, SessionAnswer, unwritten
from lapse.web._target import split_path
from lapse.web._types import Message, Receive, Scope, Send
from lapse.web.error import BadRequest
from lapse.web.resource import Resource

if TYPE_CHECKING:
    from lapse.web._request import Request
    from lapse.web.server import Site

__all__ = ["WebSocket", "WebSocketClosed", "WebSocketResource", "origin_allowed"]

log = logging.getLogger("lapse.web")

_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


class WebSocketClosed(Exception):
    """The socket is closed: ``code`` and ``reason`` say how (1008, "session
    ended": its session ended)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"the WebSocket closed: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


def _host_port(netloc: str, scheme: str) -> tuple[str, int | None]:
    parts = urlsplit(f"//{netloc}")
    try:
        port = parts.port
    except ValueError:
        return netloc.lower(), -1  # matches nothing a browser sends
    return (parts.hostname or "").lower(), port or _DEFAULT_PORTS.get(scheme)


def origin_allowed(origin: bytes | None, host: bytes | None, allowed: Iterable[str] = ()) -> bool:
    """Whether a handshake with ``Origin: origin`` may open a socket on the
    site at ``Host: host``: no Origin (not a browser), the site's own
    (the same host and port: not the scheme, which a proxy ending TLS
    changes), or one listed in ``allowed`` (exact, or ``"*"`` for any)."""
    if origin is None:
        return True
    text = origin.decode("latin-1").strip().lower().rstrip("/")
    for listed in allowed:
        if listed == "*" or listed.lower().rstrip("/") == text:
            return True
    if host is None or text == "null":
        return False
    scheme, _, netloc = text.partition("://")
    if not netloc or scheme not in _DEFAULT_PORTS:
        return False
    # The Host without a port is the default one of the scheme the browser
    # used, which TLS ended by a proxy hides from us: the Origin's own.
    return _host_port(netloc, scheme) == _host_port(host.decode("latin-1"), scheme)


class WebSocket:
    """One accepted (or about to be) WebSocket, as a handler sees it."""

    def __init__(
        self,
        request: Request,
        link: SocketLink,
        accept: Callable[[Message], Any],
        sync: Callable[[], Any],
    ) -> None:
        self.request = request
        self._link = link
        self._accept = accept
        self._sync = sync
        self.close_code: int | None = None
        """How the socket closed (None while open)."""
        self.close_reason = ""

    @property
    def closed(self) -> bool:
        """Whether the socket is closed (by either side, or its session's end)."""
        return self.close_code is not None or self._link.closed

    async def accept(self, subprotocol: str | None = None) -> None:
        """Accept the handshake (the first send or receive does, if not
        called): what the request did to its sessions is written first, and
        a new session's cookie goes with the accept."""
        if not self._link.accepted and not self._link.closed:
            message: Message = {"type": "websocket.accept"}
            if subprotocol is not None:
                message["subprotocol"] = subprotocol
            await self._accept(message)

    async def receive(self) -> str | bytes:
        """The next message; :class:`WebSocketClosed` once the socket closes."""
        await self.accept()
        if self.close_code is not None:
            raise WebSocketClosed(self.close_code, self.close_reason)
        await self._sync()
        message = await self._link.receive()
        if message["type"] == "websocket.receive":
            text = message.get("text")
            if text is not None:
                return str(text)
            return bytes(message.get("bytes") or b"")
        self.close_code = int(message.get("code", 1005))
        self.close_reason = str(message.get("reason") or "")
        raise WebSocketClosed(self.close_code, self.close_reason)

    async def __aiter__(self) -> AsyncIterator[str | bytes]:
        """The messages received, until the socket closes."""
        while True:
            try:
                yield await self.receive()
            except WebSocketClosed:
                return

    async def send(self, data: str | bytes) -> None:
        """Send a message (str: text, bytes: binary); dropped once closed
        (a handler that only sends checks :attr:`closed`)."""
        if isinstance(data, str):
            message: Message = {"type": "websocket.send", "text": data}
        elif isinstance(data, bytes | bytearray | memoryview):
            message = {"type": "websocket.send", "bytes": bytes(data)}
        else:
            raise TypeError(f"send takes str or bytes, not {type(data).__name__}")
        await self.accept()
        await self._sync()
        try:
            await self._link.send(message)
        except OSError:  # the client is gone (the server says so on a send)
            self._link.closed = True
            if self.close_code is None:
                self.close_code = 1006

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the socket (before the accept: refuse the handshake, 403)."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            await self._link.send({"type": "websocket.close", "code": code, "reason": reason})

    def __repr__(self) -> str:
        state = "open" if not self.closed else f"closed {self.close_code}"
        return f"<WebSocket {self.request.path.decode('latin-1')} {state}>"


class WebSocketResource(Resource):
    """A resource that takes WebSockets: subclass and write :meth:`websocket`.

    Class attributes (or set them on an instance): ``allowed_origins`` (other
    origins whose pages may open it, as ``"https://app.example.com"``;
    ``"*"`` for any), ``max_message_size`` (bytes; larger closes with 1009),
    ``touch_fraction`` (a message touches the session at most once per this
    fraction of its timeout).
    """

    isLeaf = True
    allowed_origins: tuple[str, ...] = ()
    max_message_size = 1024 * 1024
    touch_fraction = 0.1

    async def websocket(self, request: Request, socket: WebSocket) -> None:
        """Serve one socket; it closes (1000) when this returns."""
        await socket.close(1011, "not implemented")

    def render(self, request: Request) -> bytes:
        """Any plain HTTP request: 426 Upgrade Required."""
        request.setResponseCode(426)
        request.setHeader(b"upgrade", b"websocket")
        request.setHeader(b"connection", b"Upgrade")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"This resource takes WebSocket connections only.\n"


async def refuse(scope: Scope, send: Send, status: int, text: str) -> None:
    """Refuse a handshake: an HTTP answer where the server can send one
    (ASGI's websocket.http.response), else a close before the accept (the
    server answers 403)."""
    if "websocket.http.response" in scope.get("extensions", None) or {}:
        body = text.encode("utf-8") + b"\n"
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        if status == 503:
            headers.append((b"retry-after", b"1"))
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008 if status < 500 else 1013})


async def refuse_for_sessions(scope: Scope, send: Send, answer: SessionAnswer) -> None:
    """Refuse a handshake with the answer an HTTP request would get when its
    sessions cannot be had (:data:`UNAVAILABLE`, :data:`CONFLICT`)."""
    await refuse(scope, send, answer.status, answer.body.decode("utf-8").rstrip("\n"))


async def serve_websocket(site: Site, scope: Scope, receive: Receive, send: Send) -> None:
    """Serve a WebSocket handshake on ``site`` (see the module doc)."""
    keeper = site._keeper
    if not keeper.synchronous:
        keeper.start()
    request = site.requestFactory(site, {**scope, "method": "GET"})
    visiting = current_visit.set(request)
    try:
        try:
            cookie_header = site._read_headers(request, scope)
            request.postpath = split_path(request.path)
            if cookie_header is not None:
                if keeper.synchronous:
                    site._load_presented_now(request, cookie_header)
                else:
                    await site._load_presented(request, cookie_header)
            resource = site.getResourceFor(request)
        except BadRequest as exc:
            await refuse(scope, send, exc.status, exc.reason)
            return
        if not isinstance(resource, WebSocketResource):
            await refuse(scope, send, 404, "No WebSocket here.")
            return
        origin = request.getHeader(b"origin")
        host = request.getHeader(b"host")
        if not origin_allowed(origin, host, resource.allowed_origins):
            log.info("WebSocket refused: Origin %r is not this site's", origin)
            await refuse(scope, send, 403, "This origin may not open WebSockets here.")
            return
        await _run(site, request, resource, scope, receive, send)
    finally:
        current_visit.reset(visiting)


async def _run(
    site: Site,
    request: Request,
    resource: WebSocketResource,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    keeper = site._keeper
    sessions = SocketSessions(resource.touch_fraction)
    link = SocketLink(receive, send, sessions.message, resource.max_message_size, skip_connect=True)

    async def persist() -> bool:
        """Write what the socket's request did to its sessions; whether it could."""
        used = site._used_sessions(request)
        if not used:
            return True
        if keeper.synchronous:
            keeper.persist_now(used)
            return True
        follow_rotations(request)
        try:
            await keeper.persist(used, request)
        except StoreUnavailable:
            link.end(1013, "sessions unavailable")
            return False
        except SessionConflict as exc:
            log.info("%s", exc)
            link.end(1011, "session changed")
            return False
        return True

    async def sync() -> None:
        """Write the sessions' changes made since the last write, if any."""
        if link.accepted and not link.closed and unwritten(request, site._used_sessions(request)):
            await persist()

    async def accept(message: Message) -> None:
        if request._store_failure is not None and not site._used_sessions(request):
            await refuse_for_sessions(scope, send, UNAVAILABLE)
            link.closed = True
            return
        if not await persist():
            return
        cookies = [(b"set-cookie", cookie) for cookie in request._session_cookies()]
        if cookies:
            message = {**message, "headers": [*message.get("headers", ()), *cookies]}
        for session in site._used_sessions(request):
            sessions.add(session, link.end)
        await link.send(message)

    socket = WebSocket(request, link, accept, sync)
    try:
        await resource.websocket(request, socket)
    except StoreUnavailable:
        if link.accepted:
            link.end(1013, "sessions unavailable")
        elif not link.closed:
            await refuse_for_sessions(scope, send, UNAVAILABLE)
            link.closed = True
    except Exception:
        log.exception("WebSocket handler %r failed for %r", resource, request)
        await link.send({"type": "websocket.close", "code": 1011})
    finally:
        sessions.release()
        if not link.closed:
            await link.send({"type": "websocket.close", "code": 1000})
        await link.aclose()
        if link.accepted and link.ended_by is None:
            await persist()
