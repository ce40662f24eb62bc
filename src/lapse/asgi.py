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

Websocket scopes pass through untouched (no session in them); lifespan
messages pass through to the app, the session keeper starting before the
app's startup and closing after its shutdown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

# What making the middleware needs, imported with this module, before the
# server runs: Starlette makes its middleware inside the event loop, on the
# first lifespan event or request, where an import would block the loop (the
# default reactor brings in uvicorn, tens of milliseconds; the shared stores
# bring in sqlite3 and the Redis client).
import lapse.internet.reactor
import lapse.sessions.stores.memory
import lapse.sessions.stores.redis
import lapse.sessions.stores.sqlite  # noqa: F401
from lapse.internet.interfaces import IReactorTime
from lapse.sessions import (
    ExpiryHook,
    Session,
    SessionConflict,
    SessionData,
    SessionOwner,
    SessionStore,
    StoreUnavailable,
    Visit,
    current_visit,
)
from lapse.web._cookies import vary_on_cookie
from lapse.web._plumbing import (
    CONFLICT,
    UNAVAILABLE,
    HTTPSessions,
    is_secure,
    join_cookie_headers,
    session_cookie,
)
from lapse.web._proxy import TrustSetting
from lapse.web._types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from _collections_abc import dict_items, dict_keys, dict_values

__all__ = ["SessionMapping", "SessionMiddleware", "current_session", "get_session"]

log = logging.getLogger("lapse.asgi")

SCOPE_KEY = "lapse.session"
"""The scope key under which the middleware keeps a request's session state."""


class _Visit(Visit):
    """One HTTP request's session: the one its cookie named, the one it uses."""

    __slots__ = ("current", "failed", "failure", "mapping", "owner", "presented", "secure", "used")

    def __init__(self, owner: SessionMiddleware, secure: bool) -> None:
        self.owner = owner
        self.secure = secure
        self.failure: StoreUnavailable | None = None
        """Why the session the cookie named could not be loaded: raised to
        the app when it asks for its session (then the answer is 503)."""
        self.failed = False
        """The app asked for its session and got ``failure``."""
        self.presented: Session | None = None
        """The live session the request's cookie named, if any."""
        self.current: Session | None = None
        """The session the request has: the presented one, or one it made."""
        self.used: list[Session] = []
        """Every session the request touched or made, for persisting."""
        self.mapping = SessionMapping(self)

    def _fail(self) -> None:
        if self.failure is not None:
            self.failed = True
            raise self.failure

    def peek(self) -> Session | None:
        self._fail()
        session = self.current
        if session is None or session._expired:
            return None
        return session

    def get(self) -> Session:
        self._fail()
        session = self.current
        if session is None or session._expired:
            session = self.current = self.owner.makeSession()
            self.used.append(session)
            self.mapping._bind()
        return session

    def _note_end(self, session: Session) -> None:
        super()._note_end(session)
        if session is self.current:
            self.mapping._bind()

    def pending(self) -> list[Session]:
        """Sessions with changes not yet written (made or changed late)."""
        views = self._views or {}
        pending = []
        for session in self.used:
            entry = views.get(session)
            data = session._data if entry is None else entry[0]
            if session._needs_create or (data is not None and data.dirty):
                pending.append(session)
        return pending

    def cookie_headers(self) -> list[tuple[bytes, bytes]]:
        """The Set-Cookie headers the response needs: the session cookie if
        the request made a session or its uid changed (rotation), a deletion
        if the session ended; none otherwise."""
        session = self.current
        if session is None:
            return []
        secure = self.secure
        name = self.owner._cookie_names[1 if secure else 0]
        cookie = session_cookie(name, session, self.presented, self, secure=secure)
        return [] if cookie is None else [(b"set-cookie", cookie)]


_MISSING: Any = object()


