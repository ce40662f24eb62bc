"""The SQLite store's wake-up call: how an idle process learns, without
polling the store, that another process wrote news (an end announced, a
rotation, a session ended by hand, or one made that ends before the time the
keeper means to wake).

Every commit to a WAL-mode file, by any process, changes the header of the
WAL index in the ``-shm`` file next to it (its change counter, ``iChange``,
"incremented with each transaction", and the WAL's frame count: see
https://www.sqlite.org/walformat.html). So a waiting process reads those 48
bytes (one ``pread``, a few µs, in the event loop: the ``-shm`` is memory the
kernel already holds, never a disk read) every :data:`LOOK_EVERY` seconds,
and only when they changed asks the store one question, on its worker
thread: the last event's id and the next deadline. News is an event newer
than the one the wait began with, or a deadline earlier than the end of the
wait. Other writes (touches, creates ending later) cost that one question,
at most once per look.

Measured (bench/sqlite_news.py): a look costs ~3 µs of CPU, the question ~100
µs; an idle process looked 20 times a second, where the polling keeper ran a
round (claim, events, next deadline) 10 times a second. Lateness: at most one
look's interval plus the question.

The ``-shm`` read is the one the connection maps: if the file was replaced
at its path, the wait returns True at its next look at the path (once a
second), as the PostgreSQL store's does when its listener reconnects, and
the keeper reads the store, which moves to the new file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Awaitable, Callable

from lapse.sessions.store import StoreUnavailable
from lapse.sessions.stores.sqlite.queries import SQL

__all__ = ["FAILED_RETRY", "LOOK_EVERY", "Marker", "news_marker", "wait_for_news"]

LOOK_EVERY = 0.05
"""Seconds between two looks at the WAL index header."""

FAILED_RETRY = 1.0
"""Seconds a wait sleeps at most once the store failed it."""

CHECK_PATH_EVERY = 1.0
"""Seconds between two checks that the ``-shm`` read is still the one at the path."""

SOONER = 0.01
"""Seconds by which a deadline must precede the end of the wait to be news
(the deadline the wait was computed from is not)."""

_HEADER = 48
"""Bytes of one copy of the WAL index header."""

Marker = tuple[int, float | None, float]
"""The last event's id, the next deadline (None: no session), the store's now."""


def news_marker(conn: sqlite3.Connection, now: float) -> Marker:
    """What tells news (worker thread, in a read transaction)."""
    row = conn.execute(SQL.last_event_id).fetchone()
    last = int(row[0]) if row is not None and row[0] is not None else 0
    (live,) = conn.execute(SQL.first_deadline).fetchone()
    (leased,) = conn.execute(SQL.first_lease_end).fetchone()
    times = [t for t in (live, leased) if t is not None]
    if conn.execute(SQL.any_unclaimed).fetchone() is not None:
        times.append(now)
    return last, min(times) if times else None, now


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _at_path(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


async def wait_for_news(
    path: str,
    seconds: float,
    ask: Callable[[], Awaitable[Marker]],
    read_up_to: Callable[[], int | None],
) -> bool:
    """Sleep at most ``seconds``; True as soon as a look finds news (see the
    module), or the ``-shm`` at ``path`` is not the one read any more.
    ``ask()`` runs :func:`news_marker` on the store's worker;
    ``read_up_to()`` is the last event id ``events()`` handed out (None if
    it has not been called): an event after it is news, even one written
    before this wait began.

    Never raises for the store: if it fails (a lock held past the timeout, a
    file gone), the wait ends within :data:`FAILED_RETRY` seconds with True,
    and the keeper's round meets the failure and retries."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        return await _wait(path, seconds, ask, read_up_to)
    except (StoreUnavailable, OSError):
        left = min(seconds - (loop.time() - started), FAILED_RETRY)
        if left > 0:
            await asyncio.sleep(left)
        return True


async def _wait(
    path: str,
    seconds: float,
    ask: Callable[[], Awaitable[Marker]],
    read_up_to: Callable[[], int | None],
) -> bool:
    loop = asyncio.get_running_loop()
    wake_at = loop.time() + seconds
    shm = path + "-shm"
    fd = -1
    with contextlib.suppress(OSError):  # (none before the first call opens the file)
        fd = os.open(shm, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # The header first, then the store: a commit after the read changes it.
        header = os.pread(fd, _HEADER, 0) if fd >= 0 else b""
        identity = _identity(fd) if fd >= 0 else None
        marker = await ask()
        known = read_up_to()
        baseline = marker[0] if known is None else known
        next_path_check = loop.time() + CHECK_PATH_EVERY
        while True:
            last, upcoming, now = marker
            if last > baseline:
                return True
            left = wake_at - loop.time()
            if upcoming is not None and upcoming < now + left - SOONER:
                return True
            if left <= 0:
                return False
            if fd < 0:  # (a first call made the file meanwhile)
                with contextlib.suppress(OSError):
                    fd = os.open(shm, os.O_RDONLY | os.O_CLOEXEC)
                    header, identity = os.pread(fd, _HEADER, 0), _identity(fd)
                    marker = await ask()
                    continue
            await asyncio.sleep(min(LOOK_EVERY, left))
            if fd >= 0:
                if loop.time() >= next_path_check:
                    next_path_check = loop.time() + CHECK_PATH_EVERY
                    if _at_path(shm) != identity:
                        return True
                seen = os.pread(fd, _HEADER, 0)
                if seen == header:
                    continue
                header = seen
            marker = await ask()
    finally:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
