"""The SQLite store's wake-up call: how an idle process learns, without
polling the store, that another process wrote news (an end announced, a
rotation, a session ended by hand, or one made that ends before the time the
keeper means to wake).

Every commit to a WAL-mode file, by any process, appends to the ``-wal``
(with ``pwrite``) and changes the header of the WAL index in the ``-shm``
(its change counter, ``iChange``, "incremented with each transaction": see
https://www.sqlite.org/walformat.html). So a waiting process

- sleeps on an inotify watch of the ``-wal`` (:mod:`.watch`, Linux): no
  wake-up at all while no process writes; where inotify cannot be had, it
  reads the 48 bytes of the WAL index header every :data:`LOOK_EVERY`
  seconds (one ``pread`` of memory the kernel holds, in the event loop);
- when a write woke it (at most once per :data:`LOOK_EVERY`, however many
  commits) and the header changed, asks the store one question on its
  worker thread: the last event's id and the next deadline. News is an
  event after the last one ``events()`` handed out, or a deadline earlier
  than the end of the wait. Other writes (touches, creates ending later)
  cost that one question.

Measured (bench/sqlite_news.py, this 2-core VM): a ``pread`` of the header
~1 µs of CPU, a ``stat`` of the ``-wal`` ~3 µs, ``PRAGMA data_version``
through the worker ~100 µs (the thread hop), and any timer wake-up of the
event loop 40-180 µs, which is why the wait does not look on a timer when
inotify is there: an idle wait then costs its start (one question) and
nothing per second.

A file replaced at its path (the database or its ``-wal`` renamed, deleted
or unlinked) ends the wait with True, as the PostgreSQL store's does when
its listener reconnects: the keeper reads the store, which moves to the new
file. (Without inotify: the ``-shm`` at the path is compared with the one
read once a second.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Awaitable, Callable

from lapse.sessions.store import StoreUnavailable
from lapse.sessions.stores.sqlite.queries import SQL
from lapse.sessions.stores.sqlite.watch import WalWatch, watch_wal

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
    watch: WalWatch | None = None
    with contextlib.suppress(OSError):  # (none before the first call opens the file)
        fd = os.open(shm, os.O_RDONLY | os.O_CLOEXEC)
        watch = watch_wal(path)
    try:
        # The watch and the header first, then the store: a commit after
        # them wakes the watch and changes the header.
        header = os.pread(fd, _HEADER, 0) if fd >= 0 else b""
        identity = _identity(fd) if fd >= 0 else None
        marker = await ask()
        asked = loop.time()
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
                    watch = watch_wal(path)
                    header, identity = os.pread(fd, _HEADER, 0), _identity(fd)
                    marker = await ask()
                    continue
            if watch is not None:
                # Asleep until a process writes the WAL; then at most one
                # question per look's interval, however many commits.
                if not await watch.wait(left):
                    continue
                if watch.moved:
                    return True
                pause = asked + LOOK_EVERY - loop.time()
                if pause > 0:
                    await asyncio.sleep(min(pause, max(wake_at - loop.time(), 0.0)))
            else:
                await asyncio.sleep(min(LOOK_EVERY, left))
                if fd >= 0 and loop.time() >= next_path_check:
                    next_path_check = loop.time() + CHECK_PATH_EVERY
                    if _at_path(shm) != identity:
                        return True
            if fd >= 0:
                seen = os.pread(fd, _HEADER, 0)
                if seen == header:
                    continue
                header = seen
            marker = await ask()
            asked = loop.time()
    finally:
        if watch is not None:
            watch.close()
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
