"""The SQLite store: sessions in one file, shared by the processes of one machine.

Sessions survive a restart, and every process that opens the same file sees
the same sessions, claims each ended session exactly once per lease, and
reads the same end-of-session events.

Guarantees:

- **Atomic operations.** Each method is atomic: its statements run in one
  SQLite transaction, and every method that writes runs in a ``BEGIN
  IMMEDIATE`` one, which takes the file's write lock first, so a method is
  atomic across processes (two ``claim`` calls in two processes never hand
  out the same session while its lease holds).
- **Batched.** The calls made while the worker is busy, or in one turn of
  the event loop, run together (:mod:`.batch`): each run of consecutive
  writes as ONE transaction, each run of reads as one read transaction, one
  thread hop and one event-loop wake-up per transaction instead of one per
  call (the ~50 loads of 50 concurrent requests: one ``BEGIN IMMEDIATE`` ..
  ``COMMIT``). Each call keeps its own outcome: one that raises fails alone
  (the rest are run again without it), an error of the file fails each
  call with a ``StoreUnavailable`` of its own, and a call is answered only
  once the transaction holding it has committed.
- **The event loop never waits on SQLite.** All SQLite work runs in one
  dedicated worker thread per store, which owns the store's only connection;
  the async methods await it. Calls run in the order they were made.
- **Durability.** The file is in WAL mode with ``synchronous=NORMAL``
  (``?synchronous=`` to change it): a write that returned survives a crash
  of the process (or of every process), but a power loss or OS crash can
  roll back the last transactions committed since the WAL was last synced
  (at a checkpoint); the file stays consistent. ``FULL`` (or ``EXTRA``)
  syncs the WAL at every commit (every batch): a write that returned
  survives a power loss too. ``OFF`` never syncs: a power loss or OS crash
  may corrupt the file. Sessions are soft state, so the default trades the
  last touches before a power loss for not syncing on every batch.
- **No polling when idle.** ``wait_for_news`` sleeps on an inotify watch
  of the ``-wal`` (or looks at the WAL index header where inotify is not
  there) and asks the store only after a commit (:mod:`.news`).
- **Contention.** A lock held by another process is waited for up to
  ``busy_timeout`` seconds; past that, as on any other SQLite error (missing
  directory, a file that is not a database, a full disk), the method raises
  :class:`~lapse.sessions.store.StoreUnavailable` naming the file, raised
  ``from`` the ``sqlite3`` error. A failed ``open`` is retried by the next
  call.
- **A bound on stalls, not on queues.** A call fails (``StoreUnavailable``)
  once it has waited ``timeout`` seconds (1 by default) during which the
  worker made no progress: it is stuck on a lock another process holds, or
  on a stalled disk. A long queue
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

Schema (``PRAGMA user_version = 4``; a version 1, 2 or 3 file is migrated
in place by the first process of this version that opens it, after which
processes of older versions refuse the file):

- ``sessions``: one row per session, live (``ended = 0``) or ended and
  waiting for its expiry hook to be acknowledged (``ended = 1``). An ended
  row's ``lease_until`` is when it may be claimed (again): the moment it
  ended for one never claimed, the end of its lease for one claimed.
  ``created`` and ``ends_at`` (the absolute end, NULL for none; NULL both in
  rows from version 1) are kept by a rotation; ``deadline`` never passes
  ``ends_at``. ``version`` counts the writes of the session's data (1 at
  creation, one more per ``save``; 0 in rows from before version 3), so
  that ``load`` need not read data a process already holds. ``principal``
  is the user the session is bound to (NULL when unbound, and in rows from
  before version 4), indexed by ``sessions_principal`` over the bound rows
  (on the principal alone, so a touch never writes to it); see
  :mod:`.principals`.
- ``aliases``: the old uids of rotated sessions, each with the uid it now
  names (kept up to date by further rotations) until its grace ends.
- ``session_data``: one row per key (``value`` is JSON), so that ``save``
  writes only the keys that changed and two requests changing different keys
  of one session both persist.
- ``events``: the uids whose end was acknowledged, with an increasing id
  (the events cursor), and rotations (``uid`` the old uid, ``target`` the
  new one; NULL for an end); rows older than ten minutes are pruned.

The package: :mod:`.store` (the operations), :mod:`.inspection` (read-only
inspection), :mod:`.principals` (sessions by principal), :mod:`.runner` (the
connection, its worker thread, the stall bound, the file-replaced check),
:mod:`.batch` (a batch of calls as transactions), :mod:`.connection` (file
checks), :mod:`.news` and :mod:`.watch` (``wait_for_news``),
:mod:`.schema` (the schema version and its migrations), :mod:`.queries` (the
statements), :mod:`.config` (the URL and path checks); the SQL itself is
in ``schema.sql``, ``aliases.sql``, ``principals.sql``, ``migrate_*.sql``
and ``queries.sql``, read once at import.
"""

from __future__ import annotations

from lapse.sessions.stores.sqlite.store import EVENTS_KEPT_FOR, EVENTS_PER_CALL, SQLiteStore

__all__ = ["EVENTS_KEPT_FOR", "EVENTS_PER_CALL", "SQLiteStore"]
