"""The session: a uid, a timeout, a last-touched time, data, expiry callbacks.

Knows nothing of HTTP. Its owner (a ``Site``) decides where sessions are
stored and when they end; a session tells its owner when it is touched,
starts being checked, or is expired by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from typing import Any, Protocol

from lapse.internet.interfaces import IReactorTime
from lapse.python.components import Componentized
from lapse.sessions._data import SessionData
from lapse.sessions._visit import current_visit
from lapse.sessions.store import SessionConflict, check_principal

__all__ = ["Session", "SessionOwner", "short_uid"]

log = logging.getLogger("lapse.sessions")


class SessionOwner(Protocol):
    """What a session needs of its site."""

    @property
    def sessions(self) -> MutableMapping[str, Session]: ...
    @property
    def reactor(self) -> IReactorTime: ...

    def _start_checking(self, session: Session) -> None: ...
    def _touched(self, session: Session) -> None: ...
    def _expired_by_hand(self, session: Session) -> None: ...
    def _rotate(self, session: Session, grace: float | None) -> None: ...
    def _data_for(self, session: Session) -> SessionData: ...
    async def _set_principal(self, session: Session, principal: str | None) -> list[str]: ...


def short_uid(uid: str | bytes) -> str:
    """A uid shortened for logs: enough to correlate, too little to hijack.

    A bytes uid (Twisted's tests make sessions with them by hand) is shown
    decoded as Latin-1, so logging and ``repr()`` never raise."""
    if isinstance(uid, bytes):
        uid = uid.decode("latin-1")
    return uid[:8] + "\u2026"


class Session(Componentized):
    """A user's session, kept alive by visits, gone after ``sessionTimeout``.

    Subclass and set ``sessionTimeout`` (seconds of inactivity, 900 by
    default) and, for an absolute lifetime, ``absolute_timeout`` (seconds
    from creation; None, the default, for none), then set the subclass as
    ``Site.sessionFactory``. Keep state
    that must persist (and be shared by processes) in :attr:`data`; components
    (``ICounter(session)``) and attributes stay in this process.

    A server may hold a million of these, so what every session has lives in
    slots; other attributes (a subclass's, an instance's ``sessionTimeout``)
    go in ``__dict__`` as usual.
    """

    __slots__ = (
        "_callbacks",
        "_created",
        "_data",
        "_ends_at",
        "_expired",
        "_lastModified",
        "_principal",
        "_reactor",
        "_state",
        "site",
        "uid",
    )

    sessionTimeout: float = 900
    absolute_timeout: float | None = None
    """Seconds from creation after which the session ends however often it
    is touched (OWASP's absolute timeout); None: no such end."""
    _needs_create = False

    def __init__(self, site: SessionOwner, uid: str, reactor: IReactorTime | None = None) -> None:
        if reactor is None:
            reactor = site.reactor
        self._reactor = reactor
        self.site = site
        self.uid = uid
        # None, the one callback, or a list of them: most sessions have at
        # most one, and a list per session is one more object to collect.
        self._callbacks: Callable[[], Any] | list[Callable[[], Any]] | None = None
        self._data: SessionData | None = None
        self._expired = False
        # The memory store's bookkeeping for this session; None while no
        # memory store checks it (see lapse.sessions.stores.memory).
        self._state: object = None
        # The absolute end (store time), set when the store starts the
        # session if its class has an absolute_timeout.
        self._ends_at: float | None = None
        # The principal it is bound to (the store's index), as last known here.
        self._principal: str | None = None
        self._adapterCache = None
        # When the session was created (store time, once a memory store
        # starts it); the same float object as _lastModified until a touch.
        self._lastModified: float = reactor.seconds()
        self._created: float = self._lastModified

    @property
    def lastModified(self) -> float:
        """When the session was last touched (or began to be checked).

        On the memory store the session ends at ``lastModified +
        sessionTimeout``, so assigning it moves the session's deadline.
        """
        return self._lastModified

    @lastModified.setter
    def lastModified(self, when: float) -> None:
        self._lastModified = when
        if self._state is not None:
            self.site._touched(self)

    @property
    def principal(self) -> str | None:
        """The user behind the session (a name, an id), or None: set by
        :meth:`set_principal` at login, kept by rotation, indexed by the
        store (``site.sessions_of(principal)``)."""
        return self._principal

    @principal.setter
    def principal(self, value: object) -> None:
        raise AttributeError(
            "a session's principal is set by `await session.set_principal(name)`, which "
            "writes it to the store at once (it may end other sessions, or be refused)"
        )

    async def set_principal(self, principal: str | None) -> list[str]:
        """Bind the session to ``principal`` (None: unbind it): call it at
        login, after :meth:`rotate`. Written to the store at once (a new
        session is created first), so the site's ``sessions_of`` and
        ``expire_principal`` see it.

        With the site's ``max_sessions_per_principal``, one login too many
        either ends the least recently used of the principal's other sessions
        (cause ``"superseded"``; their uids are returned) or, with
        ``principal_policy="refuse"``, raises
        :class:`~lapse.sessions.TooManySessions` and changes nothing.
        ``SessionConflict`` if the session ended meanwhile;
        ``StoreUnavailable`` if the store cannot be reached.
        """
        if principal is not None:
            principal = check_principal(principal)
        if self._expired:
            raise SessionConflict(f"session {short_uid(self.uid)} has ended: no one logs into it")
        return await self.site._set_principal(self, principal)

    @property
    def data(self) -> SessionData:
        """State that persists with the session: JSON values, saved by key.

        In a request on a shared store, this is the request's own view of
        the data (its changes are its own until the request writes them);
        elsewhere, the process's copy."""
        visit = current_visit.get()
        if visit is not None:
            views = visit._views
            if views is not None:
                entry = views.get(self)
                if entry is not None:
                    return entry[0]
        data = self._data
        if data is None:
            data = self._data = self.site._data_for(self)
        return data

    def _store_values(self) -> dict[str, Any]:
        """The dict behind :attr:`data`: what the memory store keeps and hands
        to the expiry hook."""
        data = self._data
        if data is None:
            data = self._data = SessionData()
        return data._values

    def _peek_values(self) -> dict[str, Any] | None:
        data = self._data
        return None if data is None else data._values

    @property
    def expireCallbacks(self) -> list[Callable[[], Any]]:
        """The callbacks that will run when this session expires."""
        callbacks = self._callbacks
        if not isinstance(callbacks, list):
            callbacks = self._callbacks = [] if callbacks is None else [callbacks]
        return callbacks

    @property
    def expired(self) -> bool:
        """Whether this session has ended."""
        return self._expired

    def startCheckingExpiration(self) -> None:
        """Expire this session after ``sessionTimeout`` seconds without a touch."""
        if not self._expired:
            self.site._start_checking(self)

    def touch(self) -> None:
        """Mark the session as used now: its deadline moves to now + timeout."""
        if self._expired:
            return
        self._lastModified = self._reactor.seconds()
        self.site._touched(self)

    def rotate(self, *, grace: float | None = None) -> str:
        """Give the session a new uid, keeping everything else (data,
        callbacks, components, creation time, so its absolute end): call it
        at login, and at every change of privilege, against session
        fixation. Returns the new uid.

        Only the response of the request that rotates carries the new uid.
        By default (the site's ``rotation_grace``, 0 unless set) the old uid
        ends at once: a request presenting it gets a fresh, empty session,
        and a request still in flight that loaded the session under it
        cannot write to it any more.

        ``grace`` (seconds) keeps the old uid naming the session that much
        longer, for rotations that are *not* a privilege change (periodic
        renewal), so that requests already in flight with the old cookie
        still find the session (their responses never carry the new uid).
        Anyone holding the old uid holds the session until the grace ends:
        never give a grace to a rotation at login. Does nothing on an ended
        session.
        """
        if not self._expired:
            if grace is not None and not (
                isinstance(grace, int | float) and 0 <= grace < float("inf")
            ):
                raise ValueError(f"grace is seconds >= 0, not {grace!r}")
            self.site._rotate(self, grace)
            visit = current_visit.get()
            if visit is not None:
                visit._note_rotation(self)
        return self.uid

    def notifyOnExpire(self, callback: Callable[[], Any]) -> None:
        """Call ``callback()`` once when this session expires.

        On a session that has already expired, the callback runs at once.
        """
        if self._expired:
            self._run_callback(callback)
            return
        if self._callbacks is None:
            self._callbacks = callback
        else:
            self.expireCallbacks.append(callback)

    def expire(self) -> None:
        """End the session now (idempotent): a logout.

        It leaves ``site.sessions`` first; then each callback runs once, in
        the order registered, isolated: one that raises is logged with its
        traceback and the others still run. Then the store hears of it.
        """
        if self._expired:
            return
        self._end()
        visit = current_visit.get()
        if visit is not None:
            visit._note_end(self)
        self.site._expired_by_hand(self)

    def _end(self) -> None:
        """End this process's copy of the session and run its callbacks."""
        if self._expired:
            return
        self._expired = True
        sessions = self.site.sessions
        if sessions.get(self.uid) is self:
            del sessions[self.uid]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("session %s expired", short_uid(self.uid))
        callbacks, self._callbacks = self._callbacks, None
        if isinstance(callbacks, list):
            for callback in callbacks:
                self._run_callback(callback)
        elif callbacks is not None:
            self._run_callback(callbacks)

    def _run_callback(self, callback: Callable[[], Any]) -> None:
        try:
            callback()
        except Exception:
            log.exception("expiry callback %r of session %s raised", callback, short_uid(self.uid))
            stats = getattr(self.site, "stats", None)
            if stats is not None:
                stats.callback_error()

    def __repr__(self) -> str:
        state = "expired" if self._expired else "live"
        return f"<{type(self).__name__} {short_uid(self.uid)} {state}>"
