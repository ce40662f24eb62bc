"""The keeper: one site's sessions, between this process and the store.

Two modes, one contract:

- **Local** (the memory store). The store is in this process and answers at
  once, so the keeper drives it synchronously: one timer on the site's
  reactor wakes at the earliest deadline and drains what ended. On a fake
  ``Clock`` expiry therefore happens inside ``clock.advance()``, and when no
  session is left no call is left on the clock. The store is bound to the
  site: its live sessions are ``site.sessions`` and its records the
  ``Session`` objects themselves, so a session is kept once.
- **Shared** (SQLite, Redis). The store is the authority; ``site.sessions``
  holds this process's copies of the sessions it has seen (their callbacks
  and components). A background task claims ended sessions, runs the
  durable hook, acknowledges them, and reads the announcements of ended
  sessions so that each process runs its own ``notifyOnExpire`` callbacks.

In both, an ended session goes: out of ``site.sessions``, its callbacks, the
durable hook with its final data (``on_expire``), acknowledged. A hook that
raises is retried on the next claim, up to ``max_attempts`` deliveries.
While a hook runs, its claim's lease is renewed every third of the lease
(``store.renew``), so a hook slower than the lease is not delivered again
meanwhile; if the process dies, renewals stop and the lease runs out. On a
shared store a plain (not async) hook runs in a worker thread, so that a
slow one holds neither the event loop's requests nor its lease.

Rotation (``session.rotate()``) re-keys this process's copy at once. Locally
the store re-keys its record in the same call; on a shared store the site
writes it (one ``rotate`` call) with the request's other writes, before the
response, and other processes re-key their copies when they read the
rotation's announcement (or sooner, on a request with the old uid).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from functools import partial
from typing import Any, Protocol, cast

from lapse.internet.interfaces import IDelayedCall, IReactorTime
from lapse.sessions._data import SessionData
from lapse.sessions._session import Session, short_uid
from lapse.sessions._stats import SessionStats
from lapse.sessions._visit import Visit, current_visit
from lapse.sessions.store import (
    Expiry,
    SessionConflict,
    SessionStore,
    StoreConfigError,
    StoredSession,
    StoreUnavailable,
)
from lapse.sessions.stores.memory import MemoryStore

__all__ = ["ExpiryHook", "SessionKeeper"]

log = logging.getLogger("lapse.sessions")

ExpiryHook = Callable[[Expiry], Awaitable[None] | None]


class _Owner(Protocol):
    @property
    def sessions(self) -> MutableMapping[str, Session]: ...
    @property
    def reactor(self) -> IReactorTime: ...
    @property
    def sessionFactory(self) -> Callable[..., Session]: ...


def _is_async(hook: Callable[..., Any]) -> bool:
    """Whether calling ``hook`` makes a coroutine (an ``async def`` function,
    or an object whose ``__call__`` is one)."""
    return inspect.iscoroutinefunction(hook) or inspect.iscoroutinefunction(type(hook).__call__)


class SessionKeeper:
    """Keeps one site's sessions in its store and ends them on time."""

    def __init__(
        self,
        owner: _Owner,
        store: SessionStore,
        on_expire: ExpiryHook | None = None,
        *,
        lease: float = 30.0,
        poll_interval: float = 0.1,
        max_attempts: int = 5,
        store_timeout: float = 1.0,
        rotation_grace: float = 10.0,
        max_sessions: int | None = None,
    ) -> None:
        if not (isinstance(rotation_grace, int | float) and 0 <= rotation_grace < math.inf):
            raise ValueError(f"rotation_grace is seconds >= 0, not {rotation_grace!r}")
        if max_sessions is not None and (
            isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1
        ):
            raise ValueError(f"max_sessions is a positive int or None, not {max_sessions!r}")
        if max_sessions is not None and store.shared:
            raise StoreConfigError(
                f"max_sessions caps the sessions of one process's memory store; "
                f"{store.url} is shared by processes and keeps no such cap"
            )
        self.owner = owner
        self.store = store
        self.on_expire = on_expire
        self.lease = lease
        self.poll_interval = poll_interval
        self.max_attempts = max_attempts
        self.store_timeout = store_timeout
        self.rotation_grace = float(rotation_grace)
        self.shared = store.shared
        # Shared mode: rotations not written to the store yet, by new uid: the
        # uid the store knows the session by, the grace, and the visit of the
        # request that rotated it (it writes them; None: made outside a
        # request, written by the next request to persist the session).
        self._rotations: dict[str, tuple[str, float, Visit | None]] = {}
        # A store that bounds its own calls (see SessionStore) is not wrapped
        # in a timer per call: on the request path that timer costs.
        self._bounded = bool(getattr(store, "enforces_timeout", False))
        self.node_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._memory = store if isinstance(store, MemoryStore) and not self.shared else None
        self._alarm: IDelayedCall | None = None
        self._alarm_when = math.inf
        if self._memory is not None:
            self._memory.bind(owner.sessions, self._make_session, self._wake)
            if max_sessions is not None:
                self._memory.max_live = max_sessions
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._background: set[asyncio.Task[Any]] = set()
        self._outage = False
        self.stats = SessionStats(lambda: self.owner.reactor.seconds())

    # -- the store, with a deadline and one error type ----------------------

    async def call(self, operation: Awaitable[Any]) -> Any:
        """Await a store operation within ``store_timeout`` (or the store's
        own bound, if it ``enforces_timeout``); outages are logged once each
        and surface as :class:`StoreUnavailable`."""
        started = time.perf_counter()
        try:
            if self._bounded:
                result = await operation
            else:
                async with asyncio.timeout(self.store_timeout):
                    result = await operation
        except StoreUnavailable as exc:
            self._report_outage(exc)
            raise
        except TimeoutError as exc:
            error = StoreUnavailable(f"{self.store.url}: no answer within {self.store_timeout}s")
            self._report_outage(error)
            raise error from exc
        finally:
            self.stats.store_call(
                getattr(operation, "__name__", "call"), time.perf_counter() - started
            )
        if self._outage:
            self._outage = False
            log.warning("session store %s is reachable again", self.store.url)
        return result

    def _report_outage(self, exc: StoreUnavailable) -> None:
        if not self._outage:
            self._outage = True
            log.error("session store unavailable: %s", exc)

    # -- what sessions tell the keeper --------------------------------------

    def start_checking(self, session: Session) -> None:
        memory = self._memory
        if memory is not None:
            memory.start_now(session)  # the alarm hears of it through _wake
            if memory.evicted:  # to make room for it (max_sessions)
                self.drain()
        else:
            session._needs_create = True

    def data_for(self, session: Session) -> SessionData:
        """The data mapping of a session that has none yet. (In local mode
        the session is the store's record: its data is the store's.)"""
        return SessionData()

    def touched(self, session: Session) -> None:
        memory = self._memory
        if memory is not None:
            if session._reactor is not self.owner.reactor:
                # The store keeps the site's time; so must the session.
                session._lastModified = memory.clock()
            memory.touched_now(session)
        elif not session._needs_create:
            data = session._data
            version = None if data is None else data._version
            self.spawn(self.call(self.store.load(session.uid, version)))

    def expired_by_hand(self, session: Session) -> None:
        memory = self._memory
        if memory is not None:
            if memory.expire_record_now(session):
                self.drain()
        else:
            pending = self._rotations.get(session.uid)
            uid = session.uid if pending is None else pending[0]
            self.spawn(self.call(self.store.expire(uid)))

    def rotate(self, session: Session, new_uid: str, grace: float | None = None) -> None:
        """Give ``session`` the uid ``new_uid`` (see ``Session.rotate``); its
        old uid names it ``grace`` seconds more (None: the site's
        ``rotation_grace``)."""
        if grace is None:
            grace = self.rotation_grace
        memory = self._memory
        if memory is not None and memory.rotate_record_now(session, new_uid, grace):
            return
        # Not in a local store (a session put in site.sessions by hand), or
        # a shared one: re-key this process's copy now.
        sessions = self.owner.sessions
        old = session.uid
        if sessions.get(old) is session:
            del sessions[old]
        session.uid = new_uid
        sessions[new_uid] = session
        if memory is None and not session._needs_create:
            # Written by the rotating request's persist, before its response.
            pending = self._rotations.pop(old, None)
            origin = old if pending is None else pending[0]
            self._rotations[new_uid] = (origin, float(grace), current_visit.get())

    def _rekey(self, old: str, new: str) -> Session | None:
        """Shared mode: another process rotated ``old`` to ``new``: move this
        process's copy (its callbacks and components) to the new uid."""
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

    def _make_session(self, uid: str, timeout: float, data: Mapping[str, Any]) -> Session:
        """Local mode: the session for one created through the store API."""
        owner = self.owner
        session = owner.sessionFactory(owner, uid)
        if session.sessionTimeout != timeout:
            session.sessionTimeout = timeout
        if data:
            session._data = SessionData(dict(data))
        return session

    def _wake(self, when: float) -> None:
        """Local mode: something may end at ``when``; ring by then."""
        if when < self._alarm_when:
            self._arm(when)

    # -- loading and saving around a request ---------------------------------

    def load_now(self, uid: str) -> Session | None:
        """Local mode: touch and return the live session ``uid``."""
        memory = self._memory
        assert memory is not None
        record = memory.load_now(uid)
        if record is not None:
            live = cast(Session, record)
            return None if live._expired else live
        session = self.owner.sessions.get(uid)
        if session is None or session._expired or session._state is not None:
            return None
        # Put in site.sessions by hand, never checked (Twisted allows it).
        session._lastModified = self.owner.reactor.seconds()
        return session

    async def load(self, uid: str) -> Session | None:
        """Touch ``uid`` in the store (one call); this process's copy of it.

        In a request (a current visit), the request gets its own view of the
        session's data, read from what the store returned (or, if the store
        says the data is the version this process holds, from that)."""
        if self._memory is not None:
            return self.load_now(uid)
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
        """Shared mode: this process's copy of a session the store holds
        (loaded as ``presented``: its uid, or an old uid rotated away), and
        the data the store returned (``known`` if it said it was unchanged)."""
        sessions = self.owner.sessions
        session = sessions.get(stored.uid)
        if (session is None or session._expired) and stored.uid != presented:
            session = self._rekey(presented, stored.uid)
        if session is None or session._expired:
            session = self.owner.sessionFactory(self.owner, stored.uid)
            sessions[stored.uid] = session
        if session.sessionTimeout != stored.timeout:
            session.sessionTimeout = stored.timeout
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

    def persist_now(self, sessions: Iterable[Session]) -> None:
        """Local mode: the data is already in the store (each session is its
        own record): only forget what changed."""
        for session in sessions:
            data = session._data
            if data is not None and data.dirty:
                data.take_changes()

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
        if self._memory is not None:
            self.persist_now(sessions)
            return
        store = self.store
        views = None if visit is None else visit._views
        for session in sessions:
            if session._needs_create:
                await self._create(session)
                continue
            uid = session.uid
            pending = self._rotations.get(uid)
            if pending is not None and (pending[2] is None or pending[2] is visit):
                await self._write_rotation(session, pending)
                pending = None
            store_uid = uid if pending is None else pending[0]
            entry = None if views is None else views.get(session)
            data = session._data if entry is None else entry[0]
            if data is not None and data.dirty:
                ended = None if visit is None else visit._ended
                if session._expired and ended is not None and session in ended:
                    data._take()  # a logout: what it changed before is moot
                else:
                    target = store_uid if entry is None else entry[1]
                    await self._save(session, data, target)
            if session._expired:
                await self.call(store.expire(store_uid))

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

    def spawn(self, work: Awaitable[Any]) -> None:
        """Run store work in the background; failures are logged, not raised."""

        async def run() -> None:
            with contextlib.suppress(StoreUnavailable):
                await work

        try:
            task = asyncio.get_running_loop().create_task(run())
        except RuntimeError:
            if inspect.iscoroutine(work):
                work.close()
            log.warning("no running event loop: a session store write was skipped")
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- ending sessions ----------------------------------------------------

    def _arm(self, when: float) -> None:
        reactor = self.owner.reactor
        delay = max(0.0, when - reactor.seconds())
        alarm = self._alarm
        if alarm is not None and alarm.active():
            alarm.reset(delay)
        else:
            self._alarm = reactor.callLater(delay, self._ring)
        self._alarm_when = when

    def _ring(self) -> None:
        self._alarm = None
        self._alarm_when = math.inf
        self.drain()

    def drain(self) -> None:
        """Local mode: end what is due now, then sleep until the next deadline."""
        memory = self._memory
        assert memory is not None
        for expiry in memory.claim_now(self.node_id, self.lease, 1 << 30):
            if expiry.attempt == 1:
                self.stats.session_ended(expiry.cause)
            # The session left site.sessions as the store ended it (and may
            # have been replaced there): end the very object the store held.
            record = memory.ended_record(expiry.uid)
            # One session that raises (a Session subclass, a bad uid) must not
            # keep the others of this batch waiting for the next expiry.
            try:
                if isinstance(record, Session):
                    record._end()
            except Exception:
                log.exception("ending session %s raised", short_uid(expiry.uid))
            self._deliver_now(expiry)
        upcoming = memory.next_deadline_now()
        if upcoming is None:
            if self._alarm is not None and self._alarm.active():
                self._alarm.cancel()
            self._alarm, self._alarm_when = None, math.inf
        elif upcoming < self._alarm_when:
            self._arm(upcoming)

    def _end_local(self, uid: str) -> None:
        session = self.owner.sessions.get(uid)
        if session is not None:
            session._end()

    def _deliver_now(self, expiry: Expiry) -> None:
        assert self._memory is not None
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
        """Local mode: renew ``expiry``'s lease every third of the lease, on
        the site's reactor, until the function returned is called."""
        memory = self._memory
        assert memory is not None
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

    def _give_up(self, expiry: Expiry) -> bool:
        """Log a hook that raised; whether to stop redelivering it (acknowledge)."""
        self.stats.hook_failure()
        if expiry.attempt >= self.max_attempts:
            log.exception(
                "expiry hook failed for session %s on delivery %d; giving up",
                short_uid(expiry.uid),
                expiry.attempt,
            )
            return True
        log.exception(
            "expiry hook failed for session %s (delivery %d); it will be retried",
            short_uid(expiry.uid),
            expiry.attempt,
        )
        return False

    async def _deliver(self, expiry: Expiry) -> None:
        if expiry.attempt == 1:
            self.stats.session_ended(expiry.cause)
        hook = self.on_expire
        if hook is not None:
            renewing = asyncio.get_running_loop().create_task(self._keep_lease(expiry))
            try:
                if _is_async(hook):
                    result = hook(expiry)
                else:  # off the event loop: a slow one must not hold it
                    result = await asyncio.to_thread(hook, expiry)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                if not self._give_up(expiry):
                    return
            finally:
                renewing.cancel()
        await self.call(self.store.ack(expiry))
        self._end_local(expiry.uid)

    async def _keep_lease(self, expiry: Expiry) -> None:
        """Shared mode: renew ``expiry``'s lease every third of the lease
        while its hook runs (this task is cancelled when the hook ends)."""
        lease = self.lease
        while True:
            await asyncio.sleep(lease / 3)
            try:
                renewed = await self.call(self.store.renew(expiry, self.node_id, lease))
            except StoreUnavailable:
                continue  # logged as an outage; the next beat tries again
            if not renewed:
                log.warning(
                    "the lease of session %s's expiry (delivery %d) was lost while its "
                    "hook ran; another process may deliver it again",
                    short_uid(expiry.uid),
                    expiry.attempt,
                )
                return

    # -- the shared-mode loop -----------------------------------------------

    def start(self) -> None:
        """Shared mode: start claiming and listening (needs a running loop)."""
        if not self.shared or self._task is not None or self._closing:
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        cursor: str | None = None
        opened = False
        while not self._closing:
            delay = self.poll_interval
            try:
                if not opened:
                    await self.call(self.store.open())
                    opened = True
                if cursor is None:
                    _, cursor = await self.call(self.store.events(None))
                # One round trip for the four questions of a poll (the Redis
                # client pipelines what one tick sends): what ended and is
                # ours to deliver, what other processes announced, and when
                # to look again. The store answers them in this order.
                store = self.store
                claimed, (events, cursor), upcoming, now = await self._gather(
                    self._ask(partial(store.claim, self.node_id, self.lease, 100)),
                    self._ask(partial(store.events, cursor)),
                    self._ask(store.next_deadline),
                    self._ask(store.now),
                )
                for event in events:
                    if isinstance(event, tuple):
                        self._rekey(*event)
                    else:
                        self._end_local(event)
                busy = bool(claimed)
                while claimed:
                    # Delivered together: their acknowledgements share round
                    # trips too.
                    await self._gather(*(self._deliver(expiry) for expiry in claimed))
                    if len(claimed) < 100:
                        break
                    claimed = await self.call(self.store.claim(self.node_id, self.lease, 100))
                if busy:
                    # What was due is delivered: when is the next end, now?
                    upcoming, now = await self._gather(
                        self._ask(store.next_deadline), self._ask(store.now)
                    )
                if upcoming is not None:
                    delay = min(max(upcoming - now, 0.0), self.poll_interval)
            except StoreUnavailable:
                opened = False
                delay = 1.0
            except Exception:
                log.exception("error in the session expiry loop")
                delay = 1.0
            await asyncio.sleep(delay)

    async def _ask(self, operation: Callable[[], Awaitable[Any]]) -> Any:
        """``call(operation())``, the store call made only once this runs: a
        gathered question cancelled before it starts leaves no coroutine
        behind un-awaited (the loop is cancelled at close)."""
        return await self.call(operation())

    @staticmethod
    async def _gather(*work: Awaitable[Any]) -> list[Any]:
        """Await all of ``work`` together; then raise the first failure."""
        outcomes = await asyncio.gather(*work, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes

    async def aclose(self) -> None:
        """Stop the loop, finish background writes, close the store."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        with contextlib.suppress(StoreUnavailable):
            await self.store.aclose()

    def __repr__(self) -> str:
        mode = "shared" if self.shared else "local"
        return f"<SessionKeeper {mode} {self.store.url} {len(self.owner.sessions)} sessions>"
