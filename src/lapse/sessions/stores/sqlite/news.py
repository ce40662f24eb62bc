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
  ``stat``s the ``-wal`` every :data:`LOOK_EVERY` seconds (its size and
  time change with a commit; and at least every
  :data:`ASK_AT_LEAST_EVERY` it asks anyway). It never opens SQLite's
  files itself (see :func:`_signature`);
- when a write woke it (at most once per :data:`LOOK_EVERY`, however many
  commits), asks the store one question on its
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
file. (Without inotify: the ``-wal`` at the path is compared with the one
seen at each look.)
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Awaitable, Callable

from lapse.sessions.store import StoreUnavailable
from lapse.sessions.stores.sqlite.queries import SQL
from lapse.sessions.stores.sqlite.watch import watch_wal

__all__ = ["FAILED_RETRY", "LOOK_EVERY", "Marker", "news_marker", "wait_for_news"]

LOOK_EVERY = 0.05
"""Seconds between two looks at the WAL index header."""

FAILED_RETRY = 1.0
"""Seconds a wait sleeps at most once the store failed it."""

ASK_AT_LEAST_EVERY = 1.0
"""Without inotify, seconds after which a look asks the store even if the
``-wal`` looks unchanged (a write of the same size within one tick of the
file system's clock leaves its size and time as they were)."""

SOONER = 0.01
"""Seconds by which a deadline must precede the end of the wait to be news
(the deadline the wait was computed from is not)."""

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


def _signature(wal: str) -> tuple[int, int, int, int] | None:
    """The ``-wal``'s device, inode, size and modification time (None if it
    is not there): a ``stat``, never an ``open``. (Opening and closing a file
    SQLite holds open would drop its POSIX locks on it, for the whole
    process: another process could then think the ``-shm`` unused, truncate
    it, and this one's SQLite would die of SIGBUS on its mapping.)"""
    try:
        st = os.stat(wal)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


async def wait_for_news(
    path: str,
    seconds: float,
    ask: Callable[[], Awaitable[Marker]],
    read_up_to: Callable[[], int | None],
) -> bool:
    """Sleep at most ``seconds``; True as soon as a look finds news (see the
    module), or the ``-wal`` at ``path`` is not the one seen any more.
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
    wal = path + "-wal"
    # The watch and the WAL's signature first, then the store: a commit
    # after them wakes the watch and changes the signature.
    signature = _signature(wal)  # (None before the first call makes the file)
    watch = watch_wal(path) if signature is not None else None
    try:
        marker = await ask()
        asked = loop.time()
        known = read_up_to()
        baseline = marker[0] if known is None else known
        while True:
            last, upcoming, now = marker
            if last > baseline:
                return True
            left = wake_at - loop.time()
            if upcoming is not None and upcoming < now + left - SOONER:
                return True
            if left <= 0:
                return False
            if signature is None:  # (a first call may have made the file meanwhile)
                await asyncio.sleep(min(LOOK_EVERY, left))
                signature = _signature(wal)
                if signature is not None:
                    watch = watch_wal(path)
                    marker = await ask()
                    asked = loop.time()
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
                seen = _signature(wal)
                if seen is None or seen[:2] != signature[:2]:
                    return True  # replaced or gone: the keeper reads the store
                if seen == signature and loop.time() < asked + ASK_AT_LEAST_EVERY:
                    continue
                signature = seen
            marker = await ask()
            asked = loop.time()
    finally:
        if watch is not None:
            watch.close()
