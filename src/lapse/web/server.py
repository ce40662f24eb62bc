"""The site: an ASGI application serving a resource tree with sessions.

``Site(root)`` is what a seed program hands to ``reactor.listenTCP``; it is
also a standard ASGI app, so ``uvicorn module:site`` serves it too.

A request's path through the site:

1. limits: URI length (414), header size (431), body size (413), ``Host``
   (400 without one on HTTP/1.1, or with two);
2. the body is read, so ``request.content`` is there for a synchronous render;
3. the sessions named by the request's cookies are touched (sliding expiry);
4. traversal from the root resource along the path, then render;
5. the response is sent: at once for a str/bytes result, as it is written for
   ``NOT_DONE_YET``; errors become short pages (404, 405 with ``Allow``,
   500 with the traceback in the log only);
6. an access line is logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from inspect import isawaitable
from typing import Any

from lapse.internet.interfaces import IReactorTime
from lapse.internet.limits import HEAD_FRAMING, HTTPLimits
from lapse.sessions import (
    ExpiryHook,
    Session,
    SessionConflict,
    SessionStore,
    StoreUnavailable,
    current_visit,
)
from lapse.web._access import access_log, log_access
from lapse.web._live import bind, end_stream
from lapse.web._plumbing import CONFLICT, UNAVAILABLE, HTTPSessions, SessionAnswer
from lapse.web._proxy import TrustSetting
from lapse.web._request import _NO_SESSIONS, NOT_DONE_YET, Request
from lapse.web._target import split_path
from lapse.web._types import Receive, Scope, Send
from lapse.web.error import BadRequest, UnsupportedMethod
from lapse.web.resource import ErrorPage, getChildForRequest
from lapse.web.websocket import serve_websocket

__all__ = ["NOT_DONE_YET", "Request", "Session", "Site", "version"]

version = b"lapse"

log = logging.getLogger("lapse.web")


class _ClientGone(Exception):
    """The client disconnected before the request was read."""


class Site(HTTPSessions):
    """Serves ``resource`` over HTTP (ASGI), with sessions.

    ``sessionFactory`` makes the sessions (set a ``Session`` subclass to
    change ``sessionTimeout``); ``sessions`` maps uid to live session.
    ``requestFactory`` (a ``Request`` subclass) may be given as Twisted
    takes it: ``Site(resource, requestFactory=...)`` or second positionally.

    Options beyond Twisted's:

    - ``cookie_name``: the session cookie (default ``lapse_session``); secure
      requests use ``__Host-`` + that name.
    - ``trust_proxy_headers``: believe ``X-Forwarded-Proto`` and
      ``X-Forwarded-For`` as far as the proxies in front add them: ``True``
      for one proxy, a number N for a chain of N, or the proxies' addresses
      and networks (see :mod:`lapse.web._proxy`); ``False`` by default.
    - ``store``: where sessions live, a URL (``memory:``, the default;
      ``sqlite:///path.db``; ``redis://host:port/db``) or a store object;
      without it, the ``LAPSE_SESSION_STORE`` environment variable, if set.
    - ``on_expire``: the durable expiry hook, called (sync or async) with an
      :class:`~lapse.sessions.Expiry` for every ended session, by exactly
      one process, also for sessions whose last server is gone.
    - ``rotation_grace``: seconds an old uid still names its session after
      ``session.rotate()`` (default 0: it ends at once). Not for sites that
      rotate at login: see ``Session.rotate``, whose ``grace`` argument
      gives a grace to one rotation.
    - ``max_sessions``: at most this many live sessions (memory store only;
      None, the default, for no cap): making one more first ends the one
      closest to its end (least recently used), with cause ``"evicted"``.
    - ``max_sessions_per_principal``: at most this many live sessions per
      principal (``session.set_principal``; None, the default, for no cap),
      on every store, atomically across processes; one login too many ends
      the least recently used other (cause ``"superseded"``), or, with
      ``principal_policy="refuse"``, raises
      :class:`~lapse.sessions.TooManySessions` from ``set_principal``.
    - ``max_body_size``, ``max_uri_length``, ``max_header_size`` (one
      header's value), ``max_headers_total`` (all headers): request limits,
      in bytes; past them the answer is 413, 414 or 431.
    - ``header_timeout`` (20 s), ``body_timeout`` (20 s, plus a second for
      every ``body_min_rate`` (500) bytes received), ``keep_alive_timeout``
      (5 s), ``max_connections`` (None: from the process's file limit):
      connection limits, enforced by lapse's reactor as the bytes arrive
      (:class:`~lapse.internet.limits.HTTPLimits`); the reactor also refuses
      a request head longer than ``max_uri_length + max_headers_total``
      + 4 KiB before it is whole. Other ASGI servers apply their own.
    """

    sessionFactory: Callable[[Site, str], Session] = Session
    requestFactory: Callable[[Site, Scope], Request] = Request
    displayTracebacks = False
    _on_asyncio = False
    """A request was served on an asyncio loop (checked until one is)."""

    def __init__(
        self,
        resource: Any,
        reactor: IReactorTime | None = None,
        *,
        cookie_name: str = "lapse_session",
        trust_proxy_headers: TrustSetting = False,
        max_body_size: int = 16 * 1024 * 1024,
        max_uri_length: int = 16 * 1024,
        max_header_size: int = 8 * 1024,
        max_headers_total: int = 64 * 1024,
        header_timeout: float = 20.0,
        body_timeout: float = 20.0,
        body_min_rate: float = 500.0,
        keep_alive_timeout: float = 5.0,
        max_connections: int | None = None,
        store: str | SessionStore | None = None,
        on_expire: ExpiryHook | None = None,
        rotation_grace: float = 0.0,
        max_sessions: int | None = None,
        max_sessions_per_principal: int | None = None,
        principal_policy: str = "supersede",
        requestFactory: Callable[[Site, Scope], Request] | None = None,
    ) -> None:
        if isinstance(reactor, type):
            # Twisted's Site(resource, requestFactory): a class is never a reactor.
            if requestFactory is not None:
                raise TypeError("Site() got two request factories")
            requestFactory, reactor = reactor, None
        if requestFactory is not None:
            self.requestFactory = requestFactory
        self.resource = resource
        self.trust_proxy_headers = trust_proxy_headers
        self.max_body_size = max_body_size
        self.max_uri_length = max_uri_length
        self.max_header_size = max_header_size
        self.max_headers_total = max_headers_total
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.body_min_rate = body_min_rate
        self.keep_alive_timeout = keep_alive_timeout
        self.max_connections = max_connections
        self.http_limits()  # a bad value is a ValueError here, not when serving
        self._host_sessions(
            reactor,
            store,
            on_expire,
            cookie_name,
            rotation_grace,
            max_sessions,
            max_sessions_per_principal,
            principal_policy,
        )

    def http_limits(self) -> HTTPLimits:
        """The connection limits lapse's reactor enforces for this site."""
        return HTTPLimits(
            max_uri_length=self.max_uri_length,
            max_head_size=self.max_uri_length + self.max_headers_total + HEAD_FRAMING,
            header_timeout=self.header_timeout,
            body_timeout=self.body_timeout,
            body_min_rate=self.body_min_rate,
            keep_alive_timeout=self.keep_alive_timeout,
            max_connections=self.max_connections,
            check_host=False,  # _read_headers does, under any server
        )

    def getSession(self, uid: str | bytes) -> Session:
        """The live session ``uid``; ``KeyError`` if there is none."""
        if isinstance(uid, bytes):
            uid = uid.decode("latin-1")
        return self.sessions[uid]

    async def _load_presented(self, request: Request, cookie_header: bytes) -> None:
        """Touch the sessions the request's cookies name (one store call each);
        if the store cannot be reached, remember it for ``getSession()``."""
        uids = self._cookie_uids(cookie_header, request.isSecure())
        if uids:
            presented: list[Session | None] = [None, None]
            try:
                for slot, uid in enumerate(uids):
                    if uid is not None:
                        presented[slot] = await self._keeper.load(uid)
            except StoreUnavailable as exc:
                # The page renders without its sessions (untouched: the missed
                # touch is not made up); asking for one answers 503.
                request._store_failure = exc
                return
            request._presented = presented
            request._presented_uids = uids

    def _load_presented_now(self, request: Request, cookie_header: bytes) -> None:
        """The same, on the memory store: synchronously."""
        uids = self._cookie_uids(cookie_header, request.isSecure())
        if uids:
            load = self._keeper.load_now
            plain, secure = uids
            request._presented = [
                None if plain is None else load(plain),
                None if secure is None else load(secure),
            ]
            request._presented_uids = uids

    @staticmethod
    def _used_sessions(request: Request) -> list[Session]:
        """The sessions the request touched or was given, each once."""
        plain, secure = request._presented
        given_plain, given_secure = request._sessions
        used = []
        for session in (plain, secure, given_plain, given_secure):
            if session is not None and session not in used:
                used.append(session)
        return used

    async def _persist(self, request: Request) -> None:
        """Write what the request changed in its sessions, before responding;
        a write that cannot be made replaces the response (503, 409)."""
        used = self._used_sessions(request)
        if used:
            answer = await self._write_visit(used, request)
            if answer is not None:
                self._answer(request, answer)

    @staticmethod
    def _answer(request: Request, answer: SessionAnswer) -> None:
        """Replace the response with ``answer`` (503, 409: the same bytes the
        middleware sends); it sets no session cookie."""
        request._reset_response()
        request._sessions = _NO_SESSIONS
        request._presented = _NO_SESSIONS
        request.setResponseCode(answer.status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        for name, value in answer.headers:
            request.setHeader(name, value)
        request.write(answer.body)

    # -- resources --------------------------------------------------------

    def getResourceFor(self, request: Request) -> Any:
        """The resource that renders ``request``."""
        request.site = self
        request.sitepath = list(request.prepath)
        return getChildForRequest(self.resource, request)

    # -- ASGI -------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                await self._serve_lifespan(receive, send)
            elif kind == "websocket":
                await serve_websocket(self, scope, receive, send)
            return
        # HTTP, written out here rather than in methods of its own: this is
        # every request's path, and each call and coroutine layer costs.
        if not self._on_asyncio:
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # trio, say: no timers, no expiry here
                await self._refuse_wrong_loop(send)
                return
            self._on_asyncio = True
        keeper = self._keeper
        if not keeper.synchronous:
            keeper.start()
        request = self.requestFactory(self, scope)
        visiting = current_visit.set(request)
        try:
            result: Any = None
            resource: Any = None
            try:
                # Read, route and render; an error page replaces what went wrong.
                cookie_header = self._read_headers(request, scope)
                if request._body_expected:
                    request.content.write(await self._read_body(request, receive))
                    request.content.seek(0)
                if request.path == b"*" and request.method == b"OPTIONS":
                    result = b""
                else:
                    request.postpath = split_path(request.path)
                    if cookie_header is not None:
                        if not keeper.synchronous:
                            await self._load_presented(request, cookie_header)
                        else:
                            self._load_presented_now(request, cookie_header)
                    resource = self.getResourceFor(request)
                    result = resource.render(request)
                    if (
                        type(result) is not bytes
                        and type(result) is not str
                        and isawaitable(result)
                    ):
                        result = await result
                    if isinstance(result, bytes | str):
                        if result or not request.finished:
                            request.write(result)
                    elif not (type(result) is int and result == NOT_DONE_YET):
                        self._wrong_result(request, resource, result)
                        result = None
            except BadRequest as exc:
                self._error_page(request, exc.status, exc.reason)
                result = None
            except UnsupportedMethod as exc:
                request._reset_response()
                request.setHeader(b"allow", b", ".join(exc.allowedMethods))
                self._error_page(
                    request, 405, "This resource does not answer the method used.", reset=False
                )
                result = None
            except _ClientGone:
                request._connection_lost()
                return
            except StoreUnavailable:
                self._answer(request, UNAVAILABLE)
                result = None
            except SessionConflict as exc:  # (await session.set_principal() on an ended one)
                log.info("%s", exc)
                self._answer(request, CONFLICT)
                result = None
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "error rendering %s for %r", request._uri_for_log().decode("latin-1"), request
                )
                self._error_page(request, 500, "The server failed to answer this request.")
                result = None
            if type(result) is int and result == NOT_DONE_YET:
                await self._stream(request, receive, send)
            else:
                if not request.finished:
                    request.finish()
                if not keeper.synchronous:
                    await self._persist(request)
                elif (
                    request._presented is not _NO_SESSIONS or request._sessions is not _NO_SESSIONS
                ):
                    keeper.persist_now(self._used_sessions(request))
                chunks = request._chunks
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                request._chunks = []
                await send(request._start_message(request.sentLength))
                await send({"type": "http.response.body", "body": body})
            if access_log.isEnabledFor(logging.INFO):
                log_access(request)
        finally:
            current_visit.reset(visiting)

    def _wrong_result(self, request: Request, resource: Any, result: Any) -> None:
        log.error(
            "%r returned %r from render for %s; a render returns str, bytes or NOT_DONE_YET",
            resource,
            type(result).__name__,
            request._uri_for_log().decode("latin-1"),
        )
        self._error_page(request, 500, "The server failed to answer this request.")

    def _error_page(
        self, request: Request, status: int, detail: str, *, reset: bool = True
    ) -> None:
        if reset:
            request._reset_response()
        brief = _REASONS.get(status, "Error")
        request.write(ErrorPage(status, brief, detail).render(request))

    def _read_headers(self, request: Request, scope: Scope) -> bytes | None:
        """Check the request's size limits and ``Host``; the ``Cookie`` header, if any."""
        if len(request.uri) > self.max_uri_length:
            raise BadRequest("The request URI is too long.", 414)
        limit = self.max_header_size
        budget = self.max_headers_total
        cookie_header: bytes | None = None
        hosts = 0
        for name, value in scope["headers"]:
            budget -= len(name) + len(value)
            if len(value) > limit or budget < 0:
                raise BadRequest("The request headers are too large.", 431)
            if name == b"host":
                hosts += 1
            elif name == b"cookie":
                # join_cookie_headers's joining, in the one pass the limits
                # need anyway (a second pass costs 3% of a request)
                cookie_header = value if cookie_header is None else cookie_header + b"; " + value
            elif name == b"content-length":
                if not value.isdigit():
                    raise BadRequest("The Content-Length header is not a number.")
                if int(value) > self.max_body_size:
                    raise BadRequest("The request body is too large.", 413)
                if value != b"0":
                    request._body_expected = True
            elif name == b"transfer-encoding":
                request._body_expected = True
        if hosts != 1:
            # RFC 9112 3.2: exactly one Host in HTTP/1.1, never two in any version.
            if hosts:
                raise BadRequest("The request has more than one Host header.")
            if request.clientproto == b"HTTP/1.1":
                raise BadRequest("An HTTP/1.1 request needs a Host header.")
        if cookie_header is None:
            return None
        request._cookie_header = cookie_header
        return cookie_header

    async def _read_body(self, request: Request, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_size:
                raise BadRequest("The request body is too large.", 413)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _stream(self, request: Request, receive: Receive, send: Send) -> None:
        """Send a ``NOT_DONE_YET`` response as it is written, until finished."""
        wakeup = request._wakeup = asyncio.Event()
        watcher = asyncio.ensure_future(self._watch_disconnect(request, receive))
        # The response ends with its session (see end_stream).
        unbind = [bind(s, partial(end_stream, request)) for s in self._used_sessions(request)]
        try:
            while True:
                if request._disconnected:
                    if getattr(request, "_session_ended", False):
                        if not request._headers_sent:
                            await send(request._start_message(None))
                        body = request._take_chunks()
                        await send({"type": "http.response.body", "body": body})
                        log_access(request)
                    return
                if not request.finished and not request._chunks:
                    await wakeup.wait()
                    wakeup.clear()
                    continue
                if not request._headers_sent:
                    written = request._chunks
                    await self._persist(request)
                    if request._chunks is not written:  # replaced by an error page
                        request.finished = True
                    length = request.sentLength if request.finished else None
                    await send(request._start_message(length))
                body = request._take_chunks()
                await send(
                    {"type": "http.response.body", "body": body, "more_body": not request.finished}
                )
                if request.finished:
                    log_access(request)
                    return
        finally:
            for each in unbind:
                each()
            watcher.cancel()

    @staticmethod
    async def _watch_disconnect(request: Request, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                request._connection_lost()
                return

    def __repr__(self) -> str:
        return f"<Site {len(self.sessions)} live sessions, root {self.resource!r}>"


_REASONS = {
    400: "Bad Request",
    404: "No Such Resource",
    405: "Method Not Allowed",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}
