"""The SQLite store's connection and the thread that runs its transactions.

A :class:`Runner` owns one connection, used only by its one worker thread,
and runs each call of the store as one transaction there (see the
guarantees in :mod:`lapse.sessions.stores.sqlite`): it opens the file and
brings its schema up to date, bounds stalls (a watchdog on the event loop
fails every call once the worker has made no progress for ``timeout``
seconds, cancelling those not yet committing), and gives up a file that was
deleted or replaced at its path while in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lapse.sessions.store import StoreUnavailable
from lapse.sessions.stores.sqlite.schema import SCHEMA_VERSION, migrate

__all__ = ["Runner"]

log = logging.getLogger("lapse.sessions")

_T = TypeVar("_T")

# Where a call is (``_Job.state``). The worker moves it forward under the
# store's lock; the event loop may abandon it only before it commits.
_QUEUED, _RUNNING, _COMMITTING, _DONE, _ABANDONED = range(5)


class _Job:
    """One call of a store method: the transaction to run, where it is, and
    the future its caller awaits."""

    __slots__ = ("fn", "state", "waiter", "write")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection, float], Any],
        write: bool,
        waiter: asyncio.Future[Any],
    ) -> None:
        self.fn = fn
        self.write = write
        self.waiter = waiter
        self.state = _QUEUED


class _Abandoned(Exception):
    """The caller gave up on the call before it committed (worker thread)."""


def _settle(waiter: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    """Give a call's outcome to its caller, unless it has one already."""
    if waiter.done():
        return
    if error is None:
        waiter.set_result(result)
    else:
        waiter.set_exception(error)


