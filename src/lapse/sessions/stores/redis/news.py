"""The Redis store's wake-up call: blocking reads of the events streams, so an
idle process sleeps until its next deadline instead of polling.

Every write another process must hear of adds an entry to its shard's events
stream (``P:events``): an end announced (``ack``) and a rotation (the
announcements ``events()`` reads), and, as entries without a uid that
``events()`` skips, a session ended by hand (``expire``, a principal's
sessions ended or superseded) and a new session that ends before every other
live one of its shard (checked inside ``create``'s script: one ``ZRANGE``
more on the server, no round trip more; the common create, which ends later
than some other session, adds nothing).

:class:`News` keeps one blocking read per shard, ``XREAD COUNT 1 BLOCK ms
STREAMS P:events <mark>``, each on a connection of its own to the node that
holds the shard: a blocked connection answers nothing else, and on a cluster
each shard's stream is in a slot of its own, so one read cannot cover two.
``mark`` is where the store's last ``events()`` read stopped, so an entry
made after that read wakes the waiter even if it came before the blocking
read was sent. A read whose :data:`BLOCK` runs out is sent again: an idle
process sends one command per shard every :data:`BLOCK` seconds.

A stream keeps its entries, so news said while a connection was down is read
when it is back; but a server that restarted, or a failover, may hold other
sessions than the process knows: a connection made (again) wakes the waiter
("read the store"). While a shard cannot be read (its node down, no primary
known yet, the events key not a stream) the waiter is woken every
:data:`DEAF_RETRY` seconds instead, polling at that pace; the outage is
logged once. A server that stops answering without closing the connection is
noticed after :data:`BLOCK` plus the store's timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence

from lapse.sessions.stores.redis.client import RedisClient, RedisError
from lapse.sessions.stores.redis.layout import Shard

__all__ = ["BLOCK", "DEAF_RETRY", "News"]

log = logging.getLogger("lapse.sessions")

BLOCK = 30.0
"""Seconds one blocking read waits on the server before it is sent again."""

DEAF_RETRY = 1.0
"""Seconds between wake-ups while a shard's stream cannot be read."""

Address = tuple[str, int]


class News:
    """The blocking reads of one store (see the module).

    ``address_of(shard)``: the node that holds a shard now (None: not known
    yet), as the store's own connection routes it; ``connect(address)``: a
    new client for blocking reads there. ``marks``: the stream id per shard
    up to which the store has read the announcements (set by ``events()``).
    """

    def __init__(
        self,
        shards: Sequence[Shard],
        address_of: Callable[[Shard], Address | None],
        connect: Callable[[Address], RedisClient],
    ) -> None:
        self._shards = tuple(shards)
        self._address_of = address_of
        self._connect = connect
        self.marks: list[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[asyncio.Task[None]] = []
        self._armed: list[asyncio.Event] = []
        self._heard = asyncio.Event()
        self._reread = False
        self._clients: dict[int, RedisClient] = {}
        self._deaf: set[int] = set()
        self.connects = 0
        """Connections made for blocking reads (tests read it)."""
        self.reads = 0
        """Blocking reads sent (tests read it)."""

    async def wait(self, seconds: float) -> bool:
        """Sleep at most ``seconds`` (``math.inf``: until news); True if the
        caller should read the store now: an entry came after the marks, a
        connection was made (again), or a shard could not be read."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            await self._stop()
            self._start(loop)
        heard = self._heard
        heard.clear()
        # A read that reported news is sent again, from the marks as they
        # are now: news the caller has not read since wakes it at once.
        for armed in self._armed:
            armed.set()
        if self._reread:
            self._reread = False
            return True
        try:
            async with asyncio.timeout(None if seconds == math.inf else max(seconds, 0.0)):
                await heard.wait()
        except TimeoutError:
            return False
        self._reread = False
        return True

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heard = asyncio.Event()
        self._armed = [asyncio.Event() for _ in self._shards]
        self._listeners = [
            loop.create_task(self._listen(index, shard, armed))
            for index, (shard, armed) in enumerate(zip(self._shards, self._armed, strict=True))
        ]

    async def _listen(self, index: int, shard: Shard, armed: asyncio.Event) -> None:
        """Shard ``index``'s blocking reads, each once ``armed`` (by
        :meth:`wait`), until cancelled."""
        failing = False
        while True:
            await armed.wait()
            try:
                client = await self._client(index, shard)
                if not client.connected:
                    await client.execute("PING")
                    self.connects += 1
                    self._recovered(index)
                    failing = False
                    self._report(armed, reread=True)
                    continue
                marks = self.marks
                mark = marks[index] if marks is not None else "$"
                self.reads += 1
                reply = await client.execute(
                    "XREAD", "COUNT", 1, "BLOCK", int(BLOCK * 1000), "STREAMS", shard.events, mark
                )
            except (RedisError, OSError) as exc:
                # Once: news may be lost (the caller reads); again: deaf.
                if failing:
                    self._lost(index, shard, exc)
                    await asyncio.sleep(DEAF_RETRY)
                failing = True
                self._report(armed, reread=True)
                continue
            failing = False
            if reply:
                self._report(armed, reread=False)

    async def _client(self, index: int, shard: Shard) -> RedisClient:
        """The client of shard ``index``'s reads, to the node that holds it now."""
        address = self._address_of(shard)
        if address is None:
            raise RedisError("no node of the shard is known yet")
        client = self._clients.get(index)
        if client is not None and (client.host, client.port) != address:
            del self._clients[index]
            await client.aclose()
            client = None
        if client is None:
            client = self._clients[index] = self._connect(address)
        return client

    def _report(self, armed: asyncio.Event, *, reread: bool) -> None:
        armed.clear()  # (until the next wait: the caller reads the store first)
        if reread:
            self._reread = True
        self._heard.set()

    def _lost(self, index: int, shard: Shard, exc: BaseException) -> None:
        if not self._deaf:
            log.warning(
                "cannot listen for other processes' news on %s (%s: %s); "
                "polling every %g s until it can",
                shard.events,
                type(exc).__name__,
                exc,
                DEAF_RETRY,
            )
        self._deaf.add(index)

    def _recovered(self, index: int) -> None:
        if index in self._deaf:
            self._deaf.discard(index)
            if not self._deaf:
                log.info("listening for other processes' news again")

    async def aclose(self) -> None:
        """Stop the reads and close their connections (a blocked read is
        dropped at once); a waiter is woken (True). Idempotent; the next
        :meth:`wait` starts again."""
        self._reread = True
        self._heard.set()
        await self._stop()

    async def _stop(self) -> None:
        listeners, self._listeners = self._listeners, []
        loop, self._loop = self._loop, None
        mine = loop is asyncio.get_running_loop()
        for task in listeners:
            if mine:
                task.cancel()
        if mine and listeners:
            await asyncio.wait(listeners)
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()
