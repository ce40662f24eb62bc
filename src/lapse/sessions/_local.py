"""The local strategy: a store that holds the site's sessions (the memory store).

The store is in this process and answers at once, so the keeper drives it
synchronously (:class:`~lapse.sessions.store.LocalSessionStore`): one timer
on the site's reactor wakes at the earliest deadline and drains what ended.
On a fake ``Clock`` expiry therefore happens inside ``clock.advance()``, and
when no session is left no call is left on the clock. The store is bound to
the site: its live sessions are ``site.sessions`` and its records the
``Session`` objects themselves, so a session is kept once, and a request
loads and saves it without an await.

A burst of ends (every session a spike of traffic made comes due in the
same instant) is spread over turns of the event loop: the timer ends at
most :data:`ENDS_PER_TURN` sessions per ring, in deadline order, and rings
again at once for the rest, so requests are served between the batches. A
session past its deadline is never served meanwhile (the store no longer
loads it).

Rotation re-keys the record in the store in the same call; there is no other
process to tell. A plain expiry hook runs inline (it is this process's own
work, as the callbacks are); an async one runs as a task, its lease renewed
on the site's reactor.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from lapse.internet.interfaces import IDelayedCall
from lapse.sessions._data import SessionData
from lapse.sessions._keeper import Alarm, ExpiryHook, Keeper, KeeperOwner
from lapse.sessions._session import Session, short_uid
from lapse.sessions._visit import Visit
from lapse.sessions.store import Expiry, LocalSessionStore, SessionConflict

__all__ = ["LocalKeeper"]

log = logging.getLogger("lapse.sessions")

ENDS_PER_TURN = 128
"""At most this many sessions end (callbacks, expiry hook) each time the
keeper's timer rings; the rest of a burst ends on the next rings, one per
turn of the event loop. (At ~15 µs per end on a busy machine, a batch holds
the loop ~2 ms; a turn serving 50 requests makes at most 50 sessions, so the
ends keep up with any rate of creation.)"""


class LocalKeeper(Keeper):
    """Keeps a site's sessions in a store that holds them (``holds_sessions``)."""

    synchronous = True

    def __init__(
        self,
        owner: KeeperOwner,
        store: LocalSessionStore,
        on_expire: ExpiryHook | None = None,
        **options: Any,
    ) -> None:
        super().__init__(owner, store, on_expire, **options)
        self._memory = store
        self._alarm = Alarm(owner, self._ring)
        store.bind(owner.sessions, self._make_session, self._wake)
        # The memory store's lighter end, when no durable hook is set (an
        # in-process store of another kind may not offer it: claims then).
        self._end_due: Callable[[int], list[tuple[str, Any, str, bool]]] | None = getattr(
            store, "end_due_now", None
        )
        max_sessions = options.get("max_sessions")
        if max_sessions is not None:
            store.max_live = max_sessions

    # -- what sessions tell the keeper --------------------------------------

    def start_checking(self, session: Session) -> None:
        memory = self._memory
        memory.start_now(session)  # the alarm hears of it through _wake
        if memory.evicted:  # to make room for it (max_sessions)
            self.drain()

    def touched(self, session: Session) -> None:
        memory = self._memory
        if session._reactor is not self.owner.reactor:
            # The store keeps the site's time; so must the session.
            session._lastModified = memory.clock()
        memory.touched_now(session)

    def expired_by_hand(self, session: Session) -> None:
        if self._memory.expire_record_now(session):
            self.drain()

    def rotate(self, session: Session, new_uid: str, grace: float | None = None) -> None:
        if grace is None:
            grace = self.rotation_grace
        if self._memory.rotate_record_now(session, new_uid, grace):
            return
        # Not in the store (a session put in site.sessions by hand): re-key
        # the site's entry only.
        sessions = self.owner.sessions
        old = session.uid
        if sessions.get(old) is session:
            del sessions[old]
        session.uid = new_uid
        sessions[new_uid] = session

    def _make_session(self, uid: str, timeout: float, data: Mapping[str, Any]) -> Session:
        """The session for one created through the store API."""
        owner = self.owner
        session = owner.sessionFactory(owner, uid)
        if session.sessionTimeout != timeout:
            session.sessionTimeout = timeout
        if data:
            session._data = SessionData(dict(data))
        return session

    # -- loading and saving around a request ---------------------------------

    def load_now(self, uid: str) -> Session | None:
        record: Any = self._memory.load_now(uid)  # (a Session: no cast() call)
        if record is not None:
            return None if record._expired else record
        session = self.owner.sessions.get(uid)
        if session is None or session._expired or session._state is not None:
            return None
        # Put in site.sessions by hand, never checked (Twisted allows it).
        session._lastModified = self.owner.reactor.seconds()
        return session

    async def load(self, uid: str) -> Session | None:
        return self.load_now(uid)

    def persist_now(self, sessions: Iterable[Session]) -> None:
        """The data is already in the store (each session is its own
        record): only forget what changed."""
        for session in sessions:
            data = session._data
            if data is not None and data.dirty:
                data.take_changes()

    async def persist(self, sessions: Iterable[Session], visit: Visit | None = None) -> None:
        self.persist_now(sessions)

    # -- principals ----------------------------------------------------------

    async def set_principal(self, session: Session, principal: str | None) -> list[str]:
        limit, refuse = self._cap()
        superseded = self._memory.bind_record_now(session, principal, limit, refuse)
        if superseded is None:
            # Put in site.sessions by hand, never checked (Twisted allows
            # it): the store cannot index it.
            raise SessionConflict(
                f"session {short_uid(session.uid)} is not kept by the store: it cannot be "
                "bound to a principal"
            )
        if superseded:
            self.drain()
        return superseded

    def _ended_here(self, uids: list[str]) -> None:
        if uids:
            self.drain()

    # -- ending sessions ----------------------------------------------------

    def _wake(self, when: float) -> None:
        """Something may end at ``when``; ring by then."""
        alarm = self._alarm
        if when < alarm.when:  # (inline: it runs for most new sessions)
            alarm.set(when)

    def _ring(self) -> None:
        self.drain(ENDS_PER_TURN)

    def drain(self, limit: int = 1 << 30) -> None:
        """End what is due now (at most ``limit`` sessions, in deadline
        order), then sleep until the next deadline: at once, if more are due.

        Called inline (an expiry by hand, an eviction, a principal's
        sessions superseded), it ends them all: that work is the request's.
        Without a durable hook, on a store that offers ``end_due_now`` (the
        memory store's), there is nothing to deliver: no claim, Expiry,
        delivery id or lease is made; the same ends, callbacks and counts."""
        memory = self._memory
        if self.on_expire is None and self._end_due is not None:
            causes: dict[str, int] = {}
            for uid, record, cause, again in self._end_due(limit):
                if not again:
                    causes[cause] = causes.get(cause, 0) + 1
                self._end_copy(uid, record)
            for cause, count in causes.items():
                self.stats.session_ended(cause, count=count)
        else:
            for expiry in memory.claim_now(self.node_id, self.lease, limit):
                if expiry.attempt == 1:
                    self.stats.session_ended(expiry.cause)
                # The session left site.sessions as the store ended it (and may
                # have been replaced there): end the very object the store held.
                self._end_copy(expiry.uid, memory.ended_record(expiry.uid))
                self._deliver_now(expiry)
        upcoming = memory.next_deadline_now()
        if upcoming is None:
            self._alarm.cancel()
        else:
            self._alarm.by(upcoming)

    @staticmethod
    def _end_copy(uid: str, record: Any) -> None:
        """End ``record``, the store's object of ended session ``uid``: one
        that raises (a Session subclass, a bad uid) is logged and must not
        keep the others of its batch waiting for the next expiry."""
        try:
            if isinstance(record, Session):
                record._end()
        except Exception:
            log.exception("ending session %s raised", short_uid(uid))

    def _deliver_now(self, expiry: Expiry) -> None:
        memory = self._memory
        if self.on_expire is None:
            memory.ack_now(expiry)
            return
        try:
            result = self.on_expire(expiry)
        except Exception:
            if self._give_up(expiry):
                memory.ack_now(expiry)
            return
        if inspect.isawaitable(result):
            stop_renewing = self._keep_lease_now(expiry)

            async def finish(pending: Awaitable[None] = result) -> None:
                try:
                    await pending
                except Exception:
                    if not self._give_up(expiry):
                        return
                finally:
                    stop_renewing()
                memory.ack_now(expiry)

            self.spawn(finish())
        else:
            memory.ack_now(expiry)

    def _keep_lease_now(self, expiry: Expiry) -> Callable[[], None]:
        """Renew ``expiry``'s lease every third of the lease, on the site's
        reactor, until the function returned is called."""
        memory = self._memory
        reactor = self.owner.reactor
        beat: list[IDelayedCall] = []

        def renew() -> None:
            beat.clear()
            if memory.renew_now(expiry, self.node_id, self.lease):
                beat.append(reactor.callLater(self.lease / 3, renew))

        def stop() -> None:
            for call in beat:
                if call.active():
                    call.cancel()
            beat.clear()

        beat.append(reactor.callLater(self.lease / 3, renew))
        return stop