def _file_id(path: str) -> tuple[int, int] | None:
    """The (device, inode) of the file at ``path``, None if there is none;
    OSError if that cannot be told (a permission error, say)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


_PERMANENT_CODES = frozenset(
    {
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_AUTH,
        sqlite3.SQLITE_NOTADB,
    }
)
"""SQLite's (primary) result codes that retrying does not mend: no file can
be opened at the path, or the file there is not a usable database."""

_PERMANENT_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG}
)
"""Errors looking at the path that retrying does not mend."""


def _why_cannot_open(path: str) -> str:
    """What is wrong with ``path`` when SQLite cannot open a file there."""
    directory = os.path.dirname(path)
    if os.path.isdir(path):
        return f"{path} is a directory"
    if not os.path.isdir(directory):
        return f"no such directory: {directory}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"permission denied on the directory {directory}"
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        return f"permission denied on the file {path}"
    return "cannot open the file"


_SIDECARS = ("-wal", "-shm")
"""The files SQLite keeps next to a database in WAL mode."""


class Runner:
    """The worker thread and connection of one :class:`SQLiteStore
    <lapse.sessions.stores.sqlite.SQLiteStore>`: :meth:`call` runs a
    transaction there and awaits it; :meth:`aclose` ends both."""

    def __init__(
        self, path: str, busy_timeout: float, timeout: float, clock: Callable[[], float]
    ) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.timeout = timeout
        self.clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lapse-sqlite")
        self._conn: sqlite3.Connection | None = None  # used only in the worker
        self._closed = False
        # The file the connection opened, and its -wal and -shm (worker only).
        self._file: tuple[int, int] | None = None
        self._sidecars: dict[str, tuple[int, int] | None] = {}
        self._gave_up: str | None = None  # why the last file was given up
        # Shared by the worker and the event loop, under the lock: calls
        # submitted and not finished by the worker, and when the worker last
        # started or finished one (or was handed work while idle).
        self._lock = threading.Lock()
        self._outstanding = 0
        self._progress = time.monotonic()
        # The event loop's side: the calls awaited, and the one watchdog.
        self._jobs: set[_Job] = set()
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
        permanent = code is not None and (code & 0xFF) in _PERMANENT_CODES
        what = f"{type(exc).__name__}: {exc}"
        if code is not None and code & 0xFF == sqlite3.SQLITE_CANTOPEN:
            what += f" ({_why_cannot_open(self.path)})"
        return self.unavailable(what, permanent)

    def _connect(self) -> sqlite3.Connection:
        """Open the file and make the schema (worker thread)."""
        try:
            before = _file_id(self.path)
        except OSError as exc:
            raise self.unavailable(
                f"cannot look at the file: {exc}", exc.errno in _PERMANENT_ERRNOS
            ) from exc
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,  # we BEGIN and COMMIT ourselves
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            self._use_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
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
                opened = _file_id(self.path)
                sidecars = {suffix: _file_id(self.path + suffix) for suffix in _SIDECARS}
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
                if conn.in_transaction or not _is_busy(exc) or time.monotonic() >= give_up:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _run(
        self,
        fn: Callable[[sqlite3.Connection, float], _T],
        write: bool,
        job: _Job | None = None,
    ) -> _T:
        """Run ``fn(conn, now)`` as one transaction (worker thread).

        ``now`` is read once the transaction holds its lock, so that it is
        never earlier than the time of a transaction committed before it.
        If ``job`` was abandoned by its caller before the ``COMMIT``, the
        transaction is rolled back instead (:class:`_Abandoned`). After it,
        the path must still name the file the connection opened.
        """
        try:
            if self._conn is None:
                self._conn = self._connect()
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = fn(conn, self.clock())
                if job is not None:
                    with self._lock:
                        if job.state == _ABANDONED:
                            raise _Abandoned
                        job.state = _COMMITTING
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._sqlite_error(exc) from exc
        try:
            moved = _file_id(self.path) != self._file
        except OSError:  # cannot tell: no reason to give the file up
            moved = False
        if moved:
            self._give_up_file()
        return result

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
            now_there = _file_id(self.path)
        except OSError:
            return
        what = "deleted" if now_there is None else "replaced by another file"
        for suffix, known in self._sidecars.items():
            with contextlib.suppress(OSError):
                if known is not None and _file_id(self.path + suffix) == known:
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

    def _work(self, job: _Job, loop: asyncio.AbstractEventLoop) -> None:
        """Run one call, unless its caller gave up on it (worker thread)."""
        with self._lock:
            if job.state == _ABANDONED:
                self._outstanding -= 1
                return
            job.state = _RUNNING
            self._progress = time.monotonic()
        result: Any = None
        error: BaseException | None = None
        try:
            result = self._run(job.fn, job.write, job)
        except BaseException as exc:  # handed to the caller, as an executor does
            error = exc
        with self._lock:
            if job.state != _ABANDONED:
                job.state = _DONE
            self._outstanding -= 1
            self._progress = time.monotonic()
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed
            loop.call_soon_threadsafe(_settle, job.waiter, result, error)

    async def call(self, fn: Callable[[sqlite3.Connection, float], _T], write: bool) -> _T:
        """Run ``fn(conn, now)`` as one transaction (``BEGIN IMMEDIATE`` if
        it writes) in the worker thread, and its result; cancelled
        uncommitted if the caller is, or if the worker stalls."""
        if self._closed:
            raise self.unavailable("the store is closed")
        loop = asyncio.get_running_loop()
        job = _Job(fn, write, loop.create_future())
        with self._lock:
            if not self._outstanding:  # the worker was idle: it has not stalled
                self._progress = time.monotonic()
            self._outstanding += 1
        try:
            self._executor.submit(self._work, job, loop)
        except RuntimeError as exc:  # the executor was shut down meanwhile
            with self._lock:
                self._outstanding -= 1
            raise self.unavailable("the store is closed") from exc
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

    def _abandon(self, job: _Job) -> bool:
        """Cancel ``job`` unless it is committing or done (event loop); whether
        it was cancelled. One running is interrupted, and rolled back."""
        with self._lock:
            if job.state == _QUEUED:
                job.state = _ABANDONED
                return True
            if job.state == _RUNNING:
                job.state = _ABANDONED
                conn = self._conn
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        conn.interrupt()
                return True
            return False

    def _tick(self) -> None:
        """The watchdog (event loop): calls waiting while the worker has made
        no progress for ``timeout`` seconds are cancelled and fail."""
        self._watchdog = None
        loop = self._watchdog_loop
        jobs = [job for job in self._jobs if job.waiter.get_loop() is loop]
        if not jobs or loop is None:
            return
        with self._lock:
            stalled = time.monotonic() - self._progress
        if stalled >= self.timeout:
            for job in jobs:
                if self._abandon(job) and not job.waiter.done():
                    job.waiter.set_exception(
                        self.unavailable(
                            f"no progress for {self.timeout:g}s (a lock held by another "
                            "process, or a stalled disk); the call was cancelled uncommitted"
                        )
                    )
            wait = self.timeout
        else:
            wait = self.timeout - stalled
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
            await loop.run_in_executor(self._executor, self._close)
        finally:
            self._executor.shutdown(wait=False)
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)
