"""The SQLite store: sessions in one file, shared by the processes of one machine.

Sessions survive a restart, and every process that opens the same file sees
the same sessions, claims each ended session exactly once per lease, and
reads the same end-of-session events.

Guarantees:

- **Atomic operations.** Each method is one SQLite transaction; every method
  that writes starts it with ``BEGIN IMMEDIATE``, which takes the file's write
  lock first, so a method is atomic across processes (two ``claim`` calls in
  two processes never hand out the same session while its lease holds).
- **The event loop never waits on SQLite.** All SQLite work runs in one
  dedicated worker thread per store, which owns the store's only connection;
  the async methods await it. Operations of one store run one at a time, in
  the order they were called.
- **Durability.** The file is in WAL mode with ``synchronous=NORMAL``: a write
  that returned survives a crash of the process (or of every process), but a
  power loss or OS crash can lose the last transactions before the WAL is
  synced (the file itself stays consistent). Sessions are soft state, so
  this trades the last second of touches for not syncing on every request.
- **Contention.** A lock held by another process is waited for up to
  ``busy_timeout`` seconds; past that, as on any other SQLite error (missing
  directory, a file that is not a database, a full disk), the method raises
  :class:`~lapse.sessions.store.StoreUnavailable` naming the file, raised
  ``from`` the ``sqlite3`` error. A failed ``open`` is retried by the next
  call.
- **A bound on stalls, not on queues.** A call fails (``StoreUnavailable``)
  when the worker has made no progress for ``timeout`` seconds (1 by
  default): it is stuck on a lock another process holds, or on a stalled
  disk. Then every call not yet committing fails at once. A long queue
  that moves, or an event loop too busy to collect a finished result, fails
  nothing. The store enforces this bound itself (``enforces_timeout``).
- **A failed call is not applied.** A call that fails for a timeout, or
  whose caller was cancelled, is cancelled before it commits: not started,
  or rolled back (the worker checks before its ``COMMIT``). Once its
  ``COMMIT`` has begun, a call is waited for. So a call that raised was not
  applied and never will be, and retrying it is safe.
- **A file deleted or replaced while in use.** After each transaction the
  store checks that the path still names the file its connection opened
  (``st_dev``, ``st_ino``). If not, that call fails (so a write that went
  into a deleted file is never acknowledged), an error is logged naming the
  file, and the connection is closed after unlinking the old file's
  ``-wal`` and ``-shm`` (which SQLite leaves at the path, and would replay
  into the next file opened there). The next call opens the file then at
  the path: the replacement, or a new, empty file if it was deleted (its
  sessions are lost, as its users' logins). Other processes on the old
  file do the same at their next call.
- **Time.** Deadlines and leases are in the store's clock: ``clock()`` if
  given, else this machine's wall clock (``time.time``), which all processes
  of one machine share.

The file must be on a local file system (WAL needs shared memory between the
processes; it does not work over NFS).

Schema (``PRAGMA user_version = 3``; a version 1 or 2 file is migrated in
place by the first process of this version that opens it, after which
processes of older versions refuse the file):

- ``sessions``: one row per session, live (``ended = 0``) or ended and
  waiting for its expiry hook to be acknowledged (``ended = 1``). An ended
  row's ``lease_until`` is when it may be claimed (again): the moment it
  ended for one never claimed, the end of its lease for one claimed.
  ``created`` and ``ends_at`` (the absolute end, NULL for none; NULL both in
  rows from version 1) are kept by a rotation; ``deadline`` never passes
  ``ends_at``. ``version`` counts the writes of the session's data (1 at
  creation, one more per ``save``; 0 in rows from before version 3), so
  that ``load`` need not read data a process already holds.
- ``aliases``: the old uids of rotated sessions, each with the uid it now
  names (kept up to date by further rotations) until its grace ends.
- ``session_data``: one row per key (``value`` is JSON), so that ``save``
  writes only the keys that changed and two requests changing different keys
  of one session both persist.
- ``events``: the uids whose end was acknowledged, with an increasing id
  (the events cursor), and rotations (``uid`` the old uid, ``target`` the
  new one; NULL for an end); rows older than ten minutes are pruned.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from lapse.sessions.store import (
    Event,
    Expiry,
    SessionInfo,
    StoreConfigError,
    StoredSession,
    StoreUnavailable,
    _bucket_bounds,
)
from lapse.sessions.stores import check_no_control

if TYPE_CHECKING:
    from lapse.sessions.store import SessionStore

__all__ = ["SQLiteStore"]

log = logging.getLogger("lapse.sessions")

_T = TypeVar("_T")

_SCHEMA_VERSION = 3

# Slack when comparing a deadline with the clock (as the memory store does),
# so that a timer firing at a deadline rounded down by one ulp finds it due.
_EPSILON = 1e-6

EVENTS_KEPT_FOR = 600.0
"""Seconds an end-of-session event stays readable by ``events()``."""

EVENTS_PER_CALL = 1000
"""The most uids one ``events()`` call returns."""

_URL_PREFIX = "sqlite:///"
_URL_OPTIONS = ("busy_timeout", "timeout")

_PATH_MAX = 4095
_NAME_MAX = 255
"""Linux's limits on a file path and on one name in it, in bytes."""


