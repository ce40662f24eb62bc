"""The keeper: one site's sessions, between this process and the store.

One contract, two strategies, chosen by what the store declares (see
:mod:`lapse.sessions.store`, "Capabilities"), never by its type:

- :class:`~lapse.sessions._local.LocalKeeper`, for a store that
  ``holds_sessions`` (the memory store): the store holds the ``Session``
  objects themselves and answers synchronously; one timer on the site's
  reactor wakes at the earliest deadline. On a fake ``Clock`` expiry happens
  inside ``clock.advance()``, and when no session is left no call is left on
  the clock.
- :class:`~lapse.sessions._shared.SharedKeeper`, for every other store (SQLite,
  Redis, a store written to the async protocol alone): the store is the
  authority and ``site.sessions`` holds this process's copies of the sessions
  it has seen (their callbacks and components). One round of expiry is
  :meth:`~lapse.sessions._shared.SharedKeeper.poll_once`; a shared store is
  polled by a thin loop, an in-process one by a timer on the site's reactor.

In both, an ended session goes: out of ``site.sessions``, its callbacks, the
durable hook with its final data (``on_expire``), acknowledged. A hook that
raises is retried on the next claim, up to ``max_attempts`` deliveries.
While a hook runs, its claim's lease is renewed every third of the lease
(``store.renew``), so a hook slower than the lease is not delivered again
meanwhile; if the process dies, renewals stop and the lease runs out.

This module holds what both share: the store call with its deadline and one
error type, outage logging, background work, giving up on a hook, stats.
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
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Protocol

from lapse.internet.interfaces import IDelayedCall, IReactorTime
from lapse.sessions._data import SessionData
from lapse.sessions._session import Session, short_uid
from lapse.sessions._stats import SessionStats
from lapse.sessions._visit import Visit
from lapse.sessions.store import (
    PRINCIPAL_MEMBERS,
    Expiry,
    PrincipalIndex,
    SessionInfo,
    SessionStore,
    StoreConfigError,
    StoreUnavailable,
    check_principal,
)

__all__ = ["PRINCIPAL_POLICIES", "ExpiryHook", "Keeper", "KeeperOwner"]

PRINCIPAL_POLICIES = ("supersede", "refuse")
"""What ``max_sessions_per_principal`` does with one login too many."""

log = logging.getLogger("lapse.sessions")

ExpiryHook = Callable[[Expiry], Awaitable[None] | None]
"""The durable expiry hook: called with each ended session, once it is
claimed; a coroutine function, or a plain function."""


class KeeperOwner(Protocol):
    """What a keeper needs of its site (or middleware)."""

    @property
    def sessions(self) -> MutableMapping[str, Session]: ...
    @property
    def reactor(self) -> IReactorTime: ...
    @property
    def sessionFactory(self) -> Callable[..., Session]: ...


def is_async(hook: Callable[..., Any]) -> bool:
    """Whether calling ``hook`` makes a coroutine (an ``async def`` function,
    or an object whose ``__call__`` is one)."""
    return inspect.iscoroutinefunction(hook) or inspect.iscoroutinefunction(type(hook).__call__)


class Alarm:
    """One timer on the owner's reactor, set for the earliest time asked of
    it: what a keeper that wakes at a deadline (not by polling) holds."""

    __slots__ = ("_call", "_owner", "_ring", "when")

    def __init__(self, owner: KeeperOwner, ring: Callable[[], None]) -> None:
        self._owner = owner
        self._ring = ring
        self._call: IDelayedCall | None = None
        self.when = math.inf
        """When it rings (``inf``: not set)."""

    def set(self, when: float) -> None:
        """Ring at ``when`` (site time), whatever it was set for before."""
        reactor = self._owner.reactor
        delay = max(0.0, when - reactor.seconds())
        call = self._call
        if call is not None and call.active():
            call.reset(delay)
        else:
            self._call = reactor.callLater(delay, self._fire)
        self.when = when

    def by(self, when: float) -> None:
        """Ring at ``when`` at the latest."""
        if when < self.when:
            self.set(when)

    def cancel(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        self.when = math.inf

    def _fire(self) -> None:
        self._call = None
        self.when = math.inf
        self._ring()


class Keeper:
    """Keeps one site's sessions in its store and ends them on time (the
    part both strategies share; made by :func:`lapse.sessions.make_keeper`)."""

    synchronous = False
    """Whether the site loads and saves sessions with ``load_now`` and
    ``persist_now`` (no await) rather than ``load`` and ``persist``."""

    def __init__(
        self,
        owner: KeeperOwner,
        store: SessionStore,
        on_expire: ExpiryHook | None = None,
        *,
        lease: float = 30.0,
        poll_interval: float = 0.1,
        max_attempts: int = 5,
        store_timeout: float = 1.0,
        rotation_grace: float = 10.0,
        max_sessions: int | None = None,
        max_sessions_per_principal: int | None = None,
        principal_policy: str = "supersede",
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
        if max_sessions is not None and not store.holds_sessions:
            raise StoreConfigError(
                f"max_sessions caps the sessions of a store that holds them (the memory "
                f"store); {store.url} does not keep such a cap"
            )
        if max_sessions_per_principal is not None and (
            isinstance(max_sessions_per_principal, bool)
            or not isinstance(max_sessions_per_principal, int)
            or max_sessions_per_principal < 1
        ):
            raise ValueError(
                "max_sessions_per_principal is a positive int or None, not "
                f"{max_sessions_per_principal!r}"
            )
        if principal_policy not in PRINCIPAL_POLICIES:
            raise ValueError(
                f"principal_policy is 'supersede' or 'refuse', not {principal_policy!r}"
            )
        self.owner = owner
        self.store = store
        self.on_expire = on_expire
        self.max_sessions_per_principal = max_sessions_per_principal
        """At most this many live sessions per principal (None: no cap)."""
        self.principal_policy = principal_policy
        """One login too many: ``"supersede"`` ends the least recently used
        other session; ``"refuse"`` raises ``TooManySessions``."""
        self.lease = lease
        self.poll_interval = poll_interval
        self.max_attempts = max_attempts
        self.store_timeout = store_timeout
        self.rotation_grace = float(rotation_grace)
        self.shared = store.shared
        # (an instance attribute, as cheap to read on every request as before)
        self.synchronous = type(self).synchronous
        # A store that bounds its own calls (see SessionStore) is not wrapped
        # in a timer per call: on the request path that timer costs.
        self._bounded = store.enforces_timeout
        self.node_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._background: set[asyncio.Task[Any]] = set()
        self._outage = False
        self._failures = 0
        """Store calls failed so far."""
        self.stats = SessionStats(lambda: self.owner.reactor.seconds())

    # -- the store, with a deadline and one error type ----------------------

    async def call(self, operation: Awaitable[Any]) -> Any:
        """Await a store operation within ``store_timeout`` (or the store's
        own bound, if it ``enforces_timeout``); outages are logged once each
        and surface as :class:`StoreUnavailable`."""
        started = time.perf_counter()
        failures = self._failures
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
        if self._outage and self._failures == failures:
            # (only a call begun after the last failure: one begun before,
            # answered as the store went down, says nothing of its return)
            self._outage = False
            log.warning("session store %s is reachable again", self.store.url)
        return result

    def _report_outage(self, exc: StoreUnavailable) -> None:
        self._failures += 1
        if not self._outage:
            self._outage = True
            log.error("session store unavailable: %s", exc)

    async def open_store(self) -> StoreUnavailable | None:
        """Open the store (a start-up check): None once it answered, else the
        failure. One that is not ``permanent`` is logged as an outage (the
        keeper retries it later); a permanent one is the caller's to report."""
        store = self.store
        try:
            async with asyncio.timeout(None if self._bounded else self.store_timeout):
                await store.open()
        except StoreUnavailable as exc:
            if not exc.permanent:
                self._report_outage(exc)
            return exc
        except TimeoutError:
            failure = StoreUnavailable(f"{store.url}: no answer within {self.store_timeout}s")
            self._report_outage(failure)
            return failure
        return None

    # -- background work -----------------------------------------------------

    def spawn(self, work: Awaitable[Any]) -> bool:
        """Run store work in the background; failures are logged, not raised.
        False (the work dropped) without a running event loop."""

        async def run() -> None:
            with contextlib.suppress(StoreUnavailable):
                await work

        try:
            task = asyncio.get_running_loop().create_task(run())
        except RuntimeError:
            if inspect.iscoroutine(work):
                work.close()
            log.warning("no running event loop: a session store write was skipped")
            return False
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return True

    async def settle(self) -> None:
        """Wait until the background work started so far (touches, writes,
        expiry deliveries, and what they start) is done."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

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

    def _end_local(self, uid: str) -> None:
        """End this process's copy of ``uid``, if it has one."""
        session = self.owner.sessions.get(uid)
        if session is not None:
            session._end()

    # -- principals ----------------------------------------------------------

    def principal_index(self) -> PrincipalIndex:
        """The store, if it keeps sessions by principal; else ``TypeError``."""
        store = self.store
        if not all(callable(getattr(store, name, None)) for name in PRINCIPAL_MEMBERS):
            raise TypeError(
                f"the session store {store.url} ({type(store).__name__}) keeps no index of "
                "sessions by principal (set_principal, sessions_of, expire_principal)"
            )
        return store  # type: ignore[return-value]

    def _cap(self) -> tuple[int | None, bool]:
        return self.max_sessions_per_principal, self.principal_policy == "refuse"

    async def set_principal(self, session: Session, principal: str | None) -> list[str]:
        """Bind ``session`` to ``principal`` in the store, within the cap;
        the uids of the sessions it superseded (see ``Session.set_principal``)."""
        raise NotImplementedError

    async def sessions_of(self, principal: str) -> list[SessionInfo]:
        """The live sessions of ``principal``, most recently used first."""
        index = self.principal_index()
        result: list[SessionInfo] = await self.call(index.sessions_of(check_principal(principal)))
        return result

    async def expire_principal(self, principal: str, except_uid: str | None = None) -> list[str]:
        """End every live session of ``principal`` but ``except_uid``; the
        uids ended. This process's copies end at once (their callbacks run);
        other processes' when they read the announcements."""
        index = self.principal_index()
        ended: list[str] = await self.call(
            index.expire_principal(check_principal(principal), except_uid)
        )
        self._ended_here(ended)
        return ended

    def _ended_here(self, uids: list[str]) -> None:
        """The store ended ``uids`` at this process's request: end the copies
        here now, and have what follows (hooks, announcements) done soon."""
        for uid in uids:
            self._end_local(uid)

    # -- what each strategy provides -----------------------------------------

    def start_checking(self, session: Session) -> None:
        """A new session (``makeSession``) begins to be checked."""
        raise NotImplementedError

    def data_for(self, session: Session) -> SessionData:
        """The data mapping of a session that has none yet."""
        return SessionData()

    def touched(self, session: Session) -> None:
        """``session.touch()`` was called (its ``_lastModified`` just set)."""
        raise NotImplementedError

    def expired_by_hand(self, session: Session) -> None:
        """``session.expire()`` ended this process's copy: end it in the store."""
        raise NotImplementedError

    def rotate(self, session: Session, new_uid: str, grace: float | None = None) -> None:
        """Give ``session`` the uid ``new_uid`` (see ``Session.rotate``); its
        old uid names it ``grace`` seconds more (None: the site's
        ``rotation_grace``)."""
        raise NotImplementedError

    def load_now(self, uid: str) -> Session | None:
        """Touch and return the live session ``uid``, synchronously (only
        where :attr:`synchronous`)."""
        raise TypeError(f"{self.store.url} is not loaded synchronously: await load()")

    async def load(self, uid: str) -> Session | None:
        """Touch ``uid`` in the store; this process's copy of it."""
        raise NotImplementedError

    def persist_now(self, sessions: Iterable[Session]) -> None:
        """Write what a request did to ``sessions``, synchronously (only
        where :attr:`synchronous`)."""
        raise TypeError(f"{self.store.url} is not written synchronously: await persist()")

    async def persist(self, sessions: Iterable[Session], visit: Visit | None = None) -> None:
        """Write what ``visit`` (a request; None: outside one) did to ``sessions``."""
        raise NotImplementedError

    def start(self) -> None:
        """Start ending sessions on time (needs a running loop); idempotent."""

    async def aclose(self) -> None:
        """Stop, finish background writes, close the store."""
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
        return f"<{type(self).__name__} {self.store.url} {len(self.owner.sessions)} sessions>"