class SessionMapping(dict[str, Any]):
    """``scope["session"]``: the request's session data, made on first write.

    This is what Starlette's ``request.session`` returns: a ``dict`` (a
    subclass) in everything a program can see (``json.dumps``, ``==``, ``|``,
    ``|=``, ``copy()``, ``popitem()`` taking the newest key, ``repr``), whose
    changes go to the session's :attr:`~lapse.sessions.Session.data`, so only
    the changed keys are written. Reading without a session reads an empty
    dict (and makes none); writing makes the session, as ``get_session()``
    would. Values must be JSON-serialisable (see
    :class:`~lapse.sessions.SessionData`). ``clear()`` is a logout: it
    expires the session (callbacks run, the cookie is deleted).

    The dict's own storage is kept equal to the session's data (code such as
    ``json``'s C encoder reads it directly): filled when the request gets its
    session (every value decoded), then changed with the data.
    """

    __slots__ = ("_data", "_released", "_session", "_visit")

    def __init__(self, visit: _Visit) -> None:
        super().__init__()
        self._visit = visit
        self._session: Session | None = None
        self._data: SessionData | None = None
        self._released = False

    # -- keeping the dict equal to the session's data -------------------------

    def _bind(self) -> Session | None:
        """The request's live session; the dict made equal to its data first
        if the session or its data object changed (made, ended, reloaded)."""
        session = self._visit.peek()
        data = None if session is None else session.data
        if session is not self._session or data is not self._data or self._released:
            self._attach(session, data)
        return session

    def _attach(self, session: Session | None, data: SessionData | None) -> None:
        self._unmirror()
        dict.clear(self)
        self._session = session
        self._data = data
        if data is not None:
            dict.update(self, {key: data[key] for key in data})
            if not self._released:
                if data._mirrors is None:
                    data._mirrors = []
                data._mirrors.append(self)

    def _unmirror(self) -> None:
        data = self._data
        if data is not None and data._mirrors:
            data._mirrors = [mirror for mirror in data._mirrors if mirror is not self]

    def _release(self) -> None:
        """The request is over: stop following the data's changes (a later
        use, from a task the request left behind, re-reads it each time)."""
        self._unmirror()
        self._released = True

    # -- reading --------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        self._bind()
        return dict.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        self._bind()
        return dict.get(self, key, default)

    def __contains__(self, key: object) -> bool:
        self._bind()
        return dict.__contains__(self, key)

    def __iter__(self) -> Iterator[str]:
        self._bind()
        return dict.__iter__(self)

    def __reversed__(self) -> Iterator[str]:
        self._bind()
        return dict.__reversed__(self)

    def __len__(self) -> int:
        self._bind()
        return dict.__len__(self)

    def keys(self) -> dict_keys[str, Any]:
        self._bind()
        return dict.keys(self)

    def values(self) -> dict_values[str, Any]:
        self._bind()
        return dict.values(self)

    def items(self) -> dict_items[str, Any]:
        self._bind()
        return dict.items(self)

    def __eq__(self, other: object) -> bool:
        self._bind()
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        self._bind()
        return dict.__ne__(self, other)

    def copy(self) -> dict[str, Any]:
        """A plain ``dict`` of the data (changing it changes no session)."""
        self._bind()
        return dict.copy(self)

    def __copy__(self) -> dict[str, Any]:
        return self.copy()

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return copy.deepcopy(self.copy(), memo)

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (self.copy(),))

    def __or__(self, other: Any) -> Any:
        if not isinstance(other, dict):
            return NotImplemented
        merged = self.copy()
        merged.update(other)
        return merged

    def __ror__(self, other: Any) -> Any:
        if not isinstance(other, dict):
            return NotImplemented
        merged = dict(other)
        merged.update(self.copy())
        return merged

    def __repr__(self) -> str:
        self._bind()
        return dict.__repr__(self)

    @classmethod
    def fromkeys(cls, iterable: Iterable[Any], value: Any = None) -> Any:
        """A plain ``dict`` (a session mapping belongs to a request)."""
        return dict.fromkeys(iterable, value)

    # -- writing: through the session's data ----------------------------------

    def __setitem__(self, key: str, value: Any) -> None:
        session = self._visit.get()
        self._bind()
        session.data[key] = value

    def __delitem__(self, key: str) -> None:
        session = self._bind()
        if session is None or not dict.__contains__(self, key):
            raise KeyError(key)
        del session.data[key]

    def pop(self, key: str, default: Any = _MISSING) -> Any:
        session = self._bind()
        if session is None or not dict.__contains__(self, key):
            if default is _MISSING:
                raise KeyError(key)
            return default
        value = dict.__getitem__(self, key)
        del session.data[key]
        return value

    def popitem(self) -> tuple[str, Any]:
        """Remove and return the newest key and its value, as a dict does."""
        session = self._bind()
        if session is None or not dict.__len__(self):
            raise KeyError("popitem(): dictionary is empty")
        key = next(dict.__reversed__(self))
        value = dict.__getitem__(self, key)
        del session.data[key]
        return key, value

    def setdefault(self, key: str, default: Any = None) -> Any:
        self._bind()
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        self[key] = default
        return default

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """As ``dict.update``: a mapping (anything with ``keys()``), or pairs,
        then keyword arguments; each key written through the session."""
        if hasattr(other, "keys"):
            for key in other.keys():  # noqa: SIM118 - keys(), as dict.update calls it
                self[key] = other[key]
        else:
            for index, item in enumerate(other):
                try:
                    pair = tuple(item)
                except TypeError:
                    raise TypeError(
                        f"cannot convert dictionary update sequence element #{index} to a sequence"
                    ) from None
                if len(pair) != 2:
                    raise ValueError(
                        f"dictionary update sequence element #{index} has length "
                        f"{len(pair)}; 2 is required"
                    )
                self[pair[0]] = pair[1]
        for key, value in kwargs.items():
            self[key] = value

    def __ior__(self, other: Any) -> SessionMapping:  # type: ignore[override]
        self.update(other)
        return self

    def clear(self) -> None:
        """End the session (a logout), if the request has one."""
        session = self._bind()
        if session is not None:
            session.expire()
        self._attach(None, None)


