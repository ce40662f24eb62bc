"""The shared strategy: a store reached through the async protocol.

Used for every store that does not hold the site's sessions: SQLite and Redis
(``shared``), and an in-process store written to the protocol alone. The
store is the authority; ``site.sessions`` holds this process's copies of the
sessions it has seen (their callbacks and components). A request loads its
sessions (one ``load`` each, which touches them) and writes what it changed
before its response (:meth:`SharedKeeper.persist`).

Ending sessions is one round, :meth:`SharedKeeper.poll_once`: claim what
ended and is ours to deliver, read what other processes announced (ends, and
rotations to re-key), run the durable hook of each claim and acknowledge it,
and say how long to sleep. Tests drive it on a fake clock. Around it:

- a shared store is polled by a thin loop (open the store, retry it after an
  outage, sleep with :attr:`SharedKeeper.sleep`), at least every
  ``poll_interval``: another process may make a session that ends sooner;
  unless the store wakes its keepers (``wait_for_news``: Redis, PostgreSQL,
  SQLite):
  then it sleeps in that until the next deadline or lease end it knows of. A
  plain (not async) hook runs in a worker thread, so that a slow one holds
  neither the event loop's requests nor its lease;
- an in-process store (``shared = False``) is polled by a timer on the
  site's reactor set to the next deadline the store reports, and moved
  sooner when this keeper makes a session or ends one by hand (nobody else
  can). A plain hook runs inline, as on the memory store; on a fake
  ``Clock`` a round starts inside ``clock.advance()`` (:meth:`settle`
  awaits it).

Rotation (``session.rotate()``) re-keys this process's copy at once; the site
writes it (one ``rotate`` call) with the request's other writes, before the
response, and other processes re-key their copies when they read the
rotation's announcement (or sooner, on a request with the old uid).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from lapse.sessions._keeper import Alarm, ExpiryHook, KeeperOwner, is_async
from lapse.sessions._requests import StoreRequests
from lapse.sessions._session import short_uid
from lapse.sessions.store import (
    AlreadyDelivered,
    Expiry,
    SessionStore,
    StoreUnavailable,
)

__all__ = ["SharedKeeper"]

log = logging.getLogger("lapse.sessions")

CLAIM_BATCH = 100
"""Ended sessions claimed (and delivered together) per store call."""

RETRY_DELAY = 1.0
"""Seconds before the next round after a round failed (an outage)."""


class SharedKeeper(StoreRequests):
    """Keeps a site's sessions in a store reached through the async protocol."""

    def __init__(
        self,
        owner: KeeperOwner,
        store: SessionStore,
        on_expire: ExpiryHook | None = None,
        **options: Any,
    ) -> None:
        super().__init__(owner, store, on_expire, **options)
        self.sleep: Callable[[float], Awaitable[None]] = (
            asyncio.sleep if self.shared else self._reactor_sleep
        )
        """How the loop and lease renewals wait (tests may give a fake)."""
        self._cursor: str | None = None
        self._opened = False
        # An in-process store: the round's timer on the site's reactor.
        self._started = False
        self._alarm = Alarm(owner, self._ring)
        self._polling = False
        self._woken = math.inf
        # A shared store that wakes its keepers (wait_for_news): no polling.
        waits = getattr(store, "wait_for_news", None) if self.shared else None
        self._wait_for_news: Callable[[float], Awaitable[bool]] | None = waits
        self._round_started = -math.inf

    # -- ending sessions: one round -------------------------------------------

    async def poll_once(self) -> float:
        """One round of expiry: claim what ended (ours to deliver), read the
        announcements (ending or re-keying this process's copies), deliver
        each claim (its copy ended, the hook run, acknowledged), and return
        how long to sleep before the next round (``math.inf``: nothing is
        pending, on an in-process store). Store failures raise
        :class:`StoreUnavailable`."""
        store = self.store
        if self._cursor is None:
            _, self._cursor = await self.call(store.events(None))
        # One round trip for the four questions of a round (the Redis client
        # pipelines what one tick sends): what ended and is ours to deliver,
        # what other processes announced, and when to look again. The store
        # answers them in this order.
        claimed, (events, cursor), upcoming, now = await self._gather(
            self._ask(partial(store.claim, self.node_id, self.lease, CLAIM_BATCH)),
            self._ask(partial(store.events, self._cursor)),
            self._ask(store.next_deadline),
            self._ask(store.now),
        )
        self._cursor = cursor
        for event in events:
            if isinstance(event, tuple):
                self._rekey(*event)
            else:
                self._end_local(event)
        busy = bool(claimed)
        while claimed:
            # Delivered together: their acknowledgements share round trips too.
            await self._gather(*(self._deliver(expiry) for expiry in claimed))
            if len(claimed) < CLAIM_BATCH:
                break
            claimed = await self.call(store.claim(self.node_id, self.lease, CLAIM_BATCH))
        if busy:
            # What was due is delivered: when is the next end, now?
            upcoming, now = await self._gather(self._ask(store.next_deadline), self._ask(store.now))
        return self.delay_until(upcoming, now)

    def delay_until(self, upcoming: float | None, now: float) -> float:
        """Seconds to sleep when the store's next deadline is ``upcoming``
        and its time ``now``: until then (``math.inf``: nothing is pending),
        but at most ``poll_interval`` on a shared store that does not wake
        its keepers (another process may make a session that ends sooner,
        and announces ends)."""
        if self.shared and self._wait_for_news is None:
            if upcoming is None:
                return self.poll_interval
            return min(max(upcoming - now, 0.0), self.poll_interval)
        return math.inf if upcoming is None else max(upcoming - now, 0.0)

    async def _deliver(self, expiry: Expiry) -> None:
        if expiry.attempt == 1:
            self.stats.session_ended(expiry.cause)
        hook = self.on_expire
        if hook is not None:
            renewing = asyncio.get_running_loop().create_task(self._keep_lease(expiry))
            try:
                if is_async(hook) or not self.shared:
                    result = hook(expiry)
                else:  # off the event loop: a slow one must not hold it
                    result = await asyncio.to_thread(hook, expiry)
                if inspect.isawaitable(result):
                    await result
            except AlreadyDelivered as exc:
                # (acknowledged in the hook's own transaction, which rolled back)
                log.info("%s; left to the process that holds it", exc)
                return
            except Exception:
                if not self._give_up(expiry):
                    return
            finally:
                renewing.cancel()
        await self.call(self.store.ack(expiry))
        self._end_local(expiry.uid)

    async def _keep_lease(self, expiry: Expiry) -> None:
        """Renew ``expiry``'s lease every third of the lease while its hook
        runs (this task is cancelled when the hook ends)."""
        lease = self.lease
        while True:
            await self.sleep(lease / 3)
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

    async def _round(self) -> float:
        """Open the store if needed, then :meth:`poll_once`; after a failure,
        :data:`RETRY_DELAY` (the store is opened again)."""
        try:
            if not self._opened:
                await self.call(self.store.open())
                self._opened = True
            return await self.poll_once()
        except StoreUnavailable:
            self._opened = False
        except Exception:
            log.exception("error in the session expiry loop")
        return RETRY_DELAY

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

    # -- driving the rounds ---------------------------------------------------

    def start(self) -> None:
        """Start the rounds (needs a running loop); idempotent. A shared
        store: the loop task; an in-process one: the first round now."""
        if self._closing:
            return
        if self.shared:
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._run())
        elif not self._started:
            self._started = True
            self._ring()

    async def _run(self) -> None:
        while not self._closing:
            self._round_started = asyncio.get_running_loop().time()
            delay = await self._round()
            if self._wait_for_news is None:
                await self.sleep(delay)
            else:
                await self._idle(delay, self._wait_for_news)

    async def _idle(self, delay: float, wait: Callable[[float], Awaitable[bool]]) -> None:
        """Sleep ``delay`` seconds (``math.inf``: until woken), or until the
        store has news from another process (``wait``); but after news, not before
        ``poll_interval`` since the last round began (a burst of ends is
        read in one round, not one round each)."""
        loop = asyncio.get_running_loop()
        wake_at = loop.time() + delay
        while not self._closing:
            left = wake_at - loop.time()
            if left <= 0:
                return
            if await wait(left):
                rest = min(self._round_started + self.poll_interval, wake_at) - loop.time()
                if rest > 0:
                    await asyncio.sleep(rest)
                return

    async def _reactor_sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` of the site's reactor time (a fake ``Clock`` in tests)."""
        done = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not done.done():
                done.set_result(None)

        alarm = self.owner.reactor.callLater(seconds, wake)
        try:
            await done
        finally:
            if alarm.active():
                alarm.cancel()

    def _wake_in(self, seconds: float) -> None:
        """An in-process store: something may end ``seconds`` from now; have
        a round by then. (A shared store's loop polls anyway, or is woken by
        the store's news, its own writes' included.)"""
        if self.shared or not self._started or self._closing:
            return
        when = self.owner.reactor.seconds() + seconds
        if self._polling:
            self._woken = min(self._woken, when)
        else:
            self._alarm.by(when)

    def _ring(self) -> None:
        if self._closing:
            return
        self._polling = self.spawn(self._tick())

    async def _tick(self) -> None:
        self._woken = math.inf  # (this round reads what came before it)
        try:
            delay = await self._round()
        finally:
            self._polling = False
        when = min(self.owner.reactor.seconds() + delay, self._woken)
        self._woken = math.inf
        if when < math.inf and not self._closing:
            self._alarm.set(when)

    async def aclose(self) -> None:
        self._closing = True
        self._alarm.cancel()
        await super().aclose()
