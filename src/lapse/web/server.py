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
    SessionStore,
    StoreUnavailable,
    current_visit,
)
from lapse.web._access import access_log, log_access
from lapse.web._proxy import TrustSetting
from lapse.web._request import NOT_DONE_YET, Request
from lapse.web._respond import SiteResponses, _ClientGone
from lapse.web._target import split_path
from lapse.web._types import Receive, Scope, Send
from lapse.web.error import BadRequest
from lapse.web.resource import getChildForRequest
from lapse.web.websocket import serve_websocket

__all__ = ["NOT_DONE_YET", "Request", "Session", "Site", "version"]

version = b"lapse"

log = logging.getLogger("lapse.web")


class Site(SiteResponses):
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
                if self._routed(request):
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
                else:
                    result = b""
                result = self._written(request, resource, result)
            except _ClientGone:
                request._connection_lost()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(request, exc)
                result = None
            await self._respond(request, result, receive, send)
        finally:
            current_visit.reset(visiting)

    def _serves_now(self) -> bool:
        """Whether lapse's reactor may call :meth:`_serve_now` instead of
        this site's ASGI app: not if a subclass changed ``__call__``."""
        return type(self).__call__ is Site.__call__

    def _serve_now(self, scope: Scope, body: bytes) -> Any:
        """Serve an HTTP request without a coroutine, if it can be: lapse's
        reactor calls this in its protocol when the request (head and body)
        has arrived, instead of starting an ASGI task for it.

        The same steps as :meth:`__call__`: None if they cannot all run
        without waiting (the store is reached through the async protocol;
        nothing was done), the response as ``(status, headers, body)`` when
        done, or, when the render returned an awaitable or
        ``NOT_DONE_YET``, an ASGI app that finishes the request (the
        reactor runs it as it runs any app, with this request's ``receive``
        and ``send``).
        """
        keeper = self._keeper
        if not keeper.synchronous:
            return None
        self._on_asyncio = True  # (only lapse's reactor calls this, on asyncio)
        request = self.requestFactory(self, scope)
        visiting = current_visit.set(request)
        try:
            result: Any = None
            resource: Any = None
            try:
                cookie_header = self._read_headers(request, scope)
                if body:
                    request.content.write(body)
                    request.content.seek(0)
                if self._routed(request):
                    if cookie_header is not None:
                        self._load_presented_now(request, cookie_header)
                    resource = self.getResourceFor(request)
                    result = resource.render(request)
                    if (
                        type(result) is not bytes
                        and type(result) is not str
                        and isawaitable(result)
                    ):
                        return partial(self._resume, request, resource, result)
                else:
                    result = b""
                result = self._written(request, resource, result)
            except Exception as exc:
                self._failed(request, exc)
                result = None
            if result is not None:  # NOT_DONE_YET
                return partial(self._resume, request, resource, result)
            self._complete(request)
            code, headers = request._response_head(request.sentLength)
            body = self._whole_body(request)
            if access_log.isEnabledFor(logging.INFO):
                log_access(request)
            return code, headers, body
        finally:
            current_visit.reset(visiting)

    async def _resume(
        self,
        request: Request,
        resource: Any,
        result: Any,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """The rest of a request :meth:`_serve_now` began: its render's
        awaitable awaited, or its ``NOT_DONE_YET`` streamed; the response."""
        visiting = current_visit.set(request)
        try:
            if type(result) is not int:  # the render's awaitable
                try:
                    result = self._written(request, resource, await result)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._failed(request, exc)
                    result = None
            await self._respond(request, result, receive, send)
        finally:
            current_visit.reset(visiting)

    @staticmethod
    def _routed(request: Request) -> bool:
        """Split the request's path for traversal; False for ``OPTIONS *``,
        which asks the server, not a resource (answered with an empty 200)."""
        if request.path == b"*" and request.method == b"OPTIONS":
            return False
        request.postpath = split_path(request.path)
        return True

    def _read_headers(self, request: Request, scope: Scope) -> bytes | None:
        """Check the request's size limits and ``Host``; the ``Cookie`` header, if any."""
        if len(request.uri) > self.max_uri_length:
            raise BadRequest("The request URI is too long.", 414)
        limit = self.max_header_size
        budget = self.max_headers_total
        cookie_header: bytes | None = None
        hosts = 0
        for name, value in scope["headers"]:
            size = len(value)
            budget -= len(name) + size
            if size > limit or budget < 0:
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

    def __repr__(self) -> str:
        return f"<Site {len(self.sessions)} live sessions, root {self.resource!r}>"