def _checked_path(path: str) -> str:
    """``path`` made absolute; :class:`StoreConfigError` if no file can have it."""
    check_no_control(path, "a SQLite store path")
    absolute = os.path.abspath(path)
    try:
        raw = os.fsencode(absolute)
    except UnicodeError:
        raise StoreConfigError(
            f"the SQLite store path {path!r} cannot be a file name on this system"
        ) from None
    longest = max(len(name) for name in raw.split(b"/"))
    if len(raw) > _PATH_MAX or longest > _NAME_MAX:
        raise StoreConfigError(
            f"the SQLite store path is too long for a file: {len(raw)} bytes, its longest "
            f"name {longest} (at most {_PATH_MAX}, and {_NAME_MAX} for each name)"
        )
    return absolute


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    uid TEXT PRIMARY KEY,
    timeout REAL NOT NULL,
    deadline REAL NOT NULL,
    ended INTEGER NOT NULL DEFAULT 0,
    cause TEXT,
    delivery_id TEXT,
    attempt INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL,
    created REAL,
    ends_at REAL,
    version INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS sessions_live ON sessions (ended, deadline);
CREATE INDEX IF NOT EXISTS sessions_lease ON sessions (ended, lease_until);
CREATE TABLE IF NOT EXISTS session_data (
    uid TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (uid, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    uid TEXT NOT NULL,
    at REAL NOT NULL,
    target TEXT
);
CREATE INDEX IF NOT EXISTS events_at ON events (at);
"""

_ALIASES = """
CREATE TABLE IF NOT EXISTS aliases (
    uid TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    until REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS aliases_target ON aliases (target);
CREATE INDEX IF NOT EXISTS aliases_until ON aliases (until);
"""
_SCHEMA += _ALIASES

# From version 1: the absolute lifetime and rotation.
_MIGRATE_1_TO_2 = (
    """
ALTER TABLE sessions ADD COLUMN created REAL;
ALTER TABLE sessions ADD COLUMN ends_at REAL;
ALTER TABLE events ADD COLUMN target TEXT;
"""
    + _ALIASES
)

# From version 2: data versions.
_MIGRATE_2_TO_3 = """
ALTER TABLE sessions ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
"""

_MIGRATIONS = {0: _SCHEMA, 1: _MIGRATE_1_TO_2 + _MIGRATE_2_TO_3, 2: _MIGRATE_2_TO_3}
"""The script that brings a file of each older schema version to the current one."""


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


class SQLiteStore:
    """Sessions in an SQLite file (see the module docstring for guarantees).

    ``path`` is made absolute at construction (so a later ``chdir`` cannot
    change the file); ``url`` is ``"sqlite:///" + path``. The file and its
    tables are created by :meth:`open` (or by the first call, if ``open`` was
    not awaited); the directory must exist.
    """

    shared = True
    enforces_timeout = True
    """Every call fails once the worker has made no progress for ``timeout``
    seconds (one watchdog timer per store, not one per call)."""
    holds_sessions = False

    def __init__(
        self,
        path: str,
        *,
        clock: Callable[[], float] | None = None,
        busy_timeout: float = 5.0,
        timeout: float = 1.0,
    ) -> None:
        if not isinstance(path, str) or not path:
            raise StoreConfigError(f"the SQLite store needs a file path, not {path!r}")
        if path == ":memory:" or path.startswith("file::memory:"):
            raise StoreConfigError(
                "the SQLite store needs a file: an in-memory database cannot be "
                "shared by processes nor survive a restart (use memory: instead)"
            )
        if not busy_timeout >= 0:
            raise StoreConfigError(f"busy_timeout is seconds >= 0, not {busy_timeout!r}")
        if not 0 < timeout < float("inf"):
            raise StoreConfigError(f"timeout is seconds > 0, not {timeout!r}")
        self.path = _checked_path(path)
        self.url = _URL_PREFIX + self.path
        self.busy_timeout = float(busy_timeout)
        self.timeout = float(timeout)
        self.clock: Callable[[], float] = clock or time.time
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

    @classmethod
    def from_url(cls, url: str, clock: Callable[[], float] | None = None) -> SQLiteStore:
        """The store a ``sqlite:///`` URL names.

        ``sqlite:///sessions.db`` is relative to the current directory,
        ``sqlite:////var/lib/app/sessions.db`` is absolute. The options are
        ``?busy_timeout=SECONDS`` (default 5) and ``?timeout=SECONDS`` (default
        1; see the module docstring). Anything else, an empty path or
        ``:memory:`` is a :class:`StoreConfigError`.
        """
        if not isinstance(url, str):
            raise StoreConfigError(f"a SQLite store URL is a string, not {url!r}")
        if not url.lower().startswith("sqlite:"):
            raise StoreConfigError(
                f"not a SQLite store URL: {url!r} (use sqlite:///relative.db "
                "or sqlite:////absolute/path.db)"
            )
        if not url.lower().startswith(_URL_PREFIX):
            raise StoreConfigError(
                f"bad SQLite store URL {url!r}: it is sqlite:/// (three slashes, no host) "
                "then the file path, e.g. sqlite:///sessions.db or sqlite:////abs/sessions.db"
            )
        rest = url[len(_URL_PREFIX) :]
        if "#" in rest:
            raise StoreConfigError(f"bad SQLite store URL {url!r}: a fragment (#) means nothing")
        path, _, query = rest.partition("?")
        if not path:
            raise StoreConfigError(
                f"bad SQLite store URL {url!r}: no file path after sqlite:/// "
                "(e.g. sqlite:///sessions.db)"
            )
        if path == ":memory:":
            raise StoreConfigError(
                f"bad SQLite store URL {url!r}: an in-memory database cannot be shared "
                "by processes nor survive a restart (use memory: instead)"
            )
        options: dict[str, str] = {}
        for item in query.split("&") if query else []:
            name, eq, value = item.partition("=")
            if name not in _URL_OPTIONS:
                raise StoreConfigError(
                    f"bad SQLite store URL {url!r}: unknown option {name!r} "
                    f"(the options are: {', '.join(_URL_OPTIONS)})"
                )
            if not eq or name in options:
                raise StoreConfigError(
                    f"bad SQLite store URL {url!r}: option {name!r} needs one value"
                )
            options[name] = value
        busy_timeout = 5.0
        if "busy_timeout" in options:
            try:
                busy_timeout = float(options["busy_timeout"])
            except ValueError:
                busy_timeout = -1.0
            if not 0 <= busy_timeout < float("inf"):
                raise StoreConfigError(
                    f"bad SQLite store URL {url!r}: busy_timeout is seconds >= 0, "
                    f"not {options['busy_timeout']!r}"
                )
        timeout = 1.0
        if "timeout" in options:
            try:
                timeout = float(options["timeout"])
            except ValueError:
                timeout = 0.0
            if not 0 < timeout < float("inf"):
                raise StoreConfigError(
                    f"bad SQLite store URL {url!r}: timeout is seconds > 0, "
                    f"not {options['timeout']!r}"
                )
        return cls(path, clock=clock, busy_timeout=busy_timeout, timeout=timeout)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._conn is not None else "new"
        return f"<SQLiteStore {self.path!r} {state}>"

    # -- the worker thread ----------------------------------------------------

    def _unavailable(self, what: str, permanent: bool = False) -> StoreUnavailable:
        return StoreUnavailable(f"SQLite session store {self.path}: {what}", permanent=permanent)

    def _sqlite_error(self, exc: sqlite3.Error) -> StoreUnavailable:
        """The :class:`StoreUnavailable` for ``exc``: permanent for a path no
        file can be opened at, or a file that is not a database."""
        code = getattr(exc, "sqlite_errorcode", None)
        permanent = code is not None and (code & 0xFF) in _PERMANENT_CODES
        what = f"{type(exc).__name__}: {exc}"
        if code is not None and code & 0xFF == sqlite3.SQLITE_CANTOPEN:
            what += f" ({_why_cannot_open(self.path)})"
        return self._unavailable(what, permanent)

    def _connect(self) -> sqlite3.Connection:
        """Open the file and make the schema (worker thread)."""
        try:
            before = _file_id(self.path)
        except OSError as exc:
            raise self._unavailable(
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
                (version,) = conn.execute("PRAGMA user_version").fetchone()
                if version > _SCHEMA_VERSION:
                    raise self._unavailable(
                        f"schema version {version} is newer than this lapse knows "
                        f"({_SCHEMA_VERSION})",
                        permanent=True,
                    )
                if version < _SCHEMA_VERSION:
                    script = _MIGRATIONS[version]
                    for statement in script.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            try:
                opened = _file_id(self.path)
                sidecars = {suffix: _file_id(self.path + suffix) for suffix in _SIDECARS}
            except OSError as exc:
                raise self._unavailable(f"cannot look at the file: {exc}") from exc
            if opened is None or (before is not None and before != opened):
                raise self._unavailable("the file was deleted or replaced while it was opened")
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
        raise self._unavailable(
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

    async def _call(self, fn: Callable[[sqlite3.Connection, float], _T], write: bool) -> _T:
        if self._closed:
            raise self._unavailable("the store is closed")
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
            raise self._unavailable("the store is closed") from exc
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
                        self._unavailable(
                            f"no progress for {self.timeout:g}s (a lock held by another "
                            "process, or a stalled disk); the call was cancelled uncommitted"
                        )
                    )
            wait = self.timeout
        else:
            wait = self.timeout - stalled
        if any(not job.waiter.done() for job in jobs):
            self._watchdog = loop.call_later(wait, self._tick)

    # -- the protocol -----------------------------------------------------------

    async def open(self) -> None:
        """Create the file and its tables if need be. Idempotent; safe when
        several processes open the same new file at once."""
        # The resolved path: a URL such as sqlite:///tmp/x.db is relative.
        log.info("SQLite session store: %s", self.path)
        await self._call(lambda conn, now: None, write=False)

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

    async def now(self) -> float:
        """The store's clock."""
        if self._closed:
            raise self._unavailable("the store is closed")
        return self.clock()

    async def load(self, uid: str, version: int | None = None) -> StoredSession | None:
        """The live session ``uid``, its deadline moved to now + timeout; its
        data as JSON texts, or none (``unchanged``) if its version is still
        ``version``.

        None for an unknown session, an ended one, or one whose deadline has
        passed (even if no one has claimed it yet: a load does not revive it).
        """

        def load(conn: sqlite3.Connection, now: float) -> StoredSession | None:
            live = _resolve(conn, uid, now)
            if live is None:
                return None
            timeout, ends_at, current = conn.execute(
                "SELECT timeout, ends_at, version FROM sessions WHERE uid = ?", (live,)
            ).fetchone()
            deadline = _clamp(now + timeout, ends_at)
            conn.execute("UPDATE sessions SET deadline = ? WHERE uid = ?", (deadline, live))
            if version is not None and current == version:
                return StoredSession(live, timeout, deadline, version=current, unchanged=True)
            rows = conn.execute("SELECT key, value FROM session_data WHERE uid = ?", (live,))
            return StoredSession(live, timeout, deadline, encoded=dict(rows), version=current)

        return await self._call(load, write=True)

    async def create(
        self, uid: str, timeout: float, data: Mapping[str, Any], lifetime: float | None = None
    ) -> float:
        """Store the live session ``uid``; its deadline, now + ``timeout``
        (or now + ``lifetime``, its absolute end, if that is earlier).

        A row already under ``uid`` (live or ended) is replaced, data and all.
        """
        items = [(uid, key, _dumps(value)) for key, value in data.items()]

        def create(conn: sqlite3.Connection, now: float) -> float:
            ends_at = None if lifetime is None else now + lifetime
            deadline = _clamp(now + timeout, ends_at)
            conn.execute("DELETE FROM session_data WHERE uid = ?", (uid,))
            conn.execute(
                "INSERT OR REPLACE INTO sessions"
                " (uid, timeout, deadline, ended, attempt, created, ends_at, version)"
                " VALUES (?, ?, ?, 0, 0, ?, ?, 1)",
                (uid, timeout, deadline, now, ends_at),
            )
            conn.executemany("INSERT INTO session_data (uid, key, value) VALUES (?, ?, ?)", items)
            return deadline

        return await self._call(create, write=True)

    async def rotate(self, uid: str, new_uid: str, grace: float) -> bool:
        """Move the live session ``uid`` (row and data) to ``new_uid`` and
        touch it, in one transaction; ``uid`` becomes an alias of it until
        ``grace`` seconds from now, aliases of ``uid`` follow it, and the
        rotation is announced as an event ``(uid, new_uid)``. False if
        ``uid`` was not live."""

        def rotate(conn: sqlite3.Connection, now: float) -> bool:
            row = conn.execute(_SELECT_LIVE, (uid, now + _EPSILON)).fetchone()
            if row is None:
                return False
            timeout, ends_at = row
            deadline = _clamp(now + timeout, ends_at)
            conn.execute(
                "UPDATE sessions SET uid = ?, deadline = ? WHERE uid = ?", (new_uid, deadline, uid)
            )
            conn.execute("UPDATE session_data SET uid = ? WHERE uid = ?", (new_uid, uid))
            conn.execute("DELETE FROM aliases WHERE until <= ?", (now,))
            conn.execute("UPDATE aliases SET target = ? WHERE target = ?", (new_uid, uid))
            if grace > 0:
                conn.execute(
                    "INSERT OR REPLACE INTO aliases (uid, target, until) VALUES (?, ?, ?)",
                    (uid, new_uid, now + grace),
                )
            conn.execute(
                "INSERT INTO events (uid, at, target) VALUES (?, ?, ?)", (uid, now, new_uid)
            )
            return True

        return await self._call(rotate, write=True)

    async def save(
        self, uid: str, changed: Mapping[str, Any], removed: Iterable[str]
    ) -> bool | int:
        """Write the ``changed`` keys, then delete the ``removed`` ones (a key
        in both ends up deleted), in the live session ``uid`` (or the one an
        old ``uid`` was rotated to, within its grace); the data's new version.
        False, writing nothing, if there is none. Keys not named are left as
        they are in the file; the deadline does not move."""
        items = [(key, _dumps(value)) for key, value in changed.items()]
        gone = list(removed)

        def save(conn: sqlite3.Connection, now: float) -> bool | int:
            live = _resolve(conn, uid, now)
            if live is None:
                return False
            conn.executemany(
                "INSERT OR REPLACE INTO session_data (uid, key, value) VALUES (?, ?, ?)",
                [(live, key, value) for key, value in items],
            )
            conn.executemany(
                "DELETE FROM session_data WHERE uid = ? AND key = ?", [(live, key) for key in gone]
            )
            conn.execute("UPDATE sessions SET version = version + 1 WHERE uid = ?", (live,))
            (version,) = conn.execute(
                "SELECT version FROM sessions WHERE uid = ?", (live,)
            ).fetchone()
            return int(version)

        return await self._call(save, write=True)

    async def exists(self, uid: str) -> bool:
        """Whether ``uid`` is live (deadline still ahead), without touching it."""
        return await self._call(lambda conn, now: _is_live(conn, uid, now), write=False)

    async def expire(self, uid: str) -> bool:
        """End the live session ``uid`` now, with cause ``"expired"``; it can
        be claimed at once. False if it was not live (unknown, ended, or past
        its deadline, in which case it ends with cause ``"timeout"``)."""

        def expire(conn: sqlite3.Connection, now: float) -> bool:
            if not _is_live(conn, uid, now):
                return False
            conn.execute(
                "UPDATE sessions SET ended = 1, cause = 'expired', deadline = ?,"
                " delivery_id = NULL, attempt = 0, lease_owner = NULL, lease_until = ?"
                " WHERE uid = ?",
                (now, now, uid),
            )
            return True

        return await self._call(expire, write=True)

    async def claim(self, owner: str, lease: float, limit: int) -> list[Expiry]:
        """Take up to ``limit`` ended sessions for ``lease`` seconds.

        Claimable: a live session whose deadline has passed (it ends now, with
        cause ``"timeout"``, or ``"lifetime"`` if that deadline was its
        absolute end), a session ended by ``expire()`` and not claimed
        yet, and a claimed one whose lease has run out (redelivered with the
        same ``delivery_id`` and ``attempt`` + 1). Earliest deadlines first.
        One ``BEGIN IMMEDIATE`` transaction, so concurrent claims in any
        processes never take the same session while its lease holds.
        """
        if limit <= 0:
            return []

        def claim(conn: sqlite3.Connection, now: float) -> list[Expiry]:
            due = now + _EPSILON
            rows = conn.execute(
                "SELECT uid, deadline, ended, cause, delivery_id, attempt, ends_at FROM sessions"
                " WHERE ended = 0 AND deadline <= ? ORDER BY deadline LIMIT ?",
                (due, limit),
            ).fetchall()
            rows += conn.execute(
                "SELECT uid, deadline, ended, cause, delivery_id, attempt, ends_at FROM sessions"
                " WHERE ended = 1 AND lease_until <= ? ORDER BY deadline LIMIT ?",
                (due, limit),
            ).fetchall()
            rows.sort(key=lambda row: (row[1], row[0]))
            conn.execute("DELETE FROM aliases WHERE until <= ?", (now,))
            claims: list[Expiry] = []
            for uid, deadline, ended, cause, delivery_id, attempt, ends_at in rows[:limit]:
                if not ended:
                    cause = "lifetime" if ends_at is not None and deadline >= ends_at else "timeout"
                if delivery_id is None:
                    delivery_id = f"{uid}:{secrets.token_hex(8)}"
                attempt += 1
                conn.execute(
                    "UPDATE sessions SET ended = 1, cause = ?, delivery_id = ?, attempt = ?,"
                    " lease_owner = ?, lease_until = ? WHERE uid = ?",
                    (cause, delivery_id, attempt, owner, now + lease, uid),
                )
                claims.append(Expiry(uid, _read_data(conn, uid), delivery_id, attempt, cause))
            return claims

        return await self._call(claim, write=True)

    async def renew(self, expiry: Expiry, owner: str, lease: float) -> bool:
        """Move the lease end of the claimed session to now + ``lease``, if
        ``owner`` still holds this delivery of it (same ``delivery_id`` and
        ``attempt``); False, changing nothing, if not."""

        def renew(conn: sqlite3.Connection, now: float) -> bool:
            updated = conn.execute(
                "UPDATE sessions SET lease_until = ? WHERE uid = ? AND ended = 1"
                " AND delivery_id = ? AND attempt = ? AND lease_owner = ?",
                (now + lease, expiry.uid, expiry.delivery_id, expiry.attempt, owner),
            ).rowcount
            return bool(updated)

        return await self._call(renew, write=True)

    async def ack(self, expiry: Expiry) -> None:
        """Forget the claimed session and announce its end (one event), if it
        is still there under ``expiry.delivery_id``; else nothing (it was
        acknowledged already, e.g. after a redelivery). Prunes events older
        than ``EVENTS_KEPT_FOR``."""

        def ack(conn: sqlite3.Connection, now: float) -> None:
            deleted = conn.execute(
                "DELETE FROM sessions WHERE uid = ? AND ended = 1 AND delivery_id = ?",
                (expiry.uid, expiry.delivery_id),
            ).rowcount
            if deleted:
                conn.execute("DELETE FROM session_data WHERE uid = ?", (expiry.uid,))
                conn.execute("INSERT INTO events (uid, at) VALUES (?, ?)", (expiry.uid, now))
            conn.execute("DELETE FROM events WHERE at < ?", (now - EVENTS_KEPT_FOR,))

        await self._call(ack, write=True)

    async def events(self, cursor: str | None) -> tuple[list[Event], str]:
        """Uids whose end was announced after ``cursor`` (and ``(old, new)``
        pairs for rotations), oldest first, at most
        ``EVENTS_PER_CALL`` of them, and the cursor to pass next.

        ``None`` starts from now: no uids, and the current cursor. A cursor
        ahead of the file (the file was replaced) restarts from now. Events
        pruned before they were read are lost to that reader.
        """
        after = -1
        if cursor is not None:
            try:
                after = int(cursor)
            except ValueError:
                raise ValueError(f"not an events cursor of this store: {cursor!r}") from None

        def events(conn: sqlite3.Connection, now: float) -> tuple[list[Event], str]:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
            last = row[0] if row is not None else 0
            if cursor is None or after > last:
                return [], str(last)
            rows = conn.execute(
                "SELECT id, uid, target FROM events WHERE id > ? ORDER BY id LIMIT ?",
                (after, EVENTS_PER_CALL),
            ).fetchall()
            if not rows:
                return [], str(after)
            found: list[Event] = [uid if to is None else (uid, to) for _, uid, to in rows]
            return found, str(rows[-1][0])

        return await self._call(events, write=False)

    async def next_deadline(self) -> float | None:
        """The earliest of: live sessions' deadlines (past ones included: they
        are due), claimed sessions' lease ends, and now if a session ended by
        ``expire()`` waits to be claimed. None if there is no session."""

        def next_deadline(conn: sqlite3.Connection, now: float) -> float | None:
            (live,) = conn.execute("SELECT MIN(deadline) FROM sessions WHERE ended = 0").fetchone()
            (leased,) = conn.execute(
                "SELECT MIN(lease_until) FROM sessions WHERE ended = 1 AND delivery_id IS NOT NULL"
            ).fetchone()
            unclaimed = conn.execute(
                "SELECT 1 FROM sessions WHERE ended = 1 AND delivery_id IS NULL LIMIT 1"
            ).fetchone()
            times = [t for t in (live, leased) if t is not None]
            if unclaimed is not None:
                times.append(now)
            return min(times) if times else None

        return await self._call(next_deadline, write=False)

    # -- inspection: read-only transactions, no touch ---------------------------

    async def scan(self, cursor: str | None, limit: int) -> tuple[list[SessionInfo], str | None]:
        """Live sessions, latest deadline first (for sessions of one timeout:
        the most recently active first), then by uid, ``limit`` at a time.

        The cursor is the (deadline, uid) of the last session returned, and a
        page holds those strictly after it in that order. So a full scan
        returns no session twice: a session touched during the scan moves to
        a later deadline, behind the cursor (it is left out if it had not
        been returned yet, as are sessions created during the scan).
        Sessions live throughout the scan and not touched are all returned.
        """
        if limit < 1:
            raise ValueError(f"a scan limit is at least 1, not {limit!r}")
        after: tuple[float, str] | None = None
        if cursor is not None:
            mark, sep, last_uid = cursor.partition(":")
            try:
                after = (float(mark), last_uid)
            except ValueError:
                after = None
            if not sep or after is None:
                raise ValueError(f"not a scan cursor of this store: {cursor!r}")

        def scan(conn: sqlite3.Connection, now: float) -> tuple[list[SessionInfo], str | None]:
            query = f"SELECT {_INFO_COLUMNS} FROM sessions WHERE ended = 0 AND deadline > ?"
            params: list[Any] = [now + _EPSILON]
            if after is not None:
                query += " AND (deadline < ? OR (deadline = ? AND uid < ?))"
                params += [after[0], after[0], after[1]]
            query += " ORDER BY deadline DESC, uid DESC LIMIT ?"
            rows = conn.execute(query, [*params, limit + 1]).fetchall()
            infos = [_info(conn, row) for row in rows[:limit]]
            if len(rows) <= limit:
                return infos, None
            last = rows[limit - 1]
            return infos, f"{last[3]!r}:{last[0]}"

        return await self._call(scan, write=False)

    async def info(self, uid: str) -> SessionInfo | None:
        """The live session ``uid`` (not an alias), or None. ``last_access``
        is ``deadline - timeout``, or the creation if later: exact, except
        that a session whose deadline is its absolute end records no later
        touch (it is then the earliest time that touch can have been)."""

        def info(conn: sqlite3.Connection, now: float) -> SessionInfo | None:
            row = conn.execute(
                f"SELECT {_INFO_COLUMNS} FROM sessions WHERE uid = ? AND ended = 0"
                " AND deadline > ?",
                (uid, now + _EPSILON),
            ).fetchone()
            return None if row is None else _info(conn, row)

        return await self._call(info, write=False)

    async def count(self) -> int:
        """Live sessions now (a count over the index of live deadlines)."""

        def count(conn: sqlite3.Connection, now: float) -> int:
            (n,) = conn.execute(
                "SELECT COUNT(*) FROM sessions WHERE ended = 0 AND deadline > ?",
                (now + _EPSILON,),
            ).fetchone()
            return int(n)

        return await self._call(count, write=False)

    async def deadlines(self, now: float, horizon: float, buckets: int) -> list[int]:
        """Live sessions ending in each slice of ``(now, now + horizon]``
        (one grouped query over the index of live deadlines)."""
        width = _bucket_bounds(now, horizon, buckets)

        def deadlines(conn: sqlite3.Connection, _now: float) -> list[int]:
            counts = [0] * buckets
            rows = conn.execute(
                "SELECT CAST((deadline - ?) / ? AS INTEGER), COUNT(*) FROM sessions"
                " WHERE ended = 0 AND deadline > ? AND deadline <= ? GROUP BY 1",
                (now, width, now, now + horizon),
            )
            for bucket, n in rows:
                counts[min(buckets - 1, max(0, int(bucket)))] += int(n)
            return counts

        return await self._call(deadlines, write=False)


_INFO_COLUMNS = "uid, created, timeout, deadline"


def _info(conn: sqlite3.Connection, row: tuple[Any, ...]) -> SessionInfo:
    uid, created, timeout, deadline = row
    last = deadline - timeout
    if created is not None and last < created:
        last = created
    return SessionInfo(uid, created, last, deadline, _read_data(conn, uid))


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


_SELECT_LIVE = "SELECT timeout, ends_at FROM sessions WHERE uid = ? AND ended = 0 AND deadline > ?"


def _clamp(deadline: float, ends_at: float | None) -> float:
    """An idle deadline, never past the absolute end."""
    return deadline if ends_at is None or deadline <= ends_at else ends_at


def _resolve(conn: sqlite3.Connection, uid: str, now: float) -> str | None:
    """The uid of the live session ``uid`` names: itself, or the session an
    old uid was rotated to (within its grace); None if there is none."""
    if _is_live(conn, uid, now):
        return uid
    alias = conn.execute(
        "SELECT target FROM aliases WHERE uid = ? AND until > ?", (uid, now)
    ).fetchone()
    if alias is None or not _is_live(conn, alias[0], now):
        return None
    target: str = alias[0]
    return target


def _is_live(conn: sqlite3.Connection, uid: str, now: float) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sessions WHERE uid = ? AND ended = 0 AND deadline > ?",
        (uid, now + _EPSILON),
    ).fetchone()
    return row is not None


def _read_data(conn: sqlite3.Connection, uid: str) -> dict[str, Any]:
    rows = conn.execute("SELECT key, value FROM session_data WHERE uid = ?", (uid,))
    return {key: json.loads(value) for key, value in rows}


if TYPE_CHECKING:

    def _is_a_session_store(store: SQLiteStore) -> SessionStore:
        return store
