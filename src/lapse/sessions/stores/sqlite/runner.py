"""The SQLite store's connection and the thread that runs its transactions.

A :class:`Runner` owns one connection, used only by its one worker thread.
The calls of the store queue up; when the worker is free it takes every call
queued (those of one event-loop turn, or of the turns that passed while it
ran the previous batch) and runs them as ONE transaction (:mod:`.batch`:
each call keeps its own result or error, and is answered only once that
transaction has committed), then wakes the event loop once for the batch.
It opens the file and brings its schema up to date, bounds stalls (a
watchdog on the event loop fails every call once the worker has made no
progress for ``timeout`` seconds, cancelling those not yet committing), and
gives up a file that was deleted or replaced at its path while in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from lapse.sessions.store import StoreUnavailable
from lapse.sessions.stores.sqlite.batch import (
    ABANDONED,
    DONE,
    MAX_BATCH,
    QUEUED,
    RUNNING,
    Job,
    run_transaction,
    segments,
    settle,
)
from lapse.sessions.stores.sqlite.connection import (
    PERMANENT_CODES,
    PERMANENT_ERRNOS,
    SIDECARS,
    file_id,
    is_busy,
    why_cannot_open,
)
from lapse.sessions.stores.sqlite.schema import SCHEMA_VERSION, migrate

__all__ = ["Runner"]

_OVER = (ABANDONED, DONE)

log = logging.getLogger("lapse.sessions")

_T = TypeVar("_T")


class Runner:
    """The worker thread and connection of one :class:`SQLiteStore
    <lapse.sessions.stores.sqlite.SQLiteStore>`: :meth:`call` runs a
    transaction body there (batched with the calls around it) and awaits
    it; :meth:`aclose` ends both."""

    def __init__(
        self,
        path: str,
        busy_timeout: float,
        timeout: float,
        clock: Callable[[], float],
        synchronous: str = "normal",
        autocheckpoint: int = 1000,
    ) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.timeout = timeout
        self.clock = clock
        self.synchronous = synchronous
        self.autocheckpoint = autocheckpoint
        self.transactions = 0
        """Transactions begun (tests and the bench compare it with the calls)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lapse-sqlite")
        self._conn: sqlite3.Connection | None = None  # used only in the worker
        self._closed = False
        # The file the connection opened, and its -wal and -shm (worker only).
        self._file: tuple[int, int] | None = None
        self._sidecars: dict[str, tuple[int, int] | None] = {}
        self._gave_up: str | None = None  # why the last file was given up
        # Shared by the worker and the event loop, under the lock: the calls
        # queued, the batch running, whether the worker is at work (or has
        # been sent for), the calls submitted and not finished by it, and
        # when it last made progress (or was handed work while idle).
        self._lock = threading.Lock()
        self._queue: list[Job] = []
        self._batch: list[Job] = []
        self._busy = False
        self._kick_loop: asyncio.AbstractEventLoop | None = None
        self._outstanding = 0
        self._progress = time.monotonic()
        # The event loop's side: the calls awaited, and the one watchdog.
        self._jobs: set[Job] = set()
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_loop: asyncio.AbstractEventLoop | None = None

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called: every call fails from then on."""
        return self._closed

    @property
    def state(self) -> str:
        """``"new"``, ``"open"`` (a connection is made) or ``"closed"``."""
        return "closed" if self._closed else "open" if self._conn is not None else "new"

    # -- the worker thread ----------------------------------------------------

    def unavailable(self, what: str, permanent: bool = False) -> StoreUnavailable:
        """The error a call fails with, naming the file."""
        return StoreUnavailable(f"SQLite session store {self.path}: {what}", permanent=permanent)

    def _sqlite_error(self, exc: sqlite3.Error) -> StoreUnavailable:
        """The :class:`StoreUnavailable` for ``exc``: permanent for a path no
        file can be opened at, or a file that is not a database."""
        code = getattr(exc, "sqlite_errorcode", None)
        permanent = code is not None and (code & 0xFF) in PERMANENT_CODES
        what = f"{type(exc).__name__}: {exc}"
        if code is not None and code & 0xFF == sqlite3.SQLITE_CANTOPEN:
            what += f" ({why_cannot_open(self.path)})"
        return self.unavailable(what, permanent)

    def _connect(self) -> sqlite3.Connection:
        """Open the file and make the schema (worker thread)."""
        try:
            before = file_id(self.path)
        except OSError as exc:
            raise self.unavailable(
                f"cannot look at the file: {exc}", exc.errno in PERMANENT_ERRNOS
            ) from exc
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,  # we BEGIN and COMMIT ourselves
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            self._use_wal(conn)
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            conn.execute(f"PRAGMA wal_autocheckpoint = {int(self.autocheckpoint)}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                newer = migrate(conn)
                if newer is not None:
                    raise self.unavailable(
                        f"schema version {newer} is newer than this lapse knows ({SCHEMA_VERSION})",
                        permanent=True,
                    )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            try:
                opened = file_id(self.path)
                sidecars = {suffix: file_id(self.path + suffix) for suffix in SIDECARS}
            except OSError as exc:
                raise self.unavailable(f"cannot look at the file: {exc}") from exc
            if opened is None or (before is not None and before != opened):
                raise self.unavailable("the file was deleted or replaced while it was opened")
        except BaseException:
            conn.close()
            raise
        self._file = opened
        self._sidecars = sidecars
        if self._gave_up is not None:
            log.warning(
                "SQLite session store %s: now using the file at this path (%s)",
                self.path,
                "created anew, empty" if before is None else "another file than before",
            )
            self._gave_up = None
        return conn

    def _use_wal(self, conn: sqlite3.Connection) -> None:
        """Put the file in WAL mode (worker thread).

        Switching a new file to WAL does not wait on the busy handler: when
        several processes open a new file at once, all but one get "database
        is locked" at once. So retry, for up to ``busy_timeout``.
        """
        give_up = time.monotonic() + self.busy_timeout
        pause = 0.001
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL").fetchone()
                return
            except sqlite3.OperationalError as exc:
                if conn.in_transaction or not is_busy(exc) or time.monotonic() >= give_up:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _give_up_file(self) -> None:
        """The path no longer names the file the connection opened (deleted,
        or another file moved there): log it, drop the old file, and fail
        the call whose transaction went into it (worker thread). The next
        call opens whatever is at the path then (a new file if none).

        The old file's ``-wal`` and ``-shm`` are still at the path: SQLite
        does not checkpoint nor remove them when the database has moved, and
        the next connection to the path would replay that WAL into the new
        file. So they are unlinked first, while this connection still holds
        them open (their names cannot be another file's yet). Other
        processes still on the old file keep their open copies, write only
        there, and give it up at their next call.
        """
        try:
            now_there = file_id(self.path)
        except OSError:
            return
        what = "deleted" if now_there is None else "replaced by another file"
        for suffix, known in self._sidecars.items():
            with contextlib.suppress(OSError):
                if known is not None and file_id(self.path + suffix) == known:
                    os.unlink(self.path + suffix)
        self._close()
        self._gave_up = what
        log.error(
            "SQLite session store %s: the file was %s while in use; the call that "
            "found it failed (503) and is not in the file at that path now; the next "
            "call opens the file now there%s",
            self.path,
            what,
            " (a new, empty one)" if now_there is None else "",
        )
        raise self.unavailable(
            f"the file was {what} while in use; this call is not in the file now at the path"
        )

    def _close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _run_jobs(self, jobs: list[Job]) -> None:
        """Run one transaction of a batch (all writes or all reads, see
        :mod:`.batch`) and set each job's outcome (worker thread). After it,
        the path must still name the file the connection opened."""
        moved = False
        try:
            try:
                if self._conn is None:
                    self._conn = self._connect()
                self.transactions += run_transaction(
                    self._conn,
                    jobs,
                    jobs[0].write,
                    self.clock,
                    self._lock,
                    self._made_progress,
                    self._own_error,
                )
            except sqlite3.Error as exc:
                raise self._sqlite_error(exc) from exc
            try:
                moved = file_id(self.path) != self._file
            except OSError:  # cannot tell: no reason to give the file up
                moved = False
            if moved:
                self._give_up_file()
        except BaseException as exc:  # each caller gets an error of its own
            for job in jobs:
                if not job.settled or moved:
                    job.result = None
                    job.error = _copy(exc)

    def _own_error(self, exc: BaseException) -> BaseException:
        """The error a call gets for its own failure (worker thread)."""
        if isinstance(exc, sqlite3.Error):
            error = self._sqlite_error(exc)
            error.__cause__ = exc
            return error
        return exc

    def _made_progress(self) -> None:
        self._progress = time.monotonic()  # (one float: atomic under the GIL)

    def _drain(self) -> None:
        """Run the queued calls, a batch at a time, until none is left
        (worker thread), answering each transaction's calls once it is
        done."""
        while True:
            with self._lock:
                queue = self._queue
                jobs = [job for job in queue[:MAX_BATCH] if job.state == QUEUED]
                self._queue = queue[MAX_BATCH:]
                self._outstanding -= min(len(queue), MAX_BATCH) - len(jobs)
                if not jobs and not self._queue:
                    self._busy = False
                    return
                for job in jobs:
                    job.state = RUNNING
                self._batch = jobs
                self._progress = time.monotonic()
            for part in segments(jobs):
                self._run_jobs(part)
                self._answer(part)
            with self._lock:
                self._batch = []

    def _answer(self, jobs: list[Job]) -> None:
        """Hand the outcomes of ``jobs`` to their event loops, one wake-up
        each (worker thread)."""
        with self._lock:
            for job in jobs:
                if job.state != ABANDONED:
                    job.state = DONE
            self._outstanding -= len(jobs)
            self._progress = time.monotonic()
        loops: dict[asyncio.AbstractEventLoop, list[Job]] = {}
        for job in jobs:
            loops.setdefault(job.waiter.get_loop(), []).append(job)
        for loop, answered in loops.items():
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                loop.call_soon_threadsafe(settle, answered)

    # -- the event loop -------------------------------------------------------

    async def call(self, fn: Callable[[sqlite3.Connection, float], _T], write: bool) -> _T:
        """Run ``fn(conn, now)`` in a transaction (``BEGIN IMMEDIATE`` if any
        call of its batch writes) in the worker thread, and its result;
        cancelled uncommitted if the caller is, or if the worker stalls."""
        if self._closed:
            raise self.unavailable("the store is closed")
        loop = asyncio.get_running_loop()
        job = Job(fn, write, loop.create_future())
        with self._lock:
            if not self._outstanding:  # the worker was idle: it has not stalled
                self._progress = time.monotonic()
            self._outstanding += 1
            self._queue.append(job)
            kick = not self._busy and self._kick_loop is not loop
            if kick:
                self._kick_loop = loop
        if kick:  # at the end of this turn: the turn's other calls join it
            loop.call_soon(self._kick)
        jobs = self._jobs
        jobs.add(job)
        if self._watchdog is None or self._watchdog_loop is not loop:
            self._watchdog = loop.call_later(self.timeout, self._tick)
            self._watchdog_loop = loop
        try:
            result: _T = await job.waiter
            return result
        except asyncio.CancelledError:
            self._abandon(job)  # the caller is gone: never commit it later
            raise
        finally:
            jobs.discard(job)

    def _kick(self) -> None:
        """Send the worker for the calls queued, unless it is at work
        already (it takes them when its batch is done)."""
        with self._lock:
            self._kick_loop = None
            if self._busy or not self._queue:
                return
            self._busy = True
            self._progress = time.monotonic()  # handed work: not stalled yet
        try:
            self._executor.submit(self._drain)
        except RuntimeError:  # the executor was shut down meanwhile
            with self._lock:
                jobs, self._queue = self._queue, []
                self._outstanding -= len(jobs)
                self._busy = False
            for job in jobs:
                job.error = self.unavailable("the store is closed")
            settle(jobs)

    def _abandon(self, job: Job) -> bool:
        """Cancel ``job`` unless it is committing or done (event loop); whether
        it was cancelled. A batch whose every call is abandoned is
        interrupted, and rolled back; one with others still awaited runs
        again without it."""
        with self._lock:
            if job.state == QUEUED:
                job.state = ABANDONED
                return True
            if job.state == RUNNING:
                job.state = ABANDONED
                conn = self._conn
                if conn is not None and all(each.state in _OVER for each in self._batch):
                    with contextlib.suppress(sqlite3.Error):
                        conn.interrupt()
                return True
            return False

    def _tick(self) -> None:
        """The watchdog (event loop): a call fails, cancelled, once it has
        waited ``timeout`` seconds during which the worker made no progress
        (a call made while the worker was stuck on a batch no one awaits
        any more gets its own ``timeout``, not what is left of that one's)."""
        self._watchdog = None
        loop = self._watchdog_loop
        jobs = [job for job in self._jobs if job.waiter.get_loop() is loop]
        if not jobs or loop is None:
            return
        now = time.monotonic()
        with self._lock:
            # (the worker not sent for yet: the calls wait for this turn to end)
            since = self._progress if self._busy else now
        wait = self.timeout
        for job in jobs:
            stalled = now - max(since, job.queued)
            if stalled < self.timeout:
                wait = min(wait, self.timeout - stalled)
            elif self._abandon(job) and not job.waiter.done():
                job.waiter.set_exception(
                    self.unavailable(
                        f"no progress for {self.timeout:g}s (a lock held by another "
                        "process, or a stalled disk); the call was cancelled uncommitted"
                    )
                )
        if any(not job.waiter.done() for job in jobs):
            self._watchdog = loop.call_later(wait, self._tick)

    async def aclose(self) -> None:
        """Let the calls already made finish, close the connection, stop the
        worker thread. Idempotent; any later call raises StoreUnavailable."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._finish)
        finally:
            self._executor.shutdown(wait=False)
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None

    def _finish(self) -> None:
        with self._lock:
            self._busy = True
        self._drain()
        self._close()


def _copy(exc: BaseException) -> BaseException:
    """An error of its own for each call a batch failed: a
    :class:`StoreUnavailable` copied (same text, permanence and cause),
    anything else wrapped."""
    if isinstance(exc, StoreUnavailable):
        error = StoreUnavailable(str(exc), permanent=exc.permanent)
        error.__cause__ = exc.__cause__
        return error
    wrapped = RuntimeError(f"session store call failed: {exc!r}")
    wrapped.__cause__ = exc
    return wrapped
