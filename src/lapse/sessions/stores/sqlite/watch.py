"""Linux inotify on a SQLite file's WAL: a wait that costs nothing while no
process writes (see :mod:`.news`).

Every commit to a WAL-mode file appends its pages to the ``-wal`` with
``write``/``pwrite``, which the kernel reports to an inotify watch as
``IN_MODIFY``, whichever process wrote. :class:`WalWatch` watches the
``-wal`` for that and the database file and its ``-wal`` for being renamed,
deleted or unlinked (``IN_MOVE_SELF``, ``IN_DELETE_SELF``, ``IN_ATTRIB``: the
file replaced at its path), through ``ctypes`` (no compiler, no package).
Where inotify cannot be had (not Linux, no ``libc``, out of watches),
:func:`watch_wal` says None and :mod:`.news` looks at the WAL index instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import struct

__all__ = ["WalWatch", "watch_wal"]

_IN_MODIFY = 0x002
_IN_ATTRIB = 0x004
_IN_MOVE_SELF = 0x800
_IN_DELETE_SELF = 0x400
_IN_IGNORED = 0x8000
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_MOVED = _IN_ATTRIB | _IN_MOVE_SELF | _IN_DELETE_SELF
_EVENT = struct.Struct("iIII")


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


class WalWatch:
    """An inotify descriptor watching one database's file and ``-wal``."""

    def __init__(self, fd: int, wal: int) -> None:
        self._fd = fd
        self._wal = wal
        self.moved = False
        """Whether the file or its ``-wal`` was renamed, deleted or unlinked."""

    async def wait(self, seconds: float) -> bool:
        """Until a watched event, at most ``seconds``; whether one came (the
        events read, ``moved`` set if one says so)."""
        loop = asyncio.get_running_loop()
        came: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not came.done():
                came.set_result(None)

        loop.add_reader(self._fd, readable)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await came
        finally:
            loop.remove_reader(self._fd)
        return self._drain()

    def _drain(self) -> bool:
        got = False
        while True:
            try:
                data = os.read(self._fd, 4096)
            except BlockingIOError:
                return got
            if not data:
                return got
            got = True
            offset = 0
            while offset + _EVENT.size <= len(data):
                wd, mask, _, size = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + size
                if mask & (_MOVED | _IN_IGNORED) or wd != self._wal:
                    self.moved = True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def watch_wal(path: str) -> WalWatch | None:
    """A watch on the database at ``path`` and its ``-wal`` (both must
    exist), or None where inotify cannot give one."""
    if _LIBC is None:
        return None
    fd = int(_LIBC.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC))
    if fd < 0:
        return None
    wal = int(_LIBC.inotify_add_watch(fd, os.fsencode(path + "-wal"), _IN_MODIFY | _MOVED))
    main = int(_LIBC.inotify_add_watch(fd, os.fsencode(path), _MOVED))
    if wal < 0 or main < 0:
        os.close(fd)
        return None
    return WalWatch(fd, wal)
