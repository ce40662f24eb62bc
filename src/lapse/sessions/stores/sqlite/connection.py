"""The SQLite store's file checks: which file a path names, why SQLite cannot
open one, and which errors retrying does not mend (used by the runner)."""

from __future__ import annotations

import errno
import os
import sqlite3

__all__ = [
    "PERMANENT_CODES",
    "PERMANENT_ERRNOS",
    "SIDECARS",
    "file_id",
    "is_busy",
    "why_cannot_open",
]


def file_id(path: str) -> tuple[int, int] | None:
    """The (device, inode) of the file at ``path``, None if there is none;
    OSError if that cannot be told (a permission error, say)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


PERMANENT_CODES = frozenset(
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

PERMANENT_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG}
)
"""Errors looking at the path that retrying does not mend."""


def why_cannot_open(path: str) -> str:
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


SIDECARS = ("-wal", "-shm")
"""The files SQLite keeps next to a database in WAL mode."""


def is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)
