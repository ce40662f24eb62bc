"""What a Site and the ASGI middleware share: owning sessions over HTTP.

A session host chooses the store (a URL, a store object, or the
``LAPSE_SESSION_STORE`` environment variable), keeps the live sessions
(``sessions``), makes them with unpredictable uids, answers what sessions ask
of their owner (passing it on to the keeper), and knows the session cookie's
names and how to find them in a ``Cookie`` header.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from lapse import settings
from lapse.internet.interfaces import IReactorTime
from lapse.sessions import (
    ExpiryHook,
    Keeper,
    Session,
    SessionData,
    SessionInfo,
    SessionStats,
    SessionStore,
    StoreConfigError,
    make_keeper,
    short_uid,
)
from lapse.sessions.store import REQUIRED_MEMBERS
from lapse.sessions.stores import DEFAULT_STORE_URL, store_from_url
from lapse.web._proxy import ProxyTrust, TrustSetting, proxy_trust
from lapse.web._uids import UID_BYTES, encode_uid, new_uid

__all__ = ["SessionHost", "cookie_uid"]

session_log = logging.getLogger("lapse.sessions")

NEEDS_ASYNCIO = (
    "lapse sessions need an asyncio event loop (their timers, expiry and store calls "
    "run on it), and this server runs another (trio?): serve the app with asyncio "
    "(lapse serve, uvicorn, or hypercorn -k asyncio)"
)
"""The one line for an app served on an event loop that is not asyncio's."""

_WRONG_LOOP_BODY = b"This server cannot serve this application; its log says why.\n"
_WRONG_LOOP_START = {
    "type": "http.response.start",
    "status": 500,
    "headers": [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(_WRONG_LOOP_BODY)).encode("ascii")),
    ],
}

MAX_UID_COOKIE = 256
"""A session cookie longer than this names no session."""


T = TypeVar("T")


def _check_store_object(store: object) -> None:
    """:class:`StoreConfigError` naming what ``store=`` was given, unless it
    is a store object; the value itself is not shown (a URL in bytes may
    hold a password)."""
    kind = type(store).__name__
    if isinstance(store, bytes | bytearray):
        raise StoreConfigError(
            f"store= takes a store URL as str (or a store object), not {kind}: decode it first"
        )
    missing = [name for name in REQUIRED_MEMBERS if not hasattr(store, name)]
    if missing:
        lacks = (
            "" if len(missing) == len(REQUIRED_MEMBERS) else f" (it has no {', '.join(missing)})"
        )
        raise StoreConfigError(
            f"store= takes a store URL (str) or a session store object, not {kind}{lacks}"
        )


def cookie_uid(found: re.Match[bytes] | None) -> str | None:
    """A session cookie's value, read as the whole-header parser reads it:
    stripped, unquoted; an empty or oversized value is none."""
    if found is None:
        return None
    value = found.group(1).strip()
    if len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
        value = value[1:-1]
    if not value or len(value) > MAX_UID_COOKIE:
        return None
    return value.decode("latin-1")