def _visit_of(request_or_scope: Any) -> _Visit:
    scope = getattr(request_or_scope, "scope", request_or_scope)
    try:
        visit = scope[SCOPE_KEY]
    except (KeyError, TypeError):
        visit = None
    if not isinstance(visit, _Visit):
        raise RuntimeError(
            "no lapse session here: install lapse.asgi.SessionMiddleware "
            "(sessions are for HTTP requests, not websockets)"
        )
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
      ``Site``'s.
    - ``reactor``: the time source and timer (a ``Clock`` in tests).

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
        reactor: IReactorTime | None = None,
    ) -> None:
        self.app = app
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
        self._host_sessions(reactor, store, on_expire, cookie_name, rotation_grace, max_sessions)

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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # trio, say: the keeper's timers need asyncio
            await self._refuse_wrong_loop(send)
            return
        if loop is not self._loop:
            self._loop = loop
            self._loop_thread = threading.get_ident()
        keeper = self._keeper
        shared = keeper.shared
        if shared:
            keeper.start()
        secure, uid = self._read_headers(scope)
        visit = _Visit(self, secure)
        visiting = current_visit.set(visit)
        try:
            await self._serve_http(scope, receive, send, visit, uid)
        finally:
            current_visit.reset(visiting)

    async def _serve_http(
        self, scope: Scope, receive: Receive, send: Send, visit: _Visit, uid: str | None
    ) -> None:
        keeper = self._keeper
        shared = keeper.shared
        if uid is not None:
            try:
                session = await keeper.load(uid) if shared else keeper.load_now(uid)
            except StoreUnavailable as exc:
                # The app runs without its session (untouched: the missed
                # touch is not made up); asking for it answers 503.
                visit.failure = exc
                session = None
            if session is not None:
                visit.current = visit.presented = session
                visit.used.append(session)
                visit.mapping._bind()
        scope[SCOPE_KEY] = visit
        scope["session"] = visit.mapping
        replaced = False
        started = False

        async def send_with_session(message: Message) -> None:
            nonlocal replaced, started
            if message["type"] == "http.response.start":
                started = True
            if replaced:
                return  # the app's response after a 503 or 409 took its place
            if message["type"] != "http.response.start":
                await send(message)
                return
            if visit.failed:
                # The app asked for a session the store could not load (its
                # answer is an error page, or made without the session).
                replaced = True
                await UNAVAILABLE.send(send)
                return
            if visit.used:
                try:
                    if shared:
                        await keeper.persist(visit.used, visit)
                    else:
                        keeper.persist_now(visit.used)
                except StoreUnavailable:
                    replaced = True
                    await UNAVAILABLE.send(send)
                    return
                except SessionConflict as exc:
                    log.info("%s", exc)
                    replaced = True
                    await CONFLICT.send(send)
                    return
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
            await self.app(scope, receive, send_with_session)
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
            visit.mapping._release()
            # What changed after the response started (a background task, a
            # streamed body) or in a request that failed: written now.
            if visit.used and not replaced:
                if not shared:
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
