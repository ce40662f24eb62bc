"""The PostgreSQL store's wake-up call: a connection of its own that LISTENs
on the store's channel, so an idle process sleeps until its next deadline
instead of polling.

The store's writes that another process must hear of send a NOTIFY on the
channel (see queries.py): an end announced (``ack``), a rotation, a session
ended by hand (``expire``), and a new session that ends before every other
live one. PostgreSQL delivers a notification when the writing transaction
commits, so a read made after it sees the write.

Notifications are not stored: one sent while this connection was down is
lost. So :meth:`Listener.wait` returns at once after it (re)connects, and the
caller reads the store again (the catch-up read), which covers whatever was
said meanwhile. A connection that ends (the server stopped, a network error)
wakes the waiter too. One the server forgets without closing it (a frozen
server, a cut cable) goes unnoticed until the next deadline's read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any

from lapse.sessions.store import StoreUnavailable
from lapse.sessions.stores._deadline import bounded
from lapse.sessions.stores.postgres.pool import Pool

__all__ = ["DEAF_RETRY", "Listener"]

log = logging.getLogger("lapse.sessions")

DEAF_RETRY = 1.0
"""Seconds a waiter sleeps at most while it cannot listen (the server down,
or no connection to spare): it then polls at this pace."""


class Listener:
    """LISTEN on one channel through a connection outside the store's pool."""

    def __init__(self, pool: Pool, channel: str) -> None:
        self.pool = pool
        self.channel = channel
        self._conn: Any | None = None
        self._news = asyncio.Event()  # (bound to a loop at its first wait)
        self._deaf = False
        self.connects = 0
        """How many times a LISTEN connection was made (tests read it)."""

    @property
    def listening(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.is_closed()

    async def wait(self, seconds: float) -> bool:
        """Sleep at most ``seconds`` (``math.inf``: until news); True if the
        caller should read the store now: a notification came, the
        connection was lost or made anew (what was said without one is
        lost), or, unable to listen, :data:`DEAF_RETRY` passed."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        news = self._news
        if not self.listening:
            if await self._listen():
                return True
            rest = min(seconds, DEAF_RETRY) - (loop.time() - started)
            if rest > 0:
                await asyncio.sleep(rest)
            return seconds > DEAF_RETRY
        if news.is_set():
            news.clear()
            return True
        try:
            async with asyncio.timeout(None if seconds == math.inf else seconds):
                await news.wait()
        except TimeoutError:
            return False
        news.clear()
        return True

    async def _listen(self) -> bool:
        """Open the connection and LISTEN; False (logged once per outage) if
        it cannot be done now."""
        self._drop()
        try:
            conn = await self.pool.connect()
            try:
                async with bounded(self.pool.config.timeout):
                    await conn.add_listener(self.channel, self._heard)
            except BaseException as exc:
                conn.terminate()  # (also when cancelled: the keeper closing)
                if isinstance(exc, self.pool.failures):
                    raise self.pool.translate(exc) from exc
                raise
        except StoreUnavailable as exc:
            if not self._deaf:
                self._deaf = True
                log.warning(
                    "cannot listen for other processes' news (%s); polling every %g s until it can",
                    exc,
                    DEAF_RETRY,
                )
            return False
        conn.add_termination_listener(self._lost)
        self._conn = conn
        self.connects += 1
        if self._deaf:
            self._deaf = False
            log.info("listening for other processes' news again")
        self._news.clear()
        return True

    def _heard(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self._news.set()

    def _lost(self, conn: Any) -> None:
        if conn is self._conn:
            self._conn = None
            self._news.set()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        try:
            async with asyncio.timeout(self.pool.config.timeout):
                await conn.close()
        except Exception:
            with contextlib.suppress(Exception):
                conn.terminate()
