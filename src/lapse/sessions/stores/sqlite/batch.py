"""The calls of one event-loop turn, as one transaction (the worker thread's side).

A busy server starts many requests in one turn of its event loop, and each
begins with a load (touch) of its session. Run one by one, every call pays a
thread hop, a future wake-up, a ``BEGIN``/``COMMIT`` (a WAL append) and the
file-replaced check; that was most of a request's CPU on this store. So the
:class:`~lapse.sessions.stores.sqlite.runner.Runner` hands its worker every
call queued when the worker is free (the calls of one turn, or of the turns
that passed while it ran the previous batch), and :func:`run_batch` runs them
in order, as few transactions as keep reads off the write lock: each run of
consecutive writes is ONE ``BEGIN IMMEDIATE`` transaction, each run of
consecutive reads one ``BEGIN`` (so a read never waits for a lock another
process holds to write, in WAL mode). The calls of a batch are all pending
at once (none answered yet), so running them as these few transactions, in
the order they were made, is an order each caller could have seen.

Each call keeps its own outcome:

- A call that raises (its own error: a :class:`TooManySessions`, a value
  SQLite refuses to bind, a constraint) fails alone: the transaction is
  rolled back and the other calls are run again, without it, in a new one.
  Its error is its own; the others' results come from the transaction that
  commits.
- An error of the file or the connection (busy past ``busy_timeout``, disk
  full, I/O error, read-only file, interrupted, corrupt) fails every call of
  the batch not yet answered, each with its own
  :class:`~lapse.sessions.store.StoreUnavailable`: nothing of the batch was
  committed.
- A call whose caller gave up before the ``COMMIT`` (cancelled, or the
  watchdog's timeout) is left out: if it already ran, the transaction is
  rolled back and the others are run again without it. Once the worker has
  marked the batch as committing, the callers wait for the ``COMMIT``.
- A call is answered only after the ``COMMIT`` of the transaction holding it
  returned: a write acknowledged is in the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "ABANDONED",
    "COMMITTING",
    "DONE",
    "MAX_BATCH",
    "QUEUED",
    "RUNNING",
    "Job",
    "is_environmental",
    "run_transaction",
    "segments",
]

# Where a call is (``Job.state``). The worker moves it forward under the
# runner's lock; the event loop may abandon it only before it commits.
QUEUED, RUNNING, COMMITTING, DONE, ABANDONED = range(5)

MAX_BATCH = 256
"""The most calls in one transaction: bounds what a call that fails makes
the others run again, and how long the write lock is held at once."""


class Job:
    """One call of a store method: the transaction body to run, where it is,
    the future its caller awaits, and (worker thread) its outcome."""

    __slots__ = ("error", "fn", "queued", "result", "settled", "state", "waiter", "write")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection, float], Any],
        write: bool,
        waiter: asyncio.Future[Any],
    ) -> None:
        self.fn = fn
        self.write = write
        self.waiter = waiter
        self.state = QUEUED
        self.queued = time.monotonic()
        """When the call was made (the watchdog's clock)."""
        self.result: Any = None
        self.error: BaseException | None = None
        self.settled = False
        """Whether ``result`` or ``error`` is its outcome (worker thread)."""


_ENVIRONMENTAL = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_INTERRUPT,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOTADB,
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_AUTH,
        sqlite3.SQLITE_ABORT,
    }
)
"""SQLite's primary result codes that are the file's or the connection's
fault, not one call's: after them SQLite may have rolled the whole
transaction back by itself, so no call of the batch can be trusted."""


def is_environmental(exc: BaseException) -> bool:
    """Whether ``exc`` fails the whole batch rather than the call raising it."""
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return isinstance(exc, sqlite3.OperationalError)
    return code & 0xFF in _ENVIRONMENTAL


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def segments(jobs: list[Job]) -> list[list[Job]]:
    """``jobs`` cut into runs of consecutive writes and of consecutive
    reads, in order: one transaction each."""
    runs: list[list[Job]] = []
    for job in jobs:
        if runs and runs[-1][0].write == job.write:
            runs[-1].append(job)
        else:
            runs.append([job])
    return runs


def run_transaction(
    conn: sqlite3.Connection,
    jobs: list[Job],
    write: bool,
    clock: Callable[[], float],
    lock: threading.Lock,
    on_progress: Callable[[], None],
    own_error: Callable[[BaseException], BaseException],
) -> int:
    """Run ``jobs`` (state RUNNING; all writes, or all reads) in order as
    one transaction, again without those that raised or were abandoned
    until it commits, and set each one's outcome (``result`` or ``error``,
    and ``settled``); the transactions begun.

    ``now`` is read once the transaction holds its lock, so that it is
    never earlier than the time of a transaction committed before it.
    ``own_error`` turns a call's own error into the one its caller gets
    (a ``sqlite3.Error`` into a ``StoreUnavailable``). An environmental
    ``sqlite3.Error`` is raised, the jobs not yet settled failing with it;
    so is a ``BaseException`` that is not an ``Exception``.
    """
    pending = jobs
    begun = 0
    while pending:
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        begun += 1
        try:
            now = clock()
            results: list[Any] = []
            failed: Job | None = None
            for job in pending:
                try:
                    results.append(job.fn(conn, now))
                except Exception as exc:
                    if is_environmental(exc):
                        raise
                    job.error = own_error(exc)
                    job.settled = True
                    failed = job
                    break
                finally:
                    on_progress()
            with lock:
                gone = [job for job in pending if job.state == ABANDONED]
                if failed is None and not gone:
                    for job in pending:
                        job.state = COMMITTING
            if failed is None and not gone:
                conn.execute("COMMIT")
                for job, result in zip(pending, results, strict=True):
                    job.result = result
                    job.settled = True
                return begun
            _rollback(conn)
        except BaseException:
            _rollback(conn)
            raise
        pending = [job for job in pending if job is not failed and job not in gone]
    return begun


def settle(jobs: list[Job]) -> None:
    """Give each call its outcome, unless its caller has one already (the
    event loop of their futures)."""
    for job in jobs:
        waiter = job.waiter
        if waiter.done():
            continue
        if job.error is None:
            waiter.set_result(job.result)
        else:
            waiter.set_exception(job.error)
