"""The request path of the async strategy: a store reached through its
async protocol (see :mod:`lapse.sessions._shared`, which adds the rounds that
end sessions).

``site.sessions`` holds this process's copies of the sessions it has seen.
A request loads each session it presents (one ``load``, which touches it)
and, before its response, writes what it did (:meth:`StoreRequests.persist`):
new sessions, rotations, changed keys, logouts. A touch outside a request is
a background ``load``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from lapse.sessions._data import SessionData
from lapse.sessions._keeper import ExpiryHook, Keeper, KeeperOwner
from lapse.sessions._session import Session, short_uid
from lapse.sessions._visit import Visit, current_visit
from lapse.sessions.store import (
    SessionConflict,
    SessionStore,
    StoredSession,
    StoreUnavailable,
)

__all__ = ["StoreRequests"]


class StoreRequests(Keeper):
    """Loads and writes a site's sessions through the async store protocol."""

    def __init__(
        self,
        owner: KeeperOwner,
        store: SessionStore,
        on_expire: ExpiryHook | None = None,
        **options: Any,
    ) -> None:
        super().__init__(owner, store, on_expire, **options)
        # Rotations not written to the store yet, by new uid: the uid the
        # store knows the session by, the grace, and the visit of the request
        # that rotated it (it writes them; None: made outside a request,
        # written by the next request to persist the session).
        self._rotations: dict[str, tuple[str, float, Visit | None]] = {}

    def _wake_in(self, seconds: float) -> None:
        """Something may end ``seconds`` from now (a session made, or ended
        by hand): a strategy that sleeps until the next deadline wakes sooner."""

    # -- what sessions tell the keeper --------------------------------------

    def start_checking(self, session: Session) -> None:
        session._needs_create = True

    def touched(self, session: Session) -> None:
        if not session._needs_create:
            data = session._data
            version = None if data is None else data._version
            self.spawn(self.call(self.store.load(session.uid, version)))

    def expired_by_hand(self, session: Session) -> None:
        pending = self._rotations.get(session.uid)
        uid = session.uid if pending is None else pending[0]
        self.spawn(self._expire(uid))

    async def _expire(self, uid: str) -> None:
        if await self.call(self.store.expire(uid)):
            self._wake_in(0.0)

    def rotate(self, session: Session, new_uid: str, grace: float | None = None) -> None:
        if grace is None:
            grace = self.rotation_grace
        sessions = self.owner.sessions
        old = session.uid
        if sessions.get(old) is session:
            del sessions[old]
        session.uid = new_uid
        sessions[new_uid] = session
        if not session._needs_create:
            # Written by the rotating request's persist, before its response.
            pending = self._rotations.pop(old, None)
            origin = old if pending is None else pending[0]
            self._rotations[new_uid] = (origin, float(grace), current_visit.get())

    def _rekey(self, old: str, new: str) -> Session | None:
        """Another process rotated ``old`` to ``new``: move this process's
        copy (its callbacks and components) to the new uid."""
        sessions = self.owner.sessions
        copy = sessions.get(old)
        if copy is None or copy._expired or copy._needs_create:
            return None
        del sessions[old]
        current = sessions.get(new)
        if current is not None and not current._expired:
            # Both copies were made here: keep one, with both's callbacks.
            callbacks, copy._callbacks = copy._callbacks, None
            for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
                if callback is not None:
                    current.notifyOnExpire(callback)
            return current
        copy.uid = new
        sessions[new] = copy
        return copy

    # -- loading and saving around a request ---------------------------------

    async def load(self, uid: str) -> Session | None:
        """Touch ``uid`` in the store (one call); this process's copy of it.

        In a request (a current visit), the request gets its own view of the
        session's data, read from what the store returned (or, if the store
        says the data is the version this process holds, from that)."""
        copy = self.owner.sessions.get(uid)
        known: SessionData | None = None
        if copy is not None and not copy._expired and not copy._needs_create:
            held = copy._data
            if held is not None and held._version is not None and held._base is not None:
                known = held
        version = None if known is None else known._version
        stored: StoredSession | None = await self.call(self.store.load(uid, version))
        if stored is None:
            local = self.owner.sessions.get(uid)
            if local is not None and not local._needs_create:
                local._end()
            return None
        session, data = self._adopt(stored, uid, known)
        session._lastModified = self.owner.reactor.seconds()
        visit = current_visit.get()
        if visit is not None:
            if data._base is not None:
                view = SessionData(base=data._base, version=data._version)
            else:
                view = SessionData(dict(data._values), version=data._version)
            visit._add_view(session, view, stored.uid)
        return session

    def _adopt(
        self, stored: StoredSession, presented: str, known: SessionData | None
    ) -> tuple[Session, SessionData]:
        """This process's copy of a session the store holds (loaded as
        ``presented``: its uid, or an old uid rotated away), and the data the
        store returned (``known`` if it said it was unchanged)."""
        sessions = self.owner.sessions
        session = sessions.get(stored.uid)
        if (session is None or session._expired) and stored.uid != presented:
            session = self._rekey(presented, stored.uid)
        if session is None or session._expired:
            session = self.owner.sessionFactory(self.owner, stored.uid)
            sessions[stored.uid] = session
        if session.sessionTimeout != stored.timeout:
            session.sessionTimeout = stored.timeout
        session._principal = stored.principal
        if stored.unchanged and known is not None:
            data = known
            if session._data is None or session._data._version is None:
                session._data = data
        else:
            if stored.encoded is not None:
                data = SessionData(base=stored.encoded, version=stored.version)
            else:
                data = SessionData(dict(stored.data), version=stored.version)
            session._data = data
        return session, data

    async def persist(self, sessions: Iterable[Session], visit: Visit | None = None) -> None:
        """Write what ``visit`` (a request; None: outside one) did to
        ``sessions``: new sessions, its rotations, its changed keys, logouts.

        A request's changes are its own: they are written to the uid it
        loaded the session under (the store follows a rotation made with a
        grace), and if the store no longer has that session (another
        request rotated it away without grace, or ended it) they are not
        written and :class:`SessionConflict` is raised. A request whose
        write fails (that, or :class:`StoreUnavailable`) loses its changes
        and its rotations: nothing of it is written later."""
        store = self.store
        views = None if visit is None else visit._views
        for session in sessions:
            if session._needs_create:
                await self._create(session)
                continue
            store_uid = session.uid
            if store_uid in self._rotations:  # (rare: a rotation not written yet)
                store_uid = await self._rotated_in_store(session, visit)
            entry = None if views is None else views.get(session)
            data = session._data if entry is None else entry[0]
            if data is not None and data.dirty:
                ended = None if visit is None else visit._ended
                if session._expired and ended is not None and session in ended:
                    data._take()  # a logout: what it changed before is moot
                else:
                    target = store_uid if entry is None else entry[1]
                    await self._save(session, data, target)
            if session._expired and await self.call(store.expire(store_uid)):
                self._wake_in(0.0)

    # -- principals ----------------------------------------------------------

    async def set_principal(self, session: Session, principal: str | None) -> list[str]:
        """Write ``session`` (created, or its rotation by this request, first:
        the store binds the uid it knows), then bind it in the store."""
        index = self.principal_index()
        visit = current_visit.get()
        if session._needs_create:
            await self._create(session)
            uid = session.uid
        else:
            uid = await self._rotated_in_store(session, visit)
        limit, refuse = self._cap()
        superseded: list[str] | None = await self.call(
            index.set_principal(uid, principal, limit, refuse)
        )
        if superseded is None:
            session._end()
            raise SessionConflict(
                f"session {short_uid(uid)} ended before it could be bound to a principal"
            )
        session._principal = principal
        self._ended_here(superseded)
        return superseded

    def _ended_here(self, uids: list[str]) -> None:
        super()._ended_here(uids)
        if uids:
            self._wake_in(0.0)

    async def _create(self, session: Session) -> None:
        data = session._data
        if data is None:
            data = session._data = SessionData()
        texts = data._texts()  # (the assigned values' texts, encoded once, at assignment)
        data._take()
        try:
            await self.call(
                self.store.create(
                    session.uid, session.sessionTimeout, dict(data), session.absolute_timeout
                )
            )
        except StoreUnavailable:
            # The request fails; nobody was given the uid: end this copy
            # (its callbacks run) rather than keep it, or write it later.
            session._needs_create = False
            session._end()
            raise
        session._needs_create = False
        session._data = SessionData(base=texts)
        lifetime = session.absolute_timeout
        self._wake_in(min(session.sessionTimeout, math.inf if lifetime is None else lifetime))

    async def _save(self, session: Session, data: SessionData, target: str) -> None:
        """Write ``data``'s changes to the stored session ``target``."""
        if session._expired:
            data._take()
            raise SessionConflict(
                f"session {short_uid(target)} ended while the request ran; its changes "
                "were not written"
            )
        changed, texts, removed = data._take()
        result = await self.call(self.store.save(target, changed, removed))
        if result is False or result is None:
            raise SessionConflict(
                f"session {short_uid(target)} was rotated away or ended while the request "
                "ran; its changes were not written"
            )
        held = session._data
        if (
            type(result) is int
            and held is not None
            and held._base is not None
            and held._version is not None
            and result == held._version + 1
        ):
            # The store's data is now exactly this process's base plus these
            # changes: keep it, so the next load need not fetch it.
            base = dict(held._base)
            for key in removed:
                base.pop(key, None)
            base.update(texts)
            session._data = SessionData(base=base, version=result)

    async def _rotated_in_store(self, session: Session, visit: Visit | None) -> str:
        """Write ``session``'s rotation if ``visit`` made it (or it was made
        outside a request); the uid the store knows the session by now (an
        older one while another request's rotation is not written yet)."""
        uid = session.uid
        pending = self._rotations.get(uid)
        if pending is None:
            return uid
        if pending[2] is None or pending[2] is visit:
            await self._write_rotation(session, pending)
            return uid
        return pending[0]

    async def _write_rotation(
        self, session: Session, pending: tuple[str, float, Visit | None]
    ) -> None:
        uid = session.uid
        origin, grace, owner = pending
        self._rotations.pop(uid, None)
        try:
            rotated = await self.call(self.store.rotate(origin, uid, grace))
        except StoreUnavailable:
            if owner is None:
                self._rotations[uid] = pending
            else:
                # The rotating request fails: its rotation is undone here too,
                # so the client's old cookie names the session again.
                self._unrotate(session, origin)
            raise
        if not rotated:  # it had ended meanwhile
            session._end()

    def _unrotate(self, session: Session, origin: str) -> None:
        sessions = self.owner.sessions
        if sessions.get(session.uid) is session:
            del sessions[session.uid]
        session.uid = origin
        if not session._expired:
            sessions[origin] = session
