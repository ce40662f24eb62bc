"""lapse sessions for any ASGI application (Starlette, FastAPI, ...).

``SessionMiddleware(app, store=...)`` gives an ASGI app the sessions a lapse
``Site`` has: the same :class:`~lapse.sessions.Session` objects (``data``,
``notifyOnExpire``, ``expire()``), the same stores and guarantees, the same
cookie policy. Starlette's ``request.session`` reads and writes the session's
``data``; :func:`get_session` gives the ``Session`` itself::

    from lapse.asgi import SessionMiddleware, get_session

    app = Starlette(routes=...)
    app.add_middleware(SessionMiddleware, store="redis://127.0.0.1:6379/0")

    async def home(request):
        request.session["visits"] = request.session.get("visits", 0) + 1
        get_session(request).notifyOnExpire(lambda: print("bye"))

A request's path through the middleware:

1. the session the cookie names, if any, is loaded *and touched* (one store
   call; sliding expiry), before the app runs: reading it is synchronous;
2. the app runs; a session is made only if it asks for one (writing to
   ``request.session`` or calling :func:`get_session`);
3. when the app starts its response, what changed is written to the store
   (a new session, changed keys, a logout), then the response starts, with
   the session cookie if it must be set or deleted;
4. if the store cannot be reached in 1 or 3, the answer is ``503`` with
   ``Retry-After: 1`` instead.

Websocket scopes get the session as HTTP requests do, bound to the socket
(see :mod:`lapse.web._socket_sessions`), and a streamed response ends with
its session; lifespan messages pass through to the app, the session keeper
starting before the app's startup and closing after its shutdown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

# What making the middleware needs, imported with this module, before the
# server runs: Starlette makes its middleware inside the event loop, on the
# first lifespan event or request, where an import would block the loop (the
# default reactor brings in uvicorn, tens of milliseconds; the shared stores
# bring in sqlite3 and the Redis client; the PostgreSQL store, asyncpg: 80 ms).
import lapse.internet.reactor
import lapse.sessions.stores.memory
import lapse.sessions.stores.postgres
import lapse.sessions.stores.redis
import lapse.sessions.stores.sqlite  # noqa: F401
from lapse.internet.interfaces import IReactorTime
from lapse.sessions import (
    ExpiryHook,
    Session,
    SessionConflict,
    SessionOwner,
    SessionStore,
    StoreUnavailable,
    current_visit,
)
from lapse.web._cookies import vary_on_cookie
from lapse.web._live import StreamLink
from lapse.web._plumbing import (
    CONFLICT,
    UNAVAILABLE,
    HTTPSessions,
    is_secure,
    join_cookie_headers,
)
from lapse.web._proxy import TrustSetting
from lapse.web._session_mapping import MiddlewareVisit, SessionMapping
from lapse.web._socket_sessions import serve_websocket
from lapse.web._types import ASGIApp, Message, Receive, Scope, Send

with contextlib.suppress(ImportError):  # the PostgreSQL store's driver, an extra
    importlib.import_module("asyncpg")

__all__ = [
    "SessionMapping",
    "SessionMiddleware",
    "current_session",
    "get_session",
    "session_middleware",
]

log = logging.getLogger("lapse.asgi")

SCOPE_KEY = "lapse.session"
"""The scope key under which the middleware keeps a request's session state."""


def _visit_of(request_or_scope: Any) -> MiddlewareVisit:
    scope = getattr(request_or_scope, "scope", request_or_scope)
    try:
        visit = scope[SCOPE_KEY]
    except (KeyError, TypeError):
        visit = None
    if not isinstance(visit, MiddlewareVisit):
        raise RuntimeError("no lapse session here: install lapse.asgi.SessionMiddleware")
    return visit


def get_session(request_or_scope: Any) -> Session:
    """The request's :class:`~lapse.sessions.Session`: the one its cookie
    names, else a new one (sent as a cookie with the response).

    Takes a Starlette/FastAPI ``Request`` (anything with ``.scope``) or an
    ASGI scope. The same session comes back for every call in a request,
    unless it expired meanwhile (then a new one). ``RuntimeError`` if the
    request did not come through :class:`SessionMiddleware`.
    """
    return _visit_of(request_or_scope).get()