class SessionHost:
    """The session owner part of a :class:`~lapse.web.server.Site` and of
    :class:`~lapse.asgi.SessionMiddleware`."""

    sessionFactory: Callable[[Any, str], Session] = Session
    reactor: IReactorTime
    sessions: dict[str, Session]
    counter: int
    _log_redact: frozenset[bytes] = frozenset()
    """Query arguments whose values logs never show (a live view's token)."""
    _proxy_trust: ProxyTrust | None = None
    _trust_setting: TrustSetting = False
    _store_checked = False
    """The store answered a start-up check (:meth:`check_start`)."""
    _wrong_loop_said = False

    @property
    def trust_proxy_headers(self) -> TrustSetting:
        """Which ``X-Forwarded-For``/``-Proto`` to believe: ``False``, ``True``
        (one proxy), a number of proxies, or the proxies' addresses and
        networks (see :mod:`lapse.web._proxy`)."""
        return self._trust_setting

    @trust_proxy_headers.setter
    def trust_proxy_headers(self, setting: TrustSetting) -> None:
        self._proxy_trust = proxy_trust(setting)
        self._trust_setting = setting

    def _host_sessions(
        self,
        reactor: IReactorTime | None,
        store: str | SessionStore | None,
        on_expire: ExpiryHook | None,
        cookie_name: str,
        rotation_grace: float,
        max_sessions: int | None,
        max_sessions_per_principal: int | None = None,
        principal_policy: str = "supersede",
    ) -> None:
        """Set up the sessions part (called from the subclass's ``__init__``)."""
        if reactor is None:
            from lapse.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.sessions = {}
        self.cookie_name = cookie_name
        self._entropy: Callable[[int], bytes] = os.urandom
        self.counter = 0
        if store is None:
            store = settings.SESSION_STORE.get() or DEFAULT_STORE_URL
        if isinstance(store, str):
            # The memory store keeps the host's time (a Clock in tests); a
            # shared store keeps its own (Redis: the server's TIME).
            memory = store.split(":", 1)[0].lower() == "memory"
            store = store_from_url(
                store, clock=(lambda: self.reactor.seconds()) if memory else None
            )
        else:
            _check_store_object(store)
        self._keeper: Keeper = make_keeper(
            self,
            store,
            on_expire,
            rotation_grace=rotation_grace,
            max_sessions=max_sessions,
            max_sessions_per_principal=max_sessions_per_principal,
            principal_policy=principal_policy,
        )

    async def check_start(self) -> str | None:
        """Can this host serve? None, or the one line saying why it never can
        (every entry point stops start-up on it: ``reactor.run()``, ``lapse
        serve``, the ASGI lifespan).

        It never can on an event loop other than asyncio's, or with a store
        that says it can never work as configured (a
        :class:`StoreUnavailable` that is ``permanent``: a bad SQLite path, a
        refused Redis password, an unknown host...). A store merely
        unreachable now (refused, timed out) is logged, and start-up goes on:
        the keeper retries it, and requests that need a session get 503
        until it answers.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return NEEDS_ASYNCIO
        if self._store_checked:
            return None
        failure = await self._keeper.open_store()
        if failure is None:
            self._store_checked = True
        elif failure.permanent:
            return f"the session store cannot work: {failure}"
        return None

    async def _refuse_wrong_loop(self, send: Callable[[dict[str, Any]], Any]) -> None:
        """Answer a request served on an event loop that is not asyncio's
        (no lifespan told us before): a short 500 page, and the reason logged
        once, rather than a traceback per request."""
        if not self._wrong_loop_said:
            self._wrong_loop_said = True
            session_log.error("%s", NEEDS_ASYNCIO)
        await send(dict(_WRONG_LOOP_START))
        await send({"type": "http.response.body", "body": _WRONG_LOOP_BODY})

    # -- configuration ------------------------------------------------------

    @property
    def stats(self) -> SessionStats:
        """Counters of this host's sessions (:class:`lapse.sessions.SessionStats`)."""
        return self._keeper.stats

    @property
    def keeper(self) -> Keeper:
        """The keeper of this host's sessions (:func:`lapse.sessions.make_keeper`:
        a ``LocalKeeper`` or a ``SharedKeeper``), for tools that drive it
        themselves: ``start()``, ``persist(sessions)``, ``poll_once()``."""
        return self._keeper

    @property
    def store(self) -> SessionStore:
        """Where the sessions live."""
        return self._keeper.store

    async def call_store(self, operation: Awaitable[T]) -> T:
        """Await a call of :attr:`store` as the host's own calls are: within
        the store timeout, counted in :attr:`stats`, an outage logged once
        (:class:`StoreUnavailable`). For tools such as the live view and the
        metrics endpoint."""
        result: T = await self._keeper.call(operation)
        return result

    @property
    def on_expire(self) -> ExpiryHook | None:
        """The durable expiry hook, called for every ended session."""
        return self._keeper.on_expire

    @on_expire.setter
    def on_expire(self, hook: ExpiryHook | None) -> None:
        self._keeper.on_expire = hook

    @property
    def cookie_name(self) -> str:
        """The name of the session cookie for plain requests."""
        return self._cookie_name

    @cookie_name.setter
    def cookie_name(self, name: str) -> None:
        if not name or not name.isascii() or any(c in name for c in ' ;,="\t\r\n'):
            raise ValueError(f"{name!r} is not a usable cookie name")
        self._cookie_name = name
        raw = name.encode("ascii")
        self._cookie_names = (raw, b"__Host-" + raw)
        # The session cookies are looked for directly; the whole header is
        # only parsed if the application asks for its cookies.
        self._cookie_finders = tuple(
            re.compile(rb"(?:^|;)\s*" + re.escape(cookie) + rb"\s*=([^;]*)").search
            for cookie in self._cookie_names
        )

    @property
    def secure_cookie_name(self) -> str:
        """The name of the session cookie for secure requests."""
        return self._cookie_names[1].decode("ascii")

    # -- sessions -----------------------------------------------------------

    def _mkuid(self) -> str:
        # 144 random bits as 24 URL-safe base64 characters (lapse.web._uids):
        # from a batch read from os.urandom, unless a test set its own source.
        entropy = self._entropy
        if entropy is os.urandom:
            return new_uid()
        return encode_uid(entropy(UID_BYTES))

    def _new_uid(self, like: str | None = None) -> str:
        """A fresh uid; given ``like`` (a rotation), one that keeps its first
        two characters, so a store that places sessions by them (Redis
        shards) keeps the session where it is: 132 of its 144 bits are new."""
        sessions = self.sessions
        keep = like[:2] if like is not None and len(like) == 24 else ""
        uid = keep + self._mkuid()[len(keep) :]
        while uid in sessions:  # pragma: no cover - 132 random bits
            uid = keep + self._mkuid()[len(keep) :]
        return uid

    def makeSession(self) -> Session:
        """Create a session with a new unpredictable uid and start its clock."""
        uid = self._new_uid()
        self.counter += 1
        session = self.sessions[uid] = self.sessionFactory(self, uid)
        session.startCheckingExpiration()
        self._keeper.stats.session_created(session._lastModified)
        if session_log.isEnabledFor(logging.DEBUG):
            session_log.debug("session %s created", short_uid(uid))
        return session

    # What sessions tell their owner: passed on to the keeper.

    def _start_checking(self, session: Session) -> None:
        self._keeper.start_checking(session)

    def _touched(self, session: Session) -> None:
        self._keeper.touched(session)

    def _expired_by_hand(self, session: Session) -> None:
        self._keeper.expired_by_hand(session)

    def _rotate(self, session: Session, grace: float | None = None) -> None:
        self._keeper.rotate(session, self._new_uid(like=session.uid), grace)

    def _data_for(self, session: Session) -> SessionData:
        return self._keeper.data_for(session)

    async def _set_principal(self, session: Session, principal: str | None) -> list[str]:
        return await self._keeper.set_principal(session, principal)

    # Sessions by principal (the user behind them).

    async def sessions_of(self, principal: str) -> list[SessionInfo]:
        """The live sessions bound to ``principal`` (``session.set_principal``)
        in the store, as :class:`~lapse.sessions.SessionInfo` rows (uid,
        created, last access, deadline, data, principal), most recently used
        first, touching none: "your active sessions".

        ``StoreUnavailable`` if the store cannot be reached; ``TypeError`` if
        it keeps no index of principals."""
        return await self._keeper.sessions_of(principal)

    async def expire_principal(self, principal: str, except_uid: str | None = None) -> list[str]:
        """End every live session of ``principal`` (log out everywhere), but
        ``except_uid`` if given (everywhere else: pass the current
        session's uid); the uids ended.

        Each ends as a logout does: its callbacks run in every process that
        holds a copy (this one at once, the others when they read the store's
        announcement), the durable hook runs once with cause ``"expired"``,
        and the WebSockets and streams opened under it close."""
        return await self._keeper.expire_principal(principal, except_uid)