def current_session(request_or_scope: Any) -> Session | None:
    """The request's live session if it has one, without making one."""
    return _visit_of(request_or_scope).peek()


def session_middleware(request_or_scope: Any) -> SessionMiddleware:
    """The :class:`SessionMiddleware` serving the request: its
    ``sessions_of(principal)`` and ``expire_principal(principal,
    except_uid=None)`` list and end a user's sessions ("your active
    sessions", "log out everywhere"). ``RuntimeError`` as :func:`get_session`."""
    return _visit_of(request_or_scope).owner


class SessionMiddleware(HTTPSessions):
    """Wraps an ASGI app; gives its HTTP requests lapse sessions.

    Options (as ``Site``'s):

    - ``store``: where sessions live, a URL (``memory:``, the default;
      ``sqlite:///path.db``; ``redis://host:port/db``) or a store object;
      without it, the ``LAPSE_SESSION_STORE`` environment variable, if set.
    - ``on_expire``: the durable expiry hook, called (sync or async) with an
      :class:`~lapse.sessions.Expiry` for every ended session.
    - ``cookie_name``: the session cookie (default ``lapse_session``); https
      requests use ``__Host-`` + that name, with ``Secure``.
    - ``trust_proxy_headers``: believe ``X-Forwarded-Proto`` as far as the
      proxies in front set it: ``True`` for one proxy, a number N for a chain
      of N, or the proxies' addresses and networks (as ``Site``'s).
    - ``session_factory``: the ``Session`` subclass to make (its
      ``sessionTimeout`` is the timeout); ``timeout``: seconds of inactivity
      after which a session ends, ``absolute_timeout``: seconds from its
      creation (both override the factory's).
    - ``rotation_grace``: seconds an old uid still names its session after
      ``session.rotate()`` (default 0; see ``Session.rotate``);
      ``max_sessions``: a cap on live sessions (memory store only), as
      ``Site``'s; ``max_sessions_per_principal`` and ``principal_policy``:
      a cap on each user's sessions, as ``Site``'s.
    - ``reactor``: the time source and timer (a ``Clock`` in tests).
    - ``allowed_origins``: origins (``"https://app.example.com"``; ``"*"``
      for any) besides the site's own whose pages may open its WebSockets;
      other origins' handshakes are refused (403).
    - ``touch_fraction``: a message received on a WebSocket touches its
      session at most once per this fraction of its timeout (0.1).

    ``sessions`` maps uid to this process's live sessions.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: str | SessionStore | None = None,
        on_expire: ExpiryHook | None = None,
        cookie_name: str = "lapse_session",
        trust_proxy_headers: TrustSetting = False,
        session_factory: Callable[[Any, str], Session] | None = None,
        timeout: float | None = None,
        absolute_timeout: float | None = None,
        rotation_grace: float = 0.0,
        max_sessions: int | None = None,
        max_sessions_per_principal: int | None = None,
        principal_policy: str = "supersede",
        reactor: IReactorTime | None = None,
        allowed_origins: Iterable[str] = (),
        touch_fraction: float = 0.1,
    ) -> None:
        self.app = app
        if not 0 < touch_fraction <= 1:
            raise ValueError(f"touch_fraction is in (0, 1], not {touch_fraction!r}")
        self.touch_fraction = touch_fraction
        self.allowed_origins = tuple(allowed_origins)
        factory: Callable[[Any, str], Session] = session_factory or Session
        overrides: dict[str, float] = {}
        if timeout is not None:
            if not timeout > 0:
                raise ValueError(f"timeout is a positive number of seconds, not {timeout!r}")
            overrides["sessionTimeout"] = timeout
        if absolute_timeout is not None:
            if not absolute_timeout > 0:
                raise ValueError(
                    f"absolute_timeout is a positive number of seconds, not {absolute_timeout!r}"
                )
            overrides["absolute_timeout"] = absolute_timeout
        if overrides:
            if not isinstance(factory, type):
                raise TypeError("timeout= needs session_factory to be a Session class")
            factory = type(factory.__name__, (factory,), overrides)
        self.sessionFactory = factory
        self.trust_proxy_headers = trust_proxy_headers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
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

    # -- the session owner (what sessions and the keeper ask of it) ----------

    # Apps call these from worker threads too (FastAPI and Starlette run a
    # plain ``def`` endpoint in a thread pool): the keeper's store, timers
    # and background writes belong to the server's event loop, so there they
    # run, the thread waiting for them.

    def _start_checking(self, session: Session) -> None:
        self._in_loop(self._keeper.start_checking, session)

    def _touched(self, session: Session) -> None:
        self._in_loop(self._keeper.touched, session)

    def _expired_by_hand(self, session: Session) -> None:
        self._in_loop(self._keeper.expired_by_hand, session)

    def _rotate(self, session: Session, grace: float | None = None) -> None:
        uid = self._new_uid()
        keeper = self._keeper
        self._in_loop(lambda rotated: keeper.rotate(rotated, uid, grace), session)

    def _in_loop(self, work: Callable[[Session], None], session: Session) -> None:
        """``work(session)`` on the event loop's thread; from another thread,
        handed to the loop and waited for."""
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread or loop.is_closed():
            work(session)
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            try:
                work(session)
            except BaseException as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

        loop.call_soon_threadsafe(run)
        done.result()

    async def aclose(self) -> None:
        """Stop the shared-store loop, finish background writes, close the
        store (what lifespan shutdown does; for servers without lifespan)."""
        await self._keeper.aclose()

    # -- ASGI ---------------------------------------------------------------

    def _enter_loop(self) -> bool:
        """A connection arrived: serve sessions on its event loop (the
        keeper started there). False if it is not an asyncio loop (trio,
        say: the keeper's timers need asyncio)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if loop is not self._loop:
            self._loop = loop
            self._loop_thread = threading.get_ident()
        keeper = self._keeper
        if not keeper.synchronous:
            keeper.start()
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                await self._lifespan(scope, receive, send)
            elif kind == "websocket":
                await serve_websocket(self, scope, receive, send, SCOPE_KEY)
            else:
                await self.app(scope, receive, send)
            return
        if not self._enter_loop():
            await self._refuse_wrong_loop(send)
            return
        secure, uid = self._read_headers(scope)
        visit = MiddlewareVisit(self, secure)
        visiting = current_visit.set(visit)
        try:
            await self._serve_http(scope, receive, send, visit, uid)
        finally:
            current_visit.reset(visiting)

    async def _serve_http(
        self, scope: Scope, receive: Receive, send: Send, visit: MiddlewareVisit, uid: str | None
    ) -> None:
        keeper = self._keeper
        asynchronous = not keeper.synchronous  # (a store reached by await)
        if uid is not None:
            # The store unreachable: the app runs without its session
            # (untouched: the missed touch is not made up); asking for it
            # answers 503.
            await visit.load_presented(uid)
        scope[SCOPE_KEY] = visit
        scope["session"] = visit.mapping
        replaced = False
        started = False
        # A streamed response (or one waiting for the client to leave) ends
        # with its session.
        link = StreamLink(receive, send, visit)

        async def send_with_session(message: Message) -> None:
            nonlocal replaced, started
            if message["type"] != "http.response.start":
                if replaced:
                    return  # the app's response after a 503 or 409 took its place
                lock = link.lock
                if lock is None:
                    if not message.get("more_body", False):
                        await send(message)  # (the usual case: one body)
                        return
                    link.streams()  # bound to its session from now on
                    lock = link.lock
                    assert lock is not None
                if link.ended:
                    return  # ended with its session: later sends are dropped
                if not message.get("more_body", False):
                    link.complete = True
                async with lock:  # (not with the end of the body sent at the end)
                    await send(message)
                return
            started = link.started = True
            if replaced or link.ended:
                return
            if visit.failed:
                # The app asked for a session the store could not load (its
                # answer is an error page, or made without the session).
                replaced = True
                await UNAVAILABLE.send(send)
                return
            if visit.used:
                if asynchronous:
                    answer = await self._write_visit(visit.used, visit)
                    if answer is not None:
                        replaced = True
                        await answer.send(send)
                        return
                else:
                    keeper.persist_now(visit.used)
                cookies = visit.cookie_headers()
                if cookies:
                    message = {**message, "headers": [*message.get("headers", ()), *cookies]}
            # Every page could read request.session (an empty one reads as
            # the visitor's too: "not logged in"), and reading it leaves no
            # trace when json's C encoder does: a shared cache must key every
            # response by the cookie.
            headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", ())]
            await send({**message, "headers": vary_on_cookie(headers)})

        try:
            await self.app(scope, link.receive, send_with_session)
        except SessionConflict as exc:  # (await session.set_principal() on an ended one)
            if started:
                raise
            log.info("%s", exc)
            replaced = True
            await CONFLICT.send(send)
        except StoreUnavailable as exc:
            if not visit.failed:
                raise
            if replaced:
                pass  # answered 503 already (the app's error page was replaced)
            elif started:
                # Too late for a 503: the response is cut short.
                log.warning("session needed after the response started: %s", exc)
            else:
                replaced = True
                await UNAVAILABLE.send(send)
        finally:
            if link.streaming:
                await link.aclose()
            visit.mapping._release()
            # What changed after the response started (a background task, a
            # streamed body) or in a request that failed: written now.
            if visit.used and not replaced:
                if not asynchronous:
                    keeper.persist_now(visit.used)
                else:
                    late = visit.pending()
                    if late:
                        try:
                            await keeper.persist(late, visit)
                        except (StoreUnavailable, SessionConflict) as exc:
                            log.warning(
                                "session changes made after the response were not saved: %s", exc
                            )

    def _read_headers(self, scope: Scope) -> tuple[bool, str | None]:
        """Whether the request is secure; the uid its session cookie names."""
        secure = is_secure(scope, lambda: self._proxy_says(scope))
        cookie_header = join_cookie_headers(scope["headers"])
        if cookie_header is None:
            return secure, None
        uids = self._cookie_uids(cookie_header, secure)
        return secure, uids[1 if secure else 0] if uids else None

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass lifespan through to the app, starting the keeper before its
        startup and closing it after its shutdown. An app that does not take
        lifespan (it raises at once) gets it served here instead."""
        keeper = self._keeper
        started = False
        answered = False
        refused = False

        async def receive_lifespan() -> Message:
            nonlocal started, refused
            message = await receive()
            if message["type"] == "lifespan.startup":
                started = True
                problem = await self._start_sessions()
                if problem is not None:
                    # The app never sees a startup it cannot have.
                    refused = True
                    await send({"type": "lifespan.startup.failed", "message": problem})
                    raise _StartupRefused(problem)
            return message

        async def send_lifespan(message: Message) -> None:
            nonlocal answered
            if refused:
                return  # the server was told why (the app's own report of it is dropped)
            answered = True
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await keeper.aclose()
            await send(message)

        try:
            await self.app(scope, receive_lifespan, send_lifespan)
        except Exception:
            if refused:
                return
            if answered:
                raise
            log.debug("the app does not take lifespan; serving it for sessions", exc_info=True)
            await self._serve_lifespan(receive, send, started)

    def __repr__(self) -> str:
        return f"<SessionMiddleware {len(self.sessions)} live sessions, app {self.app!r}>"


class _StartupRefused(Exception):
    """Raised to the app's lifespan: sessions cannot start (the server was
    sent ``lifespan.startup.failed`` with the reason)."""


if TYPE_CHECKING:

    def _is_owner(middleware: SessionMiddleware) -> SessionOwner:
        """mypy's check that the middleware is what a Session needs of its site."""
        return middleware
